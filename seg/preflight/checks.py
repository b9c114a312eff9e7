"""Doctor checks of the run's config, data and machine (see ``seg.doctor`` for the list).

Each function returns a list of ``Check`` records and never raises on a user mistake: a
problem is a 'fail' record with the fix. Shard rules come from ``seg.data.shards`` (the same
``check_enough_shards`` the trainer runs), so doctor and trainer cannot disagree.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import Counter
from pathlib import Path

from seg.preflight import Check

# A train shard holding fewer than this fraction of the median shard's samples is "unbalanced".
BALANCE_RATIO = 0.5


def check_config(args) -> tuple[object | None, list[Check]]:
    """The config resolved from --config, flags and overrides; (None, [fail]) when invalid."""
    from seg.config import config_from_args

    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        return None, [Check("fail", "config", str(exc), "fix the key or value named above (see configs/*.yaml)")]
    where = args.config or "defaults"
    return cfg, [Check("ok", "config", f"{where}: valid (data {cfg.data.data_dir}, {cfg.data.image_size} px, "
                                       f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size} per rank)")]


def _balance(shards: list[dict]) -> Check | None:
    counts = sorted(s.get("count", 0) for s in shards)
    if len(counts) < 3:
        return None
    median = counts[len(counts) // 2]
    small = [s for s in shards[:-1] if s.get("count", 0) < BALANCE_RATIO * median]  # the last may be short
    if small:
        return Check("warn", "balance", f"{len(small)} train shard(s) hold < {BALANCE_RATIO:.0%} of the median "
                                        f"{median} samples (e.g. {small[0]['name']}: {small[0].get('count', 0)})",
                     "re-run `seg prepare` so that shards are filled evenly (--shard_size)")
    return Check("ok", "balance", f"train shards hold {counts[0]}-{counts[-1]} samples (median {median})")


def check_shards(data_dir: str, world_size: int, num_workers: int) -> list[Check]:
    """dataset.json, shard files, shards vs ranks x workers, balance, validation shards.

    Args:
        data_dir: folder written by ``seg prepare``.
        world_size: training processes over all nodes.
        num_workers: DataLoader workers per process (data.num_workers).
    """
    from seg.data.shards import check_enough_shards, load_dataset_info, shard_urls

    try:
        info = load_dataset_info(data_dir)
        train = shard_urls(data_dir, "train", info)
    except (ValueError, FileNotFoundError) as exc:
        return [Check("fail", "data", str(exc), "point --data_dir at a folder written by `seg prepare`")]
    splits = info.get("splits", {})
    n_train = splits.get("train", {}).get("count", 0)
    n_val = splits.get("val", {}).get("count", 0)
    val_shards = splits.get("val", {}).get("shards", [])
    out = [Check("ok", "data", f"{data_dir}: {n_train} train / {n_val} val samples in {len(train)} / "
                               f"{len(val_shards)} shard(s)")]
    readers = world_size * max(1, num_workers)
    try:
        check_enough_shards(len(train), world_size, num_workers)
        out.append(Check("ok", "shards", f"{len(train)} train shards for {world_size} rank(s) x "
                                         f"{max(1, num_workers)} worker(s) = {readers} readers"))
    except ValueError as exc:
        out.append(Check("fail", "shards", str(exc).split(". ")[0],
                         f"lower data.num_workers, or re-run `seg prepare --shard_size "
                         f"{max(1, n_train // readers)}` to get at least {readers} shards"))
    balance = _balance(splits.get("train", {}).get("shards", []))
    if balance:
        out.append(balance)
    if val_shards and len(val_shards) < world_size:
        out.append(Check("warn", "val shards", f"{len(val_shards)} validation shard(s) for {world_size} ranks: "
                                               "some ranks validate nothing (correct, but slower)",
                         f"re-run `seg prepare` with a smaller --shard_size for >= {world_size} val shards"))
    elif not val_shards:
        out.append(Check("warn", "val shards", "no validation split: best_model.pth cannot be chosen on validation",
                         "re-run `seg prepare` with --val_split 0.1 (or more)"))
    return out


def check_pairs(images: str, masks: str | None) -> list[Check]:
    """Image/mask pairing of raw folders, as ``seg prepare`` will do it."""
    from seg.data.pairing import find_pairs

    if not Path(images).is_dir():
        return [Check("fail", "pairs", f"--images {images} is not a folder", "give the folder of the images")]
    if masks is not None and not Path(masks).is_dir():
        return [Check("fail", "pairs", f"--masks {masks} is not a folder", "give the folder of the masks")]
    pairs, problems = find_pairs(images, masks, volumes=True)
    if not pairs:
        return [Check("fail", "pairs", f"no usable pair in {images} (+ {masks}): {len(problems)} problem(s)",
                      problems[0].detail if problems else "put images (jpg/png/tif/bmp) under --images")]
    out = [Check("ok", "pairs", f"{len(pairs)} image/mask pair(s) in {images}")]
    if problems:
        reasons = Counter(p.reason for p in problems)
        summary = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        out.append(Check("warn", "pairs", f"{len(problems)} image(s) skipped: {summary}; e.g. {problems[0].detail}",
                         "add or rename the masks (x.png or x_mask.png next to x.jpg's relative path)"))
    return out


def _local_addresses() -> set[str]:
    names = {"localhost", socket.gethostname(), socket.getfqdn()}
    addrs = {"127.0.0.1", "::1", "0.0.0.0"}
    for name in names:
        try:
            addrs.update(info[4][0] for info in socket.getaddrinfo(name, None))
        except OSError:
            pass
    return addrs


def check_rendezvous(head: str | None, port: int, nodes: int) -> list[Check]:
    """The head node's name resolves (c10d retries an unresolvable name until the job times
    out); the port is free when the head is this machine."""
    head = head or socket.gethostname()
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(head, port, proto=socket.IPPROTO_TCP)}
    except OSError as exc:
        return [Check("fail", "rendezvous", f"head node name {head!r} does not resolve ({exc.strerror or exc})",
                      "use a name every node resolves: on Slurm the first of "
                      "`scontrol show hostnames \"$SLURM_JOB_NODELIST\"`; else add it to DNS or /etc/hosts")]
    out = [Check("ok", "rendezvous", f"{head} resolves to {', '.join(sorted(addrs))}")]
    if nodes > 1 and addrs <= {"127.0.0.1", "::1"}:
        out.append(Check("warn", "rendezvous", f"{head} resolves only to loopback: other nodes cannot reach it",
                         "use the node's network name (or emulated nodes on one host only)"))
    if not addrs & _local_addresses():
        out.append(Check("ok", "port", f"port {port} will be opened on {head} (not this machine: not checked)"))
        return out
    family = socket.AF_INET6 if all(":" in a for a in addrs) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return out + [Check("fail", "port", f"port {port} is already in use on {head}",
                                    "pick another --rdzv_endpoint port (train.sbatch derives one from the job "
                                    "id; export SEG_RDZV_PORT to choose)")]
            return out + [Check("warn", "port", f"cannot bind port {port} on {head}: {exc}", "pick another port")]
    return out + [Check("ok", "port", f"port {port} is free on {head}")]


def check_devices(nproc_per_node: int, gpus_per_node: int | None) -> list[Check]:
    """GPUs asked for are visible to this process; CPU cores vs processes."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out = []
    if gpus_per_node:
        if visible < gpus_per_node:
            hint = os.environ.get("CUDA_VISIBLE_DEVICES")
            out.append(Check("fail", "gpus", f"{gpus_per_node} GPU(s) per node asked, {visible} visible here"
                                             + (f" (CUDA_VISIBLE_DEVICES={hint!r})" if hint is not None else ""),
                             "run doctor inside the allocation (srun seg doctor ...), ask for "
                             "--gpus-per-node, or lower --gpus_per_node"))
        else:
            names = sorted({torch.cuda.get_device_name(i) for i in range(visible)})
            out.append(Check("ok", "gpus", f"{visible} GPU(s) visible ({', '.join(names)}); {gpus_per_node} per node used"))
    elif visible:
        out.append(Check("ok", "gpus", f"{visible} GPU(s) visible; --gpus_per_node not given (CPU run?)"))
    else:
        out.append(Check("ok", "gpus", "no GPU visible: CPU processes (DDP over gloo)"))
    if not gpus_per_node and nproc_per_node > cores:
        out.append(Check("warn", "cpus", f"{nproc_per_node} processes per node on {cores} CPU core(s): oversubscribed",
                         f"use at most {cores} processes per node (--cpus-per-task / --cpu)"))
    else:
        out.append(Check("ok", "cpus", f"{cores} CPU core(s) for {nproc_per_node} process(es) per node"))
    return out
