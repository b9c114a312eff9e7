"""seg train with several processes (gloo on CPU): launchers, exact validation, preemption.

Every process is started with a timeout; each test takes its own free port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from seg.training import history
from test_train import TINY, make_shards, run_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SEG_PROGRESS_INTERVAL": "0"}  # progress lines per step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("dist_data"))


def train_args(folder: Path, run: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(folder), "--checkpoint_dir", str(run), *TINY, *extra]


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def test_torchrun_two_processes(shards, tmp_path):
    folder, _ = shards
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "seg.train",
           *train_args(folder, tmp_path / "run", "--epochs", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    check(proc)
    assert "2 process(es)" in proc.stdout and "backend gloo" in proc.stdout
    assert [r["epoch"] for r in history.read_history(tmp_path / "run")] == [1, 2]
    assert torch.load(tmp_path / "run" / "final_model.pth", weights_only=True)["provenance"]["world_size"] == 2
    # the post-processing was chosen on every validation image, gathered from both ranks, once
    tuned = torch.load(tmp_path / "run" / "best_model.pth", weights_only=True)["postprocess_tuning"]
    assert tuned["n_images"] == shards[1]["splits"]["val"]["count"] and proc.stdout.count("validation images at full size (per-image") == 1


def test_accelerate_launch_two_cpu_processes(shards, tmp_path):
    """`--multi_gpu` is Accelerate's torchrun-based launcher; without GPUs it runs CPU processes over
    gloo. (`accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is used.)"""
    folder, _ = shards
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "seg.train", *train_args(folder, tmp_path / "run", "--epochs", "1")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    check(proc)
    assert "2 process(es)" in proc.stdout and "backend gloo" in proc.stdout
    assert (tmp_path / "run" / "final_model.pth").is_file()


def test_two_simulated_nodes_with_c10d_rendezvous(shards, tmp_path):
    folder, _ = shards
    port = free_port()
    procs = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t2n",
                               "-m", "seg.train", *train_args(folder, tmp_path / "run", "--epochs", "1")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert any("2 process(es)" in out for out, _ in outs)
    assert (tmp_path / "run" / "final_model.pth").is_file()


def test_too_few_shards_fails_fast_on_every_rank(shards, tmp_path):
    folder, info = shards
    n = len(info["splits"]["train"]["shards"])
    workers = n // 2 + 1  # 2 ranks x workers > n
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "seg.train",
           *train_args(folder, tmp_path / "run", f"data.num_workers={workers}")]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode != 0
    assert f"{n} training shard(s) for 2 rank(s) x {workers} worker(s)" in proc.stderr
    assert "--shard_size" in proc.stderr
    assert time.monotonic() - start < 100


def test_validation_is_exact_on_two_ranks_with_an_odd_set(shards, tmp_path):
    folder, info = shards
    n_val = info["splits"]["val"]["count"]
    assert n_val % 2 == 1
    check(run_train(train_args(folder, tmp_path / "run", "--epochs", "1", "train.max_steps_per_epoch=2")))
    model = tmp_path / "run" / "final_model.pth"
    one = run_train(train_args(folder, tmp_path / "v1", "--validate_only", str(model), "--mixed_precision", "no"))
    check(one)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "seg.train",
           *train_args(folder, tmp_path / "v2", "--validate_only", str(model), "--mixed_precision", "no")]
    check(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV))
    r1, r2 = (json.loads((tmp_path / v / "validation.json").read_text()) for v in ("v1", "v2"))
    assert r1["n_images"] == r2["n_images"] == n_val
    assert r1["global"] == r2["global"]
    assert r1["mean"] == r2["mean"]
    assert r1["val_loss"] == pytest.approx(r2["val_loss"], rel=1e-6)


# ---- preemption -------------------------------------------------------------------------------

def launch_ranks(args: list[str], port: int) -> list[subprocess.Popen]:
    """Two ranks started directly with the torchrun environment, so each exit code is visible."""
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "seg.train", *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


class StreamReader(threading.Thread):
    """Collect a pipe's text in the background, one character at a time."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.text = pipe, ""

    def run(self):
        while chunk := self.pipe.read(1):
            self.text += chunk


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_sigusr1_mid_epoch_saves_exits_75_and_resumes_to_identical_weights(shards, tmp_path):
    folder, _ = shards
    epochs = "3"
    common = ["--data_dir", str(folder), "--image_size", "64", "--batch_size", "1", "--epochs", epochs,
              "model.base_channels=4", "data.num_workers=1", "--deterministic", "train.save_every=0"]
    # uninterrupted reference
    ref = launch_ranks([*common, "--checkpoint_dir", str(tmp_path / "ref")], free_port())
    assert finish(ref) == [0, 0], ref[0].stderr.read()[-3000:]

    run = tmp_path / "run"
    args = [*common, "--checkpoint_dir", str(run)]
    procs = launch_ranks(args, free_port())
    reader = StreamReader(procs[0].stderr)
    reader.start()
    deadline = time.monotonic() + 200
    pattern = re.compile(rf"epoch 2/{epochs}: ([1-9]\d*)/(\d+) batch")  # SEG_PROGRESS_INTERVAL=0: a line per step
    while not pattern.search(reader.text):
        assert time.monotonic() < deadline and procs[0].poll() is None, reader.text[-3000:]
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGUSR1)  # one rank only: the ranks agree through the all-reduce
    assert finish(procs) == [75, 75], reader.text[-3000:]
    progress = json.loads((run / "last" / "progress.json").read_text())
    assert progress["preempted"] and progress["epoch"] == 1 and progress["step"] > 0
    assert [r["epoch"] for r in history.read_history(run)] == [1]

    resumed = launch_ranks(args, free_port())
    assert finish(resumed) == [0, 0], resumed[0].stderr.read()[-3000:]
    assert [r["epoch"] for r in history.read_history(run)] == [1, 2, 3]
    a = torch.load(tmp_path / "ref" / "final_model.pth", weights_only=True)["state_dict"]
    b = torch.load(run / "final_model.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
