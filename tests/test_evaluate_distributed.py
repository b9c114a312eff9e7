"""seg evaluate under torchrun (2 ranks, gloo on CPU): each image scored once, the same report as
one process, and an error on one rank stops both ranks with the file's name (no hang)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seg.evaluate import main
from test_evaluate import write_mask
from test_evaluate_model import tiny_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "seg.evaluate", *args, "--no_progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def masks(tmp_path: Path, n: int = 7) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for i in range(n):
        truth = rng.random((12, 10)) < (0.0 if i == 2 else 0.4)      # image 2: empty truth
        guess = truth ^ (rng.random((12, 10)) < 0.15 * i)            # image 0 exact, others noisier
        write_mask(gt / f"g{i // 3}" / f"m{i}.png", truth)
        write_mask(pred / f"g{i // 3}" / f"m{i}_mask.png", guess)
    return gt, pred


def test_two_ranks_equal_one_process_masks(tmp_path):
    gt, pred = masks(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["--pred_dir", str(pred), "--gt_dir", str(gt), "--output_dir", str(one), "--no_progress"]) == 0
    proc = torchrun("--pred_dir", str(pred), "--gt_dir", str(gt), "--output_dir", str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("evaluated 7 images") == 1          # rank 0 alone reports
    assert (two / "evaluation_report.json").read_text() == (one / "evaluation_report.json").read_text()
    assert (two / "evaluation_report.txt").read_text() == (one / "evaluation_report.txt").read_text()
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_two_ranks_equal_one_process_model(tmp_path):
    from seg.data.synthetic import make_demo_dataset
    from seg.data.sharding import prepare_dataset

    make_demo_dataset(tmp_path / "raw", n=7, size=40, seed=5)
    prepare_dataset(images=tmp_path / "raw" / "images", masks=tmp_path / "raw" / "masks", out=tmp_path / "shards",
                    val_split=0.6, shard_size=2, workers=1, progress=False)
    ckpt = tiny_checkpoint(tmp_path / "model.pth")
    args = ["--model_path", str(ckpt), "--data_dir", str(tmp_path / "shards"), "--precision", "fp32", "--device", "cpu"]
    assert main(args + ["--output_dir", str(tmp_path / "one"), "--no_progress"]) == 0
    proc = torchrun(*args, "--output_dir", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "evaluation_report.json").read_text())
    two = json.loads((tmp_path / "two" / "evaluation_report.json").read_text())
    assert two == one and "best_threshold" in two and two["n_images"] >= 2


def test_error_on_one_rank_stops_both(tmp_path):
    gt, pred = masks(tmp_path)
    bad = gt / "g0" / "m1.png"            # image index 1: scored by rank 1
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    proc = torchrun("--pred_dir", str(pred), "--gt_dir", str(gt), "--output_dir", str(tmp_path / "o"), timeout=180)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "rank 1" in proc.stderr
    assert not (tmp_path / "o" / "evaluation_report.json").exists()
