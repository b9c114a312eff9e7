"""Submit training or cohort prediction to Slurm with submitit (no sbatch script to edit).

    python launch/submit.py train --nodes 2 --gpus_per_node 4 --partition P --time 24:00:00 \\
        --config configs/default.yaml --data_dir data/shards --checkpoint_dir runs/unet [key=value ...]
    python launch/submit.py train --tasks_per_node 2 --time 00:30:00 --config configs/cpu-smoke.yaml  # CPU
    python launch/submit.py predict --parts 100 --parallel 20 --gpus_per_node 1 --summarize \\
        --model_path runs/unet/best_model.pth --image_dir cohort/ --output_dir preds/

Both print the job ids and the log paths (``--log_dir``, default ``logs/submitit/%j``);
``--wait`` waits for the results.

Design choices (after dinov2's ``run/submit.py``):
- The submit CLI is the train (or predict) CLI plus Slurm flags: the Slurm flags are parsed
  here, everything else is handed to ``seg train`` / ``seg predict`` unchanged, and the train
  arguments are validated (config built) before anything is submitted.
- One Slurm task per training process (tasks per node = GPUs per node, or --tasks_per_node on
  CPU). Each task sets up the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT) from ``submitit.JobEnvironment`` and runs ``python -m seg.train`` as a child
  process; nothing in ``seg`` reads Slurm variables.
- ``TrainTask`` is checkpointable: on submitit's timeout/preemption signal (USR2) every task
  sends SIGUSR1 to its trainer, which saves ``last/`` at the next step and exits 75; then
  ``checkpoint()`` returns a ``DelayedSubmission`` of the same task and submitit requeues the
  job, which resumes from ``last/``. A trainer that exits 75 on its own (SIGTERM from a
  preemption) requeues the same way. The child ignores USR2 (Slurm signals every process of
  the step) so that only the trainer's own signals (USR1/TERM) stop it. The signal handler only
  sets a flag: waiting happens in the normal loop, never inside the handler.
- Prediction uses ``map_array``: part k of N runs ``seg predict ... --part k --num_parts N``,
  so a rerun of the same parts skips finished units. ``--summarize`` adds an afterok step.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import submitit

PREEMPTED_EXIT_CODE = 75  # seg.training.state.PREEMPTED_EXIT_CODE (kept here: no torch import)

# Pickle this module's classes by value, so that jobs unpickle them even when this file was
# imported under another name (tests) and launch/ is not importable on the compute node.
if __name__ != "__main__":
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def torchrun_env(job_env: submitit.JobEnvironment, port: int | None = None) -> dict[str, str]:
    """The torchrun environment of this submitit task (what ``seg.dist`` and Accelerate read).

    Args:
        job_env: the running task's ``submitit.JobEnvironment``.
        port: rendezvous port on the first node; default 20000 + job id mod 20000.
    """
    job_id = int(job_env.raw_job_id.split("_")[0])
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // max(job_env.num_nodes, 1)),
        "NODE_RANK": str(job_env.node),
        "MASTER_ADDR": job_env.hostnames[0],
        "MASTER_PORT": str(port or 20000 + job_id % 20000),
    }


class TrainTask:
    """Checkpointable submitit callable: one training process per Slurm task.

    Args:
        train_args: ``seg train`` arguments (``--config FILE ... key=value``).
        python: interpreter for the trainer (default: this one).
    """

    def __init__(self, train_args: list[str], python: str | None = None) -> None:
        self.train_args = list(train_args)
        self.python = python or sys.executable
        self._signalled = False

    def _on_usr2(self, signum, frame) -> None:  # timeout or preemption warning from Slurm
        self._signalled = True
        child = getattr(self, "_child", None)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGUSR1)

    def __call__(self) -> dict:
        job_env = submitit.JobEnvironment()
        env = {**os.environ, **torchrun_env(job_env)}
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"[submit] task {job_env.global_rank}/{job_env.num_tasks} on {job_env.hostname} "
              f"SLURM_RESTART_COUNT={restarts}: seg train {' '.join(self.train_args)}", flush=True)
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, self._on_usr2)
        self._child = subprocess.Popen([self.python, "-m", "seg.train", *self.train_args], env=env,
                                       preexec_fn=_ignore_usr2)
        while (rc := self._child.poll()) is None:
            time.sleep(0.5)
        if rc == 0:
            return {"rank": job_env.global_rank, "exit_code": 0, "restarts": int(restarts)}
        if rc == PREEMPTED_EXIT_CODE or self._signalled:
            print(f"[submit] trainer saved last/ and exited {rc}: requeueing (rank 0 requeues the job)", flush=True)
            if callable(submitit_handler):
                submitit_handler(signal.SIGUSR2, None)  # rank 0: checkpoint() + requeue + exit
            return {"rank": job_env.global_rank, "exit_code": rc, "restarts": int(restarts)}
        raise RuntimeError(f"seg train exited with code {rc} on task {job_env.global_rank}; see this task's log")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on timeout/preemption: requeue the same command (it resumes from last/)."""
        return submitit.helpers.DelayedSubmission(TrainTask(self.train_args, self.python))


class PredictPart:
    """submitit callable for ``map_array``: part k of ``num_parts`` of a cohort.

    Args:
        predict_args: ``seg predict`` arguments without --part/--num_parts.
        num_parts: the number of parts the cohort is split into.
    """

    def __init__(self, predict_args: list[str], num_parts: int, python: str | None = None) -> None:
        self.predict_args = list(predict_args)
        self.num_parts = num_parts
        self.python = python or sys.executable

    def __call__(self, part: int) -> int:
        cmd = [self.python, "-m", "seg.predict", *self.predict_args, "--part", str(part), "--num_parts", str(self.num_parts)]
        print(f"[submit] part {part}/{self.num_parts}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd, preexec_fn=_ignore_usr2)
        if rc not in (0, 3):  # 3: done, some inputs unreadable (failures.jsonl)
            raise RuntimeError(f"seg predict part {part} exited with code {rc}; see this task's log")
        return rc

    def checkpoint(self, part: int) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, part)  # rerun skips finished units


def summarize(output_dir: str, python: str | None = None) -> int:
    """The afterok step: ``seg predict --summarize OUTPUT_DIR``; raises when it fails."""
    rc = subprocess.call([python or sys.executable, "-m", "seg.predict", "--summarize", output_dir])
    if rc not in (0, 3):
        raise RuntimeError(f"seg predict --summarize {output_dir} exited with code {rc}")
    return rc


def slurm_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, add_help=False)
    a = p.add_argument
    a("--nodes", type=int, default=1, help="nodes (train)")
    a("--gpus_per_node", type=int, default=0, help="GPUs per node; one process (Slurm task) per GPU")
    a("--tasks_per_node", type=int, default=None, help="processes per node (default: GPUs per node, or 1)")
    a("--cpus_per_task", type=int, default=None, help="CPUs per process (default 8 with GPUs, else 1)")
    a("--mem_gb", type=int, default=None, help="memory per node in GB")
    a("--partition", default=None)
    a("--account", default=None)
    a("--qos", default=None)
    a("--constraint", default=None)
    a("--time", default="24:00:00", help="time limit HH:MM:SS (or minutes)")
    a("--job_name", default=None)
    a("--log_dir", default="logs/submitit/%j", help="submitit folder; %%j becomes the job id")
    a("--signal_delay_s", type=int, default=120, help="seconds before the time limit to save and requeue")
    a("--max_requeues", type=int, default=10, help="timeouts after which the job is not requeued")
    a("--cluster", choices=("slurm", "local", "debug"), default="slurm",
      help="submitit backend: slurm, or local/debug to try the submission on this machine")
    a("--wait", action="store_true", help="wait for the job(s) and print the results")
    a("-h", "--help", action="store_true")
    return p


def _minutes(text: str) -> int:
    parts = [int(x) for x in text.split(":")]
    if len(parts) == 1:
        return parts[0]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return h * 60 + m + (1 if s else 0)


def make_executor(opts, name: str, tasks_per_node: int, nodes: int) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=opts.log_dir, cluster=opts.cluster,
                                     slurm_max_num_timeout=opts.max_requeues)
    extra = {k: v for k, v in (("account", opts.account), ("qos", opts.qos)) if v}
    executor.update_parameters(
        name=opts.job_name or name, nodes=nodes, tasks_per_node=tasks_per_node,
        cpus_per_task=opts.cpus_per_task or (8 if opts.gpus_per_node else 1),
        gpus_per_node=opts.gpus_per_node or None, timeout_min=_minutes(opts.time),
        slurm_partition=opts.partition, slurm_constraint=opts.constraint, mem_gb=opts.mem_gb,
        slurm_signal_delay_s=opts.signal_delay_s, slurm_additional_parameters=extra or None,
    )
    return executor


def _report(job, what: str) -> None:
    print(f"submitted {what}: job {job.job_id}")
    print(f"  log: {job.paths.stdout}  (errors: {job.paths.stderr})")


def submit_train(argv: list[str]):
    """Submit training; returns the submitit Job. argv = Slurm flags + ``seg train`` arguments."""
    opts, train_args = slurm_parser("submit.py train").parse_known_args(argv)
    from seg.config import config_from_args
    from seg.train import build_parser

    if opts.help:
        slurm_parser("submit.py train").print_help()
        print("\nAll other arguments are `seg train` arguments:")
        build_parser().print_help()
        sys.exit(0)
    try:
        config_from_args(build_parser().parse_args(train_args))  # fail here, not in the queue
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"submit.py train: {exc}") from None
    tasks = opts.tasks_per_node or opts.gpus_per_node or 1
    executor = make_executor(opts, "seg-train", tasks, opts.nodes)
    job = executor.submit(TrainTask(train_args))
    _report(job, f"training ({opts.nodes} node(s) x {tasks} process(es))")
    return job


def submit_predict(argv: list[str]):
    """Submit cohort prediction as a map_array; returns (array jobs, summarize job or None)."""
    p = slurm_parser("submit.py predict")
    p.add_argument("--parts", type=int, required=True, help="array tasks the cohort is split into")
    p.add_argument("--parallel", type=int, default=None, help="array tasks running at once (%%N)")
    p.add_argument("--summarize", action="store_true", help="add an afterok step printing the cohort summary")
    opts, predict_args = p.parse_known_args(argv)
    if opts.parts < 1:
        raise SystemExit("submit.py predict: --parts must be >= 1")
    if "--output_dir" not in predict_args:
        raise SystemExit("submit.py predict: --output_dir is required (seg predict's output folder)")
    executor = make_executor(opts, "seg-predict", opts.tasks_per_node or 1, 1)
    if opts.parallel:
        executor.update_parameters(slurm_array_parallelism=opts.parallel)
    jobs = executor.map_array(PredictPart(predict_args, opts.parts), list(range(opts.parts)))
    print(f"submitted prediction: array job {jobs[0].job_id.split('_')[0]} with {len(jobs)} task(s)")
    print(f"  logs: {jobs[0].paths.stdout} ... {jobs[-1].paths.stdout}")
    summary = None
    if opts.summarize:
        out = predict_args[predict_args.index("--output_dir") + 1]
        executor.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{jobs[0].job_id.split('_')[0]}"},
                                   slurm_array_parallelism=256, tasks_per_node=1)
        summary = executor.submit(summarize, out)
        _report(summary, "summary (afterok)")
    return jobs, summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "predict"):
        print(__doc__.split("\n\n")[1])
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    wait = "--wait" in argv
    if argv[0] == "train":
        jobs = [submit_train(argv[1:])]
    else:
        arr, summary = submit_predict(argv[1:])
        jobs = arr + ([summary] if summary else [])
    if wait:
        for job in jobs:
            print(f"job {job.job_id}: {job.result()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
