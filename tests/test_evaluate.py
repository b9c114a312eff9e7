"""seg evaluate --pred_dir/--gt_dir: hand-computed metrics, the empty policy, exact JSON keys, valid
plots, and errors that name the files."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from seg.cli import main as seg_main
from seg.evaluate import main

REPORT_KEYS = ["n_images", "threshold", "global", "mean", "std", "empty_policy", "per_image"]
METRICS = ["dice", "iou", "precision", "recall", "f1", "specificity", "pixel_accuracy"]
PLOTS = ["confusion_matrix.png", "metrics_distribution.png", "metrics_summary.png",
         "sample_predictions.png", "worst_cases.png"]


def write_mask(path: Path, mask: np.ndarray, value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), (np.asarray(mask, bool) * value).astype(np.uint8))
    return path


def four_cases(tmp_path: Path) -> tuple[Path, Path]:
    """a: partial overlap; sub/b: both empty; c: empty truth with 3 false positives; d: all foreground."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    t = np.zeros((4, 4), bool)
    t[0, :4] = True                       # 4 foreground pixels
    p = np.zeros((4, 4), bool)
    p[0, :2] = True                       # 2 of them found
    p[3, 3] = True                        # 1 false positive
    write_mask(gt / "a.png", t)
    write_mask(pred / "a_mask.png", p)
    write_mask(gt / "sub" / "b_mask.png", np.zeros((4, 4)))   # suffix on the truth side
    write_mask(pred / "sub" / "b.png", np.zeros((4, 4)))      # plain stem on the prediction side
    c = np.zeros((4, 4), bool)
    c[1, 1:4] = True
    write_mask(gt / "c.png", np.zeros((4, 4)))
    write_mask(pred / "c_mask.png", c, value=1)               # a 0/1 mask works too
    write_mask(gt / "d.png", np.ones((4, 4)))
    write_mask(pred / "d_mask.png", np.ones((4, 4)))
    # seg predict's by-products and bookkeeping next to the masks are not predictions
    write_mask(pred / "a_overlay.png", np.ones((4, 4)))
    (pred / "manifest.jsonl").write_text("{}\n")
    return gt, pred


def test_hand_computed_metrics_and_empty_policy(tmp_path, capsys):
    gt, pred = four_cases(tmp_path)
    out = tmp_path / "out"
    assert main(["--pred_dir", str(pred), "--gt_dir", str(gt), "--output_dir", str(out), "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "4 images" in printed and "evaluation_report.json" in printed and "worst_cases.png" in printed
    report = json.loads((out / "evaluation_report.json").read_text())
    assert list(report) == REPORT_KEYS                      # exactly the docs/FORMATS.md keys, no best_threshold
    assert list(report["global"]) == METRICS + ["tp", "fp", "fn", "tn"]
    assert list(report["mean"]) == METRICS and list(report["std"]) == METRICS
    assert report["n_images"] == 4 and report["threshold"] is None
    per = {p["id"]: p for p in report["per_image"]}
    assert sorted(per) == ["a", "c", "d", "sub/b"]
    assert list(per["a"]) == ["id"] + METRICS + ["tp", "fp", "fn", "tn"]
    a = per["a"]
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (2, 1, 2, 11)
    assert a["dice"] == pytest.approx(4 / 7) and a["f1"] == pytest.approx(4 / 7)
    assert a["iou"] == pytest.approx(2 / 5)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(1 / 2)
    assert a["specificity"] == pytest.approx(11 / 12) and a["pixel_accuracy"] == pytest.approx(13 / 16)
    b = per["sub/b"]                                          # both empty: every ratio is 1.0
    assert (b["tp"], b["fp"], b["fn"], b["tn"]) == (0, 0, 0, 16)
    assert all(b[m] == 1.0 for m in METRICS)
    c = per["c"]                                              # empty truth, false positives: 0
    assert (c["tp"], c["fp"], c["fn"], c["tn"]) == (0, 3, 0, 13)
    assert c["dice"] == 0.0 and c["iou"] == 0.0 and c["precision"] == 0.0 and c["recall"] == 0.0
    assert c["specificity"] == pytest.approx(13 / 16)
    d = per["d"]                                              # all foreground, exact: specificity 0/0 -> 1
    assert (d["tp"], d["tn"]) == (16, 0) and d["specificity"] == 1.0 and d["dice"] == 1.0
    g = report["global"]                                      # pooled: tp 18, fp 4, fn 2, tn 40
    assert (g["tp"], g["fp"], g["fn"], g["tn"]) == (18, 4, 2, 40)
    assert g["dice"] == pytest.approx(36 / 42) and g["iou"] == pytest.approx(18 / 24)
    assert g["precision"] == pytest.approx(18 / 22) and g["recall"] == pytest.approx(18 / 20)
    assert g["specificity"] == pytest.approx(40 / 44) and g["pixel_accuracy"] == pytest.approx(58 / 64)
    dices = [4 / 7, 1.0, 0.0, 1.0]
    assert report["mean"]["dice"] == pytest.approx(np.mean(dices))
    assert report["std"]["dice"] == pytest.approx(np.std(dices))
    assert report["empty_policy"] == "0/0 is 1.0 where prediction equals truth, else 0.0"
    for name in PLOTS:                                        # every plot a valid PNG image
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and min(img.shape[:2]) > 200
    assert not (out / "threshold_sweep.png").exists()         # model mode only
    text = (out / "evaluation_report.txt").read_text()
    assert "0.8571" in text and "lowest-Dice images" in text and "c\n" in text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_image_dir_panels_and_seg_command(tmp_path):
    gt, pred = four_cases(tmp_path)
    images = tmp_path / "images"
    for name in ("a", "c", "d", "sub/b"):
        path = images / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((4, 4, 3), 128, np.uint8))
    out = tmp_path / "out"
    assert seg_main(["evaluate", "--pred_dir", str(pred), "--gt_dir", str(gt), "--image_dir", str(images),
                     "--output_dir", str(out), "--worst_k", "2", "--num_samples", "2", "--no_progress"]) == 0
    text = (out / "evaluation_report.txt").read_text()
    assert "lowest-Dice images (2):\n  0.0000  c\n  0.5714  a\n" in text
    assert cv2.imread(str(out / "sample_predictions.png")) is not None


def test_missing_predictions_are_listed_by_name(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for i in range(30):
        write_mask(gt / f"case{i:02d}.png", np.zeros((4, 4)))
    for i in (0, 1, 2):
        write_mask(pred / f"case{i:02d}_mask.png", np.zeros((4, 4)))
    assert main(["--pred_dir", str(pred), "--gt_dir", str(gt), "--output_dir", str(tmp_path / "o"),
                 "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "27 of 30 truths" in err and "case03, case04" in err and "case22" in err
    assert "case23" not in err and "... and 7 more" in err    # the first 20 names, then a count
    assert not (tmp_path / "o" / "evaluation_report.json").exists()


def test_few_missing_predictions_all_named(tmp_path, capsys):
    gt, pred = four_cases(tmp_path)
    (pred / "c_mask.png").unlink()
    assert main(["--pred_dir", str(pred), "--gt_dir", str(gt), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "1 of 4 truths" in err and ": c." in err and "more" not in err


def test_no_pairs_names_folders_and_rule(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    write_mask(gt / "x.png", np.zeros((4, 4)))
    write_mask(pred / "y_mask.png", np.zeros((4, 4)))
    assert main(["--pred_dir", str(pred), "--gt_dir", str(gt)]) == 2
    err = capsys.readouterr().err
    assert str(pred) in err and str(gt) in err and "a/x_mask.png pairs with a/x.png" in err


def test_size_mismatch_names_both_files(tmp_path, capsys):
    gt, pred = four_cases(tmp_path)
    write_mask(pred / "a_mask.png", np.zeros((5, 4)))
    assert main(["--pred_dir", str(pred), "--gt_dir", str(gt), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(pred / "a_mask.png") in err and str(gt / "a.png") in err and "4x5" in err


def test_unreadable_mask_is_named(tmp_path, capsys):
    gt, pred = four_cases(tmp_path)
    (gt / "d.png").write_bytes(b"")
    assert main(["--pred_dir", str(pred), "--gt_dir", str(gt), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(gt / "d.png") in err and "empty" in err


def test_two_masks_for_one_id_is_an_error(tmp_path, capsys):
    gt, pred = four_cases(tmp_path)
    write_mask(pred / "a.png", np.zeros((4, 4)))
    assert main(["--pred_dir", str(pred), "--gt_dir", str(gt), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "a_mask.png" in err


@pytest.mark.parametrize("argv, expected", [
    ([], "give either --pred_dir and --gt_dir"),
    (["--pred_dir", "p"], "--pred_dir and --gt_dir go together"),
    (["--pred_dir", "p", "--gt_dir", "g", "--model_path", "m"], "not both"),
    (["--pred_dir", "p", "--gt_dir", "g", "--threshold", "0.3"], "--threshold applies to --model_path"),
    (["--model_path", "m", "--data_dir", "d", "--threshold", "1.5"], "threshold=1.5 is not valid; it must be >= 0 and < 1"),
])
def test_flag_errors(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in capsys.readouterr().err
