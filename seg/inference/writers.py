"""Output encoding and writing on a bounded pool of threads: png files or one tar per unit.

Design choices:

- Writing runs on ``threads`` threads behind a limit of ``max_pending`` images: when the
  writers fall behind, ``submit`` blocks the main loop instead of queueing without bound, so
  memory stays bounded whatever the cohort size. A job is a batch's images of one unit
  (``submit_block``), not one image: for small images the per-job handoff (future, semaphore,
  queue, thread wake-up) cost more than encoding and writing. The jobs themselves (bilinear resize of the
  probabilities back to the original size, thresholding, PNG encoding, file writes) are mostly
  OpenCV and I/O calls that release the GIL, so they overlap with the model's forward.
- A job is a ``Block``: the batch's probability array itself (no per-image copies), thresholded
  and counted in one array operation when the images already have the network's size, else
  image by image after the resize back. A ``Block`` may instead carry masks already at the
  original size (``uint8`` 0/255) with their foreground pixel counts, as the CUDA path makes
  them on the device (``seg.inference.device``); the writer then only encodes and writes.
- Outputs per image, named from the sanitised stem: ``{stem}_mask.png`` (8-bit 0/255),
  ``{stem}_overlay.png`` (the image with the mask tinted red), ``{stem}_prob.png`` (16-bit,
  probability x 65535).
- ``--format png``: each file is written to a temporary name and renamed (``seg.fileio``), so a
  killed process never leaves a partial file under a final name; a rerun of the unit replaces
  the files. ``--format tar``: one ``{unit_id}.tar`` per unit holding the same member names,
  written under a temporary name and renamed when the unit is complete, then fsync'ed: for
  cohorts where millions of small files would exhaust a file system's inodes.
- A slice of a NIfTI volume (an item with ``slice`` set) is resized back and thresholded the
  same way, then handed to the unit's ``VolumeAssembler`` (``seg.inference.volumes``), which
  writes ``{stem}_mask.nii.gz`` through the sink when the volume's last slice is in; only that
  job returns a record (the volume's), the others none.
- Quality control (``qc``: ``seg.inference.qc.ImageQC``) measures a block's full-size
  probability maps together, in the same job, and adds ``qc`` to each image's record.
- PNG files are not fsync'ed one by one (that would cost more than encoding them); the rename
  protects against process kills and preemption. Against a machine crash, ``--format tar`` (one
  fsync'ed file per unit) is the safe choice.
- Quality control (``seg.inference.qc``) runs here too, on the full-size probability map the
  thread already holds; its record goes into the image's manifest entry under ``qc``.
"""

from __future__ import annotations

import io
import itertools
import os
import secrets
import tarfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Sequence

import cv2
import numpy as np

from seg.data.io import encode_mask_png
from seg.fileio import AtomicFile
from seg.inference.engine import Predictor
from seg.postprocess import mask_of

OVERLAY_COLOUR = np.array([255, 0, 0], np.float32)  # RGB red
OVERLAY_ALPHA = 0.45


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """Any decoded image as ``uint8 (H, W, 3)`` RGB (16-bit scaled by 257, grey repeated)."""
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image


def overlay_rgb(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the mask tinted red. Shape: ``(H, W[, 3]), (H, W) -> uint8 (H, W, 3)``."""
    rgb = to_rgb8(image).astype(np.float32)
    m = mask.astype(bool)
    rgb[m] = (1 - OVERLAY_ALPHA) * rgb[m] + OVERLAY_ALPHA * OVERLAY_COLOUR
    return rgb.astype(np.uint8)


def encode_png(array: np.ndarray, rgb: bool = False) -> bytes:
    """PNG bytes of a uint8/uint16 array (RGB converted to OpenCV's BGR when ``rgb``)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if rgb else array)
    if not ok:  # pragma: no cover - OpenCV's PNG encoder does not fail on valid arrays
        raise RuntimeError(f"OpenCV failed to encode an array of shape {array.shape} as PNG")
    return buf.tobytes()


def probability_png(prob: np.ndarray) -> bytes:
    """16-bit PNG of probabilities in [0, 1] (value = round(p * 65535))."""
    return encode_png(probability_u16(prob))


def probability_u16(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as uint16 ``round(p * 65535)`` (what ``_prob.png`` stores)."""
    return np.round(np.clip(prob, 0, 1) * 65535).astype(np.uint16)


class Block(NamedTuple):
    """One writer job: consecutive images of one unit, with their probabilities or masks.

    Attributes:
        sources, rels, sizes, images: per image (input, output stem, original ``(H, W)``,
            original image for overlays or None).
        probs: ``(n, h, w)`` float32 array (or a sequence of ``(h, w)`` arrays) of probabilities
            at the network's size, resized back here; None when ``masks`` are given.
        masks: per image ``uint8`` 0/255 at the original size (thresholded on the device).
        counts: foreground pixel count per mask (with ``masks``).
        prob16: per image ``uint16`` probability maps at the original size (with ``masks``, when
            ``_prob.png`` is written).
        slices: per image ``(axis, index, count)`` of a volume's slice, or None for an image.
        qc_in: per image the QC inputs ``(prepared pixels, TTA flip agreement or None)``.
    """
    sources: Sequence[str]
    rels: Sequence[str]
    sizes: Sequence[tuple[int, int]]
    images: Sequence[np.ndarray | None]
    probs: np.ndarray | Sequence[np.ndarray] | None = None
    masks: Sequence[np.ndarray] | None = None
    counts: Sequence[int] | None = None
    prob16: Sequence[np.ndarray] | None = None
    slices: Sequence[tuple[int, int, int] | None] | None = None
    qc_in: Sequence[tuple] | None = None

    @property
    def count(self) -> int:
        """Images in the block."""
        return len(self.sources)


def _pixels(prepared, image):
    """The pixels QC checks for content: the prepared ones, else the original image (numpy)."""
    pixels = prepared if prepared is not None else image
    return pixels.numpy() if hasattr(pixels, "numpy") else pixels


def encode_outputs(prob: np.ndarray, threshold: float, image: np.ndarray | None = None,
                   overlay: bool = False, probability: bool = False, postprocess=None) -> tuple[dict[str, bytes], float]:
    """Encoded outputs of one image: ``({suffix: png bytes}, foreground fraction)``; the mask is
    ``prob > threshold`` then ``postprocess`` (``seg.postprocess.PostProcess`` or None).

    Shape:
        prob ``(H, W)`` float32 at the original size; image ``(H, W[, 3])`` for overlays.
    """
    mask = mask_of(prob, threshold, postprocess)
    files = {"_mask.png": encode_mask_png(mask)}
    if overlay:
        if image is None:
            raise ValueError("an overlay needs the original image")
        files["_overlay.png"] = encode_png(overlay_rgb(image, mask), rgb=True)
    if probability:
        files["_prob.png"] = probability_png(prob)
    return files, float(mask.mean()) if mask.size else 0.0


_made_dirs: set[str] = set()  # folders this process has created (or found), so each is made once


def write_file_atomic(path: str, data: bytes, token: str) -> None:
    """``seg.fileio.AtomicFile`` without fsync, with the caller's token and each folder made once:
    for millions of small files a per-file ``mkdir``, random name and fsync cost more than
    encoding the PNG. ``token`` must be unique to this writer and file."""
    folder = os.path.dirname(path)
    if folder not in _made_dirs:
        os.makedirs(folder, exist_ok=True)
        _made_dirs.add(folder)
    with AtomicFile(path, fsync=False, token=token, make_dirs=False) as f:
        f.write(data)


class UnitSink:
    """Where one unit's files go: final png files, or members of the unit's temporary tar."""

    def __init__(self, out_dir: Path, unit_id: str, fmt: str):
        self.out_dir, self.unit_id, self.fmt = Path(out_dir), unit_id, fmt
        self.lock = threading.Lock()
        self.tar_path = self.out_dir / f"{unit_id}.tar" if fmt == "tar" else None
        self._file: AtomicFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._token = f"{os.getpid()}-{secrets.token_hex(4)}-"
        self._count = itertools.count()
        self._volumes = None  # VolumeAssembler, made for the first volume slice

    @property
    def volumes(self):
        """This unit's ``seg.inference.volumes.VolumeAssembler``."""
        with self.lock:
            if self._volumes is None:
                from seg.inference.volumes import VolumeAssembler

                self._volumes = VolumeAssembler()
            return self._volumes

    def write(self, name: str, data: bytes) -> None:
        if self.fmt == "png":
            write_file_atomic(os.path.join(self.out_dir, name), data, self._token + str(next(self._count)))
            return
        with self.lock:
            self._open_tar()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            self._tar.addfile(info, io.BytesIO(data))

    def _open_tar(self) -> None:
        if self._tar is None:
            self._file = AtomicFile(self.tar_path)
            self._tar = tarfile.open(fileobj=self._file.file, mode="w")

    def close(self) -> str | None:
        """Finish the unit's files; for tar, close, fsync and rename it. Returns the tar's name."""
        if self.fmt == "png":
            return None
        with self.lock:
            self._open_tar()  # a unit whose images all failed still gets its (empty) tar
            self._tar.close()
            self._file.commit()
            self._tar = self._file = None
        return self.tar_path.relative_to(self.out_dir).as_posix()

    def abort(self) -> None:
        with self.lock:
            if self._tar is not None:
                self._tar.close()
                self._file.abort()
                self._tar = self._file = None


class Writers:
    """A bounded pool of writer threads (see module docstring).

    Args:
        threshold: probability threshold for masks.
        overlay, probability: also write ``_overlay.png`` / ``_prob.png``.
        threads: writer threads.
        qc: per-image quality control (``seg.inference.qc.ImageQC``), or None for none.
        postprocess: ``seg.postprocess.PostProcess`` applied to every thresholded mask (the
            identity: none); then masks are always made here, from probabilities.
        max_pending: images queued or being written before ``submit`` blocks (default 4 x
            threads); a job larger than this waits until nothing else is in flight.
    """

    def __init__(self, threshold: float, overlay: bool = False, probability: bool = False,
                 threads: int = 4, max_pending: int | None = None, qc=None, postprocess=None):
        self.threshold, self.overlay, self.probability, self.qc = threshold, overlay, probability, qc
        self.postprocess = None if postprocess is None or postprocess.is_identity else postprocess
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="seg-writer")
        self.max_pending = max_pending or 4 * threads
        self.pending = 0  # images queued or being written
        self.room = threading.Condition()

    def _acquire(self, n: int) -> None:
        with self.room:
            while self.pending and self.pending + n > self.max_pending:
                self.room.wait()
            self.pending += n

    def _release(self, n: int) -> None:
        with self.room:
            self.pending -= n
            self.room.notify_all()

    def _masks(self, b: Block) -> tuple[Sequence[np.ndarray], Sequence[int], Sequence[np.ndarray] | None, Sequence]:
        """(uint8 0/255 masks at the original sizes, foreground counts, uint16 maps or None,
        float32 probabilities at the original sizes or None when the device made the masks)."""
        if b.masks is not None:
            if self.postprocess is not None:
                raise RuntimeError("post-processing needs the masks made on the host (device_post off)")
            return b.masks, b.counts, b.prob16, None
        probs = b.probs
        whole_batch = isinstance(probs, np.ndarray) and probs.ndim == 3 and all(
            tuple(s) == probs.shape[1:] for s in b.sizes)
        if whole_batch and self.postprocess is None:
            full = probs  # already the original size: the whole batch at once
            above = probs > self.threshold
            counts = np.count_nonzero(above.reshape(len(probs), -1), axis=1).tolist()
            masks = np.multiply(above, np.uint8(255), dtype=np.uint8)
        else:  # per image: resized back, thresholded, post-processed
            full = [Predictor.restore(p, s) for p, s in zip(probs, b.sizes)]
            above = [mask_of(p, self.threshold, self.postprocess) for p in full]
            counts = [int(np.count_nonzero(m)) for m in above]
            masks = [np.multiply(m, np.uint8(255), dtype=np.uint8) for m in above]
        return masks, counts, [probability_u16(p) for p in full] if self.probability else None, full

    def _block_job(self, sink: UnitSink, b: Block) -> list[dict]:
        masks, counts, prob16, full = self._masks(b)
        qcs = [None] * b.count
        if self.qc is not None and full is not None:  # the block's maps measured together (per-call cost dominates)
            qc_in = b.qc_in or [(None, None)] * b.count
            qcs = self.qc.many(list(full), [_pixels(q[0], image) for q, image in zip(qc_in, b.images)],
                               [q[1] for q in qc_in])
        records = []
        for i, rel in enumerate(b.rels):
            mask = masks[i]
            if b.slices is not None and b.slices[i] is not None:  # the volume's record once its last slice is in
                record = sink.volumes.add(sink, b.sources[i], rel, b.slices[i], mask > 0, qcs[i])
                if record is not None:
                    records.append(record)
                continue
            sink.write(rel + "_mask.png", encode_png(mask))
            if self.overlay:
                image = b.images[i]
                if image is None:
                    raise ValueError("an overlay needs the original image")
                image = image.numpy() if hasattr(image, "numpy") else image
                sink.write(rel + "_overlay.png", encode_png(overlay_rgb(image, mask), rgb=True))
            if prob16 is not None:
                sink.write(rel + "_prob.png", encode_png(prob16[i]))
            records.append({"input": b.sources[i], "output": rel + "_mask.png",
                            "foreground": round(counts[i] / mask.size, 6) if mask.size else 0.0})
            if qcs[i] is not None:
                records[-1]["qc"] = qcs[i]
        return records

    def _submit(self, n: int, fn, *args) -> Future:
        self._acquire(n)
        try:
            future = self.pool.submit(fn, *args)
        except BaseException:
            self._release(n)
            raise
        future.add_done_callback(lambda _: self._release(n))
        return future

    def submit_block(self, sink: UnitSink, block: Block) -> Future:
        """Queue one ``Block`` (a batch's images of one unit) as one job; blocks while
        ``max_pending`` images are in flight. The future's result is one record per image."""
        return self._submit(block.count, self._block_job, sink, block)

    def submit(self, sink: UnitSink, source: str, rel: str, prob: np.ndarray, size: tuple[int, int],
               image: np.ndarray | None = None, slice: tuple[int, int, int] | None = None,
               qc_in: tuple | None = None) -> Future:
        """Queue one image's outputs (a ``Block`` of one: tile mode's whole-image maps). The
        future's result is a list holding the image's record (empty for a volume slice that is
        not the volume's last).

        Shape:
            prob: ``(h, w)`` float32 (resized back to ``size`` here).
        """
        return self.submit_block(sink, Block([source], [rel], [size], [image], probs=[prob], slices=[slice],
                                             qc_in=[qc_in]))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
