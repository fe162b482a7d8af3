#!/usr/bin/env bash
# Installs MELT and what it needs into the current Python environment, at the versions of constraints.txt:
# the exact set the test suite last passed on (refresh it with `bash scripts/lock.sh`).
#   scripts/install.sh [EXTRAS] [--newest PKG...]
#   - torch: keeps an existing build (a CUDA one on GPU machines) and the triton that build pins; otherwise
#     installs torch==2.13.0, the CPU wheel on machines without a GPU (an unpinned torch would pull several GB
#     of CUDA packages), with the locked triton.
#   - then this package, editable, with EXTRAS (default: test,bench).
#   - `--newest PKG...`: those packages at their newest releases instead of the locked versions (CI uses it to
#     catch drift before users do); everything else stays locked.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="test,bench"
if [ $# -gt 0 ] && [ "$1" != "--newest" ]; then
    extras="$1"
    shift
fi
newest=()
if [ $# -gt 0 ]; then
    [ "$1" = "--newest" ] || { echo "usage: scripts/install.sh [EXTRAS] [--newest PKG...]" >&2; exit 2; }
    shift
    newest=("$@")
fi

log="$(mktemp)"
constraints="$(mktemp)"
trap 'rm -f "$log" "$constraints"' EXIT
# Two kinds of lines are not relayed after a successful install, and only these: setuptools' informational
# notice "Editable installation ... be careful with folders in your working directory" (printed for every editable
# install that maps folders to package names, as pyproject.toml does), and pip's "Location 'file://...' is ignored"
# for a local index directory named in the machine's own pip configuration that lacks a package. Everything else
# pip prints is shown, and on failure the whole log is.
show_log() {
    awk '/BuildBackendWarning: Editable installation\./ {skip = 1}
         skip && /with strategy, WheelFile/ {skip = 0; next}
         /^WARNING: Location .file:.* is ignored: it is neither a file nor a directory\.$/ {next}
         !skip' "$log"
}
pip_install() {
    if ! python -m pip install --quiet "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "scripts/install.sh: pip install $* failed (log above)" >&2
        exit 1
    fi
    show_log
}

python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
lock_pattern="^(torch)=="
if python -c "import torch" >/dev/null 2>&1; then
    lock_pattern="^(torch|triton)=="  # an existing torch build pins its own triton
else
    pip_install "torch==2.13.0" -c constraints.txt
fi
for pkg in "${newest[@]}"; do
    lock_pattern="${lock_pattern%)==}|${pkg})=="
done
grep -viE "$lock_pattern" constraints.txt >"$constraints"
if [ ${#newest[@]} -gt 0 ]; then
    pip_install --upgrade -c "$constraints" -e ".[${extras}]" "${newest[@]}"
else
    pip_install -c "$constraints" -e ".[${extras}]"
fi
python -c "import torch, transformers, melt; print(f'melt installed: torch {torch.__version__}, transformers {transformers.__version__}')"
