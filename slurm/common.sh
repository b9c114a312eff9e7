# Shell code shared by slurm/train.sbatch and slurm/predict.sbatch (sourced, never run).
#
# Environment variables, with one meaning in every script (docs/HPC.md):
#   SEG_ROOT            the repository (default: the folder above this file)
#   SEG_PYTHON          the interpreter (default: `python` on PATH)
#   SEG_NPROC_PER_NODE  processes per node (train) or per array task (predict). It sets a
#                       count only, never the device. Default: the GPUs allotted on the node
#                       (SLURM_GPUS_ON_NODE); without GPUs, train.sbatch starts one process per
#                       --cpus-per-task and predict.sbatch one process.
#   SEG_CPU=1           run on CPU even when GPUs are allotted: the GPUs are hidden
#                       (CUDA_VISIBLE_DEVICES=""). CPU is also what a job without GPUs gets.
#   SEG_RDZV_PORT       train.sbatch: rendezvous port (default 20000 + job id mod 20000)
#   SEG_EXIT_DIR        train.sbatch: folder for the ranks' exit codes (default logs/.exit)
#   SEG_NUM_PARTS       predict.sbatch: split the cohort N ways whatever the array's size
#
# Each script finds this file before it can use it: next to the submitted script (Slurm runs a
# copy from its spool folder, so the controller's `Command=` gives the original path), else in
# $SEG_ROOT/slurm, else in the submission folder's slurm/. That lookup is the only code each
# script repeats. SEG_SCRIPT (the script's name, for log lines) is set by the script.

SEG_ROOT_DIR="${SEG_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

seg_log() { echo "[${SEG_SCRIPT:-seg}] $*"; }
seg_die() { echo "[${SEG_SCRIPT:-seg}] $*" >&2; exit 2; }  # 2: usage error (seg/exitcodes.py)

# seg_processes CPU_DEFAULT: sets SEG_KIND (gpu|cpu), SEG_NPROC, and SEG_LAUNCH (the device
# flags of launch/torchrun.sh). CPU mode hides the GPUs for this script and what it starts.
seg_processes() {
  local gpus="${SLURM_GPUS_ON_NODE:-0}"
  case "$gpus" in ""|*[!0-9]*) gpus=0 ;; esac  # Slurm may leave it unset or empty without GPUs
  case "${SEG_CPU:-0}" in 0|1) ;; *) seg_die "SEG_CPU='$SEG_CPU' must be 1 (CPU) or 0 (GPUs when allotted)" ;; esac
  if [ "$gpus" -gt 0 ] && [ "${SEG_CPU:-0}" != 1 ]; then
    SEG_KIND=gpu; SEG_NPROC="${SEG_NPROC_PER_NODE:-$gpus}"
  else
    SEG_KIND=cpu; SEG_NPROC="${SEG_NPROC_PER_NODE:-$1}"
    export CUDA_VISIBLE_DEVICES=""
  fi
  case "$SEG_NPROC" in
    ""|*[!0-9]*|0) seg_die "process count '$SEG_NPROC' (SEG_NPROC_PER_NODE) must be a positive integer" ;;
  esac
  SEG_LAUNCH=(--nproc "$SEG_NPROC")
  if [ "$SEG_KIND" = cpu ]; then SEG_LAUNCH=(--cpu "$SEG_NPROC"); fi
}

# seg_torchrun: the path of launch/torchrun.sh, or a usage error that says how to point at it.
seg_torchrun() {
  [ -f "$SEG_ROOT_DIR/launch/torchrun.sh" ] \
    || seg_die "cannot find launch/torchrun.sh under $SEG_ROOT_DIR: export SEG_ROOT=/path/to/seg"
  echo "$SEG_ROOT_DIR/launch/torchrun.sh"
}
