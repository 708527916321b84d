#!/usr/bin/env bash
# One device call: the decode-kernel benchmark with a tile sweep, and the per-GPU TP share attention (paper Fig. 5).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 benchmarks/decode_kernel.py --sweep --out $OUT/decode_kernel_h200 > $OUT/decode_kernel.log 2>&1; tail -45 $OUT/decode_kernel.log
python3 benchmarks/tp_share_attention.py --output-dir $OUT 2>&1 | tail -25
