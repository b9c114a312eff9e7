"""seg.data.volumes: canonical orientation and back, slicing, normalisation, label checks, mask files."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from seg.data import volumes as V
from volume_fixtures import OBLIQUE_AFFINE, RAS_AFFINE, ball_volume, save_nifti

AFFINES = {
    "ras": RAS_AFFINE,
    "oblique-permuted": OBLIQUE_AFFINE,
    "lps": np.diag([-0.7, -0.7, 3.0, 1.0]) + np.array([[0, 0, 0, 50], [0, 0, 0, 60], [0, 0, 0, -10], [0, 0, 0, 0]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_canonical_and_back_is_the_identity(tmp_path, name, dtype):
    data = np.random.default_rng(3).normal(100, 50, (6, 8, 5)).astype(dtype)
    path = save_nifti(tmp_path / "x.nii.gz", data, AFFINES[name])
    vol = V.load_volume(path)
    assert vol.data.dtype == dtype
    assert nib.aff2axcodes(vol.geometry.affine) == ("R", "A", "S")
    assert np.array_equal(vol.geometry.to_original(vol.data), data)
    expected = nib.as_closest_canonical(nib.load(str(path)))
    assert np.array_equal(vol.data, np.asanyarray(expected.dataobj))
    assert vol.geometry.shape == expected.shape
    header_only = V.VolumeGeometry.read(path)
    assert header_only.shape == vol.geometry.shape and np.allclose(header_only.affine, vol.geometry.affine)


def test_spacing_follows_the_canonical_axes(tmp_path):
    path = save_nifti(tmp_path / "x.nii", np.zeros((4, 5, 6), np.int16), OBLIQUE_AFFINE)
    g = V.VolumeGeometry.read(path)
    # storage axes (4, 5, 6) map to world (-z, +x, -y): canonical (x, y, z) = storage (1, 2, 0)
    assert g.shape == (5, 6, 4)
    assert np.allclose(g.spacing, (0.8, 1.2, 2.5))
    assert np.allclose(g.slice_spacing("axial"), (0.8, 1.2, 2.5))
    assert np.allclose(g.slice_spacing("sagittal"), (1.2, 2.5, 0.8))


def test_mask_written_back_has_the_inputs_geometry_and_voxels(tmp_path):
    image, label = ball_volume((10, 16, 14))
    path = save_nifti(tmp_path / "x.nii.gz", image, OBLIQUE_AFFINE, qform_code=1, sform_code=4)
    vol = V.load_volume(path)
    canonical_mask = vol.geometry.to_canonical(label).astype(bool)
    out = tmp_path / "out" / "x_mask.nii.gz"
    V.write_mask_volume(canonical_mask, vol.geometry, out)
    written = nib.load(str(out))
    assert written.shape == image.shape
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(written.affine, nib.load(str(path)).affine)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 4
    assert np.allclose(written.get_qform(), OBLIQUE_AFFINE) and np.allclose(written.get_sform(), OBLIQUE_AFFINE)
    assert np.array_equal(np.asanyarray(written.dataobj), label)  # storage order of the input, 0/1
    assert out.read_bytes() == V.mask_volume_bytes(canonical_mask, vol.geometry)  # deterministic bytes
    assert gzip.decompress(out.read_bytes())[:4] == (348).to_bytes(4, "little")  # NIfTI-1 header size


def test_two_d_and_single_frame_volumes_are_three_d(tmp_path):
    flat = save_nifti(tmp_path / "flat.nii", np.ones((6, 7), np.float32), RAS_AFFINE)
    assert V.load_volume(flat).data.shape == (6, 7, 1)
    one = save_nifti(tmp_path / "one.nii", np.ones((6, 7, 3, 1), np.int16), RAS_AFFINE)
    assert V.load_volume(one).data.shape == (6, 7, 3)
    series = save_nifti(tmp_path / "series.nii", np.ones((6, 7, 3, 2), np.int16), RAS_AFFINE)
    with pytest.raises(V.VolumeReadError, match="series.nii.*not a 3D volume.*slicer"):
        V.load_volume(series)


def test_unreadable_and_truncated_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    with pytest.raises(V.VolumeReadError, match="bad.nii.gz: cannot be read as NIfTI") as info:
        V.load_volume(bad)
    assert info.value.kind == "unreadable"
    good = save_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).normal(size=(30, 30, 30)).astype(np.float32))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(V.VolumeReadError, match="cut.nii.gz: .*truncated or corrupt"):
        V.load_volume(cut)
    with pytest.raises(V.VolumeReadError, match="missing.nii: file not found"):
        V.load_volume(tmp_path / "missing.nii")


def test_label_checks():
    assert V.label_mask(np.array([[0, 255], [255, 0]], np.uint8), "m.nii").sum() == 2
    with pytest.raises(V.VolumeReadError, match="m.nii: label volume has no foreground") as info:
        V.label_mask(np.zeros((3, 3, 3)), "m.nii")
    assert info.value.kind == "empty label"
    with pytest.raises(V.VolumeReadError, match=r"m.nii: label volume is not binary \(non-zero values 1, 2") as info:
        V.label_mask(np.array([0, 1, 2, 2]), "m.nii")
    assert info.value.kind == "non-binary label"


def test_geometry_checks_compare_canonical_grids(tmp_path):
    image = V.VolumeGeometry.read(save_nifti(tmp_path / "i.nii", np.zeros((4, 5, 6), np.int16), OBLIQUE_AFFINE))
    # the same grid stored in RAS order: aligned, accepted
    ras = np.zeros((5, 6, 4), np.uint8)
    same_grid = V.VolumeGeometry.read(save_nifti(tmp_path / "m.nii", ras, image.affine))
    V.check_same_geometry(image, same_grid)
    small = V.VolumeGeometry.read(save_nifti(tmp_path / "s.nii", np.zeros((4, 5, 5), np.uint8), OBLIQUE_AFFINE))
    with pytest.raises(V.VolumeReadError, match="s.nii: shape .* differs from its image .*i.nii"):
        V.check_same_geometry(image, small)
    shifted = OBLIQUE_AFFINE.copy()
    shifted[0, 3] += 2.0
    moved = V.VolumeGeometry.read(save_nifti(tmp_path / "t.nii", np.zeros((4, 5, 6), np.uint8), shifted))
    with pytest.raises(V.VolumeReadError, match="t.nii: its affine differs .* by up to 2 mm.*resample") as info:
        V.check_same_geometry(image, moved)
    assert info.value.kind == "geometry mismatch"


def test_slices_stack_back_and_axes():
    data = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    for axis in ("axial", "coronal", "sagittal", 0, "1"):
        n = V.slice_count(data.shape, axis)
        assert np.array_equal(V.stack_slices([V.get_slice(data, axis, k) for k in range(n)], axis), data)
    assert V.get_slice(data, "axial", 2).shape == (3, 4)
    assert V.axis_name(0) == "sagittal"
    with pytest.raises(ValueError, match="slice_axis='top' is not valid; use axial"):
        V.axis_index("top")


def test_mri_normalisation_is_per_volume_over_non_zero_voxels():
    rng = np.random.default_rng(0)
    data = np.zeros((20, 20, 20), np.int16)
    data[5:15, 5:15, 5:15] = rng.integers(100, 200, (10, 10, 10))
    data[5, 5, 5] = 30000  # an outlier the percentile clip removes
    stats = V.mri_stats(data)
    values = data[data != 0].astype(np.float64)
    lo, hi = np.percentile(values, (0.5, 99.5))
    assert stats["lo"] == pytest.approx(lo) and stats["hi"] == pytest.approx(hi) and hi < 300
    assert stats["mean"] == pytest.approx(np.clip(values, lo, hi).mean())
    assert stats["voxels"] == 1000
    whole = V.normalize(data, stats)
    assert whole.dtype == np.float32
    inside = whole[data != 0]
    assert abs(inside.mean()) < 1e-3 and inside.std() == pytest.approx(1.0, rel=1e-3)
    for k in range(20):  # a slice normalised alone equals the slice of the normalised volume
        assert np.array_equal(V.normalize(V.get_slice(data, "axial", k), stats), V.get_slice(whole, "axial", k))
    with pytest.raises(V.VolumeReadError, match="every voxel is 0"):
        V.mri_stats(np.zeros((2, 2, 2)))


def test_ct_statistics_pool_foreground_samples_of_the_data_set():
    rng = np.random.default_rng(1)
    a, b = rng.normal(40, 10, (10, 10, 10)), rng.normal(60, 10, (10, 10, 10))
    fa, fb = a > 45, b > 45
    samples = [V.ct_foreground_sample(a, fa, "a"), V.ct_foreground_sample(b, fb, "b")]
    stats = V.ct_stats(samples)
    pooled = np.concatenate([a[fa], b[fb]]).astype(np.float32).astype(np.float64)
    lo, hi = np.percentile(pooled, (0.5, 99.5))
    assert stats["modality"] == "ct" and stats["voxels"] == pooled.size
    assert stats["lo"] == pytest.approx(lo) and stats["std"] == pytest.approx(np.clip(pooled, lo, hi).std())
    assert V.volume_stats(a, stats) == {k: stats[k] for k in ("modality", "lo", "hi", "mean", "std", "voxels")}
    big = np.arange(200_000, dtype=np.float32)
    sample = V.ct_foreground_sample(big, big >= 0, "big")
    assert sample.size == V.CT_SAMPLE_PER_VOLUME
    assert np.array_equal(sample, V.ct_foreground_sample(big, big >= 0, "big"))  # fixed seed per key
    with pytest.raises(ValueError, match="--modality ct needs foreground voxels"):
        V.ct_stats([])


def test_names():
    assert V.is_volume_name("a/b/x.nii.gz") and V.is_volume_name("X.NII") and not V.is_volume_name("x.png")
    assert not V.is_volume_name("a/.x.nii.gz.tmp-1") and not V.is_volume_name(".x.nii")
    assert V.split_volume_name("a/x.y.nii.gz") == ("a/x.y", ".nii.gz")
    assert V.split_volume_name("x.png") == ("x.png", "")
