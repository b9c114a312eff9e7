"""The cohort loop of one worker: decode -> batch -> forward -> write -> record, overlapped.

Design choices:

- Three stages run at once: DataLoader worker processes decode and preprocess
  (``seg.inference.loader``), the main thread batches same-size inputs and runs the model
  (``Predictor.forward``; in resize mode every input has the training size, so any
  ``batch_size`` images form a batch; in tile mode each image's tiles are batched), and a
  bounded pool of writer threads resizes back, encodes and writes (``seg.inference.writers``).
  Memory is bounded by prefetch + one batch + the writers' queue, never by the cohort.
- Batches are cut from the decoded chunks without unpacking them: a batch that is one whole
  chunk is its tensor as received (no copy), otherwise its slices are concatenated once; a
  writer job is the batch's images of one unit (``writers.Block``, the probability array itself).
  Per-image Python work in this thread is what limits small images.
- Batches go through ``seg.inference.device.BatchForward``: one batch is in flight, collected
  after the next one is launched, so on a GPU the host's stacking, encoding and writing overlap
  the device's work (on the CPU a launch computes at once).
- Quality control (``seg.inference.qc``, unless ``PredictConfig.qc`` is off) is computed by the
  writer threads from the full-size probabilities, so with QC the probabilities come back to the
  host (the device still predicts; masks are made on the device only with ``--no_qc``). A
  unit's QC rows go to ``qc/part-W-of-N.csv`` just before its manifest line.
- A NIfTI volume's slices are items like images; the unit sink assembles them and writes the
  mask volume when the last slice is in (``seg.inference.volumes``).
- A unit is finished when its end marker has arrived and every one of its images is written;
  only then are its tar closed and renamed, its temporaries of earlier killed runs removed, its
  failures appended to ``failures.jsonl`` and its line to ``manifest.jsonl``. A killed run
  leaves units without a manifest line, which the next run of the same command redoes
  (rewriting the same names), so every input ends with exactly one complete output.
- Units already in the manifest with this model are skipped (their recorded inputs must equal
  the planned ones). Stale temporaries are removed per finished unit, by output name, never
  folder-wide: another worker may be writing into the same folder at the same moment.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from seg.config.inference import PredictConfig
from seg.data.qc_reference import reference_from
from seg.fileio import TMP_MARK
from seg.inference.device import BatchForward
from seg.inference.engine import Predictor
from seg.inference.inputs import Unit, units_for_worker
from seg.inference.loader import Chunk, Failure, Item, UnitEnd, UnitStream, record_loader
from seg.inference.manifest import FAILURES, MANIFEST, append_lines, check_model, check_unit_inputs, read_manifest
from seg.inference.qc import ImageQC
from seg.inference.qc_table import append_unit_rows
from seg.inference.volumes import output_names
from seg.inference.writers import Block, UnitSink, Writers


def process_age() -> float:
    """Seconds since this process started (from /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class UnitState:
    unit: Unit
    sink: UnitSink
    started: float = field(default_factory=time.perf_counter)
    futures: list = field(default_factory=list)  # writer jobs, each a list of image records
    submitted: int = 0  # images handed to the writers
    failures: list = field(default_factory=list)
    end: UnitEnd | None = None

    def ready(self) -> bool:
        return (self.end is not None and self.submitted == self.end.items
                and all(f.done() for f in self.futures))


def remove_unit_temporaries(out_dir: Path, names: list[str], seen: dict | None = None) -> int:
    """Delete temporaries of earlier runs whose final name is one of ``names`` (this unit's).

    ``seen`` (one dict per run) caches each folder's temporaries by final name, listed the
    first time a finished unit touches the folder: listing a folder of N outputs once per unit
    made a cohort cost O(N^2). Temporaries created after that listing are this run's own (the
    unit's are renamed before it finishes) or another worker's, under other units' names.
    """
    seen = {} if seen is None else seen
    by_dir: dict[str, list[str]] = {}
    for name in names:
        folder, final = os.path.split(os.path.join(out_dir, name))
        by_dir.setdefault(folder, []).append(final)
    removed = 0
    for folder, finals in by_dir.items():
        if folder not in seen:
            stale: dict[str, list[str]] = {}
            try:
                for entry in os.listdir(folder):
                    if entry.startswith(".") and TMP_MARK in entry:
                        stale.setdefault(entry[1:].rsplit(TMP_MARK, 1)[0], []).append(entry)
            except FileNotFoundError:
                pass
            seen[folder] = stale
        stale = seen[folder]
        if not stale:
            continue
        for final in finals:
            for entry in stale.pop(final, ()):
                try:
                    os.unlink(os.path.join(folder, entry))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


class CohortRun:
    """One worker's pass over its units. ``run()`` returns the worker's summary dict."""

    def __init__(self, predictor: Predictor, units: list[Unit], worker: int, num_workers: int,
                 cfg: PredictConfig, position: int = 0):
        self.p, self.all_units, self.worker, self.num_workers = predictor, units, worker, num_workers
        self.cfg, self.position = cfg, position
        self.out_dir = Path(cfg.output_dir)
        self.states: dict[int, UnitState] = {}
        self.by_index = {u.index: u for u in units}
        self.images = self.failures = self.done_units = 0
        self.first_batch_s: float | None = None
        self.first_batch_start_s: float | None = None
        self._steady_from: tuple[float, int] | None = None  # (time, images) when the first batch was done
        self._temporaries: dict = {}  # remove_unit_temporaries' per-folder listing cache
        self._pending_n = 0  # images in the pending batch
        self._inflight = None  # (launched batch, its segments), collected after the next launch
        # QC needs the full-size probabilities on the host, and post-processing the masks there:
        # masks are made on the host then
        host_masks = cfg.qc or not predictor.postprocess.is_identity
        self.batches = BatchForward(predictor, probability=cfg.save_probability, compile=cfg.compile,
                                    device_post=False if host_masks else None)

    def _state(self, index: int) -> UnitState:
        if index not in self.states:
            unit = self.by_index[index]
            self.states[index] = UnitState(unit, UnitSink(self.out_dir, unit.id, self.cfg.format))
        return self.states[index]

    def _finish(self, state: UnitState) -> None:
        images = sorted((r for f in state.futures for r in f.result()), key=lambda r: r["input"])
        tar = state.sink.close()
        suffixes = ["_mask.png"] + ["_overlay.png"] * self.cfg.save_overlay + ["_prob.png"] * self.cfg.save_probability
        names = [tar] if tar else [n for i in images for n in output_names(i["output"], suffixes)]
        remove_unit_temporaries(self.out_dir, names, self._temporaries)
        unit = state.unit
        failed = [{"input": s, "reason": r} for s, r in state.failures]
        append_lines(self.out_dir / FAILURES, [{**f, "unit": unit.id, "model_sha256": self.p.sha256} for f in failed])
        record = {"unit": unit.id, "index": unit.index, "num_units": len(self.all_units), "kind": unit.kind,
                  "shard": unit.sources[0] if unit.kind == "shard" else None, "format": self.cfg.format, "tar": tar,
                  "images": images, "failed": failed, "model_sha256": self.p.sha256,
                  "mask_settings": self.p.mask_settings,
                  "seconds": round(time.perf_counter() - state.started, 3), "worker": self.worker,
                  "num_workers": self.num_workers, "host": socket.gethostname(), "pid": os.getpid(),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.cfg.qc:
            append_unit_rows(self.out_dir, self.worker, self.num_workers, unit.id, images)
        append_lines(self.out_dir / MANIFEST, [record])
        self.done_units += 1
        del self.states[unit.index]

    def _finish_ready(self) -> None:
        for state in [s for s in self.states.values() if s.ready()]:
            self._finish(state)

    def _flush(self, pending: list[tuple[Chunk, int, int]], writers: Writers) -> None:
        """Launch the pending batch (segments ``(chunk, start, end)``), then collect the one before."""
        if not pending:
            return
        import torch

        segments = list(pending)
        pending.clear()
        self._pending_n = 0
        chunk, a, b = segments[0]
        x = chunk.x[a:b] if len(segments) == 1 else torch.cat([c.x[i:j] for c, i, j in segments])
        sizes = [size for c, i, j in segments for size in c.sizes[i:j]]
        if self.first_batch_start_s is None:
            self.first_batch_start_s = process_age()
        launched = self.batches.launch(x, sizes)
        flips = self.p.pop_flip_dice()  # TTA: the flips' agreement per image (QC), taken at launch
        self._collect(writers)
        self._inflight = (launched, segments, None if flips is None else flips[:x.shape[0]])

    def _collect(self, writers: Writers) -> None:
        """Hand the batch in flight to the writers: one job per run of same-unit segments."""
        if self._inflight is None:
            return
        launched, segments, flips = self._inflight
        self._inflight = None
        out = launched.result()
        self._mark_first_batch()
        offset = 0
        k = 0
        while k < len(segments):
            unit = segments[k][0].unit
            run = [segments[k]]
            while k + len(run) < len(segments) and segments[k + len(run)][0].unit == unit:
                run.append(segments[k + len(run)])
            n = sum(j - i for _, i, j in run)
            at = [(c, m) for c, i, j in run for m in range(i, j)]
            block = Block(sources=[c.sources[m] for c, m in at], rels=[c.rels[m] for c, m in at],
                          sizes=[c.sizes[m] for c, m in at], images=[c.images[m] for c, m in at],
                          slices=[c.slices[m] if c.slices else None for c, m in at],
                          qc_in=[(c.x[m], None if flips is None else float(flips[offset + q]))
                                 for q, (c, m) in enumerate(at)],
                          probs=None if out.probs is None else out.probs[offset:offset + n],
                          masks=None if out.masks is None else out.masks[offset:offset + n],
                          counts=None if out.counts is None else out.counts[offset:offset + n],
                          prob16=None if out.prob16 is None else out.prob16[offset:offset + n])
            state = self._state(unit)
            state.futures.append(writers.submit_block(state.sink, block))
            state.submitted += n
            offset += n
            k += len(run)

    def _mark_first_batch(self) -> None:
        if self.first_batch_s is None:
            self.first_batch_s = process_age()
            self._steady_from = (time.perf_counter(), self.images)

    def _steady_rate(self, end: float) -> float | None:
        """Images/s after the first batch (start-up, model load and worker start excluded)."""
        if self._steady_from is None or end <= self._steady_from[0] or self.images <= self._steady_from[1]:
            return None
        return round((self.images - self._steady_from[1]) / (end - self._steady_from[0]), 3)

    def _add(self, item: Item, writers: Writers) -> None:
        """Predict a tile-mode image now (whole native-size images, one at a time)."""
        self.images += 1
        state = self._state(item.unit)
        if self.first_batch_start_s is None:
            self.first_batch_start_s = process_age()
        prob = self.p.predict_tiled(item.x.numpy())
        flips = self.p.pop_flip_dice()  # one value per tile: the image's is their mean
        self._mark_first_batch()
        flip = None if flips is None or not len(flips) else float(flips.mean())
        state.futures.append(writers.submit(state.sink, item.source, item.rel, prob, item.size, item.image,
                                            item.slice, (item.x, flip)))
        state.submitted += 1

    def _add_chunk(self, chunk: Chunk, pending: list[tuple[Chunk, int, int]], writers: Writers) -> None:
        """Queue a resize-mode chunk's images for the next batches, launching each full batch."""
        n = len(chunk.sources)
        self.images += n
        self._state(chunk.unit)
        if pending and pending[0][0].x.dtype != chunk.x.dtype:  # 8- and 16-bit scale differently
            self._flush(pending, writers)
        start = 0
        while start < n:
            take = min(n - start, self.p.batch_size - self._pending_n)
            pending.append((chunk, start, start + take))
            self._pending_n += take
            start += take
            if self._pending_n >= self.p.batch_size:
                self._flush(pending, writers)

    def plan(self) -> tuple[list[Unit], list[dict]]:
        """(units to do, manifest records of this worker's finished units)."""
        settings = self.p.mask_settings
        planned = {u.id: list(u.sources) for u in self.all_units if u.kind == "files"}
        check_model(self.out_dir, self.p.sha256, self.cfg.overwrite, settings, planned)
        finished = read_manifest(self.out_dir)
        todo, skipped = [], []
        for unit in units_for_worker(self.all_units, self.worker, self.num_workers):
            record = finished.get(unit.id)
            if (record is not None and record.get("model_sha256") == self.p.sha256
                    and record.get("mask_settings", settings) == settings):
                check_unit_inputs(record, list(unit.sources) if unit.kind == "files" else None)
                skipped.append(record)
            else:
                todo.append(unit)
        return todo, skipped

    def run(self) -> dict:
        from seg.progress import progress_bar

        start = time.perf_counter()
        todo, skipped = self.plan()
        total = sum(len(u) for u in todo) if all(u.kind == "files" for u in todo) else None
        bar = progress_bar(total=total, position=self.position, desc=f"predict {self.worker + 1}/{self.num_workers}",
                           unit="img", dynamic_ncols=True, mininterval=1.0, disable=not self.cfg.progress or not todo)
        # resize mode: a writer job is a batch (of one unit), so room for two batches in flight;
        # tile mode: whole-size maps, one per job, the writers' default bound
        room = None if self.p.mode == "tile" else max(4 * self.cfg.writer_threads, 2 * self.p.batch_size)
        writers = Writers(self.p.threshold, self.cfg.save_overlay, self.cfg.save_probability, self.cfg.writer_threads,
                          room, qc=ImageQC(self.p.threshold, reference_from(self.p.checkpoint)) if self.cfg.qc else None,
                          postprocess=self.p.postprocess)
        stream = UnitStream(todo, self.p.preprocessor, keep_image=self.cfg.save_overlay,
                            chunk=1 if self.p.mode == "tile" else min(self.p.batch_size, 64))
        pending: list[tuple[Chunk, int, int]] = []
        records = None
        try:
            # tile mode: whole native-size images travel, so keep one per decoding process in flight
            prefetch = 1 if self.p.mode == "tile" else 4
            pin = self.batches.device_post and self.p.device.type == "cuda" and self.p.mode == "resize"
            records = record_loader(stream, self.cfg.num_workers, prefetch, pin_memory=pin)
            for rec in records:
                if isinstance(rec, Chunk):
                    if self.p.mode == "tile":
                        for item in rec.items():
                            self._add(item, writers)
                    else:
                        self._add_chunk(rec, pending, writers)
                    bar.update(len(rec.sources))
                elif isinstance(rec, Failure):
                    self.failures += 1
                    bar.update(1)
                    self._state(rec.unit).failures.append((rec.source, rec.reason))
                elif isinstance(rec, UnitEnd):
                    self._state(rec.unit).end = rec
                self._finish_ready()
            self._flush(pending, writers)
            self._collect(writers)
            writers.close()
            self._finish_ready()
            if self.states:  # every unit sends its end marker; anything left is a bug, not user error
                raise RuntimeError(f"units {sorted(self.states)} did not finish")
        except BaseException:
            for state in self.states.values():
                state.sink.abort()
            raise
        finally:
            if records is not None and hasattr(records, "close"):  # stop decoding threads at once
                records.close()
            writers.pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        end = time.perf_counter()
        seconds = end - start
        old_failures = sum(len(r.get("failed", [])) for r in skipped)
        return {"worker": self.worker, "num_workers": self.num_workers, "units": self.done_units,
                "skipped_units": len(skipped), "images": self.images, "failures": self.failures + old_failures,
                "seconds": round(seconds, 3), "images_per_s": round(self.images / seconds, 3) if seconds else 0.0,
                "first_batch_s": None if self.first_batch_s is None else round(self.first_batch_s, 3),
                "first_batch_start_s": None if self.first_batch_start_s is None else round(self.first_batch_start_s, 3),
                "steady_images_per_s": self._steady_rate(end)}
