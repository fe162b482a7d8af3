#!/usr/bin/env bash
# Refreshes constraints.txt, the versions scripts/install.sh installs: resolves the newest releases of every
# dependency in a fresh virtualenv (torch stays 2.13.0, the CPU wheel), runs the whole test suite there, and
# writes the new lock only if the suite passes. Run it from any Python >= 3.11: `bash scripts/lock.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
python -m venv "$workdir/venv"
py="$workdir/venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet "torch==2.13.0"
"$py" -m pip install --quiet -e ".[test,bench]"
PATH="$workdir/venv/bin:$PATH" bash scripts/test.sh
{
    echo "# The exact versions the test suite last passed on; scripts/install.sh installs them as constraints."
    echo "# Written by scripts/lock.sh on $(date -u +%Y-%m-%d) (Python $("$py" -c 'import platform; print(platform.python_version())')); do not edit by hand."
    echo "# torch is not locked here: install.sh keeps an existing build or installs torch==2.13.0."
    "$py" -m pip freeze --exclude-editable | grep -viE '^(torch|pip|setuptools|wheel|nvidia-[a-z0-9_-]+)=='
} >constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "constraints.txt refreshed: $(grep -cv '^#' constraints.txt) packages locked"
