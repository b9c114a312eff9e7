"""seg.data.pairing: pairing by relative path + stem + suffix, safe unique keys, stable split."""

from pathlib import Path

import pytest

from seg.data.pairing import find_pairs, read_pairs_csv, sample_key, split_of


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_sample_key_is_tar_safe():
    assert sample_key("a/b/x.jpg") == "a/b/x"
    assert sample_key("a/b.c/x.y.z.png") == "a/b_c/x_y_z"
    assert sample_key("../../etc/passwd.png") == "etc/passwd"
    assert sample_key("/abs/./x.tif") == "abs/x"
    assert sample_key("we ird/na:me\u00e9.bmp") == "we_ird/na_me_"
    assert "." not in sample_key("a.b/c.d.e.png") and ".." not in sample_key("../x.png")


def test_pairs_across_subfolders_with_suffixes(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    _touch(images, "a/b/x.jpg", "a/y.png", "z.tif", "nomask.png", "notes.txt")
    _touch(masks, "a/b/x.png", "a/y_mask.tif", "z-mask.bmp", "other/nomask.png")
    pairs, problems = find_pairs(images, masks)
    got = {p.key: (p.image_rel, p.mask_rel) for p in pairs}
    assert got == {"a/b/x": ("a/b/x.jpg", "a/b/x.png"), "a/y": ("a/y.png", "a/y_mask.tif"),
                   "z": ("z.tif", "z-mask.bmp")}
    assert [(p.image, p.reason) for p in problems] == [("nomask.png", "missing mask")]
    assert "nomask.png" in problems[0].detail


def test_custom_suffixes_and_ambiguous_masks(tmp_path):
    images, masks = tmp_path / "i", tmp_path / "m"
    _touch(images, "x.png", "y.png")
    _touch(masks, "x_gt.png", "y.png", "y_mask.png")
    pairs, problems = find_pairs(images, masks, suffixes=("_gt",))
    assert [p.key for p in pairs] == ["x"]
    assert [p.reason for p in problems] == ["missing mask"]
    pairs, problems = find_pairs(images, masks, suffixes=("", "_mask"))
    assert [p.reason for p in problems] == ["missing mask", "ambiguous mask"]
    assert "y_mask.png" in problems[1].detail


def test_masks_next_to_images(tmp_path):
    _touch(tmp_path, "x.jpg", "x_mask.png", "y.jpg", "y_mask.png")
    pairs, problems = find_pairs(tmp_path, tmp_path)
    assert [(p.key, p.mask_rel) for p in pairs] == [("x", "x_mask.png"), ("y", "y_mask.png")] and not problems


def test_duplicate_keys_name_both_files(tmp_path):
    _touch(tmp_path / "i", "x.jpg", "x.png", "a.b.png", "a_b.png", "ok.png")
    _touch(tmp_path / "m", "x_mask.png", "a.b_mask.png", "a_b_mask.png", "ok_mask.png")
    pairs, problems = find_pairs(tmp_path / "i", tmp_path / "m")
    assert [p.key for p in pairs] == ["ok"]
    dup = {p.image: p.detail for p in problems if p.reason == "duplicate key"}
    assert set(dup) == {"x.jpg", "x.png", "a.b.png", "a_b.png"}
    assert "x.png" in dup["x.jpg"] and "x.jpg" in dup["x.png"]


def test_unlabelled_mode(tmp_path):
    _touch(tmp_path, "c/1.png", "c/2.jpg")
    pairs, problems = find_pairs(tmp_path, None)
    assert [(p.key, p.mask) for p in pairs] == [("c/1", None), ("c/2", None)] and not problems


def test_pairs_csv_relative_to_csv_folder(tmp_path):
    _touch(tmp_path, "data/img/a.png", "data/lab/a.png", "data/img/sub/b.png", "data/lab/b.png")
    csv = tmp_path / "data" / "pairs.csv"
    csv.write_text("image,mask\nimg/a.png,lab/a.png\nimg/sub/b.png,lab/b.png\nimg/c.png,lab/c.png\n"
                   "img/a.png,\n")
    pairs, problems = read_pairs_csv(csv)
    assert [(p.key, p.mask_rel) for p in pairs][:1] == [("a", "lab/a.png")]
    assert pairs[0].image == (tmp_path / "data/img/a.png").resolve()
    assert {p.key for p in pairs} == {"a", "sub/b"}
    assert [p.reason for p in problems] == ["missing image", "missing mask"]
    bad = tmp_path / "bad.csv"
    bad.write_text("img,label\nx,y\n")
    with pytest.raises(ValueError, match="bad.csv: needs a header row with columns image,mask"):
        read_pairs_csv(bad)


def test_split_is_deterministic_fractional_and_per_key():
    keys = [f"k{i}" for i in range(4000)]
    splits = [split_of(k, 0.2) for k in keys]
    assert splits == [split_of(k, 0.2) for k in keys]
    assert 0.17 < splits.count("val") / len(keys) < 0.23
    assert all(split_of(k, 0.0) == "train" for k in keys[:100])


def test_pairs_csv_split_column_imposes_the_split(tmp_path):
    _touch(tmp_path, "img/a.png", "img/b.png", "img/c.png", "lab/a.png", "lab/b.png", "lab/c.png")
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,mask,split\nimg/a.png,lab/a.png,val\nimg/b.png,lab/b.png,train\nimg/c.png,lab/c.png,\n")
    pairs, problems = read_pairs_csv(csv)
    assert {p.key: p.split for p in pairs} == {"a": "val", "b": "train", "c": None} and not problems
    csv.write_text("image,mask,split\nimg/a.png,lab/a.png,val\nimg/b.png,lab/b.png,test\n")
    with pytest.raises(ValueError, match=r"pairs.csv: row 3 \(img/b.png\) has split='test'; the split column takes train or val"):
        read_pairs_csv(csv)
