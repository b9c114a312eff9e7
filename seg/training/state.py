"""Resumable state in ``<run>/last/``, the preemption flag and its exit code.

Design choices:

- ``last/`` holds everything needed to continue bit-for-bit: ``state.pth`` (model weights,
  optimizer, scheduler and gradient-scaler state dicts, the weight average's when
  ``train.ema_decay`` is on, one RNG record per rank) and
  ``progress.json`` (epoch, step in epoch, best score, early-stopping counter, the running
  train-loss sums, whether the run has finished). ``state.pth`` holds only tensors and plain
  containers, so it loads with ``torch.load(weights_only=True)``; RNG states are converted to
  tensors and lists for that reason.
- Atomic folder: rank 0 writes a fresh ``.last.tmp-*`` folder, then swaps it in with two
  renames (``last`` -> ``last.old``, tmp -> ``last``) and deletes the old one. A crash at any
  point leaves either ``last/`` or ``last.old/`` complete; ``load_last`` reads whichever exists.
- Ranks send their RNG records to rank 0 with one ``gather_object``; only rank 0 writes. All
  ranks then meet at a barrier, because launchers (torchrun) kill the remaining workers as soon
  as one exits: no rank may leave before the state is on disk.
- Preemption: SIGUSR1 and SIGTERM handlers only set a flag. At each optimizer-step boundary
  the ranks agree on it (all-reduce MAX; a single process just reads it), save ``last/`` and
  exit with ``PREEMPTED_EXIT_CODE`` = 75 (EX_TEMPFAIL: preempted, state saved, rerun the same
  command to resume). Under torchrun the launcher itself reports a failure (exit 1) when its
  workers exit with 75; ``progress.json`` then has ``"preempted": true``.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from seg import exitcodes
from seg.fileio import atomic_write_json, remove_stale_temporaries, temporary_name

PREEMPTED_EXIT_CODE = exitcodes.PREEMPTED  # 75, EX_TEMPFAIL: "preempted, state saved, rerun to resume"
LAST = "last"
STATE_FILE = "state.pth"
PROGRESS_FILE = "progress.json"


@dataclass
class Progress:
    """Where a run stands; saved as ``last/progress.json``."""

    epoch: int = 0  # the epoch in progress (0-based); == epochs when finished
    step: int = 0  # micro-batches already done in that epoch
    best_score: float = float("-inf")  # the highest val Dice
    best_epoch: int = -1
    best_loss: float = float("inf")  # the lowest val loss (runs saved before it was kept: inf)
    best_loss_epoch: int = -1
    bad_epochs: int = 0  # epochs without an improvement that counts (train.select_on; early stopping)
    loss_sum: float = 0.0  # train loss summed over the done micro-batches of the epoch
    loss_count: int = 0
    seconds: float = 0.0  # time already spent in the epoch
    data_seconds: float = 0.0  # of which waiting for batches (rank 0)
    skipped: int = 0  # bad samples skipped in the epoch so far (data.skip_bad_samples), all ranks
    finished: bool = False  # the last epoch ran, or early stopping ended the run
    stopped_early: bool = False
    preempted: bool = False


def after_epoch(progress: Progress, epoch: int, dice: float, val_loss: float, epochs: int, early_stopping: int,
                select_on: str = "dice") -> Progress:
    """Where the run stands after ``epoch`` (0-based) scored validation Dice ``dice`` and loss
    ``val_loss``: the best of each and their epochs, the early-stopping counter (epochs without
    a higher Dice for ``select_on`` 'dice', a lower loss for 'val_loss', either for 'both'),
    whether the run has finished."""
    higher, lower = dice > progress.best_score, val_loss < progress.best_loss
    counts = {"dice": higher, "val_loss": lower, "both": higher or lower}[select_on]
    bad = 0 if counts else progress.bad_epochs + 1
    stopped_early = early_stopping > 0 and bad >= early_stopping
    return Progress(epoch=epoch + 1, step=0, best_score=dice if higher else progress.best_score,
                    best_epoch=epoch + 1 if higher else progress.best_epoch,
                    best_loss=val_loss if lower else progress.best_loss,
                    best_loss_epoch=epoch + 1 if lower else progress.best_loss_epoch, bad_epochs=bad,
                    finished=stopped_early or epoch + 1 >= epochs, stopped_early=stopped_early)


class PreemptionFlag:
    """SIGUSR1/SIGTERM set a flag; nothing else happens inside the handler."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def is_set(self) -> bool:
        return self.signum is not None

    def agreed(self, accelerator) -> bool:
        """True on every rank when any rank got the signal (one all-reduce when distributed)."""
        if accelerator.num_processes == 1:
            return self.is_set
        flag = torch.tensor([1 if self.is_set else 0], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def rng_record() -> dict:
    """This process's RNG states as tensors and plain lists (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    record = {
        "python": [version, list(mt), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        record["cuda"] = torch.cuda.get_rng_state_all()
    return record


def set_rng_record(record: dict) -> None:
    version, mt, gauss = record["python"]
    random.setstate((version, tuple(mt), gauss))
    n = record["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(record["torch"])
    if "cuda" in record and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(record["cuda"])


def save_last(run_dir: Path, accelerator, model, optimizer, scheduler, progress: Progress, ema=None) -> None:
    """Write ``run_dir/last/`` atomically (rank 0), all ranks return once it is on disk.

    Every rank must call this (it gathers RNG records and ends with a barrier). ``ema``: the
    ``seg.training.ema.ModelEMA`` of the run, or None.
    """
    from accelerate.utils import gather_object

    records = gather_object([rng_record()])
    if accelerator.is_main_process:
        run_dir = Path(run_dir)
        inner = accelerator.unwrap_model(model)
        state = {
            "model": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "rng": records,
            "world_size": accelerator.num_processes,
        }
        tmp = temporary_name(run_dir / LAST)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / STATE_FILE)
        atomic_write_json(tmp / PROGRESS_FILE, asdict(progress))
        final, old = run_dir / LAST, run_dir / f"{LAST}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def mark_preempted(run_dir: Path, progress: Progress) -> None:
    """Record in ``last/progress.json`` that the run stopped on a signal after a complete epoch.

    The epoch-end save already wrote the full state; only the flag changes (rank 0, atomic).
    """
    atomic_write_json(Path(run_dir) / LAST / PROGRESS_FILE, asdict(replace(progress, preempted=True)))


def find_last(run_dir: Path) -> Path | None:
    """The complete ``last/`` folder (or ``last.old/`` after a crash mid-swap), else None."""
    for name in (LAST, f"{LAST}.old"):
        folder = Path(run_dir) / name
        if (folder / STATE_FILE).is_file() and (folder / PROGRESS_FILE).is_file():
            return folder
    return None


def read_progress(folder: Path) -> Progress:
    data = json.loads((Path(folder) / PROGRESS_FILE).read_text())
    return Progress(**{k: v for k, v in data.items() if k in Progress.__dataclass_fields__})


def load_last(folder: Path, accelerator, model, optimizer, scheduler, ema=None) -> Progress:
    """Restore model, optimizer, scheduler, scaler, the weight average and this rank's RNG from ``folder``.

    The RNG record of this rank is used when the world size is unchanged, else rank 0's. An
    ``ema`` with no average in ``folder`` (the run trained without one) starts from the
    restored weights.
    """
    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    accelerator.unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        else:
            ema.module.load_state_dict(state["model"])
    records = state["rng"]
    rank = accelerator.process_index
    set_rng_record(records[rank] if len(records) == accelerator.num_processes else records[0])
    return read_progress(folder)


def remove_last(run_dir: Path) -> None:
    """Delete ``last/`` (and ``last.old/``): used when a run starts over (``--no_resume``)."""
    for name in (LAST, f"{LAST}.old"):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)


def clean_run_dir(run_dir: Path) -> None:
    """Remove temporaries (files and ``.last.tmp-*`` folders) left by a crashed writer."""
    run_dir = Path(run_dir)
    remove_stale_temporaries(run_dir)
    for tmp in run_dir.glob(f".{LAST}.tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
