"""`seg predict` end to end in one process: folder, list, shards, one image, tar, failures,
escaping names, reruns, another model, --summarize."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from predict_fixtures import make_checkpoint, random_image, write_image
from seg.fileio import is_temporary
from seg.inference.manifest import read_lines, read_manifest
from seg.predict import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "model.pth", image_size=32)


def make_cohort(root: Path, n: int = 5) -> dict[str, tuple[int, int]]:
    """Images in a small tree: {relative path: (H, W)} (grey, RGB and 16-bit mixed)."""
    sizes = {}
    for i in range(n):
        rel = f"site{i % 2}/case{i}/img{i}.png" if i % 3 else f"img{i}.jpg"
        h, w = 30 + 3 * i, 44 - 2 * i
        image = random_image(h, w, channels=1 if i == 1 else 3, dtype=np.uint16 if i == 2 else np.uint8, seed=i)
        write_image(root / rel, image)
        sizes[rel] = (h, w)
    return sizes


def read_png(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None, f"{path} is not a valid image"
    return arr


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if is_temporary(p)]


def stem(rel: str) -> str:
    return str(Path(rel).with_suffix(""))


def run(*args) -> int:
    return main([str(a) for a in args] + ["--no_progress"])


def test_folder_outputs_mirror_the_input_tree(tmp_path, ckpt, capsys):
    sizes = make_cohort(tmp_path / "in")
    out = tmp_path / "out"
    assert run("--model_path", ckpt, "--image_dir", tmp_path / "in", "--output_dir", out, "--unit_size", 2,
               "--num_workers", 2, "--save_overlay", "--save_probability") == 0
    for rel, (h, w) in sizes.items():
        mask = read_png(out / f"{stem(rel)}_mask.png")
        assert mask.shape == (h, w) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert read_png(out / f"{stem(rel)}_overlay.png").shape == (h, w, 3)
        prob = read_png(out / f"{stem(rel)}_prob.png")
        assert prob.shape == (h, w) and prob.dtype == np.uint16
        assert np.array_equal(prob > 0.5 * 65535, mask > 0) or np.mean((prob > 32767) != (mask > 0)) < 1e-3
    units = read_manifest(out)
    assert len(units) == 3 and sum(len(u["images"]) for u in units.values()) == len(sizes)
    assert {i["input"] for u in units.values() for i in u["images"]} == {str(tmp_path / "in" / r) for r in sizes}
    assert "5 images, 0 failures" in capsys.readouterr().out
    # rerun: every unit is finished, nothing is redone
    lines = (out / "manifest.jsonl").read_text()
    assert run("--model_path", ckpt, "--image_dir", tmp_path / "in", "--output_dir", out, "--unit_size", 2) == 0
    assert (out / "manifest.jsonl").read_text() == lines
    assert "0 images" in capsys.readouterr().out and not temporaries(out)


def test_list_with_escaping_entries_stays_inside(tmp_path, ckpt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "data/a/x.png", random_image(20, 24))
    write_image(tmp_path / "y.png", random_image(22, 20, seed=1))
    (tmp_path / "work").mkdir()
    lst = tmp_path / "work/list.txt"
    lst.write_text("data/a/../a/x.png\nwork/../y.png\n")
    out = tmp_path / "work/out"
    assert run("--model_path", ckpt, "--list", lst, "--output_dir", out, "--num_workers", 0) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_mask.png"))
    assert written == ["data/a/x_mask.png", "y_mask.png"]
    assert not list(tmp_path.glob("*_mask.png")) and not list((tmp_path / "data").rglob("*_mask.png"))


def make_shard(path: Path, samples: list[tuple[str, np.ndarray, bool]]) -> None:
    """A tar in the `seg prepare` layout: KEY.image.png, optional KEY.mask.png, KEY.json."""
    with tarfile.open(path, "w") as tar:
        for key, image, labelled in samples:
            members = {"image.png": cv2.imencode(".png", image)[1].tobytes(),
                       "json": json.dumps({"height": image.shape[0], "width": image.shape[1]}).encode()}
            if labelled:
                members["mask.png"] = cv2.imencode(".png", (image[..., 0] > 128).astype(np.uint8) * 255)[1].tobytes()
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("labelled", [True, False])
def test_shards_labelled_and_unlabelled(tmp_path, ckpt, labelled):
    shards = tmp_path / "shards"
    shards.mkdir()
    make_shard(shards / "val-000000.tar", [("site/a", random_image(20, 30), labelled),
                                           ("site/b", random_image(26, 18, seed=1), labelled)])
    make_shard(shards / "val-000001.tar", [("../../escape", random_image(16, 16, seed=2), labelled)])
    out = tmp_path / "out"
    assert run("--model_path", ckpt, "--shards", shards / "val-{000000..000001}.tar", "--output_dir", out,
               "--num_workers", 2) == 0
    assert read_png(out / "site/a_mask.png").shape == (20, 30)
    assert read_png(out / "site/b_mask.png").shape == (26, 18)
    assert read_png(out / "escape_mask.png").shape == (16, 16)
    assert not list(tmp_path.glob("escape*"))
    assert sorted(read_manifest(out)) == ["shard-val-000000", "shard-val-000001"]


def test_broken_and_short_shards_are_failures_naming_the_shard(tmp_path, ckpt):
    """A shard that breaks mid-member keeps the samples before it; one that ends before the count
    in the dataset.json beside it (cut at a header boundary) is caught by that count."""
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = [(f"s{i}", random_image(16, 16, seed=i), False) for i in range(4)]
    make_shard(shards / "data-000000.tar", samples)
    make_shard(shards / "data-000001.tar", samples)
    members = tarfile.open(shards / "data-000001.tar").getmembers()
    broken, short = shards / "data-000000.tar", shards / "data-000001.tar"
    broken.write_bytes(broken.read_bytes()[:members[5].offset_data + 5])  # inside the 3rd sample (2 members each)
    short.write_bytes(short.read_bytes()[:members[4].offset])  # before the 3rd sample's header
    listing = [{"name": n.name, "count": 4, "bytes": 1} for n in (broken, short)]
    (shards / "dataset.json").write_text(json.dumps({"splits": {"data": {"count": 8, "shards": listing}}}))
    out = tmp_path / "out"
    assert run("--model_path", ckpt, "--shards", shards / "data-*.tar", "--output_dir", out) == 3
    failed = {f["input"]: f["reason"] for f in read_lines(out / "failures.jsonl")}
    assert f"shard {broken} cannot be read past sample 2" in failed[str(broken)]
    assert f"shard {short} ended after 2 samples but dataset.json lists 4" in failed[str(short)]
    done = [i["input"] for r in read_manifest(out).values() for i in r["images"]]
    assert sorted(done) == sorted(f"{s}:s{i}" for s in (broken, short) for i in (0, 1))


def test_one_image_with_mask_writes_visualization_and_metrics(tmp_path, ckpt, capsys):
    image = write_image(tmp_path / "x.png", random_image(40, 52))
    truth = write_image(tmp_path / "x_truth.png", (random_image(40, 52, channels=1, seed=3) > 128).astype(np.uint8) * 255)
    out = tmp_path / "out"
    assert run("--model_path", ckpt, "--image_path", image, "--mask_path", truth, "--output_dir", out,
               "--save_overlay", "--show_probability") == 0
    assert read_png(out / "x_mask.png").shape == (40, 52)
    assert read_png(out / "x_overlay.png").shape == (40, 52, 3)
    assert read_png(out / "x_prob.png").dtype == np.uint16
    vis = read_png(out / "x_visualization.png")
    assert vis.ndim == 3 and vis.shape[1] > 4 * vis.shape[0] // 2
    printed = capsys.readouterr().out
    assert "dice" in printed and "iou" in printed and not (out / "manifest.jsonl").exists()


def test_unreadable_images_are_listed_and_the_rest_done(tmp_path, ckpt, capsys):
    make_cohort(tmp_path / "in", n=3)
    good = cv2.imencode(".png", random_image(20, 20))[1].tobytes()
    (tmp_path / "in/zero.png").write_bytes(b"")
    (tmp_path / "in/truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "in/corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg \xff\xd9")
    out = tmp_path / "out"
    assert run("--model_path", ckpt, "--image_dir", tmp_path / "in", "--output_dir", out, "--unit_size", 2,
               "--num_workers", 2) == 3
    failed = {Path(r["input"]).name: r["reason"] for r in read_lines(out / "failures.jsonl")}
    assert sorted(failed) == ["corrupt.jpg", "truncated.png", "zero.png"]
    assert "empty" in failed["zero.png"] and "truncated" in failed["truncated.png"]
    assert len(list(out.rglob("*_mask.png"))) == 3
    assert "3 failures" in capsys.readouterr().out
    assert run("--summarize", out) == 3


def test_tar_format_one_tar_per_unit(tmp_path, ckpt):
    sizes = make_cohort(tmp_path / "in", n=5)
    out = tmp_path / "out"
    assert run("--model_path", ckpt, "--image_dir", tmp_path / "in", "--output_dir", out, "--unit_size", 2,
               "--format", "tar", "--save_probability", "--num_workers", 0) == 0
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == ["files-000000.tar", "files-000001.tar", "files-000002.tar"]
    members = {}
    for name in tars:
        with tarfile.open(out / name) as tar:
            for m in tar.getmembers():
                members[m.name] = cv2.imdecode(np.frombuffer(tar.extractfile(m).read(), np.uint8), cv2.IMREAD_UNCHANGED)
    for rel, (h, w) in sizes.items():
        assert members[f"{stem(rel)}_mask.png"].shape == (h, w)
        assert members[f"{stem(rel)}_prob.png"].dtype == np.uint16
    assert not list(out.rglob("*_mask.png")) and not temporaries(out)
    assert run("--summarize", out) == 0


def test_other_checkpoint_is_refused_unless_overwrite(tmp_path, ckpt, capsys):
    make_cohort(tmp_path / "in", n=2)
    out = tmp_path / "out"
    other = make_checkpoint(tmp_path / "other.pth", seed=1, image_size=32)
    assert run("--model_path", ckpt, "--image_dir", tmp_path / "in", "--output_dir", out, "--num_workers", 0) == 0
    capsys.readouterr()
    assert run("--model_path", other, "--image_dir", tmp_path / "in", "--output_dir", out, "--num_workers", 0) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("sha256") >= 2
    assert run("--model_path", other, "--image_dir", tmp_path / "in", "--output_dir", out, "--num_workers", 0,
               "--overwrite") == 0
    models = {r["model_sha256"] for r in read_manifest(out).values()}
    assert len(models) == 1 and models != {None}
    assert run("--summarize", out) == 0


def test_other_mask_settings_are_refused_on_resume(tmp_path, ckpt, capsys):
    """A folder started with one threshold is not finished with another (nor post-processing, TTA)."""
    make_cohort(tmp_path / "in", n=2)
    out = tmp_path / "out"
    args = ("--model_path", ckpt, "--image_dir", tmp_path / "in", "--output_dir", out, "--num_workers", 0)
    assert run(*args) == 0
    assert all(r["mask_settings"]["threshold"] == 0.5 for r in read_manifest(out).values())
    capsys.readouterr()
    assert run(*args, "--threshold", 0.7) == 2
    err = capsys.readouterr().err
    assert "never mixes two ways of making masks" in err and '"threshold":0.7' in err
    assert run(*args, "--tta") == 2
    assert run(*args) == 0  # the first settings resume (nothing to do)
    assert run(*args, "--threshold", 0.7, "--overwrite") == 0
    assert {r["mask_settings"]["threshold"] for r in read_manifest(out).values()} == {0.7}
    assert run("--summarize", out) == 0


def test_other_inputs_are_refused_unless_overwrite(tmp_path, ckpt, capsys):
    """The same folder, model and settings, but another input list (here, another --image_dir)."""
    make_cohort(tmp_path / "a", n=2)
    make_cohort(tmp_path / "b", n=2)
    out = tmp_path / "out"
    args = ("--model_path", ckpt, "--output_dir", out, "--num_workers", 0)
    assert run(*args, "--image_dir", tmp_path / "a") == 0
    capsys.readouterr()
    assert run(*args, "--image_dir", tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert "covers other inputs than this run plans" in err and "--overwrite" in err
    assert run(*args, "--image_dir", tmp_path / "b", "--overwrite") == 0
    inputs = {i["input"] for r in read_manifest(out).values() for i in r["images"]}
    assert inputs and all(str(tmp_path / "b") in i for i in inputs)
    assert list(out.glob("manifest.jsonl.replaced-*"))
    assert run("--summarize", out) == 0


def test_tiles_for_large_images_from_patch_checkpoint(tmp_path):
    ck = make_checkpoint(tmp_path / "patch.pth", image_size=32, sampling="patch")
    write_image(tmp_path / "in/big.png", random_image(150, 97))
    write_image(tmp_path / "in/small.png", random_image(20, 12, seed=1))
    out = tmp_path / "out"
    assert run("--model_path", ck, "--image_dir", tmp_path / "in", "--output_dir", out, "--num_workers", 0,
               "--batch_size", 4) == 0
    assert read_png(out / "big_mask.png").shape == (150, 97)
    assert read_png(out / "small_mask.png").shape == (20, 12)


def test_argument_errors_name_the_fix(tmp_path, ckpt, capsys):
    assert run("--model_path", ckpt, "--output_dir", tmp_path) == 2
    assert "give one input" in capsys.readouterr().err
    assert run("--model_path", tmp_path / "missing.pth", "--image_dir", tmp_path) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run("--summarize", tmp_path / "nothing") == 1
