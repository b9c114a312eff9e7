"""The run folder's files, written by rank 0 in an order that stays consistent after a crash.

Design choices:

- ``RunFolder.start`` removes temporaries of a crashed writer, the old ``last/`` when the run
  starts over, writes ``config.yaml`` and ``provenance.json``, and returns the history rows to
  keep (a resumed run drops rows past ``last/``'s epoch, so each epoch appears once).
- A model checkpoint is serialised once (``seg.checkpoint.checkpoint_bytes``) and written once;
  best/periodic/final files holding the same weights are hard links to that file, each put in
  place by an atomic rename (a later replace of one name, the next best model, leaves the
  others untouched). Where hard links are not supported the bytes are written again.
- ``end_epoch`` writes, in this order: plots (in a thread, overlapping the rest), model
  checkpoints, ``history.csv``; ``last/`` follows (``seg.training.state.save_last``, all ranks).
"""

from __future__ import annotations

import os
from pathlib import Path

from seg.checkpoint import checkpoint_bytes, model_checkpoint
from seg.config import Config, config_to_yaml
from seg.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, temporary_name
from seg.training import history, plots, state
from seg.training.provenance import PROVENANCE_FILE


class RunFolder:
    """The run folder of one training run (rank 0 writes; other ranks never call these).

    Args:
        run_dir: ``train.checkpoint_dir``.
        ckpt_args: what every model checkpoint stores besides weights (preprocess, threshold,
            config, provenance: ``seg.checkpoint.model_checkpoint`` arguments).
    """

    def __init__(self, run_dir: Path, ckpt_args: dict):
        self.run_dir, self.ckpt_args = Path(run_dir), ckpt_args
        self.rows: list[dict] = []

    def start(self, cfg: Config, provenance: dict, resumed_epoch: int | None) -> None:
        """Prepare the folder; keep the history rows of epochs before ``resumed_epoch`` (None: fresh)."""
        state.clean_run_dir(self.run_dir)
        if not cfg.train.resume:  # starting over: an old last/ must not be resumed by a later rerun
            state.remove_last(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", config_to_yaml(cfg))
        atomic_write_json(self.run_dir / PROVENANCE_FILE, provenance)
        self.rows = history.read_history(self.run_dir, before_epoch=resumed_epoch) if resumed_epoch is not None else []

    def end_epoch(self, model, row: dict, epoch: int, metrics: dict, names: list[str], samples: list[dict],
                  mean, std, threshold: float, finished: bool) -> None:
        """Write the epoch's model checkpoints (``names``), history row and, when ``finished``, plots."""
        plotting = None
        if finished:  # rendered while the checkpoints are written
            plotting = plots.plot_all_in_background([*self.rows, row], samples, mean, std, threshold, self.run_dir)
        if names:
            data = checkpoint_bytes(model_checkpoint(model, epoch=epoch, metrics=metrics, **self.ckpt_args))
            write_linked(self.run_dir, names, data)
        self.rows.append(row)
        history.write_history(self.run_dir, self.rows)
        if plotting is not None:
            plotting.join()


BEST, BEST_LOSS = "best_model.pth", "best_loss_model.pth"


def checkpoint_names(improved: bool, epoch: int, save_every: int, finished: bool,
                     loss_candidate: bool = False) -> list[str]:
    """The model files of a finished epoch (1-based ``epoch``): best, the lowest-loss candidate
    (``train.select_on=both``), periodic, final."""
    return (([BEST] if improved else []) + ([BEST_LOSS] if loss_candidate else [])
            + ([f"checkpoint_epoch_{epoch}.pth"] if save_every and epoch % save_every == 0 else [])
            + (["final_model.pth"] if finished else []))


def write_linked(run_dir: Path, names: list[str], data: bytes) -> None:
    """Write the same bytes under several names: the first file is written (and fsynced) once,
    the others are hard links to it, each put in place by an atomic rename."""
    if not names:
        return
    first = run_dir / names[0]
    atomic_write_bytes(first, data)
    for name in names[1:]:
        tmp = temporary_name(run_dir / name)
        try:
            os.link(first, tmp)
            os.replace(tmp, run_dir / name)
        except OSError:
            tmp.unlink(missing_ok=True)
            atomic_write_bytes(run_dir / name, data)
