#!/bin/bash
# One H200 call (the `run` tool) for the decode kernel: its GPU tests (bf16 included) and the kernel table (bf16 and
# fp8 caches, the copy rate in the same run; extra arguments go to decode_kernel.py, e.g. --sweep). Files under $OUT.
#   bash benchmarks/device_run_decode_kernel.sh --sweep
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/decode_kernel_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total --format=csv | tee "$OUT/gpu.txt"
start=$SECONDS
timeout 240 python3 -m pytest tests/test_decode_kernel.py -q -p no:cacheprovider -x >"$OUT/pytest_decode_kernel.log" 2>&1
echo "pytest rc=$? in $((SECONDS - start)) s"; tail -4 "$OUT/pytest_decode_kernel.log"
start=$SECONDS
timeout 360 python3 benchmarks/decode_kernel.py "$@" --out "$OUT/decode_kernel_h200" 2>&1 | tee "$OUT/decode_kernel_h200.log" | grep -v "^{"
echo "benchmark rc=$? in $((SECONDS - start)) s"
