"""Per-image QC (seg.inference.qc): each flag rule on hand-made probability maps, the score's
monotonicity, the quantile arithmetic, the training reference and the TTA flip agreement."""

from __future__ import annotations

import itertools
import math

import cv2
import numpy as np
import pytest
import torch

from seg.data.qc_reference import build_reference, mask_stats, reference_from
from seg.inference.qc import FLAGS, ImageQC, band_entropy, qc_flags, qc_score, quantile_of, tail_risk
from seg.inference.tta import flip_average, pairwise_mask_dice

RNG = np.random.default_rng(0)


def H(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def disc(size=64, centre=(32, 32), radius=10, inside=0.98, outside=0.02) -> np.ndarray:
    prob = np.full((size, size), outside, np.float32)
    cv2.circle(prob, centre, radius, float(inside), -1)
    return prob


def textured(size=64) -> np.ndarray:
    return RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)


# training reference: fractions 0.05-0.15 (a disc of radius 10 in 64 px is 0.077), one component,
# no mask touches the border
REFERENCE = build_reference([(f, 1, False) for f in np.linspace(0.05, 0.15, 50)], "train")


def flags_of(prob, image=None, flip=None, reference=REFERENCE):
    return ImageQC(0.5, reference)(prob, image if image is not None else textured(prob.shape[0]), flip)["flags"]


def test_confident_typical_disc_fires_no_rule():
    qc = ImageQC(0.5, REFERENCE)(disc(), textured(), 0.97)
    assert qc["flags"] == []
    assert qc["components"] == 1 and not qc["touches_border"] and not qc["empty_on_content"]
    assert 0.0 < qc["foreground_quantile"] < 1.0
    assert qc["score"] > 0.7  # (1 - H(0.98))^2 x 0.97


def test_uncertain_rule_fires_on_probabilities_near_the_threshold():
    assert "uncertain" in flags_of(disc(inside=0.6, outside=0.4))
    assert "uncertain" not in flags_of(disc(inside=0.99, outside=0.01))


def test_entropy_is_the_mean_binary_entropy_over_the_dilated_mask():
    prob = np.full((64, 64), 0.1, np.float32)
    prob[20:30, 20:30] = 0.9  # band 1 px: region 12x12 = 100 at 0.9 + 44 at 0.1
    expected = (100 * H(0.9) + 44 * H(0.1)) / 144
    assert band_entropy(prob, prob > 0.5, 0.5) == pytest.approx(expected, abs=1e-2)  # 256-level table
    assert band_entropy(np.zeros((64, 64), np.float32), np.zeros((64, 64), bool), 0.5) == 0.0
    near = np.zeros((64, 64), np.float32)
    near[5:10, 5:10] = 0.4  # an empty mask: the band around the near misses (p > threshold / 2)
    assert band_entropy(near, near > 0.5, 0.5) == pytest.approx((25 * H(0.4)) / 49, abs=1e-2)


def test_flip_disagreement_rule():
    assert "flip_disagreement" in flags_of(disc(), flip=0.6)
    assert "flip_disagreement" not in flags_of(disc(), flip=0.95)
    assert "flip_disagreement" not in flags_of(disc(), flip=None)


def test_foreground_atypical_rule_against_the_training_range():
    assert "foreground_atypical" in flags_of(disc(radius=28))  # 0.6 of the image, training max 0.15
    assert "foreground_atypical" in flags_of(disc(radius=3))  # 0.007, training min 0.05
    assert "foreground_atypical" not in flags_of(disc(radius=10))


def test_components_atypical_rule():
    prob = np.full((64, 64), 0.02, np.float32)
    for c in ((12, 12), (40, 14), (20, 44)):
        cv2.circle(prob, c, 6, 0.98, -1)  # three components, each training mask had one
    qc = ImageQC(0.5, REFERENCE)(prob, textured())
    assert qc["components"] == 3 and "components_atypical" in qc["flags"]


def test_empty_on_content_rule_needs_a_non_blank_image():
    empty = np.full((64, 64), 0.01, np.float32)
    assert "empty_on_content" in flags_of(empty, image=textured())
    assert "empty_on_content" not in flags_of(empty, image=np.full((64, 64), 77, np.uint8))
    assert "empty_on_content" not in flags_of(empty, image=np.full((64, 64), 30000, np.uint16))
    assert "empty_on_content" not in flags_of(disc(), image=textured())


def test_touches_border_rule():
    assert "touches_border" in flags_of(disc(centre=(3, 32)))
    assert "touches_border" not in flags_of(disc(centre=(32, 32)))


def test_without_reference_the_plausibility_signals_are_absent():
    qc = ImageQC(0.5, None)(disc(radius=28), textured())
    assert qc["foreground_quantile"] is None and qc["components_quantile"] is None
    assert "foreground_atypical" not in qc["flags"]
    assert qc["score"] == pytest.approx((1 - qc["entropy"]) ** 2, abs=1e-3)
    assert reference_from({}) is None and reference_from({"qc_reference": None}) is None
    assert reference_from({"qc_reference": REFERENCE}) is REFERENCE


def _signals(**kw) -> dict:
    s = {"entropy": 0.1, "flip_dice": 0.95, "foreground_quantile": 0.5, "components_quantile": 0.5,
         "empty_on_content": False, "touches_border": False}
    s.update(kw)
    return s


@pytest.mark.parametrize("name,values", [
    ("entropy", np.linspace(0, 1, 21)),
    ("flip_dice", np.linspace(1, 0, 21)),
    ("foreground_quantile", np.linspace(0.5, 0, 21)),
    ("foreground_quantile", np.linspace(0.5, 1, 21)),
    ("components_quantile", np.linspace(0.5, 0, 21)),
    ("empty_on_content", [False, True]),
    ("touches_border", [False, True]),
])
def test_score_never_rises_as_a_signal_gets_worse(name, values):
    for base in ({}, {"entropy": 0.4, "flip_dice": 0.7}, {"foreground_quantile": 0.03, "touches_border": True}):
        scores = [qc_score(_signals(**{**base, name: v})) for v in values]
        assert all(0 <= s <= 1 for s in scores)
        assert all(b <= a + 1e-12 for a, b in zip(scores, scores[1:])), (name, base, scores)
        assert scores[-1] < scores[0]


def test_score_is_monotone_on_a_grid_of_combinations():
    grid = list(itertools.product((0.0, 0.3, 0.7), (1.0, 0.8, 0.4), (0.5, 0.08, 0.0), (False, True)))
    for e, f, q, empty in grid:
        s = qc_score(_signals(entropy=e, flip_dice=f, foreground_quantile=q, empty_on_content=empty))
        worse = qc_score(_signals(entropy=min(1, e + 0.1), flip_dice=f * 0.9, foreground_quantile=q / 2,
                                  empty_on_content=True))
        assert worse <= s


def test_flags_name_rules_in_a_fixed_order():
    s = _signals(entropy=0.9, flip_dice=0.2, foreground_quantile=0.0, components_quantile=1.0,
                 empty_on_content=True, touches_border=True)
    assert qc_flags(s) == list(FLAGS)


def test_quantile_of_interpolates_and_gives_ties_their_midrank():
    q = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert quantile_of(2.0, q) == 0.5
    assert quantile_of(2.5, q) == pytest.approx(0.625)
    assert quantile_of(-1, q) == 0.0 and quantile_of(5, q) == 1.0
    ties = [1, 1, 1, 2, 3]  # positions 0-2 hold 1: midrank (0 + 2) / 2 / 4 = 0.25
    assert quantile_of(1, ties) == pytest.approx(0.25)
    assert quantile_of(1.5, ties) == pytest.approx(0.625)  # between positions 2 and 3
    assert tail_risk(0.5) == 0.0 and tail_risk(0.0) == 1.0 and tail_risk(0.025) == pytest.approx(0.5)


def test_reference_quantiles_and_mask_stats():
    mask = np.zeros((10, 10), bool)
    mask[0, 0:3] = True  # touches the border
    mask[5:7, 5:7] = True
    assert mask_stats(mask) == (pytest.approx(0.07), 2, True)
    assert mask_stats(np.zeros((4, 4), bool)) == (0.0, 0, False)
    ref = build_reference([(0.1, 1, False), (0.2, 2, True), (0.3, 3, False)], "train")
    assert ref["count"] == 3 and len(ref["foreground_fraction"]) == 101
    assert ref["foreground_fraction"][0] == 0.1 and ref["foreground_fraction"][50] == 0.2
    assert ref["components"][100] == 3 and ref["border_touch_rate"] == pytest.approx(1 / 3, abs=1e-6)
    assert build_reference([], "train") is None


def test_border_penalty_shrinks_when_training_masks_touch_the_border():
    touching = disc(centre=(2, 32))
    plain = ImageQC(0.5, REFERENCE)(touching, textured())["score"]
    usual = {**REFERENCE, "border_touch_rate": 0.9}
    assert ImageQC(0.5, usual)(touching, textured())["score"] > plain


def test_pairwise_mask_dice_by_hand():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2, :2] = True  # 4 px
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[:2, :1] = True  # 2 px inside a
    empty = torch.zeros(4, 4, dtype=torch.bool)
    masks = torch.stack([torch.stack([a, a, a, b]), torch.stack([empty] * 4)])  # (N=2, K=4) -> (K, N)
    dice = pairwise_mask_dice(masks.transpose(0, 1))
    # pairs: a-a x3 = 1, a-b x3 = 2*2/6
    assert dice[0].item() == pytest.approx((3 * 1 + 3 * (4 / 6)) / 6)
    assert dice[1].item() == 1.0  # empty masks agree


def test_flip_average_matches_the_plain_mean_of_flips():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 8)

    def fn(t):  # orientation-dependent: a ramp added along the width
        return torch.sigmoid(t[:, 0] + torch.linspace(-2, 2, 8))

    prob, agree = flip_average(fn, x, 0.5)
    manual = (fn(x) + fn(x.flip(-1)).flip(-1) + fn(x.flip(-2)).flip(-2) + fn(x.flip(-2, -1)).flip(-2, -1)) / 4
    torch.testing.assert_close(prob, manual)
    assert agree.shape == (3,) and bool((agree < 1).all())
    _, same = flip_average(lambda t: torch.sigmoid(t[:, 0] * 0 + 3), x, 0.5)
    assert bool((same == 1).all())


def test_component_count_equals_opencv_connected_components():
    from seg.data.qc_reference import count_components

    rng = np.random.default_rng(3)
    for _ in range(100):  # blobs with holes and blobs inside holes
        m = cv2.GaussianBlur(rng.random((40, 50)).astype(np.float32), (0, 0), 1.5) > 0.5 + rng.uniform(-0.05, 0.1)
        assert count_components(m) == cv2.connectedComponents(m.view(np.uint8), connectivity=8)[0] - 1
    ring = np.zeros((20, 20), bool)
    ring[2:18, 2:18] = True
    ring[5:15, 5:15] = False
    ring[9:11, 9:11] = True  # a component inside the hole
    assert count_components(ring) == 2


def test_stacked_measures_equal_the_one_map_definitions():
    from seg.data.qc_reference import count_components
    from seg.inference.qc import stack_measures

    rng = np.random.default_rng(5)
    probs = []
    for k in range(9):
        p = cv2.GaussianBlur(rng.random((40, 52)).astype(np.float32), (0, 0), 2.0)
        p = (p - p.min()) / np.ptp(p)
        probs.append(p * 0.45 if k == 3 else p)  # one empty mask with near misses
    probs.append(np.zeros((40, 52), np.float32))  # empty, no near miss
    probs[5][0:6, 0:6] = 0.99  # touches the border
    stack = np.stack(probs)
    entropy, area, components, border = stack_measures(stack, 0.5)
    for k, p in enumerate(probs):
        m = p > 0.5
        assert entropy[k] == pytest.approx(band_entropy(p, m, 0.5), abs=1e-5)
        assert area[k] == m.sum() and components[k] == count_components(m)
        assert border[k] == bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
    qc = ImageQC(0.5, REFERENCE)
    images = [textured(40)[:, :, 0] for _ in probs]
    records = qc.many(probs, images)
    assert records == [qc(p, im) for p, im in zip(probs, images)]
    for r in records:  # the vectorised score and flags are the documented scalar ones
        assert r["score"] == pytest.approx(qc_score(r, REFERENCE["border_touch_rate"]), abs=1e-4)
        assert r["flags"] == qc_flags(r)
    flips = [0.5, None] * 5
    for r, f in zip(qc.many(probs, images, flips), flips):
        assert r["flip_dice"] == f and r["score"] == pytest.approx(qc_score(r, REFERENCE["border_touch_rate"]), abs=1e-4)
        assert r["flags"] == qc_flags(r)


def test_vectorised_quantiles_equal_the_scalar_ones():
    from seg.inference.qc import quantiles_of

    for q in ([0.0, 1.0, 2.0, 3.0, 4.0], [1, 1, 1, 2, 3], REFERENCE["components"], REFERENCE["foreground_fraction"]):
        values = np.concatenate([np.linspace(-1, 5, 61), np.asarray(q, float), [0.05, 0.1, 0.15]])
        np.testing.assert_allclose(quantiles_of(values, q), [quantile_of(float(v), list(q)) for v in values])
