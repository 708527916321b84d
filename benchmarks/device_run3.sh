#!/usr/bin/env bash
# One device call: the GPU tests (kernel in bf16, flex_attention), the decode-kernel benchmark with a tile sweep,
# and the per-GPU TP share (paper Fig. 5) with the kernel's final defaults.
set -uo pipefail
export PYTHONUNBUFFERED=1
CUDA_LAUNCH_BLOCKING=1 python3 - <<'PY' 2>&1 | tail -4
import torch
from modeling_mlra.mlra_decode_kernel import mlra_decode_attention
for context in (1 << 20, 1 << 21):
    cache = torch.randn(1, context, 576, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 1, 1, 64, 512, device="cuda", dtype=torch.bfloat16)
    qr = torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
    out = mlra_decode_attention(q, qr, cache, torch.full((1,), context, device="cuda"), None, 1, 0.07)
    torch.cuda.synchronize()
    print("MLA share", context, "ok", out.float().norm().item())
PY
python3 -m pytest tests/test_decode_kernel.py tests/test_modeling.py -q -x -p no:cacheprovider 2>&1 | tail -4
python3 benchmarks/decode_kernel.py --sweep --out $OUT/decode_kernel_h200 > $OUT/decode_kernel.log 2>&1; grep -v "^  sweep\|^{" $OUT/decode_kernel.log | tail -40
python3 benchmarks/tp_share_attention.py --output-dir $OUT 2>&1 | tail -12
