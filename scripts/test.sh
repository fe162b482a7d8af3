#!/usr/bin/env bash
# The test suite as CI runs it. Triton kernels run in the interpreter on machines without CUDA.
# Run `pytest` (not `python -m pytest`): the repository root must not be on sys.path, or the folder
# `kernels/` would shadow the import name that Hugging Face's `kernels` package owns.
set -euo pipefail
cd "$(dirname "$0")/.."
exec pytest -q -ra --durations=15 "$@"
