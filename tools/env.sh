# Sourced by tools/demo.sh and tools/test.sh: create or reuse .venv and install the project.
# Works on a fresh machine with only Python 3.11 and pip. torch is pinned to the CPU build that
# installs from local disk here; setup.cfg keeps torch>=2.2 with no upper pin for GPU users.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "[env] creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
PY="$ROOT/.venv/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[env] installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
# Reinstall only when setup.cfg changed since the last install (keeps reruns fast).
stamp=.venv/.seg-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || ! "$PY" -c "import seg, webdataset, albumentations" >/dev/null 2>&1; then
  echo "[env] installing seg and its dependencies"
  "$PY" -m pip install -q -e ".[test]"
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
