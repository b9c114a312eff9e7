"""seg.evaluation.surface: 3D overlap and surface metrics against hand-computed values."""

import numpy as np
import pytest

from seg.evaluation.surface import summarize_volumes, surface, surface_distances, volume_metrics


def _plate(shape, x, y, z):
    m = np.zeros(shape, bool)
    m[x[0]:x[1], y[0]:y[1], z] = True
    return m


def test_parallel_plates_are_their_gap_apart():
    # 4x4 one-voxel plates at z=2 and z=4, spacing 2.5 mm along z: every surface voxel is 5.0 mm away
    a = _plate((10, 10, 8), (2, 6), (2, 6), 2)
    b = _plate((10, 10, 8), (2, 6), (2, 6), 4)
    r = volume_metrics(a, b, (0.8, 0.8, 2.5), tolerance_mm=4.9)
    assert r["hd95"] == pytest.approx(5.0)
    assert r["surface_dice"] == 0.0
    assert r["dice"] == 0.0 and r["iou"] == 0.0 and r["precision"] == 0.0 and r["recall"] == 0.0
    assert volume_metrics(a, b, (0.8, 0.8, 2.5), tolerance_mm=5.0)["surface_dice"] == 1.0


def test_plates_shifted_in_plane():
    # A: x 2-5, B: x 3-6 (0.8 mm voxels), same y and z: 12 of 16 voxels shared; the 4 unshared
    # voxels of each plate are 0.8 mm from the other plate, the others 0
    a = _plate((10, 10, 8), (2, 6), (2, 6), 3)
    b = _plate((10, 10, 8), (3, 7), (2, 6), 3)
    r = volume_metrics(a, b, (0.8, 1.0, 2.5), tolerance_mm=0.5)
    assert r["dice"] == pytest.approx(24 / 32) and r["iou"] == pytest.approx(12 / 20)
    assert r["precision"] == pytest.approx(0.75) and r["recall"] == pytest.approx(0.75)
    assert (r["tp"], r["fp"], r["fn"]) == (12, 4, 4)
    # P95 of [0] * 12 + [0.8] * 4: position 0.95 * 15 = 14.25 lies between two 0.8s
    assert r["hd95"] == pytest.approx(0.8)
    assert r["surface_dice"] == pytest.approx((12 + 12) / 32)
    assert volume_metrics(a, b, (0.8, 1.0, 2.5), tolerance_mm=1.0)["surface_dice"] == 1.0


def test_offset_cubes_with_anisotropic_spacing():
    # A = [2:6]^3, B = A moved one voxel along x; spacing (2.0, 1.0, 0.5) mm.
    a = np.zeros((10, 10, 10), bool)
    a[2:6, 2:6, 2:6] = True
    b = np.roll(a, 1, axis=0)
    # A's 56 surface voxels: the x=2 face (16) is 2.0 mm from B's x=3 face; the side faces of
    # x=3..5 (36) are B's side faces too (0 mm); the 4 middle voxels of the x=5 face lie inside
    # B, 0.5 mm (one z step) from B's z faces. B -> A mirrors it.
    r = volume_metrics(a, b, (2.0, 1.0, 0.5), tolerance_mm=1.0)
    assert r["dice"] == pytest.approx(2 * 48 / 128) and r["iou"] == pytest.approx(48 / 80)
    assert r["hd95"] == pytest.approx(2.0)  # position 0.95 * 55 = 52.25 among 36 zeros, 4 x 0.5, 16 x 2.0
    assert r["surface_dice"] == pytest.approx(80 / 112)
    assert volume_metrics(a, b, (2.0, 1.0, 0.5), tolerance_mm=0.4)["surface_dice"] == pytest.approx(72 / 112)
    to_b, to_a = surface_distances(a, b, (2.0, 1.0, 0.5))
    assert sorted(to_b) == sorted([0.0] * 36 + [0.5] * 4 + [2.0] * 16)
    assert sorted(to_a) == sorted(to_b)


def test_single_voxels():
    a, b = np.zeros((5, 5, 8), bool), np.zeros((5, 5, 8), bool)
    a[2, 2, 2], b[2, 2, 5] = True, True
    r = volume_metrics(a, b, (1.0, 1.0, 2.0), tolerance_mm=6.0)
    assert r["hd95"] == pytest.approx(6.0) and r["surface_dice"] == 1.0
    assert volume_metrics(a, b, (1.0, 1.0, 2.0), tolerance_mm=5.9)["surface_dice"] == 0.0


def _brute_force(pred, truth, spacing):
    """Pairwise distances between surface voxel centres, on the whole volume (no box, no EDT)."""
    sp, st = np.argwhere(surface(pred)) * spacing, np.argwhere(surface(truth)) * spacing
    d = np.sqrt(((sp[:, None, :] - st[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0)


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_on_random_blobs_touching_the_border(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape, spacing = (14, 12, 9), np.array([0.7, 1.3, 2.9])
    pred = ndimage.binary_opening(rng.random(shape) > 0.55)
    truth = ndimage.binary_opening(rng.random(shape) > 0.5)
    pred[0, :, :3] = True  # on the volume's border: border voxels are surface
    truth[-1, -4:, -2:] = True
    to_truth, to_pred = surface_distances(pred, truth, spacing)
    bt, bp = _brute_force(pred, truth, spacing)
    assert np.allclose(np.sort(to_truth), np.sort(bt)) and np.allclose(np.sort(to_pred), np.sort(bp))
    r = volume_metrics(pred, truth, spacing, tolerance_mm=1.5)
    assert r["hd95"] == pytest.approx(max(np.percentile(bt, 95), np.percentile(bp, 95)))
    assert r["surface_dice"] == pytest.approx(((bt <= 1.5).sum() + (bp <= 1.5).sum()) / (bt.size + bp.size))


def test_empty_masks_and_the_summary():
    empty, blob = np.zeros((6, 6, 6), bool), np.zeros((6, 6, 6), bool)
    blob[1:3, 1:3, 1:3] = True
    both = volume_metrics(empty, empty, (1, 1, 1))
    assert both["hd95"] == 0.0 and both["surface_dice"] == 1.0 and both["dice"] == 1.0
    missed = volume_metrics(empty, blob, (1, 1, 1))
    assert missed["hd95"] is None and missed["surface_dice"] == 0.0 and missed["dice"] == 0.0
    perfect = volume_metrics(blob, blob, (1, 1, 1))
    assert perfect["hd95"] == 0.0 and perfect["surface_dice"] == 1.0
    s = summarize_volumes([{"id": "b", **missed}, {"id": "a", **perfect}], tolerance_mm=1.0)
    assert s["n_volumes"] == 2 and [r["id"] for r in s["per_volume"]] == ["a", "b"]
    assert s["volume_mean"]["dice"] == 0.5 and s["volume_std"]["dice"] == 0.5
    assert s["volume_mean"]["hd95"] == 0.0 and s["hd95_undefined"] == 1  # the undefined one left out
    assert s["volume_global"]["dice"] == pytest.approx(2 * 8 / (8 + 16))
    with pytest.raises(ValueError, match="spacing .* has 2 values for a 3D mask"):
        volume_metrics(blob, blob, (1, 1))
