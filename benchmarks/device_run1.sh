#!/usr/bin/env bash
# One device call: the GPU tests of the kernel and attention paths (bf16 included), then the decode-kernel benchmark.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
python3 -m pytest tests/test_decode_kernel.py tests/test_modeling.py tests/test_cache.py -q -x -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/pytest_gpu.log
python3 benchmarks/decode_kernel.py --out $OUT/decode_kernel_h200 2>&1 | tee $OUT/decode_kernel.log | tail -40
