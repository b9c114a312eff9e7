"""Inputs, units, the worker split, safe output names and the manifest (no model needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from seg.inference.inputs import (build_units, expand_shards, file_units, list_file, list_folder, safe_relative,
                                  units_for_worker)
from seg.inference.manifest import (ManifestError, append_lines, check_model, check_unit_inputs, read_manifest,
                                    summarize)


@pytest.mark.parametrize("name, expected", [
    ("a/b/x.png", "a/b/x.png"), ("../../etc/passwd", "etc/passwd"), ("/abs/x.png", "abs/x.png"),
    ("a/../../b/./x.png", "b/x.png"), ("a/../b/x.png", "b/x.png"), ("..\\..\\win\\x.png", "win/x.png"), ("C:/data/x.png", "data/x.png"),
    ("a/.hidden/x.png", "a/hidden/x.png"), ("a/.../x", "a/_/x"),
])
def test_safe_relative_never_escapes(tmp_path, name, expected):
    safe = safe_relative(name)
    assert safe == expected
    assert (tmp_path / safe).resolve().is_relative_to(tmp_path.resolve())


def test_safe_relative_refuses_empty():
    with pytest.raises(ValueError, match="no usable output name"):
        safe_relative("../..")


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_list_folder_recursive_sorted_and_excludes_output(tmp_path):
    for rel in ("b/2.png", "a/1.JPG", "a/z/3.tif", "notes.txt", ".hidden.png", "out/old_mask.png"):
        _touch(tmp_path / rel)
    found = list_folder(tmp_path, exclude=tmp_path / "out")
    assert [stem for _, stem in found] == ["a/1", "a/z/3", "b/2"]


def test_list_file_mirrors_common_parent_and_strips_escapes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lst = tmp_path / "paths.txt"
    lst.write_text("# cohort\n/data/c/a/x.png\n\n/data/c/b/y.png\n")
    assert [s for _, s in list_file(lst)] == ["a/x", "b/y"]
    lst.write_text("../../evil/x.png\nok/y.png\n")
    stems = [s for _, s in list_file(lst)]
    assert stems == ["evil/x", "ok/y"] and all(".." not in s for s in stems)


def test_colliding_outputs_are_an_error_naming_both(tmp_path):
    lst = tmp_path / "paths.txt"
    lst.write_text("a/x.png\na/x.jpg\n")
    with pytest.raises(ValueError, match=r"a/x.png and a/x.jpg would both write a/x_mask.png|a/x.jpg and a/x.png"):
        list_file(lst)


def test_units_are_stable_and_split_by_index_mod_workers(tmp_path):
    found = [(f"p{i:03d}.png", f"p{i:03d}") for i in range(10)]
    units = file_units(found, 3)
    assert [u.id for u in units] == ["files-000000", "files-000001", "files-000002", "files-000003"]
    assert [len(u) for u in units] == [3, 3, 3, 1]
    assert file_units(found, 3) == units
    parts = [units_for_worker(units, w, 3) for w in range(3)]
    assert [[u.index for u in p] for p in parts] == [[0, 3], [1], [2]]
    assert sorted(s for p in parts for u in p for s in u.sources) == sorted(p for p, _ in found)


def test_shard_patterns_expand_braces_and_globs(tmp_path):
    for i in range(3):
        _touch(tmp_path / f"val-{i:06d}.tar")
    assert len(expand_shards(str(tmp_path / "val-{000000..000002}.tar"))) == 3
    assert len(expand_shards(str(tmp_path / "*.tar"))) == 3
    units = build_units(shards=str(tmp_path / "val-*.tar"))
    assert [u.id for u in units] == ["shard-val-000000", "shard-val-000001", "shard-val-000002"]
    with pytest.raises(ValueError, match="matches no file"):
        expand_shards(str(tmp_path / "train-*.tar"))
    with pytest.raises(ValueError, match="exactly one of"):
        build_units(image_dir=str(tmp_path), shards="x")


def test_manifest_append_read_skips_truncated_line_and_dedupes(tmp_path):
    path = tmp_path / "manifest.jsonl"
    append_lines(path, [{"unit": "u0", "index": 0, "num_units": 2, "images": [], "model_sha256": "a"}])
    with open(path, "a") as fh:
        fh.write('{"unit": "u1", "index": 1, "num_un')  # a crash mid-write
    append_lines(path, [{"unit": "u0", "index": 0, "num_units": 2, "images": [], "model_sha256": "a", "dup": 1}])
    append_lines(path, [{"unit": "u1", "index": 1, "num_units": 2, "images": [], "model_sha256": "a"}])
    units = read_manifest(tmp_path)
    assert sorted(units) == ["u0", "u1"] and "dup" not in units["u0"]
    assert all(json.loads(line) for line in path.read_text().splitlines()[2:])


def test_other_model_is_refused_unless_overwrite(tmp_path):
    append_lines(tmp_path / "manifest.jsonl", [{"unit": "u0", "model_sha256": "a" * 64}])
    check_model(tmp_path, "a" * 64)
    with pytest.raises(ManifestError, match=f"{'a' * 64}.*{'b' * 64}"):
        check_model(tmp_path, "b" * 64)
    check_model(tmp_path, "b" * 64, overwrite=True)
    assert read_manifest(tmp_path) == {}
    assert (tmp_path / f"manifest.jsonl.replaced-{'a' * 12}").is_file()


def test_other_mask_settings_are_refused_unless_overwrite(tmp_path):
    first = {"threshold": 0.5, "postprocess": {"fill_holes": True, "min_size": 0, "keep_largest": 0}, "tta": False,
             "mode": "resize"}
    append_lines(tmp_path / "manifest.jsonl", [{"unit": "u0", "model_sha256": "a" * 64, "mask_settings": first},
                                                {"unit": "u1", "model_sha256": "a" * 64}])  # a line from before
    check_model(tmp_path, "a" * 64, settings=dict(first))
    plain = {**first, "postprocess": {"fill_holes": False, "min_size": 0, "keep_largest": 0}}
    with pytest.raises(ManifestError, match="never mixes two ways of making masks.*--postprocess"):
        check_model(tmp_path, "a" * 64, settings=plain)
    with pytest.raises(ManifestError, match="threshold.*0.6"):
        check_model(tmp_path, "a" * 64, settings={**first, "threshold": 0.6})
    check_model(tmp_path, "a" * 64, overwrite=True, settings=plain)
    assert read_manifest(tmp_path) == {}


def test_changed_inputs_are_caught():
    record = {"unit": "files-000000", "images": [{"input": "a.png"}], "failed": [{"input": "b.png"}]}
    check_unit_inputs(record, ["b.png", "a.png"])
    with pytest.raises(ManifestError, match="--unit_size changed"):
        check_unit_inputs(record, ["a.png", "b.png", "c.png"])


def test_units_with_other_inputs_are_refused_unless_overwrite(tmp_path):
    append_lines(tmp_path / "manifest.jsonl", [
        {"unit": "files-000000", "model_sha256": "a" * 64, "images": [{"input": "a.png"}], "failed": []},
        {"unit": "files-000009", "model_sha256": "a" * 64, "images": [{"input": "z.png"}], "failed": []}])
    check_model(tmp_path, "a" * 64, planned={"files-000000": ["a.png"]})  # unit 9 is not planned: not compared
    with pytest.raises(ManifestError, match="files-000000 .*other inputs.*--overwrite"):
        check_model(tmp_path, "a" * 64, planned={"files-000000": ["b.png"]})
    check_model(tmp_path, "a" * 64, overwrite=True, planned={"files-000000": ["b.png"]})
    assert read_manifest(tmp_path) == {}
    assert (tmp_path / f"manifest.jsonl.replaced-{'a' * 12}").is_file()


def test_summarize_reports_missing_units_and_files(tmp_path):
    (tmp_path / "x_mask.png").write_bytes(b"png")
    append_lines(tmp_path / "manifest.jsonl", [
        {"unit": "u0", "index": 0, "num_units": 3, "model_sha256": "a", "seconds": 1.0,
         "images": [{"input": "x.png", "output": "x_mask.png", "foreground": 0.25}],
         "failed": [{"input": "bad.png", "reason": "empty"}]},
        {"unit": "u1", "index": 1, "num_units": 3, "model_sha256": "a", "seconds": 1.0,
         "images": [{"input": "y.png", "output": "y_mask.png", "foreground": 0.0}], "failed": []}])
    s = summarize(tmp_path)
    assert (s["units"], s["planned_units"], s["missing_units"], s["images"], s["failures"]) == (2, 3, [2], 2, 1)
    assert s["foreground"]["empty"] == 1 and s["foreground"]["max"] == 0.25
    assert any("not finished" in p for p in s["problems"]) and any("y_mask.png" in p for p in s["problems"])
    assert os.path.exists(tmp_path / ".manifest.lock")


def test_decoding_stream_chunks_by_dtype_and_reports_failures(tmp_path):
    import numpy as np

    from predict_fixtures import random_image, write_image
    from seg.inference.engine import Preprocessor
    from seg.inference.loader import Chunk, Failure, UnitEnd, UnitStream

    paths = [write_image(tmp_path / "a.png", random_image(20, 30)), write_image(tmp_path / "b.png", random_image(9, 9)),
             write_image(tmp_path / "c.png", random_image(12, 12, dtype=np.uint16)), tmp_path / "d.png",
             write_image(tmp_path / "e.png", random_image(16, 8, channels=1))]
    paths[3].write_bytes(b"")
    unit = file_units([(str(p), p.stem) for p in paths], 5)[0]
    stream = UnitStream([unit], Preprocessor("resize", 16, 3, [0.5] * 3, [0.25] * 3), chunk=2)
    records = list(stream)
    kinds = [type(r).__name__ for r in records]
    assert kinds == ["Chunk", "Failure", "Chunk", "Chunk", "UnitEnd"]
    chunks = [r for r in records if isinstance(r, Chunk)]
    assert [c.rels for c in chunks] == [("a", "b"), ("c",), ("e",)]
    assert [str(c.x.dtype) for c in chunks] == ["torch.uint8", "torch.uint16", "torch.uint8"]
    assert tuple(chunks[0].x.shape) == (2, 16, 16, 3) and chunks[0].sizes == ((20, 30), (9, 9))
    assert isinstance(records[1], Failure) and "empty" in records[1].reason
    assert records[-1] == UnitEnd(0, 4, 1)


@pytest.mark.timeout(120)
def test_decoding_workers_start_after_opencv_threads_ran(tmp_path):
    """A process that has run a threaded OpenCV call forks its decoding workers safely: a child
    that changed its own OpenCV thread count after such a fork hung forever (seg.data.io)."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import cv2, numpy as np
from predict_fixtures import random_image, write_image
from seg.inference.engine import Preprocessor
from seg.inference.inputs import build_units
from seg.inference.loader import UnitStream, record_loader
cv2.setNumThreads(2)
big = np.random.default_rng(0).integers(0, 255, (3000, 3000), np.uint8)
for _ in range(3):
    cv2.GaussianBlur(cv2.resize(big, (1500, 1500)), (0, 0), 3)  # the thread pool runs now
__import__("time").sleep(1)  # its threads are asleep when the workers fork (the case that hung)
for i in range(8):
    write_image(__import__("pathlib").Path({str(tmp_path)!r}) / "in" / f"x{{i}}.png", random_image(20, 20, seed=i))
units = build_units({str(tmp_path / "in")!r}, unit_size=2)
stream = UnitStream(units, Preprocessor("resize", 32, 3, [0.5] * 3, [0.25] * 3))
print(sum(1 for _ in record_loader(stream, num_workers=2)), "records")
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] != "0"
