"""`seg doctor` (= ``python -m seg.doctor``): preflight checks before a run burns a queue slot.

    seg doctor --config configs/default.yaml --data_dir data/shards --nodes 2 --nproc_per_node 4 \\
        --head node001 --port 29500 --sbatch slurm/train.sbatch
    seg doctor --images raw/images --masks raw/masks                 # pairs before `seg prepare`
    seg doctor --image_dir cohort/ --output_dir preds/ --num_parts 100 --save_overlay   # prediction

Each check prints ``ok``, ``warn`` or ``FAIL`` with what it found and, when not ok, the fix.
Exit code 1 when any check fails, else 0.

Checks (each runs when its inputs are given; the machine checks always run):
- config: the resolved config (``--config``, flags, dotted overrides) is valid.
- data: dataset.json and its shards exist; train shards >= ranks x workers (else some readers
  get nothing); shard sizes balanced; validation shards vs ranks.
- groups: no group (volume, or ``--group_by REGEX`` on the image paths: patient, slide) has
  samples in both train and val (``seg.preflight.groups``).
- pairs: images with masks (``--images/--masks``), unpaired and ambiguous files counted.
- rendezvous: the head node name resolves; the port is free when the head is this machine.
- devices: GPUs asked for are visible; CPU cores vs processes.
- sbatch: ``--signal`` (B: form when the script traps it), ``--requeue``, the log folder exists.
- prediction: inputs, units vs workers, expected output files and bytes, free disk, and the
  ``--format tar`` hint above ``--tar_threshold`` files.

Design choices: checks are plain functions returning ``Check`` records (``seg.preflight.checks``,
``seg.preflight.slurm``, ``seg.preflight.outputs``), so tests and other tools can call them one by
one; nothing here reads Slurm variables (``--head`` is given explicitly, e.g.
``--head $(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)``).
"""

from __future__ import annotations

import argparse
import sys

from seg import exitcodes
from seg.config import PredictConfig, add_config_arguments
from seg.config.fields import add_flags, from_flags
from seg.preflight import STATUSES, Check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seg doctor", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_config_arguments(p)
    a = p.add_argument
    a("--nodes", type=int, default=1, help="nodes the run will use")
    a("--nproc_per_node", type=int, default=None, help="processes per node (default: GPUs per node, else 1)")
    a("--gpus_per_node", type=int, default=None, help="GPUs each node will be given")
    a("--head", default=None, help="rendezvous host (the first node); default: this machine's name")
    a("--port", type=int, default=29500, help="rendezvous port")
    a("--sbatch", metavar="SCRIPT", help="sbatch script to check (--signal, --requeue, log folder)")
    a("--images", help="raw images folder to pair with --masks (before `seg prepare`)")
    a("--masks", help="raw masks folder")
    a("--group_by", metavar="REGEX", help="check that no group (the regex's first capture group in each "
                                          "sample's image path, e.g. '^([^/]+)/') is in both train and val")
    g = p.add_argument_group("prediction (the same flags as seg predict)")
    add_flags(g, PredictConfig, names=["image_dir", "list_path", "shards", "output_dir", "format", "save_overlay",
                                       "save_probability", "unit_size", "num_parts"])
    g.add_argument("--tar_threshold", type=int, default=1_000_000,
                   help="output files above which --format tar is advised")
    return p


def run_checks(args: argparse.Namespace) -> list[Check]:
    """All checks that apply to ``args`` (parsed by ``build_parser``), in report order."""
    from seg.preflight import checks, groups, outputs, slurm

    results: list[Check] = []
    gpus = args.gpus_per_node
    nproc = args.nproc_per_node or gpus or 1
    world = args.nodes * nproc
    train_given = args.config is not None or hasattr(args, "data__data_dir") or bool(args.overrides)
    if train_given:
        cfg, found = checks.check_config(args)
        results += found
        if cfg is not None:
            results += checks.check_shards(cfg.data.data_dir, world, cfg.data.num_workers)
            results += groups.check_groups(cfg.data.data_dir, args.group_by)
    if args.images:
        results += checks.check_pairs(args.images, args.masks)
    results += checks.check_rendezvous(args.head, args.port, args.nodes)
    results += checks.check_devices(nproc, gpus)
    if args.sbatch:
        results += slurm.check_sbatch(args.sbatch)
    prediction = from_flags(PredictConfig, args)
    if prediction.inputs():
        results += outputs.check_prediction(prediction, (prediction.num_parts or 1) * nproc, args.tar_threshold)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    results = run_checks(args)
    for check in results:
        print(check.format(), flush=True)
    counts = {s: sum(c.status == s for c in results) for s in STATUSES}
    print(f"\n{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failure(s)")
    return exitcodes.FAILED if counts["fail"] else exitcodes.OK


if __name__ == "__main__":
    from seg.cli import run_command

    run_command(main)
