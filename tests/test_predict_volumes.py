"""seg.inference on volumes without a model: listing and units, slices out, mask volumes in (png and tar)."""

import gzip
import tarfile
import threading

import nibabel as nib
import numpy as np
import pytest

from seg.data import volumes as V
from seg.inference.engine import Preprocessor
from seg.inference.inputs import Unit, file_units, list_folder, output_stem
from seg.inference.volumes import MASK_SUFFIX, check_volume_inputs, output_names, volume_slices
from seg.inference.writers import UnitSink
from volume_fixtures import OBLIQUE_AFFINE, ball_volume, save_nifti

VOLUME = {"slice_axis": "axial", "normalization": {"modality": "mri", "percentiles": [0.5, 99.5]}}


def test_volumes_are_listed_with_their_stems_and_are_units_alone(tmp_path):
    for name in ("a.png", "b.nii.gz", "c.png", "d.png", "e.nii"):
        (tmp_path / name).write_bytes(b"x")
    found = list_folder(tmp_path)
    assert [stem for _, stem in found] == ["a", "b", "c", "d", "e"]
    units = file_units(found, unit_size=2)
    assert [[s.rsplit("/", 1)[1] for s in u.sources] for u in units] == [["a.png"], ["b.nii.gz"], ["c.png", "d.png"],
                                                                        ["e.nii"]]
    assert [u.id for u in units] == [f"files-{i:06d}" for i in range(4)]
    assert output_stem("x/../sub.01/t1.nii.gz") == "sub.01/t1"
    assert output_names("s/t1" + MASK_SUFFIX, ["_mask.png", "_overlay.png"]) == ["s/t1_mask.nii.gz"]
    assert output_names("s/x_mask.png", ["_mask.png", "_overlay.png"]) == ["s/x_mask.png", "s/x_overlay.png"]


def test_slices_come_out_normalised_and_prepared(tmp_path):
    image, _ = ball_volume((6, 20, 16), dtype=np.int16)
    path = save_nifti(tmp_path / "v.nii.gz", image, OBLIQUE_AFFINE)
    pre = Preprocessor("resize", 32, 1, [0.0], [1.0], VOLUME)
    out = list(volume_slices(str(path), pre))
    vol = V.load_volume(path)
    stats = V.mri_stats(vol.data)
    assert [w for w, _, _ in out] == [(2, k, 6) for k in range(6)]
    for (_, k, _), x, size in out:
        expected = pre.prepare(V.normalize(V.get_slice(vol.data, "axial", k), stats))
        assert x.dtype == np.float32 and x.shape == (32, 32) and size == (20, 16)
        assert np.array_equal(x, expected)
    ct = dict(VOLUME, normalization={"modality": "ct", "lo": 0.0, "hi": 500.0, "mean": 100.0, "std": 50.0,
                                     "voxels": 10})
    first = next(volume_slices(str(path), Preprocessor("tile", 32, 1, [0.0], [1.0], ct)))[1]
    assert np.allclose(first, (np.clip(V.get_slice(vol.data, "axial", 0), 0, 500) - 100) / 50)


@pytest.mark.parametrize("fmt", ["png", "tar"])
def test_assembler_writes_one_mask_volume_from_slices_in_any_order(tmp_path, fmt):
    image, label = ball_volume((6, 20, 16))
    source = str(save_nifti(tmp_path / "in" / "v.nii.gz", image, OBLIQUE_AFFINE, qform_code=1, sform_code=4))
    canonical = V.VolumeGeometry.read(source).to_canonical(label).astype(bool)
    sink = UnitSink(tmp_path / "out", "files-000000", fmt)
    records = []
    order = list(np.random.default_rng(0).permutation(6))

    def add(k):
        r = sink.volumes.add(sink, source, "sub/v", (2, int(k), 6), V.get_slice(canonical, "axial", int(k)))
        if r is not None:
            records.append(r)

    threads = [threading.Thread(target=add, args=(k,)) for k in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(records) == 1 and records[0]["output"] == "sub/v_mask.nii.gz" and records[0]["slices"] == 6
    assert records[0]["foreground"] == pytest.approx(label.mean(), abs=1e-6)
    tar = sink.close()
    if fmt == "png":
        data = (tmp_path / "out" / "sub" / "v_mask.nii.gz").read_bytes()
    else:
        with tarfile.open(tmp_path / "out" / tar) as t:
            data = t.extractfile("sub/v_mask.nii.gz").read()
    written = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    assert np.array_equal(np.asanyarray(written.dataobj), label)  # the input's storage order
    assert np.array_equal(written.affine, nib.load(source).affine) and int(written.header["sform_code"]) == 4
    assert not sink.volumes.pending


def test_checkpoint_and_inputs_must_match():
    volume_unit = [Unit(0, "files-000000", "files", ("a/v.nii.gz",), ("a/v",))]
    image_unit = [Unit(0, "files-000000", "files", ("a/x.png",), ("a/x",))]
    with pytest.raises(ValueError, match="v.nii.gz is a NIfTI volume but the checkpoint was trained on 2D images"):
        check_volume_inputs(volume_unit, {"image_size": 32})
    with pytest.raises(ValueError, match="x.png is a 2D image but the checkpoint was trained on NIfTI volume"):
        check_volume_inputs(image_unit, {"volume": VOLUME})
    with pytest.raises(ValueError, match="--save_overlay and --save_probability write 2D images"):
        check_volume_inputs(volume_unit, {"volume": VOLUME}, overlay=True)
    check_volume_inputs(volume_unit, {"volume": VOLUME})
    check_volume_inputs(image_unit, {"image_size": 32}, overlay=True)
    with pytest.raises(ValueError, match="not trained on NIfTI volumes"):
        next(volume_slices("a/v.nii.gz", Preprocessor("resize", 32, 1, [0.0], [1.0])))


def _slice_qc(score, fg, flags=(), empty_on_content=False, flip=None):
    return {"score": score, "flags": list(flags), "entropy": 1 - score ** 0.5, "flip_dice": flip, "foreground": fg,
            "foreground_quantile": 0.5, "components": 1, "components_quantile": 0.5, "content": 0.1,
            "empty_on_content": empty_on_content, "touches_border": False}


def test_volume_qc_is_decided_by_the_slices_with_something_to_judge():
    from seg.inference.volumes import volume_qc

    blank = [_slice_qc(1.0, 0.0) for _ in range(15)]  # outside the anatomy: empty and right
    judged = [_slice_qc(0.8, 0.1), _slice_qc(0.6, 0.2, ["uncertain"]), _slice_qc(0.1, 0.0, ["empty_on_content"],
                                                                                 empty_on_content=True)]
    qc = volume_qc(blank + judged, foreground=0.02)
    assert qc["score"] == pytest.approx((0.8 + 0.6 + 0.1) / 3, abs=1e-4) and qc["slices_judged"] == 3
    assert qc["flags"] == ["uncertain"] and qc["slices_flagged"] == 2  # 1 of 3 slices >= 5 %
    assert qc["empty_on_content"] is False  # the volume's mask is not empty
    empty = volume_qc(blank + [_slice_qc(0.2, 0.0, ["empty_on_content"], empty_on_content=True)], foreground=0.0)
    assert empty["flags"] == ["empty_on_content"] and empty["empty_on_content"] is True
    assert volume_qc(blank, foreground=0.0)["score"] == 1.0  # nothing to judge: every slice counts
    good = volume_qc(blank + [_slice_qc(0.8, 0.1), _slice_qc(0.6, 0.1)], foreground=0.02)
    worse = volume_qc(blank + [_slice_qc(0.8, 0.1), _slice_qc(0.3, 0.1)], foreground=0.02)
    assert worse["score"] < good["score"]  # monotone in its slices' scores
