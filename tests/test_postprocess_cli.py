"""Post-processing end to end: `seg evaluate --tune_postprocessing` writes a tuned checkpoint
whose choice re-evaluates to the Dice it reported, and `seg predict` applies the stored
post-processing by default (``--postprocess none`` turns it off)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from seg.checkpoint import load_checkpoint, save_checkpoint
from seg.data.io import read_image
from seg.evaluate import main as evaluate_main
from seg.inference.engine import Predictor
from seg.postprocess import PostProcess, mask_of
from seg.predict import main as predict_main
from test_evaluate_model import labelled  # noqa: F401 (the shared fixture: demo shards + a tiny model)


def _evaluate(root, ckpt, out, *extra) -> dict:
    argv = ["--model_path", str(ckpt), "--data_dir", str(root / "shards"), "--output_dir", str(out),
            "--precision", "fp32", "--device", "cpu", "--no_progress", *extra]
    assert evaluate_main(argv) == 0
    return json.loads((out / "evaluation_report.json").read_text())


def test_tuned_checkpoint_reevaluates_to_the_reported_dice(labelled, tmp_path):
    root, ckpt = labelled
    report = _evaluate(root, ckpt, tmp_path / "tune", "--tune_postprocessing")
    pp = report["postprocessing"]
    assert set(pp) == {"threshold", "postprocess", "dice", "baseline_dice", "objective", "n_images",
                       "tuned_model_path"}
    assert pp["n_images"] == report["n_images"] and pp["objective"] == "mean"
    assert pp["baseline_dice"] == pytest.approx(report["mean"]["dice"], abs=1e-9)  # the model as it was
    assert pp["dice"] >= pp["baseline_dice"]
    tuned = load_checkpoint(pp["tuned_model_path"])
    assert tuned["threshold"] == pp["threshold"] and tuned["postprocess"] == pp["postprocess"]
    original = load_checkpoint(ckpt)
    assert all(torch.equal(tuned["state_dict"][k], v) for k, v in original["state_dict"].items())
    assert "postprocess" not in original  # the evaluated file is not touched
    again = _evaluate(root, pp["tuned_model_path"], tmp_path / "again")
    assert again["threshold"] == pp["threshold"]
    assert again["mean"]["dice"] == pytest.approx(pp["dice"], abs=1e-9)
    assert "postprocessing" not in again


def test_tuning_refuses_masks_mode_and_overwriting_the_model(labelled, tmp_path, capsys):
    root, ckpt = labelled
    assert evaluate_main(["--pred_dir", str(tmp_path), "--gt_dir", str(tmp_path), "--tune_postprocessing"]) == 2
    assert "--tune_postprocessing needs a model" in capsys.readouterr().err
    assert evaluate_main(["--model_path", str(ckpt), "--data_dir", str(root / "shards"), "--tune_postprocessing",
                          "--tuned_model_path", str(ckpt), "--no_progress"]) == 2
    assert "is the evaluated checkpoint" in capsys.readouterr().err


def test_predict_applies_the_stored_postprocessing_unless_told_not_to(labelled, tmp_path):
    root, ckpt = labelled
    stored = load_checkpoint(ckpt)
    post = PostProcess(fill_holes=True, min_size=40, keep_largest=1)
    save_checkpoint({**stored, "postprocess": post.to_dict()}, tmp_path / "pp.pth")
    images = sorted((root / "raw" / "images").iterdir())
    predictor = Predictor(tmp_path / "pp.pth", device="cpu", precision="fp32", batch_size=1)
    assert predictor.postprocess == post
    changed = 0
    for flag, expect_post in (([], post), (["--postprocess", "none"], None)):
        out = tmp_path / ("on" if expect_post else "off")
        args = ["--model_path", tmp_path / "pp.pth", "--image_dir", root / "raw" / "images", "--output_dir", out,
                "--device", "cpu", "--precision", "fp32", "--no_progress", *flag]
        assert predict_main([str(a) for a in args]) == 0
        for path in images:
            prob = predictor.predict_probabilities([read_image(path)])[0]
            got = cv2.imread(str(out / f"{path.stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
            assert np.array_equal(got, mask_of(prob, predictor.threshold, expect_post)), (path, flag)
            changed += int(expect_post is not None and not np.array_equal(got, prob > predictor.threshold))
    assert changed > 0  # the random model's masks are noisy: post-processing did something
