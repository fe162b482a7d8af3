#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that benchmarks.gpu_suite needs and the lent GPU machine lacks.
# Run it HERE, on a CPU machine with network, in the environment the tests pass in; then make the `device` call
# that README "GPU" gives (carry [".whl"], command `bash scripts/gpu_suite.sh`).
#
# The lent machine (/work/.library/device/KINDS.md): python3 3.12 with torch 2.11 + CUDA, triton 3.6,
# transformers 5.17, huggingface_hub 1.33.0, tokenizers 0.23.2, safetensors 0.8.0, pyarrow, pandas, fsspec,
# xxhash, matplotlib, pytest; no `datasets`; no network. Carried:
#   transformers  the locked version (MELT needs >= 5.24; the machine has 5.17);
#   regex         transformers checks its version at import (>= 2025.10.22) and the machine's is not recorded;
#   datasets, dill, multiprocess   MELT's data pipeline (convert/data.py); the latter two are datasets' needs
#                 that the machine lacks.
# Versions default to the lock, constraints.txt (the set the CPU suite last passed on); override with e.g.
# TRANSFORMERS_VERSION=5.24.0. torch and triton are never downloaded: the machine's CUDA builds must stay.
# Afterwards every carried wheel's requirements are checked against the carried set and the machine's packages
# (versions where KINDS.md records them); a requirement that nothing satisfies fails this script.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
version_of() {
    local locked
    locked="$(grep -iE "^$1==" constraints.txt | cut -d= -f3)"
    [ -n "$locked" ] || { echo "scripts/gpu_wheels.sh: $1 is not in constraints.txt" >&2; exit 1; }
    echo "$locked"
}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-$(version_of transformers)}
DATASETS_VERSION=${DATASETS_VERSION:-$(version_of datasets)}
DILL_VERSION=${DILL_VERSION:-$(version_of dill)}
MULTIPROCESS_VERSION=${MULTIPROCESS_VERSION:-$(version_of multiprocess)}
REGEX_VERSION=${REGEX_VERSION:-$(version_of regex)}

rm -rf .whl
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    "transformers==${TRANSFORMERS_VERSION}" "datasets==${DATASETS_VERSION}" "dill==${DILL_VERSION}" \
    "multiprocess==${MULTIPROCESS_VERSION}" "regex==${REGEX_VERSION}"

"$python" - <<'EOF'
"""Check the carried wheels: one of each, no torch/triton, every requirement met there (carried or installed)."""
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

# The lent machine's packages (KINDS.md, "Python packages already there"), with the versions it records.
KNOWN = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
         "tokenizers": "0.23.2", "torch": "2.11.0", "triton": "3.6.0", "sentencepiece": "0.2.2", "tiktoken": "0.14.0"}
PRESENT = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython einops filelock
fonttools frozenlist fsspec h11 h5py hf-xet httpcore httpx huggingface-hub idna iniconfig jinja2 joblib kiwisolver
markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict networkx ninja numpy packaging
pandas pathspec pillow pip pluggy protobuf psutil pyarrow pygments pyparsing pytest pytest-xdist python-dateutil
pyyaml regex requests rich safetensors scipy sentencepiece setuptools shellingham six sympy tokenizers torch tqdm
triton typer typing-extensions urllib3 wheel xxhash yarl zipp""".split())

env = default_environment()
env.update(python_version="3.12", python_full_version="3.12.3", sys_platform="linux", platform_system="Linux",
           platform_machine="x86_64", implementation_name="cpython", platform_python_implementation="CPython")
carried = {}
for wheel in sorted(Path(".whl").glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    name = canonicalize_name(name)
    if name in carried:
        sys.exit(f"two versions of {name} in .whl/: pip would refuse the install")
    if name in ("torch", "triton") or name.startswith("nvidia-"):
        sys.exit(f"{wheel.name}: the machine's CUDA build of {name} must not be replaced")
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
    carried[name] = (Version(version), wheel, requires)

problems, lines = [], []
for name, (version, wheel, requires) in carried.items():
    size = wheel.stat().st_size / 2**20
    lines.append(f"  {wheel.name}  ({size:.1f} MiB)")
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        dep = canonicalize_name(req.name)
        if dep in carried:
            have, where = carried[dep][0], "carried"
        elif dep in KNOWN:
            have, where = Version(KNOWN[dep]), "on the machine"
        elif dep in PRESENT:
            lines.append(f"      {req}: on the machine, version not recorded (not checked)")
            continue
        else:
            problems.append(f"{name} needs {req}, which is neither carried nor on the machine")
            continue
        ok = req.specifier.contains(have, prereleases=True)
        lines.append(f"      {req}: {have} {where}{'' if ok else '  <-- NOT SATISFIED'}")
        if not ok:
            problems.append(f"{name} needs {req}, but {dep} {have} is {where}")
total = sum(w.stat().st_size for _, w, _ in carried.values()) / 2**20
print("wheels for the lent machine (.whl/):")
print("\n".join(lines))
print(f"total {total:.1f} MiB (the working tree and the carried paths travel within 64 MiB)")
if problems:
    sys.exit("problems:\n  " + "\n  ".join(problems) + "\nadd the missing wheels (pip download ... -d .whl) or pick "
             "other versions (e.g. TRANSFORMERS_VERSION=...)")
EOF
