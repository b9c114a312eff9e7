#!/usr/bin/env bash
# The GPU device check (one prepared script, about 8 minutes at most on one H100/H200):
#   1. installs the project's missing dependencies from wheels carried in .whl/ (no network;
#      fetch them beforehand with `bash tools/gpu_wheels.sh` on a machine with registry access),
#   2. runs the GPU-marked tests (tests/test_gpu.py: bf16/fp16 training steps, `seg train` through
#      accelerate launch, cuDNN autotuning and DDP options, `seg predict` on a small cohort, the
#      device path of prediction (pinned side-stream copies, resize/threshold on the GPU) against
#      the CPU path, torch.compile'd prediction, checkpoint round trip GPU <-> CPU),
#   3. runs tools/bench/gpu_bench.py (budget 270 s): training images/s and MFU at 512 px (bf16)
#      against a matmul rate measured in the same run, data loading's share of step time and
#      the loader's images/s per core, `seg predict` images/s at 256 px as a whole process, the
#      host-pipeline share of prediction time, torch.compile against eager, and a profiler
#      summary where a goal (>= 40 % MFU, data wait <= 5 %, >= 1,000 images/s) is missed,
#   4. prints the table and writes everything under $OUT (default: gpu_check_out/): gpu_table.md,
#      gpu_bench.json, profile_*.txt, gpu_tests.log/.xml, nvidia-smi.txt, versions.txt.
# On a machine without CUDA every CUDA part is skipped, and the script says so and exits 0.
#
# Through the device tool:  run(command="OUT=$OUT bash tools/gpu_check.sh", carry=[".whl"], timeout_s=560)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=python3
[ -x .venv/bin/python ] && PY="$ROOT/.venv/bin/python"

if ! "$PY" -c "import webdataset, albumentations, submitit, pytest, pytest_timeout" >/dev/null 2>&1; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "[gpu_check] installing carried wheels from .whl/ into /tmp/seg-site (no network)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/seg-site .whl/*.whl || { echo "[gpu_check] FAIL: wheel install"; exit 1; }
    export PYTHONPATH="/tmp/seg-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu_check] FAIL: webdataset/albumentations/submitit/pytest missing and no .whl/ carried (run tools/gpu_wheels.sh)"
    exit 1
  fi
fi
# The project itself runs from the checkout (no install step needed on the device).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[gpu_check] CUDA is not available on this machine: GPU tests and benchmarks SKIPPED."
  "$PY" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -n 3 | tee "$OUT/gpu_tests.log"
  echo "skipped: no CUDA" > "$OUT/summary.txt"
  exit 0
fi

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" - <<'PYEOF' | tee "$OUT/versions.txt"
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
PYEOF

status=0
echo "[gpu_check] GPU-marked tests"
timeout 180 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -n 25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "[gpu_check] benchmarks"
timeout 330 "$PY" tools/bench/gpu_bench.py --out "$OUT" --budget_s 270 2>&1 | tee "$OUT/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
