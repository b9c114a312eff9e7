"""seg.fileio: atomic writes leave the old file or the new one, never a partial one or a temp."""

import json

import pytest

from seg.fileio import atomic_path, atomic_write_json, atomic_write_text, is_temporary, remove_stale_temporaries


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_exception_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            assert is_temporary(tmp) and tmp.parent == tmp_path
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "d").mkdir()
    stale = tmp_path / "d" / ".x.png.tmp-123-abcd"
    stale.write_text("partial")
    keep = tmp_path / "d" / "x.png"
    keep.write_text("done")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and keep.exists()
    assert remove_stale_temporaries(tmp_path / "missing") == 0
