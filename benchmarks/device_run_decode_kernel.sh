#!/bin/bash
# One H200 call (the `run` tool) for the decode kernel. Triton's cache is filled with the benchmark's launches first, in
# parallel processes (compile_decode_kernel.py compiles exactly what a launch compiles), beside the kernel's GPU tests
# (bf16 included; pytest-xdist if its wheels are carried in .whl/); then the table, --quick --sweep unless other
# arguments are given (they go to decode_kernel.py). Files under $OUT.
#   bash benchmarks/device_run_decode_kernel.sh [--sweep ...]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/decode_kernel_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
workers=""
if ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl; then
  export PYTHONPATH=/tmp/site
  workers="-n 8"
fi
start=$SECONDS
compile() { python3 benchmarks/compile_decode_kernel.py "$@" 2>&1 | grep "^|"; }
{
  for shapes in share layer MLA grid; do compile --shapes "$shapes" & done
  compile --shapes "TP-4 share" "MLRA-4 layer" --skip-defaults --choices HOIST_OFFSETS=0 &
  compile --shapes "share fp8" "layer fp8" --skip-defaults --choices BLOCK_N=64,num_stages=3 &
  wait
} >"$OUT/compile_decode_kernel.md" &
compiling=$!
timeout 120 python3 -m pytest tests/test_decode_kernel.py tests/test_fp8_cache.py tests/test_continuous_batching.py \
  -q -rf -p no:cacheprovider $workers >"$OUT/pytest_decode_kernel.log" 2>&1
echo "pytest rc=$? in $((SECONDS - start)) s"; tail -3 "$OUT/pytest_decode_kernel.log"
wait $compiling
echo "compiled in $((SECONDS - start)) s"
start=$SECONDS
arguments=("$@")
[ ${#arguments[@]} -eq 0 ] && arguments=(--quick --sweep)
timeout 150 python3 benchmarks/decode_kernel.py "${arguments[@]}" --out "$OUT/decode_kernel_h200" 2>&1 \
  | tee "$OUT/decode_kernel_h200.log" | grep -v "^{"
echo "benchmark rc=$? in $((SECONDS - start)) s"
