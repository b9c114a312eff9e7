"""seg evaluate --pred_dir/--gt_dir on NIfTI volumes: hand-computed 3D metrics in the report."""

import json

import nibabel as nib
import numpy as np
import pytest

from seg.evaluate import main
from seg.evaluation.volumes import index_volumes, pair_volume_masks
from volume_fixtures import save_nifti

SPACING_AFFINE = np.diag([2.0, 1.0, 0.5, 1.0])  # RAS, anisotropic


def _cube(shift: int = 0) -> np.ndarray:
    m = np.zeros((10, 10, 10), np.uint8)
    m[2 + shift:6 + shift, 2:6, 2:6] = 1
    return m


def _write_cases(tmp_path):
    """cubes: B = A moved one voxel along x (hand-computed in test_surface); missed: empty prediction;
    the cube prediction is stored flipped and transposed (another orientation, the same voxels)."""
    truth, pred = tmp_path / "gt", tmp_path / "pred"
    save_nifti(truth / "a" / "cubes.nii.gz", _cube(), SPACING_AFFINE)
    # the prediction stored in LPI-like order: flip x, then swap storage axes 0 and 2
    flipped = _cube(1)[::-1].transpose(2, 1, 0).copy()
    affine = SPACING_AFFINE @ np.array([[0, 0, -1, 9], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    save_nifti(pred / "a" / "cubes_mask.nii.gz", flipped, affine)
    assert np.array_equal(np.asanyarray(nib.as_closest_canonical(nib.load(str(pred / "a" / "cubes_mask.nii.gz")))
                                        .dataobj), _cube(1))
    save_nifti(truth / "missed_seg.nii.gz", _cube(), SPACING_AFFINE)
    save_nifti(pred / "missed_mask.nii.gz", np.zeros((10, 10, 10), np.uint8), SPACING_AFFINE)
    return truth, pred


def test_report_holds_hand_computed_volume_metrics(tmp_path, capsys):
    truth, pred = _write_cases(tmp_path)
    out = tmp_path / "eval"
    code = main(["--pred_dir", str(pred), "--gt_dir", str(truth), "--output_dir", str(out), "--tolerance_mm", "1.0",
                 "--workers", "1", "--no_progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "evaluation_report.json").read_text())
    rows = {r["id"]: r for r in report["per_volume"]}
    cubes = rows["a/cubes"]
    assert cubes["dice"] == pytest.approx(0.75) and cubes["iou"] == pytest.approx(0.6)
    assert cubes["precision"] == pytest.approx(0.75) and cubes["recall"] == pytest.approx(0.75)
    assert cubes["hd95"] == pytest.approx(2.0)  # see tests/test_surface.py for the derivation
    assert cubes["surface_dice"] == pytest.approx(80 / 112)
    assert cubes["spacing"] == [2.0, 1.0, 0.5] and cubes["shape"] == [10, 10, 10]
    missed = rows["missed"]
    assert missed["dice"] == 0.0 and missed["hd95"] is None and missed["surface_dice"] == 0.0
    assert report["n_volumes"] == 2 and report["hd95_undefined"] == 1 and report["surface_tolerance_mm"] == 1.0
    assert report["volume_mean"]["dice"] == pytest.approx(0.375)
    assert report["volume_mean"]["hd95"] == pytest.approx(2.0)  # the undefined HD95 is left out
    assert report["volume_global"]["tp"] == 48 and report["volume_global"]["fn"] == 16 + 64
    # the existing keys: axial slices as images (10 per volume), pooled voxels equal the 3D counts
    assert report["n_images"] == 20
    assert {k: report["global"][k] for k in ("tp", "fp", "fn", "tn")} == \
        {k: report["volume_global"][k] for k in ("tp", "fp", "fn", "tn")}
    assert any(r["id"] == "a/cubes/axial_0003" for r in report["per_image"])
    text = (out / "evaluation_report.txt").read_text()
    assert "volumes: 2 (3D metrics per volume" in text and "a/cubes" in text
    assert (out / "volume_metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert "2 volumes: mean 3D Dice 0.3750" in capsys.readouterr().out


def test_volume_pairing_errors(tmp_path):
    truth, pred = _write_cases(tmp_path)
    assert set(index_volumes(pred, "--pred_dir")) == {"a/cubes", "missed"}
    (pred / "missed_mask.nii.gz").unlink()
    with pytest.raises(ValueError, match="1 of 2 truth volumes .* have no prediction .*: missed"):
        pair_volume_masks(pred, truth)
    save_nifti(pred / "missed_mask.nii.gz", np.zeros((10, 10, 9), np.uint8), SPACING_AFFINE)
    code = main(["--pred_dir", str(pred), "--gt_dir", str(truth), "--output_dir", str(tmp_path / "e"),
                 "--workers", "1", "--no_progress"])
    assert code == 2  # bad input; the error names both files (checked below through the exception)
    from seg.evaluation.volumes import VolumePairs

    pairs, _ = pair_volume_masks(pred, truth)
    with pytest.raises(ValueError, match="prediction .*missed_mask.nii.gz does not lie on the grid of its truth"):
        list(VolumePairs(pairs, truth, pred).assigned(0, 1, workers=1))
