"""Metrics against hand-computed values: empty-mask policy, global pooling, keyed accumulation."""

import numpy as np
import pytest
import torch

from seg.metrics import COUNT_NAMES, EMPTY_POLICY, METRIC_NAMES, MetricAccumulator, confusion_counts, metrics_from_counts


def _one(counts):
    return {k: float(v[0]) for k, v in metrics_from_counts(np.array([counts])).items()}


def test_confusion_counts_torch_and_numpy_agree():
    prob = np.array([[[0.9, 0.6], [0.2, 0.5]]])  # 0.5 is not > 0.5: background
    target = np.array([[[1, 0], [1, 0]]])
    expected = [[1, 1, 1, 1]]
    assert confusion_counts(prob, target).tolist() == expected
    assert confusion_counts(torch.tensor(prob)[:, None], torch.tensor(target)[:, None]).tolist() == expected
    assert confusion_counts(prob, target, threshold=0.1).tolist() == [[2, 2, 0, 0]]


def test_metrics_hand_computed():
    m = _one([2, 1, 3, 4])  # tp fp fn tn
    assert m["dice"] == pytest.approx(4 / 8) and m["f1"] == m["dice"]
    assert m["iou"] == pytest.approx(2 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 5)
    assert m["specificity"] == pytest.approx(4 / 5) and m["pixel_accuracy"] == pytest.approx(6 / 10)


def test_both_empty_is_perfect():
    assert _one([0, 0, 0, 16]) == {name: 1.0 for name in METRIC_NAMES}


def test_empty_truth_with_false_positives_scores_zero():
    m = _one([0, 3, 0, 13])
    assert m["dice"] == m["iou"] == m["precision"] == 0.0
    assert m["recall"] == 0.0  # 0/0 but the prediction differs from the truth
    assert m["specificity"] == pytest.approx(13 / 16)


def test_all_foreground_truth_predicted_exactly():
    m = _one([16, 0, 0, 0])
    assert m["specificity"] == 1.0 and m["dice"] == 1.0


def test_global_pools_counts_and_mean_averages_images():
    acc = MetricAccumulator()
    acc.update(["empty", "hit"], np.array([[0, 0, 0, 4], [2, 1, 1, 0]]))
    report = acc.summary(per_image=True)
    assert report["n_images"] == 2 and report["empty_policy"] == EMPTY_POLICY
    assert {k: report["global"][k] for k in COUNT_NAMES} == {"tp": 2, "fp": 1, "fn": 1, "tn": 4}
    assert report["global"]["dice"] == pytest.approx(4 / 6)
    assert report["mean"]["dice"] == pytest.approx((1 + 4 / 6) / 2)
    assert report["std"]["dice"] == pytest.approx(abs(1 - 4 / 6) / 2)  # population std of two values
    assert [row["id"] for row in report["per_image"]] == ["empty", "hit"]
    assert report["per_image"][0]["dice"] == 1.0 and report["per_image"][1]["tp"] == 2


def test_global_empty_policy_on_pooled_counts():
    acc = MetricAccumulator()
    acc.update(["a", "b"], np.array([[0, 0, 0, 4], [0, 0, 0, 9]]))
    assert acc.summary()["global"]["dice"] == 1.0
    acc.update(["c"], np.array([[0, 2, 0, 2]]))
    assert acc.summary()["global"]["dice"] == 0.0 and acc.summary()["global"]["recall"] == 0.0


def test_keyed_accumulation_drops_duplicates():
    rank0, rank1 = MetricAccumulator(), MetricAccumulator()
    rank0.update(["a", "b"], confusion_counts(torch.tensor([[[[0.9]]], [[[0.1]]]]), torch.tensor([[[[1.0]]], [[[1.0]]]])))
    rank1.update(["b", "c"], confusion_counts(torch.tensor([[[[0.1]]], [[[0.8]]]]), torch.tensor([[[[1.0]]], [[[0.0]]]])))
    rank0.update(["a"], np.array([[1, 0, 0, 0]]))  # the same image scored twice counts once
    keys, counts = rank1.state()  # what a rank sends
    rank0.update(keys, counts)
    report = rank0.summary()
    assert report["n_images"] == 3 and len(rank0) == 3
    assert [report["global"][k] for k in COUNT_NAMES] == [1, 1, 1, 0]


def test_update_checks_lengths():
    with pytest.raises(ValueError, match="2 keys for 1 count rows"):
        MetricAccumulator().update(["a", "b"], np.array([[1, 0, 0, 0]]))
