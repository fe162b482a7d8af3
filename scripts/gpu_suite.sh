#!/usr/bin/env bash
# Runs benchmarks.gpu_suite on the lent GPU machine as that machine is (README "GPU" gives the `device` call):
# installs the wheels carried in .whl/ (made by scripts/gpu_wheels.sh on a CPU machine) into a target directory,
# without their dependencies, so the machine's torch and triton (CUDA builds) stay; makes this checkout's packages
# importable under their installed names (melt, melt_kernels, melt_convert, melt_benchmarks, as pyproject.toml maps
# them), like an editable install; then runs the suite with $OUT as its output directory and a log beside it.
#   bash scripts/gpu_suite.sh                          # every part, the default budget (420 s)
#   bash scripts/gpu_suite.sh --parts d --budget-s 150 # extra arguments go to the suite, e.g. to rerun one part
# Without $OUT (e.g. on a workstation) it writes to runs/gpu_suite.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-runs/gpu_suite}
mkdir -p "$out"
site=${MELT_GPU_SITE:-/tmp/melt-gpu-site}
rm -rf "$site"
mkdir -p "$site"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "gpu_suite.sh: installing .whl/ failed" >&2; exit 1; }
else
    echo "gpu_suite.sh: no .whl/ here (run scripts/gpu_wheels.sh on a CPU machine and carry .whl); using what is installed" >&2
fi
"$python" - "$site" <<'EOF' || exit 1
"""Link each package of pyproject's [tool.setuptools.package-dir] (import name -> folder) into the target dir."""
import os
import sys
import tomllib

site = sys.argv[1]
with open("pyproject.toml", "rb") as f:
    package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
for name, folder in package_dir.items():
    os.symlink(os.path.abspath(folder), os.path.join(site, name))
EOF
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# -P for every Python process (pytest's xdist workers included): the checkout's root stays off sys.path, where
# `kernels/` would shadow Hugging Face's `kernels` package.
export PYTHONSAFEPATH=1
# What the suite will run with (torch must still be the machine's CUDA build).
"$python" -c "import torch, triton, transformers, melt, melt_kernels; print(f'gpu_suite.sh: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, transformers {transformers.__version__}, melt {melt.__version__}; {torch.cuda.device_count()} GPU(s)')" \
    || { echo "gpu_suite.sh: the environment is broken (see above)" >&2; exit 1; }
"$python" -m melt_benchmarks.gpu_suite --out "$out" "$@" 2>&1 | tee "$out/gpu_suite.log"
exit "${PIPESTATUS[0]}"
