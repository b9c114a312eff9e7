"""Output encoding and writing on a bounded pool of threads: png files or one tar per unit.

Design choices:

- Writing runs on ``threads`` threads behind a limit of ``max_pending`` images: when the
  writers fall behind, ``submit`` blocks the main loop instead of queueing without bound, so
  memory stays bounded whatever the cohort size. A job is a batch's images of one unit
  (``submit_many``), not one image: for small images the per-job handoff (future, semaphore,
  queue, thread wake-up) cost more than encoding and writing. The jobs themselves (bilinear resize of the
  probabilities back to the original size, thresholding, PNG encoding, file writes) are mostly
  OpenCV and I/O calls that release the GIL, so they overlap with the model's forward.
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

import cv2
import numpy as np

from seg.data.io import encode_mask_png
from seg.fileio import AtomicFile
from seg.inference.engine import Predictor

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
    return encode_png(np.round(np.clip(prob, 0, 1) * 65535).astype(np.uint16))


def encode_outputs(prob: np.ndarray, threshold: float, image: np.ndarray | None = None,
                   overlay: bool = False, probability: bool = False) -> tuple[dict[str, bytes], float]:
    """Encoded outputs of one image: ``({suffix: png bytes}, foreground fraction)``.

    Shape:
        prob ``(H, W)`` float32 at the original size; image ``(H, W[, 3])`` for overlays.
    """
    mask = prob > threshold
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
        max_pending: images queued or being written before ``submit`` blocks (default 4 x
            threads); a job larger than this waits until nothing else is in flight.
    """

    def __init__(self, threshold: float, overlay: bool = False, probability: bool = False,
                 threads: int = 4, max_pending: int | None = None, qc=None):
        self.threshold, self.overlay, self.probability, self.qc = threshold, overlay, probability, qc
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

    def _one(self, sink: UnitSink, source: str, rel: str, prob: np.ndarray, size: tuple[int, int],
             image: np.ndarray | None, slice: tuple[int, int, int] | None = None,
             qc_in: tuple | None = None) -> tuple[dict | None, np.ndarray | None, tuple | None]:
        """(record or None, probability map for QC or None, QC inputs) of one image or slice."""
        prob = Predictor.restore(prob, size)
        if slice is not None:  # a volume's slice: the volume's record once its last slice is in
            return sink.volumes.add(sink, source, rel, slice, prob > self.threshold), None, None
        image = image.numpy() if hasattr(image, "numpy") else image
        files, fg = encode_outputs(prob, self.threshold, image, self.overlay, self.probability)
        for suffix, data in files.items():
            sink.write(rel + suffix, data)
        # qc_in: (pixels for the intensity check, flip agreement or None)
        record = {"input": source, "output": rel + "_mask.png", "foreground": round(fg, 6)}
        return (record, prob, qc_in or (image, None)) if self.qc is not None else (record, None, None)

    def _job(self, sink: UnitSink, items: list[tuple]) -> list[dict]:
        done = [self._one(sink, *item) for item in items]
        measured = [(record, prob, q) for record, prob, q in done if prob is not None]
        if measured:  # the job's maps measured together (ImageQC.many: per-call cost dominates)
            qcs = self.qc.many([p for _, p, _ in measured], [q[0] for *_, q in measured], [q[1] for *_, q in measured])
            for (record, _, _), qc in zip(measured, qcs):
                record["qc"] = qc
        return [record for record, _, _ in done if record is not None]

    def submit_many(self, sink: UnitSink, items: list[tuple]) -> Future:
        """Queue the outputs of several images of one unit as one job (one thread handoff, one
        future and one semaphore slot for the lot: per-job cost, not encoding, limits small images);
        blocks while ``max_pending`` images are in flight. The future's result is one record per item.

        Args:
            items: ``(source, rel, prob, size, image[, slice[, qc_in]])`` tuples, as ``submit`` takes them.
        """
        items = list(items)
        n = len(items)
        self._acquire(n)
        try:
            future = self.pool.submit(self._job, sink, items)
        except BaseException:
            self._release(n)
            raise
        future.add_done_callback(lambda _: self._release(n))
        return future

    def submit(self, sink: UnitSink, source: str, rel: str, prob: np.ndarray, size: tuple[int, int],
               image: np.ndarray | None = None, slice: tuple[int, int, int] | None = None,
               qc_in: tuple | None = None) -> Future:
        """Queue one image's outputs (a job of one; see ``submit_many``). The future's result is a
        list holding the image's record.

        Args:
            qc_in: ``(pixels, flip_dice)`` for QC: any view of the input image (the prepared
                pixels do) for the intensity check, and the TTA flip agreement or None.

        Shape:
            prob: ``(h, w)`` float32 at the network's size (resized back to ``size`` here).
        """
        return self.submit_many(sink, [(source, rel, prob, size, image, slice, qc_in)])

    def close(self) -> None:
        self.pool.shutdown(wait=True)
