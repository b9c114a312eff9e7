"""seg evaluate --model_path --data_dir: prepared shards, shard patterns and raw folders give the
counts of an independent Predictor + threshold computation; the sweep and best_threshold; and the
same report as `seg predict` followed by `seg evaluate --pred_dir`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from seg.checkpoint import model_checkpoint, save_checkpoint
from seg.data.synthetic import make_demo_dataset
from seg.data.io import read_image, read_mask
from seg.data.pairing import find_pairs
from seg.data.sharding import prepare_dataset
from seg.evaluate import main
from seg.evaluation.scoring import SWEEP_THRESHOLDS
from seg.metrics import confusion_counts, metrics_from_counts
from seg.model.unet import UNet

DESIGN_KEYS = ["n_images", "threshold", "global", "mean", "std", "empty_policy", "per_image"]


def tiny_checkpoint(path: Path, threshold: float = 0.5) -> Path:
    """A random UNet(3, 4) whose BatchNorm statistics and output scale make probabilities vary."""
    torch.manual_seed(0)
    model = UNet(3, 4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        model.eval()
        x = torch.randn(2, 3, 32, 32)
        model.outc.weight.mul_(2.0 / max(float(model(x).std()), 1e-6))
        model.outc.bias.sub_(float(model(x).mean()))
    preprocess = {"image_size": 32, "in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "sampling": "resize"}
    save_checkpoint(model_checkpoint(model, preprocess, threshold=threshold), path)
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmodel")
    make_demo_dataset(root / "raw", n=8, size=40, seed=3)
    prepare_dataset(images=root / "raw" / "images", masks=root / "raw" / "masks", out=root / "shards",
                    val_split=0.5, shard_size=2, workers=1, progress=False)
    return root, tiny_checkpoint(root / "model.pth")


def expected_counts(root: Path, ckpt: Path, threshold: float) -> dict[str, np.ndarray]:
    """Independent computation: Predictor on each raw image, threshold, confusion counts."""
    from seg.inference.engine import Predictor

    pairs, problems = find_pairs(root / "raw" / "images", root / "raw" / "masks")
    assert not problems
    predictor = Predictor(ckpt, device="cpu", precision="fp32", batch_size=1)
    out = {}
    for pair in pairs:
        prob = predictor.predict_probabilities([read_image(pair.image)])[0]
        out[pair.key] = confusion_counts(prob[None], read_mask(pair.mask)[None], threshold)[0]
    return out


def run(tmp_path, data_dir, ckpt, *extra) -> dict:
    out = tmp_path / "out"
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    argv = ["--model_path", str(ckpt), "--data_dir", str(data_dir), "--output_dir", str(out),
            "--precision", "fp32", "--device", "cpu", "--batch_size", "3", "--no_progress", *extra]
    assert main(argv) == 0
    return json.loads((out / "evaluation_report.json").read_text())


@pytest.fixture(scope="module")
def reports(labelled, tmp_path_factory):
    """Model-mode runs shared by the tests (each costs seconds on a busy CPU): name -> (report, folder)."""
    root, ckpt = labelled
    cache: dict = {}

    def get(name: str, data_dir, *extra):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = (run(folder, data_dir, ckpt, *extra), folder / "out")
        return cache[name]
    return get


@pytest.mark.slow
def test_model_mode_on_prepared_shards(labelled, reports):
    root, ckpt = labelled
    info = json.loads((root / "shards" / "dataset.json").read_text())
    report, out = reports("val", root / "shards")
    assert list(report) == DESIGN_KEYS + ["best_threshold", "qc"]  # qc: seg.evaluation.qc_ranking
    assert report["threshold"] == 0.5 and report["n_images"] == info["splits"]["val"]["count"]
    assert report["qc"]["n_images"] == report["n_images"] and (out / "report.html").is_file()
    expected = expected_counts(root, ckpt, 0.5)
    per = {p["id"]: p for p in report["per_image"]}
    for key, p in per.items():
        assert [p["tp"], p["fp"], p["fn"], p["tn"]] == expected[key].tolist(), key
    assert 0 < report["global"]["tp"] and 0 < report["global"]["fp"]  # a model that is neither all-0 nor exact
    # best_threshold: the sweep threshold with the highest pooled Dice, recomputed here
    from seg.inference.engine import Predictor

    predictor = Predictor(ckpt, device="cpu", precision="fp32")
    pairs = [p for p in find_pairs(root / "raw" / "images", root / "raw" / "masks")[0] if p.key in per]
    probs = predictor.predict_probabilities([read_image(p.image) for p in pairs])
    truths = [read_mask(p.mask) for p in pairs]
    pooled = [metrics_from_counts(sum(confusion_counts(pr[None], t[None], th)[0] for pr, t in zip(probs, truths)))
              ["dice"][0] for th in SWEEP_THRESHOLDS]
    best = int(np.argmax(pooled))
    assert report["best_threshold"] == {"threshold": SWEEP_THRESHOLDS[best], "dice": pytest.approx(pooled[best])}
    for name in ("threshold_sweep.png", "confusion_matrix.png", "metrics_distribution.png", "metrics_summary.png",
                 "sample_predictions.png", "worst_cases.png"):
        img = cv2.imread(str(out / name))
        assert img is not None and min(img.shape[:2]) > 200, name
    text = (out / "evaluation_report.txt").read_text()
    assert "threshold sweep" in text and "<- best" in text


@pytest.mark.slow
def test_sources_agree_and_threshold_override(labelled, reports, tmp_path):
    root, ckpt = labelled
    pattern = run(tmp_path, str(root / "shards" / "val-*.tar"), ckpt)
    assert pattern == reports("val", root / "shards")[0]
    everything = run(tmp_path, root / "shards", ckpt, "--split", "all")
    raw = reports("raw", root / "raw")[0]                    # images/ + masks/ folder
    assert everything == raw and raw["n_images"] == 8
    low = run(tmp_path, root / "raw", ckpt, "--threshold", "0.3")
    assert low["threshold"] == 0.3
    expected = expected_counts(root, ckpt, 0.3)
    assert {p["id"]: [p["tp"], p["fp"], p["fn"], p["tn"]] for p in low["per_image"]} == \
        {k: v.tolist() for k, v in expected.items()}


@pytest.mark.slow
def test_predict_then_evaluate_pred_dir_equals_model_mode(labelled, reports, tmp_path):
    from seg.predict import main as predict_main

    root, ckpt = labelled
    preds = tmp_path / "preds"
    assert predict_main(["--model_path", str(ckpt), "--image_dir", str(root / "raw" / "images"),
                         "--output_dir", str(preds), "--precision", "fp32", "--device", "cpu",
                         "--num_workers", "0", "--no_progress", "--save_overlay"]) == 0
    model_mode = reports("raw", root / "raw")[0]
    out = tmp_path / "masks_out"
    assert main(["--pred_dir", str(preds), "--gt_dir", str(root / "raw" / "masks"),
                 "--image_dir", str(root / "raw" / "images"), "--output_dir", str(out), "--no_progress"]) == 0
    masks_mode = json.loads((out / "evaluation_report.json").read_text())
    assert masks_mode["threshold"] is None and "best_threshold" not in masks_mode
    assert {k: v for k, v in masks_mode.items() if k != "threshold"} == \
        {k: v for k, v in model_mode.items() if k not in ("threshold", "best_threshold")}


def test_model_mode_errors(labelled, tmp_path, capsys):
    root, ckpt = labelled
    base = ["--model_path", str(ckpt), "--output_dir", str(tmp_path / "o"), "--no_progress"]
    assert main(base + ["--data_dir", str(tmp_path / "nowhere" / "x-*.tar")]) == 2
    assert "names no existing shard" in capsys.readouterr().err
    unlabelled = tmp_path / "unlabelled"
    prepare_dataset(images=root / "raw" / "images", out=unlabelled, workers=1, progress=False)
    assert main(base + ["--data_dir", str(unlabelled)]) == 2
    assert "unlabelled shards cannot be evaluated" in capsys.readouterr().err
    assert main(base + ["--data_dir", str(root / "shards"), "--model_path", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth does not exist" in capsys.readouterr().err
    first = sorted((root / "shards").glob("val-*.tar"))[0]
    assert main(base + ["--data_dir", f"{first}::{first}"]) == 2      # the same shard twice
    assert "occurs twice" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(root / "shards", broken)
    shard = sorted(broken.glob("val-*.tar"))[-1]
    shard.write_bytes(shard.read_bytes()[:3000])
    assert main(base + ["--data_dir", str(broken)]) == 2  # the folder: checked against dataset.json first
    assert f"shard {shard} has 3000 bytes but dataset.json lists" in capsys.readouterr().err
    assert main(base + ["--data_dir", str(shard)]) == 2  # the shard alone: it breaks while read
    assert f"shard {shard} cannot be read past sample" in capsys.readouterr().err
