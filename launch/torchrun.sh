#!/usr/bin/env bash
# Start `seg train` (or another seg module) under torchrun on this node.
#
#   bash launch/torchrun.sh [--gpus N | --cpu N] [--module seg.train] [--] TRAIN ARGS
#   bash launch/torchrun.sh --config configs/default.yaml --data_dir data/shards   # all GPUs
#   bash launch/torchrun.sh --cpu 2 --config configs/cpu-smoke.yaml                # 2 CPU processes
#   bash launch/torchrun.sh --module seg.predict --gpus 4 --model_path M --image_dir D --output_dir O
#
# Multi-node (what slurm/train.sbatch runs on every node through srun):
#   bash launch/torchrun.sh --nnodes 2 --rdzv_endpoint HEAD:PORT --rdzv_id JOBID --gpus 4 -- ARGS
#
# Design choices:
# - Processes per node: --gpus N, --cpu N (CUDA hidden, one torch thread each unless
#   OMP_NUM_THREADS is set), or by default every visible GPU (nvidia-smi -L); no GPU and no
#   --cpu is an error that says so.
# - One node uses torchrun --standalone (a free local port); several nodes use the c10d
#   rendezvous on --rdzv_endpoint, which needs no node rank per node.
# - Every worker runs through launch/worker.py, which records its exit code in $SEG_EXIT_DIR
#   when set (torchrun itself exits 1 when its workers exit 75 after a preemption save).
# - torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to its workers, and here SIGUSR1 as well
#   (TORCHELASTIC_SIGNALS_TO_HANDLE); it waits 30 s for them, so a save must fit in 30 s.
# - The script execs torchrun: under srun, torchrun itself is the task that Slurm signals.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

nproc="" cpu=0 nnodes=1 endpoint="" rdzv_id="seg" module="seg.train"
value() { # value OPTION NEXT_ARG: the option's value, or a usage error
  case "${2:-}" in
    ""|-*) echo "torchrun.sh: $1 needs a value (e.g. $1 2)" >&2; exit 2 ;;
  esac
  printf '%s' "$2"
}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=1; nproc="$(value "$1" "${2:-}")"; shift 2 ;;
    --gpus|--nproc) nproc="$(value "$1" "${2:-}")"; shift 2 ;;
    --nnodes) nnodes="$(value "$1" "${2:-}")"; shift 2 ;;
    --rdzv_endpoint) endpoint="$(value "$1" "${2:-}")"; shift 2 ;;
    --rdzv_id) rdzv_id="$(value "$1" "${2:-}")"; shift 2 ;;
    --module) module="$(value "$1" "${2:-}")"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) break ;;  # the first unknown argument starts the module's own arguments
  esac
done

case "$nproc" in
  "") nproc="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
      if [ "${nproc:-0}" -lt 1 ]; then
        echo "torchrun.sh: no GPU visible (nvidia-smi -L lists none); use --cpu N for N CPU processes" >&2
        exit 2
      fi ;;
  *[!0-9]*|0) echo "torchrun.sh: process count '$nproc' must be a positive integer" >&2; exit 2 ;;
esac

if [ "$cpu" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
export TORCHELASTIC_SIGNALS_TO_HANDLE="${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"

PYTHON="${SEG_PYTHON:-python}"
if [ "$nnodes" = 1 ] && [ -z "$endpoint" ]; then
  rdzv=(--standalone)
else
  if [ -z "$endpoint" ]; then echo "torchrun.sh: --nnodes $nnodes needs --rdzv_endpoint HOST:PORT" >&2; exit 2; fi
  rdzv=(--nnodes "$nnodes" --rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id "$rdzv_id")
fi
echo "[torchrun.sh] ${SLURMD_NODENAME:-$(hostname -s)}: $nproc process(es) per node x $nnodes node(s), module $module" >&2
exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$nproc" --max_restarts 0 \
  "$HERE/worker.py" "$module" "$@"
