"""seg prepare: round trip through plain webdataset, bad inputs, strict, overwrite, crash safety."""

import glob
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from seg.data.io import read_image, read_mask, to_float01
from seg.data.pairing import split_of
from seg.data.sharding import PrepareError, ShardSeries, prepare_dataset
from seg.prepare import main

RNG = np.random.default_rng(1)
REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(path.suffix, arr)
    path.write_bytes(buf.tobytes())
    return path


def _pair(root: Path, rel: str, shape=(24, 32), ext=".png", dtype=np.uint8, rgb=True, mask_rel=None):
    """Write a random image and a 0/255 mask; returns the mask array (bool)."""
    full = shape + (3,) if rgb else shape
    img = RNG.integers(0, np.iinfo(dtype).max, size=full, endpoint=True).astype(dtype)
    _write(root / "images" / (rel + ext), img)
    mask = RNG.random(shape) > 0.7
    _write(root / "masks" / (mask_rel or rel + "_mask.png"), mask.astype(np.uint8) * 255)
    return mask


def _read_shards(out: Path) -> dict:
    urls = sorted(glob.glob(str(out / "*.tar")))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)} if urls else {}


def _split_keys(info: dict) -> dict:
    return {name: split["count"] for name, split in info["splits"].items()}


def test_round_trip_bytes_masks_json_and_stats(tmp_path):
    src = tmp_path / "src"
    masks = {"a/rgb8": _pair(src, "a/rgb8"), "a/b/jpg": _pair(src, "a/b/jpg", ext=".jpg"),
             "grey16": _pair(src, "grey16", ext=".tif", dtype=np.uint16, rgb=False),
             "bmp": _pair(src, "bmp", ext=".bmp"), "tiff": _pair(src, "tiff", ext=".tiff")}
    for i in range(10):
        masks[f"many/{i:02d}"] = _pair(src, f"many/{i:02d}", shape=(20, 20))
    out = tmp_path / "shards"
    info = prepare_dataset(src / "images", src / "masks", out, val_split=0.3, shard_size=4, workers=2,
                           progress=False)
    assert json.loads((out / "dataset.json").read_text()) == info
    assert set(info) >= {"format_version", "labelled", "created", "source", "splits", "image_size", "channels",
                         "foreground_fraction", "mask_multi_value_count", "val_split", "shard_size",
                         "shard_bytes", "skipped"}
    samples = _read_shards(out)
    assert set(samples) == set(masks) and info["skipped"] == []
    ext_of = {"a/b/jpg": "jpg", "grey16": "tif", "bmp": "bmp", "tiff": "tif"}
    train_pixels = []
    for key, s in samples.items():
        meta = json.loads(s["json"])
        image_path = src / "images" / meta["image"]
        assert s[f"image.{ext_of.get(key, 'png')}"] == image_path.read_bytes()  # original bytes
        mask = cv2.imdecode(np.frombuffer(s["mask.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, masks[key])
        np.testing.assert_array_equal(mask > 0, read_mask(src / "masks" / meta["mask"]))
        assert (meta["height"], meta["width"]) == masks[key].shape
        assert meta["foreground_fraction"] == pytest.approx(masks[key].mean())
        assert split_of(key, 0.3) in s["__url__"]
        if split_of(key, 0.3) == "train":
            x = to_float01(read_image(image_path)).astype(np.float64)
            x = np.repeat(x[..., None], 3, axis=2) if x.ndim == 2 else x
            train_pixels.append(x.reshape(-1, 3))
    # shards: bounded by count, names in order, counts/bytes as on disk
    for name, split in info["splits"].items():
        assert [sh["name"] for sh in split["shards"]] == [f"{name}-{i:06d}.tar" for i in range(len(split["shards"]))]
        assert all(sh["count"] <= 4 and sh["bytes"] == (out / sh["name"]).stat().st_size for sh in split["shards"])
        assert sum(sh["count"] for sh in split["shards"]) == split["count"]
    px = np.concatenate(train_pixels)
    np.testing.assert_allclose(info["channels"]["mean"], px.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(info["channels"]["std"], px.std(axis=0), rtol=1e-7)
    assert info["image_size"]["height"]["max"] == 24 and info["image_size"]["width"]["min"] == 20


def test_pairs_csv_split_column_overrides_the_hash(tmp_path):
    src = tmp_path / "src"
    keys = [f"s{i:02d}" for i in range(12)]
    for k in keys:
        _pair(src, k, rgb=False)
    imposed = {k: ("val" if i >= 8 else "train") for i, k in enumerate(keys)}
    imposed["s11"] = ""  # an empty cell: the split by key hash
    rows = "".join(f"images/{k}.png,masks/{k}_mask.png,{imposed[k]}\n" for k in keys)
    (src / "pairs.csv").write_text("image,mask,split\n" + rows)
    out = tmp_path / "shards"
    assert main(["--pairs", str(src / "pairs.csv"), "--out", str(out), "--workers", "1", "--no_progress",
                 "--val_split", "0.5"]) == 0
    for key, s in _read_shards(out).items():
        expected = imposed[key] or split_of(key, 0.5)
        assert f"/{expected}-" in s["__url__"], (key, s["__url__"])


def test_split_is_stable_when_the_data_set_grows(tmp_path):
    src = tmp_path / "src"
    for i in range(30):
        _pair(src, f"{i:03d}", shape=(8, 8))
    first = prepare_dataset(src / "images", src / "masks", tmp_path / "one", workers=0, progress=False)
    for i in range(30, 60):
        _pair(src, f"{i:03d}", shape=(8, 8))
    prepare_dataset(src / "images", src / "masks", tmp_path / "two", workers=0, progress=False)
    split_one = {k: s["__url__"].split("/")[-1][:3] for k, s in _read_shards(tmp_path / "one").items()}
    split_two = {k: s["__url__"].split("/")[-1][:3] for k, s in _read_shards(tmp_path / "two").items()}
    assert len(split_one) == 30 and len(split_two) == 60
    assert all(split_two[k] == v for k, v in split_one.items())
    assert 0 < first["splits"]["val"]["count"] < 30


@pytest.fixture
def bad_source(tmp_path):
    src = tmp_path / "src"
    for i in range(5):
        _pair(src, f"good{i}")
    _pair(src, "multi")
    _write(src / "masks" / "multi_mask.png", np.array([[0, 1, 2, 3]] * 24 * 8, np.uint8).reshape(24, 32))
    _pair(src, "corrupt")
    (src / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50 + b"IEND")
    _pair(src, "trunc")
    data = (src / "images" / "trunc.png").read_bytes()
    (src / "images" / "trunc.png").write_bytes(data[: len(data) // 2])
    _pair(src, "size")
    _write(src / "masks" / "size_mask.png", np.zeros((10, 10), np.uint8))
    _write(src / "images" / "nomask.png", np.zeros((24, 32), np.uint8))
    _pair(src, "zero")
    (src / "masks" / "zero_mask.png").write_bytes(b"")
    _pair(src, "dup")
    _write(src / "images" / "dup.jpg", np.zeros((24, 32, 3), np.uint8))
    return src


def test_bad_pairs_are_skipped_with_their_reason(bad_source, tmp_path):
    info = prepare_dataset(bad_source / "images", bad_source / "masks", tmp_path / "out", workers=2,
                           progress=False)
    reasons = {s["image"]: s["reason"] for s in info["skipped"]}
    assert reasons == {"corrupt.png": "corrupt image", "trunc.png": "truncated image", "size.png": "size mismatch",
                       "nomask.png": "missing mask", "zero.png": "empty mask", "dup.png": "duplicate key",
                       "dup.jpg": "duplicate key"}
    assert all(s["detail"] for s in info["skipped"])
    assert set(_read_shards(tmp_path / "out")) == {f"good{i}" for i in range(5)} | {"multi"}
    assert info["mask_multi_value_count"] == 1
    assert sum(s["count"] for s in info["splits"].values()) == 6


def test_strict_fails_listing_bad_pairs_and_keeps_nothing(bad_source, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--images", str(bad_source / "images"), "--masks", str(bad_source / "masks"), "--out", str(out),
               "--strict", "--workers", "0", "--no_progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--strict" in err and "nomask.png" in err and "dup.jpg" in err
    assert not list(out.glob("*")) if out.exists() else True
    (bad_source / "images" / "nomask.png").unlink()
    (bad_source / "images" / "dup.jpg").unlink()  # pairing problems gone; decoding ones remain
    with pytest.raises(PrepareError, match=r"trunc\.png"):
        prepare_dataset(bad_source / "images", bad_source / "masks", out, strict=True, workers=0, progress=False)
    assert list(out.iterdir()) == []


def test_non_empty_output_needs_overwrite(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(3):
        _pair(src, f"x{i}")
    out = tmp_path / "out"
    args = ["--images", str(src / "images"), "--masks", str(src / "masks"), "--out", str(out), "--workers", "0",
            "--shard_size", "1", "--val_split", "0"]
    assert main(args) == 0
    assert "wrote 3 pairs" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    (out / ".train-000009.tar.tmp-1-abcd").write_bytes(b"stale")
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    (src / "images" / "x2.png").unlink()
    assert main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "notes.txt", "train-000000.tar",
                                                     "train-000001.tar"]


def test_exception_while_writing_leaves_only_complete_shards(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for i in range(9):
        _pair(src, f"x{i}")
    real_write, calls = ShardSeries.write, []

    def failing_write(self, sample):
        calls.append(sample["__key__"])
        if len(calls) == 6:
            raise OSError("disk full (injected)")
        real_write(self, sample)

    monkeypatch.setattr(ShardSeries, "write", failing_write)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        prepare_dataset(src / "images", src / "masks", out, val_split=0, shard_size=2, workers=0, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["train-000000.tar", "train-000001.tar"]  # the open third shard was removed
    for name in names:
        with tarfile.open(out / name) as tar:
            assert len(tar.getmembers()) == 6


@pytest.mark.slow
def test_sigkill_mid_run_leaves_no_partial_final_shard(tmp_path):
    src = tmp_path / "src"
    for i in range(400):
        _pair(src, f"{i:04d}", shape=(48, 48))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "seg.prepare", "--images", str(src / "images"), "--masks", str(src / "masks"),
           "--out", str(out), "--shard_size", "1", "--workers", "1", "--no_progress", "--val_split", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("train-*.tar"))) < 20:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "prepare finished before it could be killed; give it more data"
    assert not (out / "dataset.json").exists()
    finals = sorted(out.glob("train-*.tar"))
    assert 20 <= len(finals) < 400
    for shard in finals:  # every final-named shard is complete: 1 sample, 3 members, readable
        with tarfile.open(shard) as tar:
            assert sorted(m.name.split(".", 1)[1] for m in tar.getmembers()) == ["image.png", "json", "mask.png"]
    assert len(list(wds.WebDataset([str(p) for p in finals], shardshuffle=False))) == len(finals)
    rc = subprocess.run(cmd + ["--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    assert not [p for p in out.iterdir() if ".tmp-" in p.name] and len(list(out.glob("*.tar"))) == 400


def test_pairs_csv_mode_and_unsafe_keys(tmp_path):
    root = tmp_path / "data"
    m1 = _pair(root, "v1.2/x.y", mask_rel="lab/x.y.png")
    m2 = _pair(tmp_path, "outside/z", mask_rel="lab/z.png")
    csv = root / "pairs.csv"
    csv.write_text("image,mask\nimages/v1.2/x.y.png,masks/lab/x.y.png\n../images/outside/z.png,../masks/lab/z.png\n")
    info = prepare_dataset(pairs_csv=csv, out=tmp_path / "out", val_split=0, workers=0, progress=False)
    assert info["source"]["pairs"] == str(csv.resolve()) and info["labelled"]
    samples = _read_shards(tmp_path / "out")
    assert set(samples) == {"data/images/v1_2/x_y", "images/outside/z"}
    np.testing.assert_array_equal(read_mask_bytes(samples["data/images/v1_2/x_y"]["mask.png"]), m1)
    np.testing.assert_array_equal(read_mask_bytes(samples["images/outside/z"]["mask.png"]), m2)
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        assert all(".." not in m.name and not m.name.startswith("/") for m in tar.getmembers())


def read_mask_bytes(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) > 0


def test_unlabelled_cohort(tmp_path):
    _pair(tmp_path, "a/one")
    _pair(tmp_path, "two", ext=".jpg")
    info = prepare_dataset(tmp_path / "images", out=tmp_path / "out", workers=0, progress=False)
    assert not info["labelled"] and list(info["splits"]) == ["data"] and info["splits"]["data"]["count"] == 2
    assert info["foreground_fraction"] is None and info["source"]["masks"] is None
    samples = _read_shards(tmp_path / "out")
    assert set(samples) == {"a/one", "two"} and all("mask.png" not in s for s in samples.values())
    assert json.loads(samples["two"]["json"])["mask"] is None
    assert (tmp_path / "out" / "data-000000.tar").exists()


def test_shard_bytes_bound(tmp_path):
    src = tmp_path / "src"
    for i in range(6):
        _pair(src, f"x{i}", shape=(64, 64))  # random RGB: about 12.3 kB of PNG per sample
    info = prepare_dataset(src / "images", src / "masks", tmp_path / "out", val_split=0, shard_bytes=40960,
                           workers=0, progress=False)
    shards = info["splits"]["train"]["shards"]
    # tar pads to 10240-byte records: 2 samples fit in 30720 bytes, 3 would need 51200
    assert [sh["count"] for sh in shards] == [2, 2, 2]
    assert all(sh["bytes"] <= 40960 for sh in shards)


@pytest.mark.parametrize("module", ["seg.prepare", "seg.demo_data"])
def test_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage:" in r.stdout
