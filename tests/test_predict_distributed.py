"""`seg predict` across processes: two torchrun ranks, a simulated 3-task Slurm array, and a
SIGKILL mid-run followed by a rerun (exactly one complete output per input), then a refused
rerun with another checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from predict_fixtures import make_checkpoint, random_image, write_image
from seg.fileio import is_temporary
from seg.inference.manifest import read_lines, read_manifest, summarize

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
REPO = Path(__file__).resolve().parents[1]


def make_inputs(root: Path, n: int, size: int = 24) -> set[str]:
    for i in range(n):
        write_image(root / f"d{i % 3}" / f"img{i:04d}.png", random_image(size, size + i % 5, seed=i))
    return {f"d{i % 3}/img{i:04d}" for i in range(n)}


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{k: str(v) for k, v in extra.items()})
    return e


def predict_cmd(ckpt: Path, inputs: Path, out: Path, *extra) -> list[str]:
    return ["-m", "seg.predict", "--model_path", str(ckpt), "--image_dir", str(inputs), "--output_dir", str(out),
            "--no_progress", *map(str, extra)]


def outputs(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out).with_suffix(""))[: -len("_mask")] for p in out.rglob("*_mask.png"))


def check_exactly_once(out: Path, expected: set[str], num_workers: int) -> None:
    """Union of outputs = inputs, no input in two units, each unit done by worker index mod W."""
    assert outputs(out) == sorted(expected)
    lines = read_lines(out / "manifest.jsonl")
    assert len(lines) == len({r["unit"] for r in lines}), "a unit was recorded twice"
    inputs = [i["input"] for r in lines for i in r["images"]]
    assert len(inputs) == len(set(inputs)) == len(expected)
    for r in lines:
        assert r["worker"] == r["index"] % num_workers and r["num_workers"] == num_workers
    for name in outputs(out):
        assert cv2.imread(str(out / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED) is not None
    assert not [p for p in out.rglob("*") if is_temporary(p)]
    assert summarize(out)["problems"] == []


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "model.pth", image_size=32)


def test_two_torchrun_ranks_split_the_cohort(tmp_path, ckpt):
    expected = make_inputs(tmp_path / "in", 14)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *predict_cmd(ckpt, tmp_path / "in", out, "--unit_size", 3, "--num_workers", 0)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_exactly_once(out, expected, 2)
    assert {r["worker"] for r in read_manifest(out).values()} == {0, 1}


def test_three_task_array_split_the_cohort(tmp_path, ckpt):
    expected = make_inputs(tmp_path / "in", 13)
    out = tmp_path / "out"
    for task in range(3):
        proc = subprocess.run([sys.executable, *predict_cmd(ckpt, tmp_path / "in", out, "--unit_size", 2,
                                                            "--num_workers", 0)],
                              env=env(SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_TASK_COUNT=3),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        done = read_manifest(out)
        assert {r["worker"] for r in done.values()} == set(range(task + 1))  # only this task's units were added
        assert sorted(r["index"] for r in done.values() if r["worker"] == task) == list(range(task, 7, 3))
    check_exactly_once(out, expected, 3)


def test_sigkill_mid_run_then_rerun_gives_exactly_one_output_each(tmp_path, ckpt):
    expected = make_inputs(tmp_path / "in", 240, size=20)
    out = tmp_path / "out"
    cmd = [sys.executable, *predict_cmd(ckpt, tmp_path / "in", out, "--unit_size", 6, "--num_workers", 1,
                                        "--batch_size", 2, "--writer_threads", 1, "--save_overlay")]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(read_lines(out / "manifest.jsonl")) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_with = len(read_manifest(out))
    assert 3 <= killed_with < 40, f"the kill did not land mid-run ({killed_with} of 40 units finished)"
    # every finished unit's files exist; unfinished ones may be partly written
    assert summarize(out)["missing_units"] and not [p for p in summarize(out)["problems"] if "missing" in p and "listed" in p]
    rerun = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{killed_with} already finished" in rerun.stdout
    check_exactly_once(out, expected, 1)
    overlays = sorted(str(p.relative_to(out))[: -len("_overlay.png")] for p in out.rglob("*_overlay.png"))
    assert overlays == sorted(expected)
    # the same folder with another checkpoint is refused
    other = make_checkpoint(tmp_path / "other.pth", seed=5, image_size=32)
    cmd[cmd.index(str(ckpt))] = str(other)
    refused = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "never mixes models" in refused.stderr
