#!/usr/bin/env bash
# Installs MELT and what it needs into the current Python environment.
#   - torch: keeps an existing build (a CUDA one on GPU machines); otherwise installs torch==2.13.0, the
#     CPU wheel on machines without a GPU (an unpinned torch would pull several GB of CUDA packages).
#   - then this package, editable, with the extras given as arguments (default: test,bench).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,bench}"
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[${extras}]"
python -c "import torch, transformers, melt; print(f'melt installed: torch {torch.__version__}, transformers {transformers.__version__}')"
