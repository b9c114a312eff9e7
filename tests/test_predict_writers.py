"""Writer jobs of several images and the once-per-folder cleanup of stale temporaries."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np

from seg.fileio import TMP_MARK
from seg.inference.runner import remove_unit_temporaries
from seg.inference.writers import Block, UnitSink, Writers


def test_stale_temporaries_of_a_unit_are_removed_and_others_kept(tmp_path):
    sub = tmp_path / "a"
    sub.mkdir()
    stale = [sub / f".x_mask.png{TMP_MARK}1-dead-0", tmp_path / f".y_mask.png{TMP_MARK}1-dead-1"]
    other = sub / f".z_mask.png{TMP_MARK}2-live-0"  # another unit's name: never touched
    for p in stale + [other]:
        p.write_bytes(b"partial")
    seen: dict = {}
    assert remove_unit_temporaries(tmp_path, ["a/x_mask.png", "y_mask.png"], seen) == 2
    assert not any(p.exists() for p in stale) and other.exists()
    # listed once per folder: a temporary created after the listing is this run's, not stale
    late = sub / f".w_mask.png{TMP_MARK}3-new-0"
    late.write_bytes(b"in flight")
    assert remove_unit_temporaries(tmp_path, ["a/w_mask.png"], seen) == 0 and late.exists()
    assert remove_unit_temporaries(tmp_path, ["a/z_mask.png"], seen) == 1 and not other.exists()
    assert remove_unit_temporaries(tmp_path, ["missing/q_mask.png"], {}) == 0


def _block(sources, rels, prob, size):
    return Block(sources, rels, [size] * len(sources), [None] * len(sources), probs=[prob] * len(sources))


def test_blocks_write_every_image_and_bound_images_in_flight(tmp_path):
    writers = Writers(0.5, threads=2, max_pending=6)
    sink = UnitSink(tmp_path, "files-000000", "png")
    peak, lock = [0], threading.Lock()
    job = writers._block_job

    def slow_job(sink, block):  # record how many images are in flight while a job runs
        with lock:
            peak[0] = max(peak[0], writers.pending)
        time.sleep(0.02)
        return job(sink, block)

    writers._block_job = slow_job
    prob = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    futures = [writers.submit_block(sink, _block([f"in{j}{i}" for i in range(3)], [f"o{j}{i}" for i in range(3)],
                                                 prob, (8, 8))) for j in range(5)]
    futures.append(writers.submit_block(sink, _block([f"big{i}" for i in range(8)], [f"b{i}" for i in range(8)],
                                                     prob, (16, 16))))
    writers.close()
    records = [r for f in futures for r in f.result()]
    assert len(records) == 23 and peak[0] <= 8 and writers.pending == 0  # 8: the job larger than the bound
    mask = cv2.imread(str(tmp_path / "o00_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (8, 8) and set(np.unique(mask)) <= {0, 255}
    assert records[0] == {"input": "in00", "output": "o00_mask.png", "foreground": round(float((cv2.resize(
        prob, (8, 8), interpolation=cv2.INTER_LINEAR) > 0.5).mean()), 6)}
    assert not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]
