"""qc/ part files and their merge into qc.csv by `seg predict --summarize`, across array tasks,
ranks, reruns and a lost part file; QC fields in manifest.jsonl."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from predict_fixtures import make_checkpoint, random_image, write_image
from seg.inference.manifest import read_manifest
from seg.inference.qc_table import COLUMNS, QC_CSV, append_unit_rows, merge_tables, part_path, read_table
from seg.predict import main as predict_main

N = 23


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc_cohort")
    ckpt = make_checkpoint(root / "m.pth")
    for i in range(N):
        write_image(root / "images" / f"img{i:03d}.png", random_image(30 + i % 5, 36, seed=i))
    return ckpt, root / "images"


def predict(ckpt, images, out, monkeypatch, task=None, rank=None, extra=()):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    if task is not None:
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task[0]))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(task[1]))
    if rank is not None:
        monkeypatch.setenv("RANK", str(rank[0]))
        monkeypatch.setenv("LOCAL_RANK", str(rank[0]))
        monkeypatch.setenv("WORLD_SIZE", str(rank[1]))
    code = predict_main(["--model_path", str(ckpt), "--image_dir", str(images), "--output_dir", str(out),
                         "--unit_size", "4", "--num_workers", "0", "--writer_threads", "2", "--no_progress", *extra])
    assert code == 0


def manifest_images(out: Path) -> dict[str, dict]:
    return {i["input"]: i for r in read_manifest(out).values() for i in r["images"]}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.timeout(300)
def test_merge_over_array_tasks_and_ranks_gives_one_row_per_image(cohort, tmp_path, monkeypatch):
    ckpt, images = cohort
    out = tmp_path / "out"
    for task in range(2):  # a 2-task array, each task with 2 ranks: 4 workers
        for rank in range(2):
            predict(ckpt, images, out, monkeypatch, task=(task, 2), rank=(rank, 2))
    parts = sorted(p.name for p in (out / "qc").iterdir())
    assert parts == [part_path(out, w, 4).name for w in range(4)]
    manifest = manifest_images(out)
    assert len(manifest) == N and all("qc" in m and 0 <= m["qc"]["score"] <= 1 for m in manifest.values())

    # a unit killed between its rows and its manifest line was redone (its rows appended twice),
    # and a unit that never reached the manifest left rows behind
    units = read_manifest(out)
    unit_id, record = next(iter(units.items()))
    worker = record["worker"]
    append_unit_rows(out, worker, 4, unit_id, record["images"])
    append_unit_rows(out, worker, 4, "files-999999", [{**record["images"][0], "input": "ghost.png"}])

    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert predict_main(["--summarize", str(out)]) == 0
    rows = read_csv(out / QC_CSV)
    assert list(rows[0]) == list(COLUMNS)
    assert sorted(r["input"] for r in rows) == sorted(manifest)  # one row per image, no ghost
    scores = [float(r["qc_score"]) for r in rows]
    assert scores == sorted(scores)  # lowest first
    for r in rows:
        qc = manifest[r["input"]]["qc"]
        assert float(r["qc_score"]) == qc["score"] and r["qc_flags"] == ";".join(qc["flags"])
    assert (out / "report.html").is_file()

    # one worker's part file lost: its rows come from the manifest, the table is the same
    before = read_table(out / QC_CSV)
    lost = part_path(out, worker, 4)
    n_lost = sum(1 for line in lost.read_text().splitlines()[1:] if line and "ghost" not in line)
    lost.unlink()
    merged = merge_tables(out)
    assert merged["rows"] == N and merged["from_manifest"] > 0 and merged["from_manifest"] <= n_lost
    assert read_table(out / QC_CSV) == before


@pytest.mark.timeout(300)
def test_same_table_from_one_worker_and_qc_can_be_switched_off(cohort, tmp_path, monkeypatch):
    ckpt, images = cohort
    one, three = tmp_path / "one", tmp_path / "three"
    predict(ckpt, images, one, monkeypatch)
    for k in range(3):
        predict(ckpt, images, three, monkeypatch, extra=("--part", str(k), "--num_parts", "3"))
    a, b = merge_tables(one), merge_tables(three)
    assert a["rows"] == b["rows"] == N
    ta = {r["input"]: r for r in read_table(one / QC_CSV)}
    tb = {r["input"]: r for r in read_table(three / QC_CSV)}
    assert set(ta) == set(tb)
    for key in ta:  # batches differ between the splits; bf16 results may differ in the last digit
        assert ta[key]["qc_score"] == pytest.approx(tb[key]["qc_score"], abs=0.02)

    off = tmp_path / "off"
    predict(ckpt, images, off, monkeypatch, extra=("--no_qc",))
    assert not (off / "qc").exists()
    assert all("qc" not in m for m in manifest_images(off).values())
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert predict_main(["--summarize", str(off), "--json"]) == 0
    assert not (off / QC_CSV).exists()
    info = json.loads((off / "prediction.json").read_text())
    assert info["settings"]["qc"] is False and info["model_sha256"]
