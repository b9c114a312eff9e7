"""`seg train` (= ``python -m seg.train``): train the U-Net on shards written by `seg prepare`.

The same command runs as a single process, under ``accelerate launch`` and under ``torchrun``::

    # one process (CPU, or one GPU)
    seg train --data_dir data/shards --checkpoint_dir runs/unet --epochs 50
    # one node, 4 processes (one per GPU; on a machine without GPUs, 4 CPU processes over gloo)
    accelerate launch --multi_gpu --num_processes 4 -m seg.train --data_dir data/shards --checkpoint_dir runs/unet
    torchrun --nproc_per_node 4 -m seg.train --data_dir data/shards --checkpoint_dir runs/unet
    # (`accelerate launch --cpu --num_processes N` starts ONE process unless mpirun is used)
    # two nodes (run on each node, NODE_RANK 0 and 1, HEAD = node 0's address)
    torchrun --nnodes 2 --node_rank NODE_RANK --nproc_per_node 4 --rdzv_backend c10d \\
        --rdzv_endpoint HEAD:29500 -m seg.train --data_dir data/shards --checkpoint_dir runs/unet

The run folder (``--checkpoint_dir``) receives config.yaml, history.csv, best_model.pth,
final_model.pth, checkpoint_epoch_N.pth, last/, training_history.png,
sample_predictions.png and provenance.json. Re-running the same command resumes from
``last/``; a finished run is not trained again; ``--no_resume`` starts over.

Exit codes: 0 done; 75 (``seg.training.state.PREEMPTED_EXIT_CODE``, EX_TEMPFAIL) = SIGUSR1 or
SIGTERM received (Slurm preemption or time limit): every rank saved ``last/`` at the next step
boundary, rerun the same command to resume; 2 = invalid configuration or data.

``--validate_only MODEL.pth`` scores a model checkpoint on the validation shards with the
same exact distributed code and writes ``<checkpoint_dir>/validation.json``.
"""

from __future__ import annotations

import argparse
import sys

from seg.config import add_config_arguments, config_from_args, config_to_yaml


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seg train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit code 75: preempted, state saved in last/; rerun to resume.")
    add_config_arguments(parser)
    parser.add_argument("--no_resume", action="store_true", help="ignore last/ and start over (train.resume=false)")
    parser.add_argument("--log_with", choices=["none", "tensorboard"], help="train.log_with")
    parser.add_argument("--deterministic", action="store_true", default=None, help="train.deterministic=true")
    parser.add_argument("--validate_only", metavar="MODEL.pth",
                        help="score this model checkpoint on the validation shards and exit")
    return parser


def parse_train_args(argv: list[str]) -> argparse.Namespace:
    """`seg train`'s arguments as `seg train` reads them (``launch/submit.py train`` calls this too).

    Dotted overrides may come between flags (``--config X train.lr=1e-3 --seed 2``); the
    flags that stand for a config key become dotted overrides placed first, so explicit dotted
    overrides still win. Pass the result to ``config_from_args``.

    Args:
        argv: the arguments after ``seg train``.

    Raises:
        SystemExit: argparse's usage error (exit 2).
    """
    args = build_parser().parse_intermixed_args(argv)
    extra = []
    if args.no_resume:
        extra.append("train.resume=false")
    if args.log_with:
        extra.append(f"train.log_with={args.log_with}")
    if args.deterministic:
        extra.append("train.deterministic=true")
    args.overrides = extra + list(args.overrides)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_train_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"seg train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from seg.training.loop import run_training  # torch/accelerate imported here, not for --help

    try:
        if args.validate_only:
            from seg.training.validate import run_validation

            run_validation(cfg, args.validate_only)
            return 0
        return run_training(cfg, ["seg", "train", *argv])
    except (ValueError, FileNotFoundError) as exc:
        print(f"seg train: error: {exc}", file=sys.stderr)
        return 2


def exit_now(code: int) -> None:
    """End this process with ``code`` without the interpreter's module teardown.

    After torch, accelerate and matplotlib are loaded, Python's final teardown (freeing every
    module) takes 1-2 s on a small CPU and does nothing useful: every file of the run is
    already closed. Non-daemon threads are joined and the ``atexit`` handlers (DataLoader
    worker clean-up, loggers, trackers) run as in a normal exit; then ``os._exit``. Only for the
    process's entry point (``python -m seg.train``, ``torchrun``/``accelerate launch -m
    seg.train``), never inside a caller's process.
    """
    import atexit
    import os
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # joins non-daemon threads, as Py_Finalize does
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
