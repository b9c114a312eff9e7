"""seg train in one process: run folder, resume, checkpoints, errors, and its building blocks.

Tiny U-Nets (base width 4) on 32 px crops of a few dozen synthetic images; the end-to-end
runs start `python -m seg.train` as a subprocess (with a timeout), as a user would.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from seg.data.synthetic import make_demo_dataset
from seg.data.sharding import prepare_dataset
from seg.metrics import METRIC_NAMES
from seg.training import history, loaders, state

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--image_size", "32", "--batch_size", "4", "model.base_channels=4", "data.num_workers=1"]


def make_shards(root: Path, n: int = 40, size: int = 64, shard_size: int = 4) -> tuple[Path, dict]:
    """Demo images -> shards with an odd number of validation samples; returns (folder, dataset.json)."""
    raw = make_demo_dataset(root / "raw", n=n, size=size, seed=0)
    for split in (0.25, 0.27, 0.3, 0.33, 0.2, 0.22):
        out = root / f"shards{int(split * 100)}"
        info = prepare_dataset(raw / "images", raw / "masks", out=out, val_split=split, shard_size=shard_size,
                               workers=0, progress=False)
        if info["splits"]["val"]["count"] % 2 == 1:
            return out, info
    raise AssertionError("no val_split gave an odd validation set")


def run_train(args: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "seg.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    return make_shards(tmp_path_factory.mktemp("train_data"))


# ---- building blocks ------------------------------------------------------------------------

def test_steps_per_epoch_covers_the_training_set():
    assert loaders.steps_per_epoch(22, 4, 1, 1) == 6  # ceil(22 / 4)
    assert loaders.steps_per_epoch(22, 4, 2, 1) == 3
    assert loaders.steps_per_epoch(22, 4, 2, 2) == 2
    assert loaders.steps_per_epoch(3, 8, 4, 1) == 1
    assert loaders.steps_per_epoch(1000, 4, 1, 1, cap=5) == 5


def test_last_batch_holds_the_rest_of_the_training_set():
    assert loaders.last_batch_size(18, 4, 1, 1, loaders.steps_per_epoch(18, 4, 1, 1)) == 2  # 4+4+4+4+2
    assert loaders.last_batch_size(16, 4, 1, 1, 4) == 4
    assert loaders.last_batch_size(22, 4, 2, 1, 3) == 3  # 8+8, then 6 over 2 ranks
    assert loaders.last_batch_size(17, 4, 2, 1, 3) == 1  # 1 left: at least one image per rank
    assert loaders.last_batch_size(18, 4, 1, 4, 2) == 4  # the remainder is not in the last micro-batch
    assert loaders.last_batch_size(1000, 4, 1, 1, 5) == 4  # capped epoch


def test_same_checkpoint_under_several_names_is_written_once(tmp_path):
    from seg.training.checkpoints import write_linked

    (tmp_path / "final_model.pth").write_bytes(b"old")
    write_linked(tmp_path, ["best_model.pth", "checkpoint_epoch_2.pth", "final_model.pth"], b"weights")
    files = [tmp_path / n for n in ("best_model.pth", "checkpoint_epoch_2.pth", "final_model.pth")]
    assert [f.read_bytes() for f in files] == [b"weights"] * 3
    assert len({f.stat().st_ino for f in files}) == 1 and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f.name for f in files)  # hard links, no temporaries left
    write_linked(tmp_path, ["best_model.pth"], b"better")  # an atomic replace of one name
    assert [f.read_bytes() for f in files] == [b"better", b"weights", b"weights"]


def test_history_roundtrip_drops_epochs_that_will_run_again(tmp_path):
    report = {"global": {m: 0.5 for m in METRIC_NAMES}, "mean": {"dice": 0.4}}
    rows = [history.epoch_row(e, 1.0 / e, 0.9, report, 1e-3, 3.0, 10, 2.0, 0.5) for e in (1, 2, 3)]
    history.write_history(tmp_path, rows)
    back = history.read_history(tmp_path, before_epoch=2)
    assert [r["epoch"] for r in back] == [1, 2]
    assert back[1]["train_loss"] == pytest.approx(0.5) and back[0]["images_per_s"] == pytest.approx(5.0)
    with open(tmp_path / "history.csv") as fh:
        assert tuple(next(csv.reader(fh))) == history.COLUMNS


def test_preemption_flag_only_records_the_signal():
    flag = state.PreemptionFlag().install()
    try:
        assert not flag.is_set
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.is_set and flag.signum == signal.SIGUSR1
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert state.PREEMPTED_EXIT_CODE == 75


def test_rng_record_roundtrip_is_weights_only(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    record = state.rng_record()
    torch.save(record, tmp_path / "rng.pth")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    state.set_rng_record(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_pickled_object_checkpoint_is_refused(tmp_path):
    import argparse

    path = tmp_path / "evil.pth"  # any object that needs code to unpickle
    torch.save({"format": "seg-model", "state_dict": {}, "payload": argparse.Namespace(x=1)}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


# ---- errors before training -----------------------------------------------------------------

def test_raw_folder_gets_the_prepare_command(tmp_path):
    raw = make_demo_dataset(tmp_path / "raw", n=2, size=32)
    proc = run_train(["--data_dir", str(raw), "--checkpoint_dir", str(tmp_path / "run")], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "seg prepare --images" in proc.stderr and str(raw / "images") in proc.stderr


def test_tensorboard_without_the_package_is_a_clear_error(shards, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    folder, _ = shards
    proc = run_train(["--data_dir", str(folder), "--checkpoint_dir", str(tmp_path / "run"), *TINY,
                      "--log_with", "tensorboard"], timeout=120)
    assert proc.returncode == 2 and "pip install tensorboard" in proc.stderr, proc.stderr[-2000:]


def test_too_few_shards_for_workers_fails_before_training(shards, tmp_path):
    folder, info = shards
    n = len(info["splits"]["train"]["shards"])
    proc = run_train(["--data_dir", str(folder), "--checkpoint_dir", str(tmp_path / "run"), *TINY,
                      f"data.num_workers={n + 1}"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{n} training shard(s)" in proc.stderr and f"{n + 1} readers" in proc.stderr
    assert "--shard_size" in proc.stderr and "--num_workers" in proc.stderr
    assert not (tmp_path / "run" / "history.csv").exists()


# ---- end to end -------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_epochs_write_the_run_folder_then_resume_and_restart(shards, tmp_path):
    folder, info = shards
    run = tmp_path / "run"
    args = ["--data_dir", str(folder), "--checkpoint_dir", str(run), "--epochs", "2", "--save_every", "1",
            "--scheduler", "cosine", *TINY]
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.yaml", "history.csv", "best_model.pth", "final_model.pth", "checkpoint_epoch_1.pth",
                 "checkpoint_epoch_2.pth", "training_history.png", "sample_predictions.png", "provenance.json",
                 "last/state.pth", "last/progress.json"):
        assert (run / name).is_file(), name
    for png in ("training_history.png", "sample_predictions.png"):
        assert (run / png).read_bytes()[:8] == PNG_MAGIC
    rows = history.read_history(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    import yaml

    ema = yaml.safe_load((run / "config.yaml").read_text())["train"]["ema_decay"] > 0
    expected = set(history.COLUMNS) if ema else set(history.COLUMNS) - set(history.RAW_COLUMNS)
    assert all(set(r) == expected for r in rows)
    assert rows[1]["lr"] < rows[0]["lr"]  # cosine schedule stepped
    assert "epoch 2/2" in proc.stdout and "dice" in proc.stdout

    ckpt = torch.load(run / "final_model.pth", weights_only=True)
    assert ckpt["preprocess"] == {"image_size": 32, "in_channels": 3, "mean": ckpt["preprocess"]["mean"],
                                  "std": ckpt["preprocess"]["std"], "sampling": "resize"}
    assert ckpt["epoch"] == 2 and ckpt["model"]["base_channels"] == 4
    assert ckpt["provenance"]["world_size"] == 1 and len(ckpt["provenance"]["dataset_json_sha256"]) == 64
    assert ckpt["config"]["train"]["epochs"] == 2
    assert ckpt["qc_reference"] == info["qc_reference"] and ckpt["qc_reference"]["count"] > 0  # for prediction QC
    torch.load(run / "last" / "state.pth", weights_only=True)  # resumable state is weights_only too

    mtime = (run / "history.csv").stat().st_mtime_ns
    again = run_train(args)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert (run / "history.csv").stat().st_mtime_ns == mtime

    fresh = run_train([*args, "--no_resume", "--epochs", "1"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert [r["epoch"] for r in history.read_history(run)] == [1]


@pytest.mark.parametrize("select_on", ["val_loss", "dice", "both"])
def test_best_model_is_the_epoch_train_select_on_picks(shards, tmp_path, select_on):
    folder, _ = shards
    run = tmp_path / "run"
    args = ["--data_dir", str(folder), "--checkpoint_dir", str(run), "--epochs", "4", *TINY,
            "train.max_steps_per_epoch=3", "train.save_every=2", "train.lr=0.01", f"train.select_on={select_on}"]
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = history.read_history(run)
    lowest = min(rows, key=lambda r: r["val_loss"])["epoch"]
    highest = max(rows, key=lambda r: r["dice"])["epoch"]  # the first of equal values, as in training
    best = torch.load(run / "best_model.pth", weights_only=True)
    progress = json.loads((run / "last" / "progress.json").read_text())
    assert (progress["best_epoch"], progress["best_loss_epoch"]) == (highest, lowest)
    assert "postprocess_tuning" in best
    if select_on != "both":
        assert best["epoch"] == (lowest if select_on == "val_loss" else highest)
        assert not (run / "best_loss_model.pth").exists() and "selection" not in best
        return
    assert torch.load(run / "best_loss_model.pth", weights_only=True)["epoch"] == lowest
    if lowest == highest:
        assert best["epoch"] == highest and "selection" not in best
    # Two candidates of other epochs, as a crash before the end-of-training choice leaves them: the
    # rerun of the finished run chooses, and keeps the one with the higher full-size validation Dice.
    save_checkpoint(torch.load(run / "checkpoint_epoch_4.pth", weights_only=True), run / "best_model.pth")
    save_checkpoint(torch.load(run / "checkpoint_epoch_2.pth", weights_only=True), run / "best_loss_model.pth")
    again = run_train(args)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-3000:]
    best = torch.load(run / "best_model.pth", weights_only=True)
    selection = best["selection"]
    assert [(c["file"], c["epoch"]) for c in selection["candidates"]] == [
        ("best_model.pth", 4), ("best_loss_model.pth", 2)]
    kept = max(selection["candidates"], key=lambda c: c["dice"])  # a tie keeps best_model.pth
    assert selection["kept"] == kept["file"] and best["epoch"] == kept["epoch"]
    assert best["postprocess_tuning"]["dice"] == kept["dice"] and f"kept {kept['file']}" in again.stdout


@pytest.mark.parametrize("recipe", [
    # constant lr after the warm-up: a cosine's course depends on --epochs, which the resume raises
    ["train.ema_decay=0.9", "train.warmup_epochs=0.5", "train.scheduler=none", "train.optimizer=adamw",
     "model.norm=group", "data.augmentation=strong"],
    ["train.ema_decay=0.9", "train.ema_bn_batches=2", "train.warmup_epochs=0.5", "train.scheduler=none",
     "model.norm=batch", "train.dice_reduction=image"],
    ["train.ema_decay=0", "train.warmup_epochs=0", "train.scheduler=plateau", "train.optimizer=adam",
     "model.norm=batch", "data.augmentation=standard", "train.dice_reduction=batch"]],
    ids=["group-ema", "batchnorm-ema-recalibrated", "old-defaults"])
def test_recipe_options_train_and_resume_to_the_same_weights(shards, tmp_path, recipe):
    """1 epoch then --epochs 2 (resumed from last/: weight average, per-step schedule, optimizer)
    ends with the weights of an uninterrupted 2-epoch run; the saved model is the average."""
    folder, _ = shards
    common = ["--data_dir", str(folder), *TINY, "--deterministic", "train.save_every=0",
              "train.max_steps_per_epoch=3", *recipe]
    straight = run_train([*common, "--checkpoint_dir", str(tmp_path / "a"), "--epochs", "2"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert run_train([*common, "--checkpoint_dir", str(tmp_path / "b"), "--epochs", "1"]).returncode == 0
    resumed = run_train([*common, "--checkpoint_dir", str(tmp_path / "b"), "--epochs", "2"])
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "a" / "final_model.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "final_model.pth", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["model"]["norm"] == ("group" if "model.norm=group" in recipe else "batch")
    assert a["config"]["train"]["ema_decay"] == (0.9 if "train.ema_decay=0.9" in recipe else 0.0)
    rows = history.read_history(tmp_path / "a")
    state_dict = torch.load(tmp_path / "a" / "last" / "state.pth", weights_only=True)
    if "train.ema_decay=0.9" in recipe:
        assert all("raw_dice" in r for r in rows)
        assert state_dict["ema"]["updates"] == 6
        ema = state_dict["ema"]["module"]  # the saved model is the average, not the raw weights
        assert all(torch.equal(ema[k], a["state_dict"][k]) for k in ema if ema[k].is_floating_point())
        if "model.norm=batch" in recipe:  # recalibrated: 2 batches of 4 counted
            assert int(ema["inc.block.1.num_batches_tracked"]) == 2
        assert not all(torch.equal(state_dict["model"][k], a["state_dict"][k]) for k in ema)
    else:
        assert not any("raw_dice" in r for r in rows) and state_dict["ema"] is None


@pytest.mark.slow
def test_raising_epochs_continues_a_finished_run(shards, tmp_path):
    folder, _ = shards
    run = tmp_path / "run"
    base = ["--data_dir", str(folder), "--checkpoint_dir", str(run), *TINY, "train.max_steps_per_epoch=2",
            "train.grad_accum=2", "--scheduler"]
    assert run_train([*base, "--epochs", "1"]).returncode == 0
    proc = run_train([*base, "--epochs", "2"])
    assert proc.returncode == 0 and "resuming" in proc.stdout, proc.stderr[-2000:]
    assert [r["epoch"] for r in history.read_history(run)] == [1, 2]


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_saves_and_exits_75(shards, tmp_path):
    """Slurm and `timeout` signal every process of the job, DataLoader workers included: the
    workers must not die (that would crash the step); the main process saves last/ and exits 75."""
    import re
    import threading
    import time

    folder, _ = shards
    run = tmp_path / "run"
    args = ["--data_dir", str(folder), "--checkpoint_dir", str(run), "--image_size", "64", "--batch_size", "1",
            "--epochs", "2", "model.base_channels=4", "data.num_workers=2"]
    proc = subprocess.Popen([sys.executable, "-m", "seg.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "SEG_PROGRESS_INTERVAL": "0"})
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"epoch 1/2: [1-9]\d*/\d+ batch", "".join(err)):  # a progress line per step
            assert time.monotonic() < deadline and proc.poll() is None, "".join(err)[-3000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == state.PREEMPTED_EXIT_CODE, "".join(err)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    assert "Traceback" not in "".join(err)
    assert json.loads((run / "last" / "progress.json").read_text())["preempted"]
    again = run_train(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["epoch"] for r in history.read_history(run)] == [1, 2]
