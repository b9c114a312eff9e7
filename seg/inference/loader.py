"""Decoding and preprocessing, unit by unit: in threads (image files) or DataLoader processes (shards).

Design choices:

- ``UnitStream`` is an ``IterableDataset`` over this worker's units; reader ``j`` of ``n``
  takes units ``j, j + n, ...`` whole, so one unit is read by one reader, in order.
  It yields three kinds of records: ``Chunk`` (decoded, preprocessed images), ``Failure`` (an
  input that could not be read: the reason, the job goes on) and ``UnitEnd`` (the unit's
  counts), which tells the main process that a unit has no more records.
- Image files are decoded by ``threads`` in this process (``thread_records``): reading and
  OpenCV decoding release the GIL, so threads decode in parallel, and a decoded chunk reaches
  the batcher without crossing a process boundary. Through DataLoader worker processes every
  256x256 RGB image cost ~400 us of CPU on the way (a new shared-memory segment per chunk, its
  page faults and a file-descriptor handoff over a socket), a fifth of decoding and encoding
  it; the Python each image needs under the GIL is small beside OpenCV's 1.2 ms for decoding
  it. Small images scale less well over threads (docs/BENCHMARKS.md: 32 px on 2 cores). Shards
  are read by DataLoader worker processes: webdataset's tar iteration and key grouping are
  Python, which threads would serialise.
- Shards are read by ``seg.data.shards.shard_samples`` (the same reader, member -> sample rule
  and checks as training, against the ``dataset.json`` beside them when there is one) and
  decoded by ``seg.data.shards.decode_sample``. A shard that breaks mid-way or ends short
  keeps the samples read before and records a failure naming the shard for the rest.
- Only the prepared raw pixels (channels adapted, resized in resize mode, still uint8/uint16)
  go to the batcher, stacked into ``Chunk``s of up to ``chunk`` images as one tensor: one
  record per chunk, not per image (per-record cost, not bytes, limits small images). From a
  worker process, a chunk of at most ``BY_VALUE_BYTES`` travels by value through the pipe (a
  shared-memory tensor measured twice the cost of copying 200 KB, 64 images of 32x32x3), a
  larger one through shared memory; plus the original images when overlays
  are requested; masks in labelled shards are ignored (prediction does not need
  them). Batches are formed by the consumer (``batch_size=None`` here), so end-of-unit
  markers are never held back inside a batch. With ``pin_memory`` (CUDA) chunks come in
  page-locked memory, ready for an asynchronous copy to the GPU.
- Each worker process runs with one torch and one OpenCV thread (forked inside
  ``seg.data.io.opencv_threads(1)``): parallelism comes from the processes, and the main
  process keeps its cores for the model.
- A NIfTI volume becomes one ``Item`` per slice (``slice = (axis, index, count)``, see
  ``seg.inference.volumes``); an unreadable volume is one ``Failure``. ``UnitEnd.items``
  counts items, so slices.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, NamedTuple

import numpy as np
import torch.utils.data

from seg.data.io import opencv_threads, read_image
from seg.data.volumes import is_volume_name
from seg.inference.engine import Preprocessor
from seg.inference.inputs import Unit, output_stem


class Item(NamedTuple):
    unit: int
    source: str
    rel: str  # sanitised output stem
    x: np.ndarray | torch.Tensor  # prepared raw pixels (Preprocessor.prepare), uint8/uint16
    size: tuple[int, int]  # original (H, W)
    image: np.ndarray | None  # original image, only for overlays
    slice: tuple[int, int, int] | None = None  # (axis, index, count) of a volume's slice


BY_VALUE_BYTES = 1 << 20  # chunks up to this size are pickled by value, larger ones use shared memory


def _chunk_by_value(unit, sources, rels, x: np.ndarray, sizes, images, slices=()) -> "Chunk":
    return Chunk(unit, sources, rels, torch.from_numpy(x), sizes, images, slices)


class Chunk(NamedTuple):
    """Consecutive items of one unit whose prepared pixels share shape and dtype, stacked."""
    unit: int
    sources: tuple[str, ...]
    rels: tuple[str, ...]
    x: torch.Tensor  # (n, ...) prepared pixels
    sizes: tuple[tuple[int, int], ...]
    images: tuple[np.ndarray | None, ...]
    slices: tuple[tuple[int, int, int] | None, ...] = ()

    def items(self) -> Iterator[Item]:
        for i, source in enumerate(self.sources):
            yield Item(self.unit, source, self.rels[i], self.x[i], self.sizes[i], self.images[i],
                       self.slices[i] if self.slices else None)

    def __reduce__(self):
        # small chunks by value (see the module docstring); torch's reduction puts larger ones in shared memory
        if self.x.nbytes <= BY_VALUE_BYTES:
            return _chunk_by_value, (self.unit, self.sources, self.rels, self.x.numpy(), self.sizes, self.images,
                                     self.slices)
        return Chunk, tuple(self)


class Failure(NamedTuple):
    unit: int
    source: str
    reason: str


class UnitEnd(NamedTuple):
    unit: int
    items: int
    failures: int


class UnitStream(torch.utils.data.IterableDataset):
    """Iterable of ``Chunk``/``Failure``/``UnitEnd`` records for ``units`` (see module docstring).

    Args:
        units: this worker's units, in order.
        preprocessor: the engine's picklable CPU half.
        keep_image: also send the original image (for overlays and visualisations).
        chunk: images per ``Chunk`` (1 for whole large images in tile mode).
    """

    def __init__(self, units: list[Unit], preprocessor: Preprocessor, keep_image: bool = False, chunk: int = 32):
        self.units, self.pre, self.keep_image, self.chunk = units, preprocessor, keep_image, max(1, chunk)

    def _item(self, unit: Unit, source: str, rel: str, image: np.ndarray) -> Item:
        return Item(unit.index, source, rel, self.pre.prepare(image), tuple(image.shape[:2]),
                    image if self.keep_image else None)

    @staticmethod
    def _stack(items: list[Item]) -> Chunk:
        return Chunk(items[0].unit, tuple(i.source for i in items), tuple(i.rel for i in items),
                     torch.from_numpy(np.stack([i.x for i in items])), tuple(i.size for i in items),
                     tuple(i.image for i in items), tuple(i.slice for i in items))

    def _chunked(self, records: Iterator) -> Iterator:
        """Items grouped into ``Chunk``s of up to ``self.chunk`` (one IPC message each, not one per
        image: per-message cost dominates for small images); failures and ends pass through."""
        buffer: list[Item] = []
        for rec in records:
            if isinstance(rec, Item):
                if buffer and (rec.x.shape != buffer[0].x.shape or rec.x.dtype != buffer[0].x.dtype):
                    yield self._stack(buffer)
                    buffer = []
                buffer.append(rec)
                if len(buffer) >= self.chunk:
                    yield self._stack(buffer)
                    buffer = []
                continue
            if isinstance(rec, UnitEnd) and buffer:
                yield self._stack(buffer)
                buffer = []
            yield rec

    def _records(self, unit: Unit, attempts: Iterator) -> Iterator:
        """The ``Item``s or a ``Failure`` per ``(source, load)`` of ``attempts``, then the unit's end.

        ``load()`` returns an item, or a list of items (a volume's slices, read whole so that a
        bad file fails before any slice), or raises (ImageReadError, ShardSampleError and
        ShardReadError are ValueErrors): the input is recorded as failed and the unit goes on.
        """
        done = failed = 0
        for source, load in attempts:
            try:
                loaded = load()
            except (ValueError, OSError) as exc:
                failed += 1
                yield Failure(unit.index, source, str(exc))
                continue
            items = loaded if isinstance(loaded, list) else [loaded]
            done += len(items)
            yield from items
        yield UnitEnd(unit.index, done, failed)

    def _volume(self, unit: Unit, source: str, rel: str) -> list[Item]:
        from seg.inference.volumes import volume_slices

        return [Item(unit.index, source, rel, x, size, None, where) for where, x, size in volume_slices(source, self.pre)]

    def _file_attempts(self, unit: Unit) -> Iterator:
        for source, rel in zip(unit.sources, unit.rels):
            if is_volume_name(source):
                yield source, lambda source=source, rel=rel: self._volume(unit, source, rel)
            else:
                yield source, lambda source=source, rel=rel: self._item(unit, source, rel, read_image(source))
    def _shard_attempts(self, unit: Unit) -> Iterator:
        """One attempt per sample; a shard that breaks (or ends short) is one last failed attempt."""
        from seg.data.shards import decode_sample, listed_counts, shard_samples

        shard = unit.sources[0]
        samples = shard_samples(shard, listed_counts([shard]).get(shard))
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                return
            except ValueError as exc:  # ShardReadError: truncated, corrupt, or shorter than dataset.json
                yield shard, lambda exc=exc: _raise(exc)
                return

            def load(sample=sample):
                decoded = decode_sample(sample)
                return self._item(unit, f"{shard}:{sample['__key__']}", output_stem(decoded["key"]), decoded["image"])
            yield f"{shard}:{sample['__key__']}", load

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for j, unit in enumerate(self.units):
            if j % workers == worker:
                attempts = self._shard_attempts(unit) if unit.kind == "shard" else self._file_attempts(unit)
                yield from self._chunked(self._records(unit, attempts))


def _raise(exc: Exception):
    raise exc


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # OpenCV's single thread is inherited: see record_loader


def _identity(record):
    return record


_DONE = object()


def thread_records(stream: UnitStream, threads: int, prefetch: int = 4, pin_memory: bool = False) -> Iterator:
    """Records of ``stream`` decoded by ``threads`` threads (thread ``j`` reads units ``j, j + n, ...``).

    At most ``threads * prefetch`` records wait in the queue. Records of one unit keep their
    order; units interleave. An exception in a thread is raised here; closing the generator
    stops the threads.
    """
    records: queue.Queue = queue.Queue(maxsize=max(1, threads * prefetch))
    stop = threading.Event()

    def put(record) -> bool:
        while not stop.is_set():
            try:
                records.put(record, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read(j: int) -> None:
        try:
            part = UnitStream(stream.units[j::threads], stream.pre, stream.keep_image, stream.chunk)
            for record in part:
                if isinstance(record, Chunk) and pin_memory:
                    record = record._replace(x=record.x.pin_memory())
                if not put(record):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(exc)

    workers = [threading.Thread(target=read, args=(j,), name=f"seg-decode-{j}", daemon=True) for j in range(threads)]
    for w in workers:
        w.start()
    try:
        done = 0
        while done < threads:
            record = records.get()
            if record is _DONE:
                done += 1
            elif isinstance(record, BaseException):
                raise record
            else:
                yield record
    finally:
        stop.set()
        for w in workers:
            w.join()


def record_loader(stream: UnitStream, num_workers: int = 2, prefetch: int = 4, pin_memory: bool = False):
    """Records of ``stream``, decoded by ``num_workers`` readers (0: in this thread): threads for
    image files, DataLoader processes for shards (see the module docstring).

    Records come unbatched; at most ``num_workers * prefetch`` are in flight. ``pin_memory``
    (CUDA): each chunk's pixels are copied into page-locked memory (by the reading thread, or
    the DataLoader's pin thread), so the batch's copy to the GPU can be asynchronous.
    """
    if num_workers == 0:
        return iter(stream)
    workers = max(0, min(num_workers, len(stream.units)))
    if workers == 0:
        return iter(())
    if all(unit.kind == "files" for unit in stream.units):
        return thread_records(stream, workers, prefetch, pin_memory)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=prefetch,
                                         pin_memory=pin_memory, worker_init_fn=_worker_init, collate_fn=_identity,
                                         persistent_workers=False)
    with opencv_threads(1):  # the workers are forked here and keep one OpenCV thread (seg.data.io)
        return iter(loader)
