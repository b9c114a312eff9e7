"""seg.evaluation.scoring: the sweep's counts, the rank split and the merge, worst-k selection."""

from __future__ import annotations

import numpy as np
import pytest

from seg.evaluation.scoring import SWEEP_THRESHOLDS, RankScores, merge, sweep_counts, sweep_table
from seg.metrics import confusion_counts


def random_case(seed: int, shape=(24, 20)):
    rng = np.random.default_rng(seed)
    prob = rng.random(shape, dtype=np.float32)
    prob[0, :len(SWEEP_THRESHOLDS)] = np.asarray(SWEEP_THRESHOLDS, np.float32)  # values exactly on thresholds
    truth = rng.random(shape) < 0.3
    return prob, truth


def test_sweep_counts_equal_thresholding_at_every_threshold():
    prob, truth = random_case(0)
    sweep = sweep_counts(prob, truth)
    assert sweep.shape == (19, 4) and SWEEP_THRESHOLDS[0] == 0.05 and SWEEP_THRESHOLDS[-1] == 0.95
    for j, t in enumerate(SWEEP_THRESHOLDS):
        assert sweep[j].tolist() == confusion_counts(prob[None], truth[None], t)[0].tolist(), t
    assert (sweep.sum(1) == prob.size).all()


def score(items, world: int, worst_k: int = 3, num_samples: int = 2, sweep: bool = True):
    """Score ``items`` split over ``world`` simulated ranks exactly as run.py does, then merge."""
    ranks = [RankScores(threshold=0.5, sweep=sweep, worst_k=worst_k, num_samples=num_samples) for _ in range(world)]
    for index, (key, prob, truth) in enumerate(items):
        ranks[index % world].add(index, key, truth, prob=prob, image=lambda: None)
    return merge([r.payload() for r in ranks], 0.5, worst_k, num_samples)


def test_split_over_ranks_equals_one_process():
    items = [(f"img{i:02d}", *random_case(i)) for i in range(11)]
    items[4] = ("img04", np.zeros((24, 20), np.float32), np.zeros((24, 20), bool))  # both empty: Dice 1
    one = score(items, 1)
    for world in (2, 3, 5):
        many = score(items, world)
        assert many.report == one.report
        assert many.sweep == one.sweep
        assert [t.key for t in many.worst] == [t.key for t in one.worst]
        assert [t.key for t in many.samples] == [t.key for t in one.samples] == ["img00", "img01"]
    dice = {p["id"]: p["dice"] for p in one.report["per_image"]}
    expected = sorted(dice, key=lambda k: (dice[k], k))[:3]
    assert [t.key for t in one.worst] == expected
    assert one.sweep["best"]["dice"] == max(one.sweep["dice"])


def test_sweep_at_report_threshold_matches_report():
    items = [(f"k{i}", *random_case(i)) for i in range(4)]
    ev = score(items, 2)
    j = SWEEP_THRESHOLDS.index(0.5)
    assert ev.sweep["dice"][j] == pytest.approx(ev.report["global"]["dice"])
    assert ev.sweep["mean_dice"][j] == pytest.approx(ev.report["mean"]["dice"])


def test_best_threshold_is_the_lowest_among_ties():
    truth = np.zeros((4, 4), bool)
    truth[:2] = True
    prob = np.where(truth, 0.97, 0.01).astype(np.float32)   # every threshold separates perfectly
    table = sweep_table({"x": sweep_counts(prob, truth)})
    assert table["best"] == {"threshold": 0.05, "dice": 1.0}


def test_duplicate_id_is_an_error():
    r = RankScores(threshold=0.5)
    prob, truth = random_case(1)
    r.add(0, "x", truth, prob=prob)
    with pytest.raises(ValueError, match="'x' occurs twice"):
        r.add(1, "x", truth, prob=prob)


def test_thumbnails_are_small_and_only_for_panels():
    r = RankScores(threshold=None, worst_k=2, num_samples=1)
    calls = []
    big = np.zeros((600, 300), bool)
    for i in range(6):
        pred = big.copy()
        pred[: 100 * i] = True
        r.add(i, f"k{i}", big, pred=pred, image=lambda: calls.append(1) or np.zeros((600, 300), np.uint8))
    assert set(r.samples) == {"k0"} and set(r.worst) == {"k1", "k2"}  # k0 is exact (Dice 1)
    assert r.worst["k1"].truth.shape == (256, 128) and r.worst["k1"].size == (600, 300)
    assert len(calls) == 3          # the image is read only for thumbnails kept at the time
