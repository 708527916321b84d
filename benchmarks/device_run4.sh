#!/usr/bin/env bash
# The last H200 call of this session: the decode-kernel table with the final defaults, then the end-to-end
# generate() benchmark. Each part has its own time limit so one overrun does not lose the other.
set -uo pipefail
export PYTHONUNBUFFERED=1
timeout 100 python3 benchmarks/decode_kernel.py --out $OUT/decode_kernel_h200 > $OUT/decode_kernel.log 2>&1
grep -v "^{" $OUT/decode_kernel.log | tail -28
timeout 360 python3 benchmarks/e2e_generate.py --stop-after-s 320 --compiled-before-s 240 --out $OUT/e2e_h200 > $OUT/e2e_h200.log 2>&1
tail -c 7000 $OUT/e2e_h200.md
