"""``qc.csv``: one flat row of QC per predicted image, written per worker and merged once.

Layout of a prediction folder::

    OUT/qc/part-00003-of-00008.csv   worker 3 of 8 (rank x array task), appended per finished unit
    OUT/qc.csv                       the merge, written by ``seg predict --summarize OUT``

Design choices:

- Each worker appends the rows of a finished unit to its own file, before the unit's manifest
  line (``seg.inference.runner``): no lock is shared between workers for it, and a spreadsheet
  can be opened on a part while the job runs. The file name holds the worker count, so a rerun
  with another array size never appends to a file of the earlier split.
- The manifest stays the record of finished work: the merge keeps only rows of units that are in
  the manifest with its images, one row per input (a unit that was killed between its rows and
  its manifest line is redone and appends the same rows again), and fills any manifest image
  without a row (a part file lost or deleted) from the QC the manifest records with the image.
  So the merged table is the same whatever the number of workers, tasks and reruns.
- Rows are sorted by ``qc_score`` then input: the images to look at first come first.
- Columns (``COLUMNS``) are documented in docs/FORMATS.md; flags are joined by ``;``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from seg.fileio import atomic_write_text
from seg.inference.manifest import read_manifest

QC_DIR = "qc"
QC_CSV = "qc.csv"
SIGNALS = ("entropy", "flip_dice", "foreground_quantile", "components", "components_quantile", "content",
           "empty_on_content", "touches_border")
COLUMNS = ("input", "output", "unit", "qc_score", "qc_flags", "foreground") + SIGNALS


def part_path(out_dir: Path, worker: int, num_workers: int) -> Path:
    """This worker's part file under ``OUT/qc/``."""
    return Path(out_dir) / QC_DIR / f"part-{worker:05d}-of-{num_workers:05d}.csv"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def image_row(unit: str, image: dict) -> list[str]:
    """The CSV cells of one manifest image record (with its ``qc`` dict)."""
    qc = image.get("qc") or {}
    return [image["input"], image["output"], unit, _cell(qc.get("score")), ";".join(qc.get("flags", ())),
            _cell(image.get("foreground"))] + [_cell(qc.get(k)) for k in SIGNALS]


def _csv_text(rows: list[list[str]], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(COLUMNS)
    writer.writerows(rows)
    return buf.getvalue()


def append_unit_rows(out_dir: Path, worker: int, num_workers: int, unit: str, images: list[dict]) -> None:
    """Append a finished unit's rows to this worker's part (one ``write``, then fsync)."""
    rows = [image_row(unit, image) for image in images if image.get("qc")]
    if not rows:
        return
    path = part_path(out_dir, worker, num_workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        text = _csv_text(rows, header=size == 0)
        if size:  # a crash mid-row left no newline: start on a fresh line (the broken row is dropped)
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    text = "\n" + text
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_parts(out_dir: Path) -> dict[tuple[str, str], list[str]]:
    """``{(unit, input): row}`` from every part file; rows that do not parse fully are skipped."""
    rows: dict[tuple[str, str], list[str]] = {}
    folder = Path(out_dir) / QC_DIR
    for path in sorted(folder.glob("part-*.csv")) if folder.is_dir() else ():
        with open(path, newline="") as fh:
            for row in csv.reader(fh):
                if len(row) != len(COLUMNS) or row[0] == COLUMNS[0]:
                    continue
                rows[(row[2], row[0])] = row
    return rows


def merge_tables(out_dir: Path, units: dict | None = None) -> dict:
    """Write ``OUT/qc.csv`` from the parts, checked against the manifest (module docstring).

    Returns:
        ``{"path": str | None, "rows": n, "from_parts": n, "from_manifest": n}``; no file is
        written when no image of the manifest has QC (a folder predicted without it).
    """
    out_dir = Path(out_dir)
    units = read_manifest(out_dir) if units is None else units
    parts = read_parts(out_dir)
    merged: dict[str, list[str]] = {}
    from_parts = from_manifest = 0
    for unit_id, record in units.items():
        for image in record.get("images", []):
            if image["input"] in merged:
                continue  # the same input in two units is reported by manifest.summarize
            row = parts.get((unit_id, image["input"]))
            if row is not None:
                from_parts += 1
            elif image.get("qc"):
                row, from_manifest = image_row(unit_id, image), from_manifest + 1
            else:
                continue
            merged[image["input"]] = row
    if not merged:
        return {"path": None, "rows": 0, "from_parts": 0, "from_manifest": 0}
    rows = sorted(merged.values(), key=lambda r: (float(r[3]) if r[3] else 2.0, r[0]))
    path = out_dir / QC_CSV
    atomic_write_text(path, _csv_text(rows, header=True))
    return {"path": str(path), "rows": len(rows), "from_parts": from_parts, "from_manifest": from_manifest}


def read_table(path: Path) -> list[dict]:
    """The rows of a ``qc.csv`` as dicts (numbers parsed, flags as lists, empty cells None)."""
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            rec: dict = {"input": row["input"], "output": row["output"], "unit": row["unit"],
                         "qc_flags": [f for f in row["qc_flags"].split(";") if f]}
            for key in ("qc_score", "foreground") + SIGNALS:
                value = row.get(key, "")
                rec[key] = None if value == "" else float(value)
            out.append(rec)
    return out
