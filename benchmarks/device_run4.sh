#!/usr/bin/env bash
# The last H200 call of this session: GPU-only tests, the decode-kernel table (tile sweep of the 2.9B layer), the
# end-to-end generate() benchmark. Each part has its own time limit so one overrun does not lose the others.
set -uo pipefail
export PYTHONUNBUFFERED=1
timeout 90 python3 -m pytest tests/test_decode_kernel.py tests/test_modeling.py -q -p no:cacheprovider \
    -k "never_waits or flex or published or equations" 2>&1 | tail -3 | tee $OUT/pytest_gpu.log
timeout 150 python3 benchmarks/decode_kernel.py --sweep --out $OUT/decode_kernel_h200 > $OUT/decode_kernel.log 2>&1
grep -v "^  sweep\|^{" $OUT/decode_kernel.log | tail -30
timeout 330 python3 benchmarks/e2e_generate.py --out $OUT/e2e_h200 > $OUT/e2e.log 2>&1
tail -c 5000 $OUT/e2e.log
