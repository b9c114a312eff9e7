"""AUROC, Spearman and lowest-share arithmetic of seg.evaluation.qc_ranking, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from seg.evaluation.qc_ranking import auroc, lowest_share, manifest_id, midranks, qc_section, spearman


def test_midranks_average_tied_positions():
    np.testing.assert_array_equal(midranks([3, 1, 3, 2]), [3.5, 1, 3.5, 2])
    np.testing.assert_array_equal(midranks([5, 5, 5]), [2, 2, 2])


def test_auroc_by_hand_with_ties():
    # failures score 0.1, 0.4, 0.6; successes 0.4, 0.7, 0.9
    scores = [0.1, 0.4, 0.6, 0.4, 0.7, 0.9]
    failed = [True, True, True, False, False, False]
    # pairs (failure < success) out of 9: 0.1 < all 3; 0.4 tie with 0.4 (1/2) and < 0.7, 0.9; 0.6 < 0.7, 0.9
    assert auroc(scores, failed) == pytest.approx((3 + 2.5 + 2) / 9)
    assert auroc([0, 0, 1, 1], [True, True, False, False]) == 1.0
    assert auroc([1, 1, 0, 0], [True, True, False, False]) == 0.0
    assert auroc([0.5] * 4, [True, False, True, False]) == 0.5
    assert auroc([0.1, 0.2], [False, False]) is None and auroc([0.1, 0.2], [True, True]) is None


def test_spearman_by_hand_with_ties():
    x = [1, 2, 2, 3]  # midranks 1, 2.5, 2.5, 4
    y = [10, 30, 20, 40]  # ranks 1, 3, 2, 4
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4])
    expected = ((rx - rx.mean()) * (ry - ry.mean())).sum() / np.sqrt(((rx - rx.mean()) ** 2).sum()
                                                                      * ((ry - ry.mean()) ** 2).sum())
    assert spearman(x, y) == pytest.approx(expected)
    assert expected == pytest.approx(4.5 / np.sqrt(4.5 * 5))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_lowest_share_counts_ties_at_the_cut_by_their_failure_share():
    scores = [0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.8, 0.9, 0.9, 0.95]
    failed = [True, False, True, True, False, False, False, False, True, False]
    # lowest 30 %: 3 images = 0.1 (fail), 0.2 (ok), then 1 place among four 0.3s holding 2 failures
    res = lowest_share(scores, failed, 0.3)
    assert res["images"] == 3 and res["failures"] == pytest.approx(1.5)
    assert res["captured"] == pytest.approx(1.5 / 4) and res["precision"] == pytest.approx(0.5)
    assert lowest_share(scores, failed, 0.05)["images"] == 1  # ceil(0.5)
    assert lowest_share(scores, failed, 0.05)["failures"] == 1.0


def test_qc_section_fields():
    dice = {"a": 0.95, "b": 0.3, "c": 0.7, "d": 0.9, "e": 0.85}
    qc = {k: {"score": s, "flags": f} for k, s, f in
          (("a", 0.9, []), ("b", 0.1, ["uncertain"]), ("c", 0.2, ["uncertain"]), ("d", 0.8, []), ("e", 0.7, []))}
    sec = qc_section(dice, {**qc, "zz": {"score": 0.5, "flags": []}})
    assert sec["n_images"] == 5
    d8 = sec["detection"]["dice_below_0.8"]
    assert d8["failures"] == 2 and d8["auroc"] == 1.0
    assert d8["lowest_5pct"] == {"images": 1, "failures": 1.0, "captured": 0.5, "precision": 1.0}
    assert sec["detection"]["dice_below_0.5"]["failures"] == 1
    assert sec["flags"] == {"uncertain": {"images": 2, "failures_0.8": 2}}
    assert sec["spearman_dice"] == pytest.approx(1.0)
    assert [p["id"] for p in sec["per_image"]] == ["a", "b", "c", "d", "e"]
    assert qc_section({"a": 1.0}, {"b": {"score": 1, "flags": []}}) is None


def test_manifest_id_matches_the_evaluation_pairing():
    assert manifest_id("sub/x_mask.png") == "sub/x"
    assert manifest_id("a.b/y_mask.png") == "a_b/y"
