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
  so a rerun of the same parts skips finished units. ``--summarize`` adds an afterok step
  (one task, one CPU, no GPU) through submitit's ``slurm_dependency``.
- Every Slurm setting goes through submitit's named parameters (``slurm_account``,
  ``slurm_qos``, ``slurm_dependency``, ...), never ``slurm_additional_parameters``, so one
  setting cannot replace another; the generated sbatch text of each submission kind is kept
  as golden files (tests/golden/submitit/).
- The train arguments are parsed by ``seg.train.parse_train_args`` itself, so the launcher
  accepts and refuses exactly what ``seg train`` does. Time limits are read by
  ``seg.slurm_time`` (every Slurm form), exit codes come from ``seg.exitcodes``. ``seg`` must
  be importable on the compute node anyway (the tasks run ``python -m seg.train``).
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

from seg.exitcodes import FAILED_INPUTS, OK, PREEMPTED, USAGE
from seg.slurm_time import FORMS, slurm_minutes

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
        if rc == OK:
            return {"rank": job_env.global_rank, "exit_code": OK, "restarts": int(restarts)}
        if rc == PREEMPTED or self._signalled:
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
        if rc not in (OK, FAILED_INPUTS):  # FAILED_INPUTS: done, some inputs unreadable (failures.jsonl)
            raise RuntimeError(f"seg predict part {part} exited with code {rc}; see this task's log")
        return rc

    def checkpoint(self, part: int) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, part)  # rerun skips finished units


def summarize(output_dir: str, python: str | None = None) -> int:
    """The afterok step: ``seg predict --summarize OUTPUT_DIR``; raises when it fails."""
    rc = subprocess.call([python or sys.executable, "-m", "seg.predict", "--summarize", output_dir])
    if rc not in (OK, FAILED_INPUTS):
        raise RuntimeError(f"seg predict --summarize {output_dir} exited with code {rc}")
    return rc


def slurm_parser(prog: str) -> argparse.ArgumentParser:
    # allow_abbrev=False: a train/predict flag must never be taken for a prefix of a Slurm flag
    p = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
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
    a("--time", default="24:00:00", help=f"time limit: {FORMS}")
    a("--job_name", default=None)
    a("--log_dir", default="logs/submitit/%j", help="submitit folder; %%j becomes the job id")
    a("--signal_delay_s", type=int, default=120, help="seconds before the time limit to save and requeue")
    a("--max_requeues", type=int, default=10, help="timeouts after which the job is not requeued")
    a("--cluster", choices=("slurm", "local", "debug"), default="slurm",
      help="submitit backend: slurm, or local/debug to try the submission on this machine")
    a("--wait", action="store_true", help="wait for the job(s) and print the results")
    a("-h", "--help", action="store_true")
    return p


def _usage_error(prog: str, message: str):
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(USAGE)


def make_executor(opts, name: str, tasks_per_node: int, nodes: int, gpus_per_node: int | None = None,
                  cpus_per_task: int | None = None, **slurm) -> submitit.AutoExecutor:
    """An executor with every Slurm flag of ``opts`` as a named submitit parameter.

    Args:
        opts: the parsed ``slurm_parser`` flags.
        name: the job name unless ``--job_name`` is given.
        tasks_per_node, nodes: the job's shape.
        gpus_per_node: default ``opts.gpus_per_node``; 0 asks for none.
        cpus_per_task: default ``--cpus_per_task``, else 8 with GPUs and 1 without.
        slurm: further named submitit parameters (``slurm_dependency``, ``slurm_array_parallelism``).
    """
    gpus = opts.gpus_per_node if gpus_per_node is None else gpus_per_node
    executor = submitit.AutoExecutor(folder=opts.log_dir, cluster=opts.cluster,
                                     slurm_max_num_timeout=opts.max_requeues)
    executor.update_parameters(
        name=opts.job_name or name, nodes=nodes, tasks_per_node=tasks_per_node,
        cpus_per_task=cpus_per_task or opts.cpus_per_task or (8 if gpus else 1),
        gpus_per_node=gpus or None, timeout_min=opts.timeout_min, mem_gb=opts.mem_gb,
        slurm_partition=opts.partition, slurm_account=opts.account, slurm_qos=opts.qos,
        slurm_constraint=opts.constraint, slurm_signal_delay_s=opts.signal_delay_s, **slurm,
    )
    return executor


def parse_slurm_flags(parser: argparse.ArgumentParser, argv: list[str]):
    """(Slurm flags, the rest) with ``--time`` checked and read into ``opts.timeout_min``."""
    opts, rest = parser.parse_known_args(argv)
    try:
        opts.timeout_min = slurm_minutes(opts.time)
    except ValueError as exc:
        _usage_error(parser.prog, f"--time: {exc}")
    return opts, rest


def _report(job, what: str) -> None:
    print(f"submitted {what}: job {job.job_id}")
    print(f"  log: {job.paths.stdout}  (errors: {job.paths.stderr})")


def submit_train(argv: list[str]):
    """Submit training; returns the submitit Job. argv = Slurm flags + ``seg train`` arguments."""
    parser = slurm_parser("submit.py train")
    opts, train_args = parse_slurm_flags(parser, argv)
    from seg.train import build_parser, parse_train_args

    if opts.help:
        parser.print_help()
        print("\nAll other arguments are `seg train` arguments:")
        build_parser().print_help()
        sys.exit(OK)
    try:
        parse_train_args(train_args)  # as `seg train` reads them; fail here, not in the queue
    except (ValueError, FileNotFoundError) as exc:
        _usage_error(parser.prog, str(exc))
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
    opts, predict_args = parse_slurm_flags(p, argv)
    if opts.parts < 1:
        _usage_error(p.prog, "--parts must be >= 1")
    if "--output_dir" not in predict_args:
        _usage_error(p.prog, "--output_dir is required (seg predict's output folder)")
    array = {"slurm_array_parallelism": opts.parallel} if opts.parallel else {}
    executor = make_executor(opts, "seg-predict", opts.tasks_per_node or 1, 1, **array)
    jobs = executor.map_array(PredictPart(predict_args, opts.parts), list(range(opts.parts)))
    array_id = jobs[0].job_id.split("_")[0]
    print(f"submitted prediction: array job {array_id} with {len(jobs)} task(s)")
    print(f"  logs: {jobs[0].paths.stdout} ... {jobs[-1].paths.stdout}")
    summary = None
    if opts.summarize:
        out = predict_args[predict_args.index("--output_dir") + 1]
        # merging manifest.jsonl needs one CPU and no GPU; account, qos, partition stay
        summary_executor = make_executor(opts, "seg-summarize", 1, 1, gpus_per_node=0, cpus_per_task=1,
                                         slurm_dependency=f"afterok:{array_id}")
        summary = summary_executor.submit(summarize, out)
        _report(summary, "summary (afterok)")
    return jobs, summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "predict"):
        print(__doc__.split("\n\n")[1])
        return OK if argv and argv[0] in ("-h", "--help") else USAGE
    wait = "--wait" in argv
    if argv[0] == "train":
        jobs = [submit_train(argv[1:])]
    else:
        arr, summary = submit_predict(argv[1:])
        jobs = arr + ([summary] if summary else [])
    if wait:
        for job in jobs:
            print(f"job {job.job_id}: {job.result()}")
    return OK


if __name__ == "__main__":
    sys.exit(main())
