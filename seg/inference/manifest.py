"""manifest.jsonl and failures.jsonl: the record of finished work, shared by every worker.

Design choices:

- One JSON line per finished unit, appended only after the unit's files are complete (renamed
  into place), so a line always describes files that exist. A line holds the unit id and index,
  the number of units, its inputs (``images``: input, output, foreground fraction; ``failed``:
  inputs that could not be read), the tar name for ``--format tar``, the model checkpoint's
  SHA-256, the mask settings, seconds, worker and host.
- Many processes append to the same files (torchrun ranks, array tasks, on several nodes over a
  shared file system): each append takes an exclusive ``fcntl.flock`` on ``.manifest.lock``
  beside the manifest, writes the whole line with one ``write``, then flushes and fsyncs.
  Readers skip a line that does not parse (a truncated last line from a crash mid-write) and
  keep the first line of each unit id (a unit can only be appended twice by a crash between
  its write and the next run's read, and both lines describe the same outputs).
- A folder holds the outputs of one model made one way. A run whose checkpoint SHA-256 differs
  from the manifest's is refused (the error names both) unless ``--overwrite``, which sets the
  old records aside (``manifest.jsonl.replaced-SHA12``) under the lock so that every unit is
  redone with the new model; output files of the old model are then replaced as their units
  finish. The same holds for the settings that decide a mask from the same weights
  (``mask_settings``: threshold, post-processing, TTA, tiling; ``Predictor.mask_settings``):
  resuming a folder with ``--postprocess none`` where the first run applied the checkpoint's
  post-processing, or with another ``--threshold``, would otherwise mix two kinds of masks in
  one cohort without a trace. Precision and batch size are not part of it: a resumed array
  task may land on another kind of node. Likewise a unit whose recorded inputs are not the
  ones planned now (the input list or ``--unit_size`` changed): refused, or set aside with
  ``--overwrite``.
- ``summarize`` merges and validates the manifest for ``seg predict --summarize OUT`` (the
  afterok job of a Slurm array): units finished out of planned, images, failures, foreground
  statistics, models, and every listed output present.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"
LOCK = ".manifest.lock"


class ManifestError(ValueError):
    """An output folder whose manifest conflicts with this run (other model, other inputs)."""


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Exclusive lock on ``out_dir/.manifest.lock`` (works across processes and NFS clients)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def append_lines(path: Path, records: list[dict]) -> None:
    """Append records as JSON lines in one ``write`` under the folder's lock, then fsync."""
    if not records:
        return
    data = "".join(json.dumps(r, sort_keys=False, separators=(",", ":")) + "\n" for r in records).encode()
    with locked(path.parent):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:  # a crash mid-line left no newline: start ours on a fresh line
                with open(path, "rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def read_lines(path: Path) -> list[dict]:
    """Parsed JSON lines of ``path``; lines that do not parse (truncated) are skipped."""
    if not path.is_file():
        return []
    records = []
    with open(path, "rb") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def read_manifest(out_dir: Path) -> dict[str, dict]:
    """Finished units by id (the first line of each id wins)."""
    units: dict[str, dict] = {}
    for record in read_lines(Path(out_dir) / MANIFEST):
        if "unit" in record:
            units.setdefault(record["unit"], record)
    return units


def _settings_text(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def check_model(out_dir: Path, sha256: str, overwrite: bool = False, settings: dict | None = None,
                planned: dict[str, list[str]] | None = None) -> None:
    """Refuse a folder holding another model's results, masks made with other ``settings``
    (``mask_settings`` of its lines; lines without them are not compared), or units that cover
    other inputs than ``planned`` (unit id -> input paths; units not in it are not compared),
    or set them aside with ``overwrite``."""
    out_dir = Path(out_dir)
    with locked(out_dir):
        manifest = out_dir / MANIFEST
        records = read_lines(manifest)
        others = sorted({r.get("model_sha256") for r in records} - {sha256, None})
        changed = [] if settings is None else sorted(
            {_settings_text(r["mask_settings"]) for r in records if isinstance(r.get("mask_settings"), dict)}
            - {_settings_text(settings)})
        moved = [] if planned is None else [
            r for r in records if r.get("unit") in planned and _recorded_inputs(r) != sorted(planned[r["unit"]])]
        if not others and not changed and not moved:
            return
        if not overwrite and not others and not changed:
            check_unit_inputs(moved[0], planned[moved[0]["unit"]])
        if not overwrite:
            if others:
                raise ManifestError(
                    f"{manifest} holds predictions of model sha256 {', '.join(others)}, but this run's checkpoint "
                    f"has sha256 {sha256}; a cohort never mixes models. Use another --output_dir, or pass "
                    "--overwrite to redo every unit with this checkpoint")
            raise ManifestError(
                f"{manifest} holds masks made with {'; '.join(changed)}, but this run makes them with "
                f"{_settings_text(settings)}; a cohort never mixes two ways of making masks. Rerun with the first "
                "run's --threshold / --postprocess / --tta / --tile_size, use another --output_dir, or pass "
                "--overwrite to redo every unit this way")
        tag = (others[0] if others else sha256)[:12]
        for name in (MANIFEST, FAILURES):
            if (out_dir / name).exists():
                os.replace(out_dir / name, out_dir / f"{name}.replaced-{tag}")


def _recorded_inputs(record: dict) -> list[str]:
    return sorted([i["input"] for i in record.get("images", [])] + [f["input"] for f in record.get("failed", [])])


def check_unit_inputs(record: dict, sources: list[str] | None) -> None:
    """A finished unit's recorded inputs must be the planned ones (same list, same unit size)."""
    if sources is None:
        return
    recorded = _recorded_inputs(record)
    if recorded != sorted(sources):
        raise ManifestError(
            f"unit {record['unit']} in the manifest covers other inputs than this run plans "
            f"({len(recorded)} recorded, {len(sources)} planned): the input list or --unit_size changed since "
            "the folder was written. Rerun with the same inputs and --unit_size, use a new --output_dir, or pass "
            "--overwrite to redo every unit with these inputs")


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    n = len(v)
    return {"mean": round(sum(v) / n, 6), "min": v[0], "median": v[n // 2], "max": v[-1],
            "empty": sum(1 for x in v if x == 0)}


def summarize(out_dir: Path, check_files: bool = True) -> dict:
    """Merge and validate ``out_dir``'s manifest into a cohort summary dict.

    Keys: units, planned_units, missing_units (indices), images, failures, foreground (stats),
    models, workers, seconds, problems (list of strings; empty when the cohort is complete
    and every listed output exists).
    """
    out_dir = Path(out_dir)
    units = read_manifest(out_dir)
    problems: list[str] = []
    if not units:
        problems.append(f"{out_dir / MANIFEST} holds no finished unit")
    planned = {r.get("num_units") for r in units.values()}
    num_units = max((p for p in planned if p is not None), default=len(units))
    if len(planned) > 1:
        problems.append(f"units were planned with different totals {sorted(planned, key=str)}")
    indices = {r.get("index") for r in units.values()}
    missing = [i for i in range(num_units) if i not in indices]
    if missing:
        problems.append(f"{len(missing)} of {num_units} units are not finished (first: {missing[:10]}); "
                        "rerun the same command to finish them")
    seen: dict[str, str] = {}
    fg, failures = [], []
    for unit_id, r in units.items():
        for image in r.get("images", []):
            if image["input"] in seen:
                problems.append(f"{image['input']} appears in units {seen[image['input']]} and {unit_id}")
            seen[image["input"]] = unit_id
            fg.append(image["foreground"])
        failures += r.get("failed", [])
        if check_files:
            names = [r["tar"]] if r.get("tar") else [i["output"] for i in r.get("images", [])]
            absent = [n for n in names if not (out_dir / n).is_file()]
            if absent:
                problems.append(f"unit {unit_id}: {len(absent)} listed outputs are missing (first: {absent[0]})")
    models = sorted({r.get("model_sha256") for r in units.values()} - {None})
    if len(models) > 1:
        problems.append(f"the folder mixes models {', '.join(models)}")
    return {
        "output_dir": str(out_dir), "units": len(units), "planned_units": num_units, "missing_units": missing,
        "images": len(seen), "failures": len(failures), "foreground": _stats(fg),
        "models": models,
        "workers": len({(r.get("worker"), r.get("num_workers")) for r in units.values()}),
        "seconds": round(sum(r.get("seconds", 0.0) for r in units.values()), 3), "problems": problems,
    }


def format_summary(s: dict) -> str:
    fg = s["foreground"]
    lines = [f"{s['output_dir']}: {s['units']}/{s['planned_units']} units, {s['images']} images, "
             f"{s['failures']} failures, {s['workers']} workers, {s['seconds']:.1f} s of unit time",
             f"models: {', '.join(s['models']) or 'none'}"]
    if fg:
        lines.append(f"foreground fraction: mean {fg['mean']:.4f}, median {fg['median']:.4f}, "
                     f"min {fg['min']:.4f}, max {fg['max']:.4f}, {fg['empty']} empty masks")
    lines += [f"PROBLEM: {p}" for p in s["problems"]]
    return "\n".join(lines)
