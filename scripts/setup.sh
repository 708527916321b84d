#!/usr/bin/env bash
# Installs the package, its test tools, lm-eval (the `eval` extra) and transformers' server (the `serve` extra)
# into the active Python. A torch that is already installed is kept; otherwise the CPU build torch==2.13.0 is
# installed (plain `torch` would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[dev,eval,serve]"
python -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')"
