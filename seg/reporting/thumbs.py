"""Overlay thumbnails and full-size overlays of the few images the report shows.

Only the worst N images (by ``qc_score``) are ever read: their mask from the prediction folder
(a png file, or a member of the unit's tar for ``--format tar``) and their input image (a file,
or a ``shard.tar:key`` sample of a shard). Each tar is opened once for all its members.

Design choices:

- Thumbnails are JPEG (quality 85, longest side ``THUMB``) embedded as data URIs: a few
  kilobytes each, so 100 of them keep the page under a megabyte and self-contained.
- The full-size overlay a thumbnail links to is the ``{stem}_overlay.png`` that ``seg predict
  --save_overlay`` wrote, when the folder holds one as a file; otherwise it is written at the
  original size into the report's sibling folder (``report_files/``), only for these N images.
- An input image that can no longer be read (moved, deleted) does not stop the report: the
  mask is shown on black and the card says so.
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import cv2
import numpy as np

from seg.data.io import ImageReadError, decode_image, decode_mask, read_image, read_mask
from seg.fileio import atomic_write_bytes
from seg.inference.writers import encode_png, overlay_rgb
from seg.reporting.page import data_uri

THUMB = 160


class TarCache:
    """Open tar files by path, each once, with a member-name index."""

    def __init__(self):
        self.open: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}

    def get(self, path: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
        if path not in self.open:
            tar = tarfile.open(path, "r")
            self.open[path] = (tar, {m.name: m for m in tar.getmembers()})
        return self.open[path]

    def read(self, path: str, name: str) -> bytes | None:
        tar, members = self.get(path)
        member = members.get(name)
        if member is None:
            return None
        fh = tar.extractfile(member)
        return None if fh is None else fh.read()

    def find(self, path: str, prefix: str) -> tuple[str, bytes] | None:
        tar, members = self.get(path)
        for name in members:
            if name.startswith(prefix):
                data = self.read(path, name)
                return (name, data) if data is not None else None
        return None

    def close(self) -> None:
        for tar, _ in self.open.values():
            tar.close()
        self.open.clear()


def read_input(source: str, tars: TarCache) -> np.ndarray:
    """The input image of a manifest record: a file, or ``SHARD.tar:KEY`` (a shard sample)."""
    shard, sep, key = source.rpartition(":")
    if sep and shard.endswith(".tar") and os.path.isfile(shard):
        found = tars.find(shard, f"{key}.image.")
        if found is None:
            raise ImageReadError(f"{shard} has no image member for sample {key!r}", "unreadable")
        return decode_image(found[1], f"{shard}:{found[0]}")
    return read_image(source)


def read_prediction(pred_dir: Path, output: str, tar: str | None, tars: TarCache) -> np.ndarray:
    """The predicted mask (bool) of a manifest image record."""
    if tar:
        data = tars.read(str(pred_dir / tar), output)
        if data is None:
            raise ImageReadError(f"{pred_dir / tar} has no member {output}", "unreadable")
        return decode_mask(data, f"{pred_dir / tar}:{output}")
    return read_mask(pred_dir / output)


def thumbnail_uri(rgb: np.ndarray) -> str:
    """A JPEG data URI of an RGB image scaled to fit ``THUMB`` px."""
    h, w = rgb.shape[:2]
    scale = min(1.0, THUMB / max(h, w))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    elif max(h, w) < THUMB // 2:  # tiny images: enlarge with visible pixels
        f = THUMB // max(h, w)
        rgb = cv2.resize(rgb, (w * f, h * f), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:  # pragma: no cover - OpenCV's JPEG encoder does not fail on valid arrays
        raise RuntimeError("OpenCV failed to encode a thumbnail")
    return data_uri(buf.tobytes(), "image/jpeg")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-80:]


def make_case(pred_dir: Path, record: dict, rank: int, files_dir: Path, out_dir: Path, tars: TarCache) -> dict:
    """Thumbnail URI, link and notes of one shown image.

    Args:
        record: the manifest image record plus ``tar`` (the unit's tar name or None).
        rank: its position in the worst list (names the written overlay).
        files_dir: the report's sibling folder; out_dir: the report's folder (links are relative).
    """
    notes = []
    try:
        mask = read_prediction(pred_dir, record["output"], record.get("tar"), tars)
    except (ImageReadError, OSError, tarfile.TarError) as exc:
        return {"thumb": None, "link": None, "note": f"mask unreadable: {exc}"}
    try:
        image = read_input(record["input"], tars)
        if image.shape[:2] != mask.shape:
            raise ImageReadError(f"{record['input']} is {image.shape[:2]}, its mask {mask.shape}", "size mismatch")
    except (ImageReadError, OSError, tarfile.TarError) as exc:
        image, notes = np.zeros(mask.shape, np.uint8), [f"input not shown: {exc}"]
    if image.dtype == np.uint16:  # stretch for display
        from seg.evaluation.scoring import display_image

        image = display_image(image)
    overlay = overlay_rgb(image, mask)
    stem = record["output"][: -len("_mask.png")] if record["output"].endswith("_mask.png") else record["output"]
    existing = pred_dir / f"{stem}_overlay.png"
    if not record.get("tar") and existing.is_file() and not notes:
        target = existing
    else:
        target = files_dir / f"{rank:04d}_{_safe(stem)}_overlay.png"
        atomic_write_bytes(target, encode_png(overlay, rgb=True), fsync=False)
    return {"thumb": thumbnail_uri(overlay), "link": os.path.relpath(target, out_dir).replace(os.sep, "/"),
            "note": "; ".join(notes)}
