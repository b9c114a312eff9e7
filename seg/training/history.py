"""``history.csv``: one row per finished epoch, rewritten atomically after each epoch.

Design choices:

- Columns: ``epoch`` (1-based), ``train_loss``, ``val_loss``, every metric of
  ``seg.metrics.METRIC_NAMES`` computed over the pooled validation pixels (``global``, the
  value early stopping and ``best_model.pth`` use for ``dice``), ``mean_dice`` (per-image
  average), ``lr``, ``seconds`` (the whole epoch, validation and checkpoints included),
  ``images_per_s`` (training images per second of the training steps, all ranks together),
  ``train_seconds`` (the training steps), ``data_seconds`` (rank 0's time waiting for the
  next batch, the data loader's share of ``train_seconds``) and ``skipped_samples`` (bad
  training and validation samples skipped in the epoch, all ranks; only with
  ``data.skip_bad_samples``, else a bad sample stops the run).
- The whole file is rewritten through ``seg.fileio`` after every epoch (a few hundred rows at
  most): a crash never leaves a half-written row, and on resume the rows of epochs that will
  run again are dropped, so every epoch is in the file exactly once.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from seg.fileio import atomic_write_text
from seg.metrics import METRIC_NAMES

HISTORY_FILE = "history.csv"
COLUMNS = ("epoch", "train_loss", "val_loss", *METRIC_NAMES, "mean_dice", "lr", "seconds", "images_per_s",
           "train_seconds", "data_seconds", "skipped_samples")


def read_history(run_dir: str | Path, before_epoch: int | None = None) -> list[dict]:
    """Rows of ``history.csv`` as dicts of floats (``epoch`` as int), oldest first.

    Args:
        run_dir: the run folder.
        before_epoch: keep only rows with ``epoch <= before_epoch`` (1-based count of finished epochs).
    """
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as fh:
        for raw in csv.DictReader(fh):
            row = {k: (int(v) if k == "epoch" else float(v)) for k, v in raw.items() if k in COLUMNS and v != ""}
            if before_epoch is None or row["epoch"] <= before_epoch:
                rows.append(row)
    return rows


def write_history(run_dir: str | Path, rows: list[dict]) -> None:
    """Write every row (missing columns left empty) to ``history.csv`` atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(Path(run_dir) / HISTORY_FILE, buffer.getvalue())


def epoch_row(epoch: int, train_loss: float, val_loss: float, report: dict, lr: float,
              seconds: float, images: int, train_seconds: float | None = None, data_seconds: float = 0.0,
              skipped: int = 0) -> dict:
    """One history row from a validation report (``MetricAccumulator.summary()``).

    Args:
        seconds: the whole epoch; train_seconds: its training steps (default: ``seconds``);
        images: training images of the epoch, all ranks; data_seconds: time spent waiting for batches;
        skipped: bad samples skipped in the epoch.
    """
    train_seconds = seconds if train_seconds is None else train_seconds
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        **{m: report["global"][m] for m in METRIC_NAMES},
        "mean_dice": report["mean"]["dice"],
        "lr": lr,
        "seconds": seconds,
        "images_per_s": images / train_seconds if train_seconds > 0 else 0.0,
        "train_seconds": train_seconds,
        "data_seconds": data_seconds,
        "skipped_samples": skipped,
    }


def summary_line(row: dict, epochs: int, best: bool) -> str:
    """The one log line printed per epoch."""
    skipped = int(row.get("skipped_samples") or 0)
    return (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"dice {row['dice']:.4f}  iou {row['iou']:.4f}  lr {row['lr']:.3g}  "
            f"{row['seconds']:.1f}s  {row['images_per_s']:.2f} img/s"
            + (f"  skipped {skipped} bad samples" if skipped else "") + ("  (best)" if best else ""))
