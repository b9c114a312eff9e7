"""NIfTI volumes end to end: prepare -> train (tiny) -> predict -> mask volumes -> evaluate.

The predicted mask volumes are checked voxel by voxel in WORLD coordinates: every stored voxel
of the written file, mapped through the file's affine, must hold the value the model gives the
canonical voxel at the same place (computed here in-process, slice by slice). The threshold is
the 80th percentile of the probabilities, so the masks are neither empty nor full whatever the
tiny model learned, and a flipped or transposed volume cannot pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from seg.data import volumes as V
from seg.evaluation.surface import volume_metrics
from seg.inference.engine import Predictor
from seg.prepare import main as prepare_main
from volume_fixtures import OBLIQUE_AFFINE, ball_volume, save_nifti

N = 6


def _cohort(root: Path) -> None:
    for i in range(N):
        rng = np.random.default_rng(i)
        centre = (5 + rng.uniform(-1, 1), 20 + rng.uniform(-4, 4), 18 + rng.uniform(-4, 4))
        image, label = ball_volume((10, 40, 36), centre=centre, radius=(3.5, 10, 9), seed=i,
                                   dtype=np.int16 if i % 2 else np.float32)
        save_nifti(root / "images" / f"sub-{i:02d}.nii.gz", image, OBLIQUE_AFFINE, qform_code=1, sform_code=4)
        save_nifti(root / "labels" / f"sub-{i:02d}_seg.nii.gz", label, OBLIQUE_AFFINE)


def _run(module: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def _canonical_probabilities(predictor: Predictor, path: Path) -> np.ndarray:
    vol = V.load_volume(path)
    stats = V.mri_stats(vol.data)
    slices = [V.normalize(V.get_slice(vol.data, "axial", k), stats) for k in range(vol.data.shape[2])]
    return V.stack_slices(predictor.predict_probabilities(slices), "axial")


def _world_check(written: nib.Nifti1Image, expected_canonical: np.ndarray, canonical_affine: np.ndarray) -> None:
    """Each stored voxel of ``written`` equals the expected canonical voxel at the same world point."""
    data = np.asanyarray(written.dataobj)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in data.shape], indexing="ij"), -1).reshape(-1, 3)
    world = nib.affines.apply_affine(written.affine, ijk)
    cidx = np.rint(nib.affines.apply_affine(np.linalg.inv(canonical_affine), world)).astype(int)
    assert np.array_equal(data[tuple(ijk.T)], expected_canonical[tuple(cidx.T)].astype(np.uint8))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_volumes_prepare_train_predict_evaluate(tmp_path, capsys):
    _cohort(tmp_path)
    shards, run, preds = tmp_path / "shards", tmp_path / "run", tmp_path / "preds"
    assert prepare_main(["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "labels"), "--out",
                         str(shards), "--val_split", "0.34", "--shard_size", "8", "--workers", "0",
                         "--no_progress"]) == 0
    info = json.loads((shards / "dataset.json").read_text())
    assert info["volumes"]["count"]["train"] and info["volumes"]["count"]["val"]
    assert not set(info["groups"]["train"]) & set(info["groups"]["val"])

    train = _run("seg.train", ["--data_dir", str(shards), "--checkpoint_dir", str(run), "--epochs", "2",
                               "--image_size", "32", "--batch_size", "4", "model.base_channels=4",
                               "data.num_workers=0", "data.in_channels=1"])
    assert train.returncode == 0, train.stderr[-3000:]
    # the threshold was chosen on the validation slices, predicted with the volume normalisation
    assert "chosen on" in train.stdout, train.stdout[-3000:] + train.stderr[-3000:]
    tuned = torch.load(run / "best_model.pth", weights_only=True)["postprocess_tuning"]
    assert tuned["n_images"] == info["splits"]["val"]["count"]
    model = run / "final_model.pth"
    ckpt = torch.load(model, weights_only=True)
    assert ckpt["preprocess"]["volume"] == {"slice_axis": "axial", "normalization": info["normalization"]}
    assert ckpt["preprocess"]["mean"] == [0.0] and ckpt["preprocess"]["std"] == [1.0]
    assert ckpt["qc_reference"] == info["qc_reference"] and info["qc_reference"]["split"] == "train"  # QC of slices

    predictor = Predictor(str(model), device="cpu", precision="fp32", batch_size=1)
    probs = {i: _canonical_probabilities(predictor, tmp_path / "images" / f"sub-{i:02d}.nii.gz") for i in range(N)}
    threshold = float(np.percentile(probs[0], 80))
    assert (probs[0] > threshold).mean() > 0.05  # a mask that is neither empty nor full
    args = ["--model_path", str(model), "--image_dir", str(tmp_path / "images"), "--output_dir", str(preds),
            "--threshold", str(threshold), "--precision", "fp32", "--batch_size", "1", "--num_workers", "1",
            "--device", "cpu", "--no_progress"]
    first = _run("seg.predict", args)
    assert first.returncode == 0, first.stderr[-3000:]
    for i in range(N):
        source = tmp_path / "images" / f"sub-{i:02d}.nii.gz"
        written = nib.load(str(preds / f"sub-{i:02d}_mask.nii.gz"))
        original = nib.load(str(source))
        assert written.shape == original.shape and np.array_equal(written.affine, original.affine)
        assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 4
        assert written.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(written.dataobj))) <= {0, 1}
        _world_check(written, probs[i] > threshold, nib.as_closest_canonical(original).affine)

    records = [json.loads(line) for line in (preds / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == N and all(len(r["images"]) == 1 for r in records)  # one unit per volume
    rec = {r["images"][0]["output"]: r["images"][0] for r in records}["sub-00_mask.nii.gz"]
    assert rec["slices"] == 10 and rec["input"].endswith("sub-00.nii.gz")
    assert rec["foreground"] == pytest.approx(float((probs[0] > threshold).mean()), abs=1e-6)
    mtime = (preds / "sub-00_mask.nii.gz").stat().st_mtime_ns
    again = _run("seg.predict", args)  # resume: every volume is already done
    assert again.returncode == 0 and f"0 units done, {N} already finished" in again.stdout
    assert (preds / "sub-00_mask.nii.gz").stat().st_mtime_ns == mtime
    assert 0 <= rec["qc"]["score"] <= 1 and rec["qc"]["slices_judged"] >= 1  # QC per volume, as per image
    assert rec["qc"]["foreground"] == rec["foreground"]
    summary = _run("seg.predict", ["--summarize", str(preds), "--json"])
    assert summary.returncode == 0 and json.loads(summary.stdout)["images"] == N
    qc_rows = (preds / "qc.csv").read_text().splitlines()
    assert len(qc_rows) == N + 1 and any("sub-00_mask.nii.gz" in row for row in qc_rows)

    # an unreadable volume is a failure of its own unit; the others are written (exit 3)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not a volume")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{broken}\n{tmp_path / 'images' / 'sub-01.nii.gz'}\n")
    failed = _run("seg.predict", [*args[:2], "--list", str(listing), "--output_dir", str(tmp_path / "listed"),
                                  *args[6:]])
    assert failed.returncode == 3, failed.stderr[-3000:]
    failure = json.loads((tmp_path / "listed" / "failures.jsonl").read_text())
    assert failure["input"] == str(broken) and "cannot be read as NIfTI" in failure["reason"]
    assert (tmp_path / "listed" / "images" / "sub-01_mask.nii.gz").is_file()

    # 2D-only outputs and a 2D checkpoint are refused for volumes before any work
    refused = _run("seg.predict", [*args, "--save_overlay"])
    assert refused.returncode == 2 and "--save_overlay and --save_probability write 2D images" in refused.stderr

    from seg.evaluate import main as evaluate_main

    out = tmp_path / "eval"
    assert evaluate_main(["--pred_dir", str(preds), "--gt_dir", str(tmp_path / "labels"), "--output_dir", str(out),
                          "--workers", "1", "--no_progress"]) == 0
    report = json.loads((out / "evaluation_report.json").read_text())
    assert report["n_volumes"] == N and report["n_images"] == N * 10
    row = {r["id"]: r for r in report["per_volume"]}["sub-00"]
    truth = V.load_volume(tmp_path / "labels" / "sub-00_seg.nii.gz")
    direct = volume_metrics(probs[0] > threshold, truth.data, truth.geometry.spacing)
    for name in ("dice", "iou", "precision", "recall", "hd95", "surface_dice", "tp", "fp", "fn"):
        assert row[name] == pytest.approx(direct[name]), name
