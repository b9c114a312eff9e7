"""Post-processing on hand-made masks, and its choice on validation data."""

import numpy as np
import pytest

from seg.postprocess import PostProcess, fill_holes, select_components, tune_postprocessing


def _mask(h=20, w=20, boxes=()):
    m = np.zeros((h, w), bool)
    for y0, x0, y1, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def test_identity_changes_nothing():
    m = _mask(boxes=[(1, 1, 4, 4), (10, 10, 11, 11)])
    out = PostProcess().apply(m)
    assert PostProcess().is_identity and np.array_equal(out, m) and out is not m


def test_fill_holes_fills_enclosed_background_only():
    ring = _mask(boxes=[(2, 2, 9, 9)])
    ring[4:7, 4:7] = False  # an enclosed hole of 9 pixels
    notch = _mask(boxes=[(12, 0, 18, 6)])
    notch[14:16, 0:2] = False  # open to the image border: not a hole
    filled = fill_holes(ring | notch)
    assert filled[4:7, 4:7].all() and not filled[14:16, 0:2].any()
    assert filled.sum() == (ring | notch).sum() + 9


def test_min_size_removes_small_components_8_connected():
    m = _mask(boxes=[(0, 0, 5, 5), (10, 10, 12, 12)])  # 25 and 4 pixels
    m[6, 6] = m[7, 7] = True  # two diagonal pixels: one 8-connected component of 2
    out = PostProcess(min_size=3).apply(m)
    assert out.sum() == 29 and not out[6, 6]
    assert PostProcess(min_size=5).apply(m).sum() == 25


def test_keep_largest_k():
    m = _mask(boxes=[(0, 0, 5, 5), (10, 10, 13, 13), (15, 15, 17, 17)])  # 25, 9, 4
    assert PostProcess(keep_largest=1).apply(m).sum() == 25
    assert PostProcess(keep_largest=2).apply(m).sum() == 34
    assert PostProcess(keep_largest=2, min_size=10).apply(m).sum() == 25


def test_never_emptier_than_the_evidence():
    m = _mask(boxes=[(3, 3, 5, 5), (10, 10, 11, 11)])  # 4 and 1 pixels, all below min_size
    out = PostProcess(min_size=100).apply(m)
    assert out.sum() == 4 and out[3:5, 3:5].all()
    assert not PostProcess(min_size=100).apply(np.zeros((8, 8), bool)).any()
    assert list(select_components(np.array([3, 7, 5]), 10, 0)) == [False, True, False]


def test_round_trip_and_validation():
    pp = PostProcess(True, 16, 2)
    assert PostProcess.from_dict(pp.to_dict()) == pp and PostProcess.from_dict(None) == PostProcess()
    with pytest.raises(ValueError, match="unknown post-processing keys"):
        PostProcess.from_dict({"min_sise": 3})
    with pytest.raises(ValueError, match="must be >= 0"):
        PostProcess(min_size=-1)


def test_tuning_picks_the_removal_that_helps_and_keeps_the_identity_otherwise():
    rng = np.random.default_rng(0)
    probs, truths = [], []
    for _ in range(6):
        truth = _mask(32, 32, [(8, 8, 20, 20)])
        prob = np.where(truth, 0.9, 0.05) + rng.uniform(0, 0.02, (32, 32))
        for _ in range(4):  # confident specks of false positives: no threshold separates them
            y, x = rng.integers(0, 30, 2)
            if not truth[y, x]:
                prob[y, x] = 0.95
        probs.append(prob)
        truths.append(truth)
    result = tune_postprocessing(probs, truths)
    assert result["dice"] > result["baseline_dice"]
    assert result["postprocess"].min_size > 2 or result["postprocess"].keep_largest == 1
    assert result["dice"] == pytest.approx(1.0)
    for p, t in zip(probs, truths):  # the chosen setting does what the score says
        assert np.array_equal(result["postprocess"].apply(p > result["threshold"]), t)
    clean = [np.where(t, 0.9, 0.1) for t in truths]
    plain = tune_postprocessing(clean, truths)
    assert plain["postprocess"].is_identity and plain["threshold"] == 0.5 and plain["dice"] == 1.0


def test_a_component_rule_must_beat_the_best_bare_threshold():
    from seg.postprocess import choose_postprocessing

    # One image, truth 100 px. At 0.5: the object (120 px, 100 on the truth) and a 10 px blob;
    # at 0.55: the object alone, 118 px with 99 on the truth.
    stats = [{"truth": 100, (0.5, False): (np.array([120, 10]), np.array([100, 0])),
              (0.55, False): (np.array([118]), np.array([99]))}]
    grid = {"thresholds": (0.5, 0.55), "keep_largest": (0,), "fill": (False,)}
    # Removing the blob at 0.5 (200/220 = 0.9091) beats 0.55 bare (198/218 = 0.9083) by less than
    # min_gain: the bare threshold stays, though a joint search would have reached the rule first.
    result = choose_postprocessing(stats, min_sizes=(0, 16), **grid)
    assert result["threshold"] == 0.55 and result["postprocess"].is_identity
    assert result["dice"] == pytest.approx(198 / 218) and result["baseline_dice"] == pytest.approx(200 / 230)
    # By more than min_gain, the rule wins, at whichever threshold it scores best.
    result = choose_postprocessing(stats, min_sizes=(0, 16), min_gain=1e-4, **grid)
    assert (result["threshold"], result["postprocess"].min_size) == (0.5, 16)
    assert result["dice"] == pytest.approx(200 / 220)
    with pytest.raises(ValueError, match="must include False"):
        choose_postprocessing(stats, min_sizes=(0, 16), thresholds=(0.5,), keep_largest=(0,), fill=(True,))


def test_tuning_threshold_and_global_objective():
    truth = _mask(16, 16, [(4, 4, 12, 12)])
    prob = np.where(truth, 0.4, 0.0)  # the model is under-confident: 0.5 predicts nothing
    result = tune_postprocessing([prob], [truth], objective="global")
    assert result["baseline_dice"] == 0.0 and result["threshold"] < 0.4 and result["dice"] == 1.0
    with pytest.raises(ValueError, match="objective='median'"):
        tune_postprocessing([prob], [truth], objective="median")


def test_stats_per_rank_then_choice_equals_the_one_process_tuning():
    rng = np.random.default_rng(3)
    truths = [_mask(24, 24, [(4, 4, 14, 14)]) for _ in range(4)]
    probs = [np.clip(np.where(t, 0.7, 0.2) + rng.normal(0, 0.2, t.shape), 0, 1) for t in truths]
    from seg.postprocess import THRESHOLDS, choose_postprocessing, image_stats

    stats = [image_stats(p, t) for p, t in zip(probs, truths)]  # e.g. two ranks, two images each, gathered
    assert choose_postprocessing(stats[:2] + stats[2:]) == tune_postprocessing(probs, truths)
    assert set(stats[0]) == {"truth"} | {(float(t), f) for t in THRESHOLDS for f in (False, True)}
