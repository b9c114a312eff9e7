"""seg train's end-of-training choice of threshold and post-processing (``seg.training.tuning``).

Tiny U-Nets on synthetic shards, trained by `python -m seg.train` subprocesses (with timeouts).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seg.checkpoint import load_checkpoint
from test_train import TINY, make_shards, run_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(shards folder, dataset.json, a run trained with the defaults, that run's stdout)."""
    root = tmp_path_factory.mktemp("tuning")
    folder, info = make_shards(root)
    run = root / "run"
    proc = run_train(["--data_dir", str(folder), "--checkpoint_dir", str(run), "--epochs", "3", *TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, info, run, proc.stdout


def test_best_model_carries_the_choice_made_on_every_validation_image(trained):
    _, info, run, stdout = trained
    best = load_checkpoint(run / "best_model.pth")
    entry = best["postprocess_tuning"]
    assert entry["chosen_by"] == "seg train" and entry["objective"] == "mean"
    assert entry["n_images"] == info["splits"]["val"]["count"]
    assert best["threshold"] == entry["threshold"] and best["postprocess"] == entry["postprocess"]
    assert entry["dice"] >= entry["baseline_dice"]
    assert f"threshold {entry['threshold']:g}, post-processing" in stdout and "chosen on" in stdout


def test_final_model_keeps_the_configured_threshold(trained):
    _, _, run, _ = trained
    final = load_checkpoint(run / "final_model.pth")
    assert final["threshold"] == 0.5 and "postprocess_tuning" not in final and "postprocess" not in final
    best = load_checkpoint(run / "best_model.pth")
    if best["epoch"] == final["epoch"]:  # the same weights: tuning touched nothing else
        assert all(torch.equal(best["state_dict"][k], v) for k, v in final["state_dict"].items())


def test_the_choice_is_seg_evaluates_on_the_validation_split(trained, tmp_path):
    """Made as `seg evaluate --model_path --data_dir --tune_postprocessing` makes it: the same
    images at full size, the same candidates, the same choice and validation Dice."""
    folder, _, run, _ = trained
    chosen = load_checkpoint(run / "best_model.pth")["postprocess_tuning"]
    untuned = tmp_path / "untuned.pth"
    ckpt = load_checkpoint(run / "best_model.pth")
    torch.save({k: v for k, v in ckpt.items() if k not in ("postprocess", "postprocess_tuning")}
               | {"threshold": 0.5}, untuned)
    proc = subprocess.run([sys.executable, "-m", "seg", "evaluate", "--model_path", str(untuned), "--data_dir",
                           str(folder), "--output_dir", str(tmp_path / "ev"), "--tune_postprocessing",
                           "--no_progress"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_evaluate = json.loads((tmp_path / "ev" / "evaluation_report.json").read_text())["postprocessing"]
    for key in ("threshold", "postprocess", "n_images"):
        assert by_evaluate[key] == chosen[key]
    assert by_evaluate["dice"] == pytest.approx(chosen["dice"], abs=1e-3)


def test_predict_applies_the_tuned_threshold_by_default(trained, tmp_path):
    from seg.data.synthetic import make_demo_dataset

    _, _, run, _ = trained
    raw = make_demo_dataset(tmp_path / "raw", n=2, size=48, seed=5)
    out = tmp_path / "pred"
    proc = subprocess.run([sys.executable, "-m", "seg", "predict", "--model_path", str(run / "best_model.pth"),
                           "--image_dir", str(raw / "images"), "--output_dir", str(out), "--no_progress"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = load_checkpoint(run / "best_model.pth")["postprocess_tuning"]
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    assert lines and all(r["mask_settings"]["threshold"] == tuned["threshold"] for r in lines)


def test_switched_off_and_done_after_a_crash_by_rerunning(tmp_path):
    """A run whose best_model.pth lacks the choice (the process died between the last epoch and
    the choice; here: trained with --no_tune_postprocessing) gets it from a rerun of the command."""
    folder, _ = make_shards(tmp_path / "data", n=24)
    args = ["--data_dir", str(folder), "--checkpoint_dir", str(tmp_path / "run"), "--epochs", "1", *TINY]
    off = run_train([*args, "--no_tune_postprocessing"])
    assert off.returncode == 0, off.stderr[-3000:]
    best = load_checkpoint(tmp_path / "run" / "best_model.pth")
    assert "postprocess_tuning" not in best and best["threshold"] == 0.5 and "chosen on" not in off.stdout
    again = run_train(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout and "chosen on" in again.stdout
    assert load_checkpoint(tmp_path / "run" / "best_model.pth")["postprocess_tuning"]["chosen_by"] == "seg train"
    third = run_train(args)  # chosen once: a further rerun changes nothing
    assert third.returncode == 0 and "chosen on" not in third.stdout


def test_an_unreadable_validation_image_leaves_the_threshold_and_says_how_to_choose_later(tmp_path):
    """Training is done when the choice fails: exit 0, best_model.pth untouched, the message names
    the sample and the command that makes the choice later."""
    from seg.data.shards import shard_urls
    from test_hardening import scramble_images

    folder, _ = make_shards(tmp_path / "data", n=24)
    args = ["--data_dir", str(folder), "--checkpoint_dir", str(tmp_path / "run"), "--epochs", "1", *TINY]
    assert run_train([*args, "--no_tune_postprocessing"]).returncode == 0
    scramble_images(Path(shard_urls(folder, "val")[0]), 1)
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    line = next((ln for ln in out.splitlines() if "threshold and post-processing not chosen" in ln), "")
    assert "val-000000.tar" in line and "seg evaluate --model_path" in line and "--tune_postprocessing" in line, out[-3000:]
    assert "postprocess_tuning" not in load_checkpoint(tmp_path / "run" / "best_model.pth")
