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

Exit codes (``seg.exitcodes``): 0 done; 1 an error while training (a corrupt or truncated
shard, a rank that failed: the message names it); 2 invalid configuration or data, found before
the first step; 75 (EX_TEMPFAIL) SIGUSR1 or SIGTERM received (Slurm preemption or time limit):
every rank saved ``last/`` at the next step boundary, rerun the same command to resume.

``--validate_only MODEL.pth`` scores a model checkpoint on the validation shards with the
same exact distributed code and writes ``<checkpoint_dir>/validation.json``.
"""

from __future__ import annotations

import argparse
import sys

from seg import exitcodes
from seg.config import Config, add_config_arguments, config_from_args, config_to_yaml


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seg train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit code 75: preempted, state saved in last/; rerun to resume.")
    add_config_arguments(parser)
    parser.add_argument("--val_split", type=float, metavar="FRACTION",
                        help="accepted from the original scripts: the split is made by `seg prepare --val_split`; "
                             "here it must equal the one recorded in dataset.json")
    parser.add_argument("--validate_only", metavar="MODEL.pth",
                        help="score this model checkpoint on the validation shards and exit")
    return parser


def parse_train_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    """(arguments, resolved config) of a `seg train` command line, as `seg train` reads it
    (``launch/submit.py train`` calls this too: one parser, one behaviour).

    Dotted overrides may come between flags (``--config X train.lr=1e-3 --seed 2``).

    Raises:
        ValueError, FileNotFoundError: an invalid config or ``--val_split`` (argparse itself
        exits 2 on an unknown flag).
    """
    args = build_parser().parse_intermixed_args(argv)
    cfg = config_from_args(args)
    check_val_split(cfg, args.val_split)
    return args, cfg


def check_val_split(cfg: Config, val_split: float | None) -> None:
    """``--val_split`` must match the split `seg prepare` made (it cannot change it)."""
    if val_split is None:
        return
    from seg.data.shards import load_dataset_info

    recorded = load_dataset_info(cfg.data.data_dir).get("val_split")
    if recorded is not None and abs(float(recorded) - val_split) > 1e-9:
        raise ValueError(f"--val_split {val_split} differs from the split of {cfg.data.data_dir} "
                         f"(val_split {recorded} in dataset.json): the split is made by `seg prepare`. "
                         f"Re-run `seg prepare ... --val_split {val_split} --out NEW_DIR`, or drop --val_split")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, cfg = parse_train_args(argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"seg train: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return exitcodes.OK
    from seg.training.loop import run_training  # torch/accelerate imported here, not for --help

    try:
        if args.validate_only:
            from seg.training.validate import run_validation

            run_validation(cfg, args.validate_only)
            return exitcodes.OK
        return run_training(cfg, ["seg", "train", *argv])
    except exitcodes.RunFailed as exc:
        print(f"seg train: error: {exc}", file=sys.stderr)
        return exitcodes.FAILED
    except (ValueError, FileNotFoundError) as exc:
        print(f"seg train: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE


if __name__ == "__main__":
    from seg.cli import run_command

    run_command(main)
