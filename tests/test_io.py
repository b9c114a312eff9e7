"""seg.data.io: every format, bit depth and channel layout; errors that name the file."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from seg.data.io import (ImageReadError, check_same_size, decode_mask_info, encode_mask_png, mask_value_count,
                         read_image, read_mask, to_float01)

RNG = np.random.default_rng(0)


def _write(path: Path, arr: np.ndarray) -> Path:
    """Write an array given in RGB(A) order with OpenCV (which expects BGR(A))."""
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR if arr.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(path.suffix, arr)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def _random(shape, dtype):
    return RNG.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


LOSSLESS = [(".png", np.uint8), (".png", np.uint16), (".tif", np.uint8), (".tif", np.uint16), (".bmp", np.uint8)]


@pytest.mark.parametrize("ext,dtype", LOSSLESS)
@pytest.mark.parametrize("layout", ["grey", "rgb", "rgba"])
def test_lossless_formats_round_trip(tmp_path, ext, dtype, layout):
    shape = {"grey": (17, 23), "rgb": (17, 23, 3), "rgba": (17, 23, 4)}[layout]
    arr = _random(shape, dtype)
    img = read_image(_write(tmp_path / f"x{ext}", arr))
    assert img.dtype == dtype
    expected = arr[:, :, :3] if layout == "rgba" else arr  # alpha dropped, RGB order kept
    np.testing.assert_array_equal(img, expected)


def test_jpeg_grey_and_rgb(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200  # pure red must come back red, not blue (BGR converted)
    img = read_image(_write(tmp_path / "x.jpg", rgb))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert img[..., 0].mean() > 180 and img[..., 2].mean() < 20
    grey = read_image(_write(tmp_path / "g.jpeg", np.full((8, 9), 77, np.uint8)))
    assert grey.shape == (8, 9) and abs(int(grey.mean()) - 77) <= 2


def test_grey_stored_as_three_channels_stays_three_channels(tmp_path):
    arr = np.repeat(_random((10, 12, 1), np.uint8), 3, axis=2)
    assert read_image(_write(tmp_path / "x.png", arr)).shape == (10, 12, 3)


def test_masks_are_binary_any_positive_value(tmp_path):
    m = np.array([[0, 1, 2], [255, 0, 7]], np.uint8)
    mask = read_mask(_write(tmp_path / "m.png", m))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, m > 0)
    data = (tmp_path / "m.png").read_bytes()
    assert decode_mask_info(data, "m.png")[1] == 5  # 0, 1, 2, 7, 255
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[1, 1, 2] = 9  # only the blue channel set: foreground (max over channels)
    mask = read_mask(_write(tmp_path / "c.png", colour))
    assert mask.sum() == 1 and mask[1, 1]
    mask16 = read_mask(_write(tmp_path / "m16.tif", np.array([[0, 1000]], np.uint16)))
    np.testing.assert_array_equal(mask16, [[False, True]])
    assert mask_value_count(np.array([[0, 255], [255, 0]], np.uint8)) == 2


def test_encode_mask_png_is_8bit_0_255(tmp_path):
    m = np.zeros((5, 6), bool)
    m[2:4, 1:3] = True
    raw = cv2.imdecode(np.frombuffer(encode_mask_png(m), np.uint8), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint8 and raw.shape == (5, 6)
    assert set(np.unique(raw)) == {0, 255}
    np.testing.assert_array_equal(raw > 0, m)


def test_to_float01_scales_by_dtype_max():
    assert to_float01(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    out = to_float01(np.array([0, 65535], np.uint16))
    assert out.dtype == np.float32 and out.tolist() == [0.0, 1.0]


def _encoded(ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, _random((40, 50, 3), np.uint8))
    return buf.tobytes()


def test_zero_byte_file_names_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png.*empty \(0 bytes\)") as info:
        read_image(p)
    assert info.value.kind == "empty"


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif", ".bmp"])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file_names_file(tmp_path, ext, keep):
    data = _encoded(ext)
    p = tmp_path / f"cut{ext}"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageReadError, match=f"cut\\{ext}") as info:
        read_image(p)
    assert info.value.kind in ("truncated", "corrupt")


def test_jpeg_missing_only_end_marker_is_truncated(tmp_path):
    p = tmp_path / "noeoi.jpg"
    p.write_bytes(_encoded(".jpg")[:-2])
    with pytest.raises(ImageReadError, match="noeoi.jpg: truncated JPEG"):
        read_image(p)


def test_corrupt_and_unsupported_files(tmp_path):
    p = tmp_path / "garbage.png"
    p.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageReadError, match="garbage.png: could not be decoded"):
        read_image(p)
    q = tmp_path / "x.gif"
    q.write_bytes(b"GIF89a")
    with pytest.raises(ImageReadError, match=r"x\.gif: unsupported file extension '\.gif'.*\.png"):
        read_image(q)
    f32 = tmp_path / "float.tif"
    ok, buf = cv2.imencode(".tif", np.ones((4, 4), np.float32))
    f32.write_bytes(buf.tobytes())
    with pytest.raises(ImageReadError, match="float.tif: unsupported pixel type float32"):
        read_image(f32)
    with pytest.raises(ImageReadError, match="missing.png: cannot be read"):
        read_image(tmp_path / "missing.png")


def test_size_mismatch_names_both_files():
    with pytest.raises(ImageReadError, match=r"m\.png: wrong size 4x3 .*i\.png of size 5x3") as info:
        check_same_size(np.zeros((3, 5)), np.zeros((3, 4), bool), "i.png", "m.png")
    assert info.value.kind == "size mismatch"
