"""seg prepare on NIfTI volumes: slices in shards, split by volume/group, bad volumes, normalisation;
--group_by for 2D data, and the doctor's leak check."""

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from seg.data import volumes as V
from seg.data.sharding import PrepareError, prepare_dataset
from seg.data.shards import decode_sample
from seg.data.transforms import build_eval_transform, build_train_transform, channel_stats
from seg.preflight.groups import check_groups
from seg.prepare import main
from volume_fixtures import OBLIQUE_AFFINE, RAS_AFFINE, ball_volume, save_nifti

SHAPE = (8, 24, 20)  # storage order; canonical (24, 20, 8) under OBLIQUE_AFFINE: 8 axial slices


def _cohort(root: Path, n: int = 4, shape=SHAPE) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """n subjects, int16 and float32 alternating; returns {key: (image, label)} in storage order."""
    out = {}
    for i in range(n):
        image, label = ball_volume(shape, seed=i, dtype=np.int16 if i % 2 else np.float32)
        save_nifti(root / "images" / f"sub-{i:02d}" / "t1.nii.gz", image)
        save_nifti(root / "labels" / f"sub-{i:02d}" / "t1_seg.nii.gz", label)
        out[f"sub-{i:02d}/t1"] = (image, label)
    return out


def _samples(out: Path) -> dict[str, dict]:
    """{key: raw sample with __split__} of every shard in ``out``."""
    found = {}
    for shard in sorted(out.glob("*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            found[s["__key__"]] = {**s, "__split__": shard.name.split("-")[0]}
    return found


def test_volumes_become_lossless_slices_split_by_volume(tmp_path):
    cohort = _cohort(tmp_path)
    info = prepare_dataset(tmp_path / "images", tmp_path / "labels", tmp_path / "out", val_split=0.5,
                           workers=0, progress=False)
    assert info["kind"] == "volumes" and info["volumes"]["slice_axis"] == "axial"
    assert info["normalization"] == {"modality": "mri", "percentiles": [0.5, 99.5], "per_volume": True}
    assert info["channels"]["mean"] == [0.0] and info["channels"]["std"] == [1.0]
    samples = _samples(tmp_path / "out")
    assert len(samples) == 4 * 8 == info["splits"]["train"]["count"] + info["splits"]["val"]["count"]
    splits_of_volume: dict[str, set] = {}
    for key, s in samples.items():
        meta = json.loads(s["json"])
        volume, name = key.rsplit("/", 1)
        splits_of_volume.setdefault(volume, set()).add(s["__split__"])
        image, label = cohort[volume]
        canonical = V.VolumeGeometry.read(tmp_path / "images" / f"{volume}.nii.gz")
        k = int(name.split("_")[1])
        stored = np.load(io.BytesIO(s["image.npy"]), allow_pickle=False)
        assert stored.dtype == image.dtype  # lossless, in the volume's dtype
        assert np.array_equal(stored, V.get_slice(canonical.to_canonical(image), "axial", k))
        truth = V.get_slice(canonical.to_canonical(label), "axial", k) > 0
        assert np.array_equal(cv2.imdecode(np.frombuffer(s["mask.png"], np.uint8), 0) > 0, truth)
        assert meta["volume"] == volume and meta["slice_index"] == k and meta["slices"] == 8
        assert np.allclose(meta["spacing"], (0.8, 1.2, 2.5)) and meta["volume_shape"] == [24, 20, 8]
        assert meta["original_shape"] == list(SHAPE) and np.allclose(meta["original_affine"], OBLIQUE_AFFINE)
        stats = V.mri_stats(canonical.to_canonical(image))
        assert meta["normalization"] == pytest.approx(stats)
        decoded = decode_sample(s)  # the reader normalises with the slice's statistics
        assert decoded["image"].dtype == np.float32
        assert np.array_equal(decoded["image"], V.normalize(stored, stats))
        assert decoded["meta"]["group"] == volume
    assert all(len(v) == 1 for v in splits_of_volume.values())  # a volume never crosses train/val
    groups = info["groups"]
    assert sorted(groups["train"] + groups["val"]) == sorted(cohort) and not set(groups["train"]) & set(groups["val"])
    assert {g for g, s in splits_of_volume.items() if s == {"val"}} == set(groups["val"])
    assert check_groups(tmp_path / "out")[0].status == "ok"


def test_slices_train_through_the_transforms(tmp_path):
    _cohort(tmp_path, n=2)
    info = prepare_dataset(tmp_path / "images", tmp_path / "labels", tmp_path / "out", val_split=0.0,
                           workers=0, progress=False)
    mean, std = channel_stats("dataset", info, 1)
    assert (mean, std) == ([0.0], [1.0])
    with pytest.raises(ValueError, match="imagenet does not apply to NIfTI volume shards"):
        channel_stats("imagenet", info, 3)
    sample = decode_sample(next(iter(_samples(tmp_path / "out").values())))
    train = build_train_transform(32, mean, std, 1, seed=0)
    image, mask = train(sample["image"], sample["mask"])
    assert image.shape == (1, 32, 32) and mask.shape == (1, 32, 32)
    evaluate = build_eval_transform(32, mean, std, 1)
    image, _ = evaluate(sample["image"], sample["mask"])
    expected = cv2.resize(sample["image"], (32, 32), interpolation=cv2.INTER_LINEAR)
    assert np.allclose(image[0].numpy(), expected, atol=1e-6)  # z-scores kept: no [0, 1] clipping
    assert image.min() < 0


def test_group_by_keeps_subjects_whole_and_empty_slices_thin(tmp_path):
    for i in range(6):
        for session in ("a", "b"):
            image, label = ball_volume((16, 16, 12), seed=i, centre=(8, 8, 9), radius=(5, 5, 2.5))
            save_nifti(tmp_path / "images" / f"sub-{i}" / f"{session}.nii", image, RAS_AFFINE)
            save_nifti(tmp_path / "labels" / f"sub-{i}" / f"{session}_mask.nii", label, RAS_AFFINE)
    info = prepare_dataset(tmp_path / "images", tmp_path / "labels", tmp_path / "out", val_split=0.5,
                           group_by=r"^(sub-\d+)/", empty_slice_fraction=0.0, workers=2, progress=False)
    samples = _samples(tmp_path / "out")
    subject_splits: dict[str, set] = {}
    for s in samples.values():
        meta = json.loads(s["json"])
        subject_splits.setdefault(meta["group"], set()).add(s["__split__"])
        has_fg = cv2.imdecode(np.frombuffer(s["mask.png"], np.uint8), 0).any()
        if s["__split__"] == "train":
            assert has_fg  # every empty training slice was left out
    assert all(len(v) == 1 for v in subject_splits.values()) and len(subject_splits) == 6
    assert set(info["groups"]["train"]) | set(info["groups"]["val"]) == {f"sub-{i}" for i in range(6)}
    n_val = info["volumes"]["count"]["val"]
    assert info["splits"]["val"]["count"] == n_val * 12  # validation keeps every slice
    assert info["volumes"]["empty_slices_dropped"] == info["volumes"]["count"]["train"] * 7  # z 0-5 and 12+: empty
    # the same run with 2 workers or none writes identical shards
    prepare_dataset(tmp_path / "images", tmp_path / "labels", tmp_path / "again", val_split=0.5,
                    group_by=r"^(sub-\d+)/", empty_slice_fraction=0.0, workers=0, progress=False)
    for shard in (tmp_path / "out").glob("*.tar"):
        assert shard.read_bytes() == (tmp_path / "again" / shard.name).read_bytes()


def test_bad_volumes_are_skipped_with_the_file_and_the_fix(tmp_path):
    _cohort(tmp_path, n=1)
    image, label = ball_volume(SHAPE, seed=5)
    save_nifti(tmp_path / "images" / "small.nii.gz", image)
    save_nifti(tmp_path / "labels" / "small_seg.nii.gz", label[:, :20])
    save_nifti(tmp_path / "images" / "multi.nii.gz", image)
    save_nifti(tmp_path / "labels" / "multi_seg.nii.gz", label * np.arange(SHAPE[2], dtype=np.uint8)[None, None])
    save_nifti(tmp_path / "images" / "empty.nii.gz", image)
    save_nifti(tmp_path / "labels" / "empty_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    (tmp_path / "images" / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    save_nifti(tmp_path / "labels" / "broken_seg.nii.gz", label)
    info = prepare_dataset(tmp_path / "images", tmp_path / "labels", tmp_path / "out", workers=0, progress=False)
    reasons = {s["image"]: (s["reason"], s["detail"]) for s in info["skipped"]}
    assert reasons["small.nii.gz"][0] == "size mismatch" and "small_seg.nii.gz: shape" in reasons["small.nii.gz"][1]
    assert reasons["multi.nii.gz"][0] == "non-binary label" and "keep one label" in reasons["multi.nii.gz"][1]
    assert reasons["empty.nii.gz"][0] == "empty label" and "empty_seg.nii.gz" in reasons["empty.nii.gz"][1]
    assert reasons["broken.nii.gz"][0] == "unreadable image" and "broken.nii.gz" in reasons["broken.nii.gz"][1]
    assert sum(info["volumes"]["count"].values()) == 1
    with pytest.raises(PrepareError, match="--strict: 4 bad pairs"):
        prepare_dataset(tmp_path / "images", tmp_path / "labels", tmp_path / "strict", workers=0, progress=False,
                        strict=True)
    assert not list((tmp_path / "strict").glob("*.tar"))


def test_ct_statistics_come_from_the_training_foreground(tmp_path):
    cohort = _cohort(tmp_path)
    info = prepare_dataset(tmp_path / "images", tmp_path / "labels", tmp_path / "out", val_split=0.5,
                           modality="ct", workers=0, progress=False)
    stats = info["normalization"]
    train = info["groups"]["train"]
    assert stats["modality"] == "ct" and stats["computed_on"] == "train" and train
    expected = V.ct_stats([cohort[k][0][cohort[k][1] > 0].astype(np.float32) for k in train])
    for name in ("lo", "hi", "mean", "std", "voxels"):
        assert stats[name] == pytest.approx(expected[name])
    for s in _samples(tmp_path / "out").values():
        assert json.loads(s["json"])["normalization"] == {k: stats[k] for k in ("modality", "lo", "hi", "mean",
                                                                                  "std", "voxels")}
    with pytest.raises(PrepareError, match="--modality ct computes .* labelled training volumes"):
        prepare_dataset(tmp_path / "images", None, tmp_path / "unlabelled", modality="ct", progress=False)


def test_cli_flags_and_input_errors(tmp_path, capsys):
    _cohort(tmp_path, n=2)
    code = main(["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "labels"), "--out",
                 str(tmp_path / "out"), "--slice_axis", "coronal", "--workers", "0", "--no_progress"])
    assert code == 0 and "coronal slices" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["volumes"]["slice_axis"] == "coronal"
    assert len(_samples(tmp_path / "out")) == 2 * 20  # canonical (24, 20, 8): 20 coronal slices
    cv2.imwrite(str(tmp_path / "images" / "x.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(tmp_path / "labels" / "x.png"), np.zeros((8, 8), np.uint8))
    assert main(["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "labels"), "--out",
                 str(tmp_path / "mixed")]) == 2
    assert "mix 1 2D images (e.g. x.png) and 2 NIfTI volumes" in capsys.readouterr().err


def _png_tree(root: Path, patients: int = 8, per_patient: int = 3) -> None:
    for p in range(patients):
        for i in range(per_patient):
            img = np.full((16, 16), 10 * p + i, np.uint8)
            cv2.imwrite(str((root / "images" / f"patient{p:02d}").mkdir(parents=True, exist_ok=True)
                            or root / "images" / f"patient{p:02d}" / f"img{i}.png"), img)
            (root / "masks" / f"patient{p:02d}").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "masks" / f"patient{p:02d}" / f"img{i}.png"), (img > 40).astype(np.uint8) * 255)


def test_group_by_on_2d_images_and_the_doctor_leak_check(tmp_path):
    _png_tree(tmp_path)
    plain = prepare_dataset(tmp_path / "images", tmp_path / "masks", tmp_path / "plain", val_split=0.5,
                            workers=0, progress=False)
    assert "groups" not in plain  # without --group_by nothing changes
    leak = check_groups(tmp_path / "plain", r"^(patient\d+)/")
    assert leak[0].status == "fail" and "in both train and val" in leak[0].message and "--group_by" in leak[0].fix
    info = prepare_dataset(tmp_path / "images", tmp_path / "masks", tmp_path / "grouped", val_split=0.5,
                           group_by=r"^(patient\d+)/", workers=0, progress=False)
    assert info["groups"]["group_by"] == r"^(patient\d+)/"
    assert not set(info["groups"]["train"]) & set(info["groups"]["val"])
    assert info["groups"]["train"] and info["groups"]["val"]
    for s in _samples(tmp_path / "grouped").values():
        assert json.loads(s["json"])["group"] in info["groups"][s["__split__"]]
    assert check_groups(tmp_path / "grouped")[0].status == "ok"
    assert check_groups(tmp_path / "grouped", r"^(patient\d+)/")[0].status == "ok"
    with pytest.raises(PrepareError, match=r"--group_by '\^\(p\\\\d\+\)/' matches no group in 24 of 24"):
        prepare_dataset(tmp_path / "images", tmp_path / "masks", tmp_path / "bad", group_by=r"^(p\d+)/",
                        progress=False)


def test_doctor_reports_a_recorded_leak(tmp_path):
    _png_tree(tmp_path, patients=4)
    prepare_dataset(tmp_path / "images", tmp_path / "masks", tmp_path / "out", val_split=0.5,
                    group_by=r"^(patient\d+)/", workers=0, progress=False)
    path = tmp_path / "out" / "dataset.json"
    info = json.loads(path.read_text())
    info["groups"]["val"].append(info["groups"]["train"][0])  # as an older or hand-edited folder might say
    path.write_text(json.dumps(info))
    check = check_groups(tmp_path / "out")[0]
    assert check.status == "fail" and info["groups"]["train"][0] in check.message


def test_pairs_csv_of_volumes(tmp_path):
    _cohort(tmp_path, n=2)
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,mask\n" + "".join(f"images/sub-{i:02d}/t1.nii.gz,labels/sub-{i:02d}/t1_seg.nii.gz\n"
                                            for i in range(2)))
    info = prepare_dataset(pairs_csv=csv, out=tmp_path / "out", val_split=0.0, workers=0, progress=False)
    assert info["kind"] == "volumes" and info["volumes"]["count"] == {"train": 2, "val": 0}
    assert sorted(info["groups"]["train"]) == ["sub-00/t1", "sub-01/t1"]
