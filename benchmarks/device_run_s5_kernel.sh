#!/bin/bash
# One H200 call for branch s5-kernel: GPU tests of the decode kernel, then the benchmark, bf16 only (copy rate in each
# process): the 2.9B layer at batch 1 with split-count and tile candidates, then 16 x 32K, the share and MLA with the
# merge's programmatic launch off (pdl=0) and 2 stages; the diagnostic (e) and the control (d) at 16 x 32K. Triton's cache filled first in parallel processes.
set -o pipefail
export PYTHONUNBUFFERED=1
R=/tmp/s5r
mkdir -p $R
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee $R/gpu.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
start=$SECONDS
compile() { timeout 110 python3 benchmarks/compile_decode_kernel.py "$@" 2>&1 | grep "^|"; }
{
  for shapes in "2.9B MLRA-4 layer" "2.9B grid" "TP-4 share" "MLA"; do compile --shapes "$shapes" & done
  for c in pdl=0 BLOCK_N=32,num_stages=4 num_stages=2; do compile --shapes "2.9B MLRA-4 layer" --skip-defaults --choices $c & done
  for c in pdl=0 num_stages=2; do compile --shapes "TP-4 share" --skip-defaults --choices $c & done
  compile --shapes "MLA" --skip-defaults --choices pdl=0 &
  wait
} >$R/compile.md &
compiling=$!
timeout 100 python3 -m pytest tests/test_decode_kernel.py -q -rf -p no:cacheprovider -n 8 >$R/pytest_decode_kernel.log 2>&1
echo "pytest rc=$? in $((SECONDS - start)) s"; tail -4 $R/pytest_decode_kernel.log
wait $compiling
echo "compiled in $((SECONDS - start)) s"
bench() {
  timeout "$1" python3 benchmarks/decode_kernel.py "${@:3}" --no-fp8 --sweep --out $R/$2 2>&1 | tee $R/$2.log | grep -v "^{"
  echo "$2 rc=$? at $((SECONDS - start)) s"
}
bench 70 batch1 --only c:1x32K c:1x128K --choices pdl=0 BLOCK_N=32,num_stages=4 num_stages=2 num_splits=33 num_splits=44 num_splits=132
bench 95 large --only c:16x32K a:1x128K a:1x512K a:1x1M b:1x128K b:1x512K b:1x1M --choices pdl=0 num_stages=2
bench 40 diag --only e:16x32K d:64x32K
tar czf $OUT/s5.tgz -C $R . && cp $R/*.md $R/pytest_decode_kernel.log $OUT/
