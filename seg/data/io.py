"""Image and mask reading with errors that name the file and what is wrong.

Design choices:

- One decoder, OpenCV's ``cv2.imdecode(..., IMREAD_UNCHANGED)``, for every format
  (png, jpg/jpeg, tif/tiff, bmp). ``UNCHANGED`` keeps the bit depth (8 and 16 bit stay
  ``uint8``/``uint16``) and ignores EXIF orientation, so an image and its mask are never rotated
  differently. Anything else (float TIFFs, int32, ...) is refused rather than silently rescaled.
- Decoding works on bytes (``decode_image``) so that ``seg prepare`` can validate exactly the
  bytes it copies into a shard, and the shard reader can decode the same bytes again.
- Arrays follow the package convention: ``HxW`` grey or ``HxWx3`` RGB (OpenCV's BGR is
  converted), alpha dropped. A grey image stored as three equal channels stays 3-channel: the
  channel count is what the file says, the model config decides what to feed.
- Truncation is detected twice: OpenCV returns ``None`` for most truncated files, and a
  structural check catches the cases where a decoder would hand back a partial image: a JPEG
  must have an end-of-image marker after its last start-of-scan, a PNG its ``IEND`` chunk, a
  BMP at least the byte count its header announces.
- Worker processes that use OpenCV are forked inside ``opencv_threads(1)``: a forked child of a
  process whose OpenCV thread pool is running hangs when it changes its own thread count
  (reproduced with OpenCV 5.0: ``cv2.setNumThreads(1)`` in a child forked after a threaded
  resize in the parent never returns). With one thread in the parent while it forks, children
  inherit a single-threaded OpenCV without a pool and never touch the setting.
- Masks are binary: any value > 0 is foreground; a multi-channel mask uses the maximum over its
  channels. ``mask_value_count`` reports the number of distinct values so that ``seg prepare``
  can count masks that are not strictly two-valued (they are accepted, not rejected).
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SUPPORTED_DTYPES = (np.uint8, np.uint16)


@contextlib.contextmanager
def opencv_threads(n: int = 1) -> Iterator[None]:
    """OpenCV's thread count is ``n`` inside the block and restored after (see the module
    docstring: start forked worker processes inside ``opencv_threads(1)``)."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


class ImageReadError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the problem.

    ``kind`` is a short category for grouping (``seg prepare``'s summary): one of ``unreadable``,
    ``empty``, ``truncated``, ``corrupt``, ``unsupported``, ``size mismatch``.
    """

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep ``kind`` when sent between processes
        return (type(self), (str(self), self.kind))


def _check_extension(name: str) -> None:
    ext = os.path.splitext(str(name))[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ImageReadError(
            f"{name}: unsupported file extension {ext or '(none)'!r}; "
            f"supported extensions are {', '.join(IMAGE_EXTENSIONS)}",
            kind="unsupported",
        )


def _truncation_problem(data: bytes) -> str | None:
    """Return a description if the encoded bytes are structurally incomplete, else None."""
    if data[:2] == b"\xff\xd8":  # JPEG: an EOI marker must follow the last start-of-scan
        sos = data.rfind(b"\xff\xda")
        if sos < 0 or data.find(b"\xff\xd9", sos) < 0:
            return "truncated JPEG (no end-of-image marker after the image data)"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        iend = data.rfind(b"IEND")
        if iend < 0 or iend < data.rfind(b"IDAT"):
            return "truncated PNG (no IEND chunk after the image data)"
    elif data[:2] == b"BM" and len(data) >= 6:
        (declared,) = struct.unpack("<I", data[2:6])
        if declared and len(data) < declared:
            return f"truncated BMP ({len(data)} bytes, header declares {declared})"
    return None


def decode_raw(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes exactly as stored (BGR/BGRA channel order, any channel count).

    Args:
        data: the encoded file content.
        name: the file name used in error messages (its extension must be supported).

    Raises:
        ImageReadError: empty, truncated, corrupt data, or an unsupported extension or dtype.
    """
    _check_extension(name)
    if len(data) == 0:
        raise ImageReadError(f"{name}: file is empty (0 bytes)", kind="empty")
    problem = _truncation_problem(data)
    if problem:
        raise ImageReadError(f"{name}: {problem}", kind="truncated")
    try:
        arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # some codecs raise instead of returning None
        detail = str(exc).strip().splitlines()[-1]
        raise ImageReadError(f"{name}: could not be decoded ({detail})", kind="corrupt") from exc
    if arr is None or arr.size == 0:
        raise ImageReadError(f"{name}: could not be decoded (corrupt, truncated, or not an image file)", kind="corrupt")
    if arr.dtype not in SUPPORTED_DTYPES:
        raise ImageReadError(
            f"{name}: unsupported pixel type {arr.dtype}; only 8-bit (uint8) and 16-bit (uint16) "
            "images are accepted (convert the file, e.g. to a 16-bit PNG or TIFF)",
            kind="unsupported",
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)):
        raise ImageReadError(
            f"{name}: unsupported image shape {arr.shape}; expected HxW, HxWx3 or HxWx4", kind="unsupported"
        )
    return arr


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode encoded bytes into an image array following the package convention.

    Args:
        data: the encoded file content (png, jpg/jpeg, tif/tiff or bmp).
        name: the file name, used for the extension check and in error messages.

    Shape:
        returns ``(H, W)`` for grey or ``(H, W, 3)`` RGB, dtype ``uint8`` or ``uint16``; alpha
        (and the alpha of grey+alpha files) is dropped.
    """
    arr = decode_raw(data, name)
    if arr.ndim == 2:
        return arr
    channels = arr.shape[2]
    if channels == 2:  # grey + alpha
        return np.ascontiguousarray(arr[:, :, 0])
    if channels == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def read_bytes(path: str | Path) -> bytes:
    """Read a file's bytes, turning OS errors into ``ImageReadError`` naming the file."""
    try:
        with open(path, "rb") as fh:  # not Path.read_bytes: 3 us less per file, which counts for small images
            return fh.read()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file. See ``decode_image`` for the returned array."""
    _check_extension(str(path))
    return decode_image(read_bytes(path), str(path))


def _mask_plane(raw: np.ndarray) -> np.ndarray:
    """Reduce a raw decoded mask to one plane: colour channels' maximum, alpha ignored."""
    if raw.ndim == 2:
        return raw
    channels = raw.shape[2]
    colour = raw[:, :, :1] if channels == 2 else raw[:, :, :3]
    return colour.max(axis=2)


def mask_value_count(raw: np.ndarray) -> int:
    """Number of distinct values in a decoded mask (after the max over colour channels).

    A clean binary mask has 1 or 2; more means anti-aliased edges or a label image, which
    ``seg prepare`` accepts as ``> 0`` and counts.
    """
    return int(np.unique(_mask_plane(raw)).size)


def decode_mask_info(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """Decode mask bytes into ``(mask, distinct_value_count)``.

    Shape:
        mask is ``bool (H, W)``: True where the (max over colour channels) value is > 0.
    """
    plane = _mask_plane(decode_raw(data, name))
    return plane > 0, int(np.unique(plane).size)


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """Decode mask bytes into a ``bool (H, W)`` array; any value > 0 is foreground.

    Unlike ``decode_mask_info`` it does not count distinct values (a sort of every pixel,
    ~0.5 ms of each 512x512 training sample that nothing used).
    """
    return _mask_plane(decode_raw(data, name)) > 0


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file into a ``bool (H, W)`` array; any value > 0 is foreground."""
    _check_extension(str(path))
    return decode_mask(read_bytes(path), str(path))


def check_same_size(image: np.ndarray, mask: np.ndarray, image_name: str, mask_name: str) -> None:
    """Raise ``ImageReadError`` if image and mask differ in height or width (never resized)."""
    if image.shape[:2] != mask.shape[:2]:
        raise ImageReadError(
            f"{mask_name}: wrong size {mask.shape[1]}x{mask.shape[0]} (WxH) for image {image_name} "
            f"of size {image.shape[1]}x{image.shape[0]}; masks are never resized, fix or remove the pair",
            kind="size mismatch",
        )


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Encode a binary mask as an 8-bit 0/255 single-channel PNG.

    Shape:
        mask: ``(H, W)``, bool or any dtype (non-zero is foreground).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_mask_png expects an HxW mask, got shape {mask.shape}")
    ok, buf = cv2.imencode(".png", (mask != 0).astype(np.uint8) * np.uint8(255))
    if not ok:  # pragma: no cover - OpenCV's PNG encoder does not fail on valid arrays
        raise RuntimeError("OpenCV failed to encode a mask as PNG")
    return buf.tobytes()


def dtype_max(dtype) -> float:
    """The scale of an integer image dtype: 255 for uint8, 65535 for uint16."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise ValueError(f"unsupported image dtype {dtype}; expected uint8 or uint16")
    return float(np.iinfo(dtype).max)


def to_float01(img: np.ndarray) -> np.ndarray:
    """Scale a uint8/uint16 image to float32 in [0, 1] by its dtype maximum (255 or 65535)."""
    return img.astype(np.float32) / np.float32(dtype_max(img.dtype))


def image_size_of(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file (decodes it; errors as ``read_image``)."""
    return read_image(path).shape[:2]
