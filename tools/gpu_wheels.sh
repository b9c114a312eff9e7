#!/usr/bin/env bash
# Download, on a machine with package-registry access, the wheels that the GPU machine lacks
# (it has torch, accelerate, opencv, numpy, pyyaml, matplotlib, scipy but no webdataset,
# albumentations and its pydantic/albucore needs, submitit, and pytest with pytest-timeout in case
# the image lacks them) into .whl/ for tools/gpu_check.sh,
# which installs them there with --no-index. .whl/ is ignored by git.
#   bash tools/gpu_wheels.sh [PYTHON_VERSION (default 3.12)]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYVER="${1:-3.12}"
PIP="${PIP:-.venv/bin/python -m pip}"
[ -x .venv/bin/python ] || PIP="python3 -m pip"
# Versions as installed here (tested together); keep one version of each.
PKGS=(webdataset==1.0.2 braceexpand==0.1.7 albumentations==2.0.8 albucore==0.0.24
      stringzilla==5.3.2 simsimd==6.5.16 pydantic==2.14.4 pydantic-core==2.50.5
      annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
      submitit==1.5.4 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pytest-timeout==2.4.0)
mkdir -p .whl
for spec in "${PKGS[@]}"; do
  name="${spec%%==*}"
  if ls .whl/ | grep -qi "^$(echo "$name" | tr - _)-${spec##*==}-"; then continue; fi
  $PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -la .whl
du -sh .whl
