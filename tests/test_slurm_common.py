"""slurm/common.sh without a cluster: one meaning of SEG_NPROC_PER_NODE and SEG_CPU for every
script, and the sbatch scripts finding their shared code from a copy outside the repository
(Slurm runs a spool copy). On the real cluster: tests/test_slurm_train.py, test_slurm_predict.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "slurm" / "common.sh"
PREDICT = ROOT / "slurm" / "predict.sbatch"


def _processes(cpu_default: int, **env: str) -> subprocess.CompletedProcess:
    script = (f'source "{COMMON}"; seg_processes {cpu_default}; '
              'echo "$SEG_KIND $SEG_NPROC ${SEG_LAUNCH[*]} cuda=${CUDA_VISIBLE_DEVICES-unset}"')
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SEG_", "SLURM_", "CUDA_VISIBLE"))}
    return subprocess.run(["bash", "-c", script], env={**base, **env}, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("env, expected", [
    ({}, "cpu 3 --cpu 3 cuda="),                                                  # no GPU: CPU default count
    ({"SLURM_GPUS_ON_NODE": ""}, "cpu 3 --cpu 3 cuda="),
    ({"SLURM_GPUS_ON_NODE": "4"}, "gpu 4 --nproc 4 cuda=unset"),                  # one process per GPU
    ({"SLURM_GPUS_ON_NODE": "4", "SEG_NPROC_PER_NODE": "2"}, "gpu 2 --nproc 2 cuda=unset"),  # count only
    ({"SEG_NPROC_PER_NODE": "2"}, "cpu 2 --cpu 2 cuda="),
    ({"SLURM_GPUS_ON_NODE": "4", "SEG_CPU": "1"}, "cpu 3 --cpu 3 cuda="),         # device only
    ({"SLURM_GPUS_ON_NODE": "4", "SEG_CPU": "1", "SEG_NPROC_PER_NODE": "5"}, "cpu 5 --cpu 5 cuda="),
    ({"SLURM_GPUS_ON_NODE": "4", "SEG_CPU": "0"}, "gpu 4 --nproc 4 cuda=unset"),
])
def test_process_count_and_device_have_one_meaning(env, expected):
    out = _processes(3, **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


@pytest.mark.parametrize("env, message", [
    ({"SEG_NPROC_PER_NODE": "0"}, "'0' (SEG_NPROC_PER_NODE) must be a positive integer"),
    ({"SEG_NPROC_PER_NODE": "two"}, "'two' (SEG_NPROC_PER_NODE) must be a positive integer"),
    ({"SEG_CPU": "yes"}, "SEG_CPU='yes' must be 1 (CPU) or 0"),
])
def test_bad_values_are_usage_errors(env, message):
    out = _processes(1, **env)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def _recorder(tmp_path: Path) -> Path:
    """A SEG_PYTHON that prints its arguments and whether GPUs are hidden, instead of running seg."""
    rec = tmp_path / "python-recorder"
    rec.write_text('#!/bin/bash\necho "ARGS $* CUDA=${CUDA_VISIBLE_DEVICES-unset}"\n')
    rec.chmod(0o755)
    return rec


def _predict_env(tmp_path: Path, **extra: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SEG_", "SLURM_", "CUDA_VISIBLE"))}
    return {**base, "SLURM_JOB_ID": "7", "SEG_PYTHON": str(_recorder(tmp_path)), **extra}


@pytest.mark.parametrize("extra, expected", [
    ({}, "ARGS -m seg.predict --output_dir o CUDA="),
    ({"SLURM_GPUS_ON_NODE": "1"}, "ARGS -m seg.predict --output_dir o CUDA=unset"),
    ({"SLURM_GPUS_ON_NODE": "1", "SEG_CPU": "1"}, "ARGS -m seg.predict --output_dir o CUDA="),
    ({"SLURM_ARRAY_TASK_ID": "17", "SEG_NUM_PARTS": "100"},
     "ARGS -m seg.predict --output_dir o --part 17 --num_parts 100 CUDA="),
])
def test_predict_sbatch_single_process(tmp_path, extra, expected):
    out = subprocess.run(["bash", str(PREDICT), "--output_dir", "o"], env=_predict_env(tmp_path, **extra),
                         cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == expected


def test_predict_sbatch_gpus_with_a_count_stay_on_gpu(tmp_path):
    env = _predict_env(tmp_path, SLURM_GPUS_ON_NODE="4", SEG_NPROC_PER_NODE="2")
    out = subprocess.run(["bash", str(PREDICT), "--output_dir", "o"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "2 process(es) (gpu)" in out.stdout
    last = out.stdout.strip().splitlines()[-1]  # launch/torchrun.sh --nproc 2: GPUs stay visible
    assert last.startswith("ARGS -m torch.distributed.run --standalone --nproc_per_node 2") and last.endswith("CUDA=unset")


def test_copied_script_finds_common_sh_through_seg_root_or_submission_folder(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"  # what slurmd runs: a copy outside the repository
    shutil.copy(PREDICT, copy)
    run = lambda cwd, **extra: subprocess.run(["bash", str(copy), "--output_dir", "o"],  # noqa: E731
                                              env=_predict_env(tmp_path, **extra), cwd=cwd,
                                              capture_output=True, text=True, timeout=30)
    lost = run(tmp_path)
    assert lost.returncode == 2 and "cannot find slurm/common.sh" in lost.stderr
    assert "export SEG_ROOT=/path/to/seg" in lost.stderr
    assert run(tmp_path, SEG_ROOT=str(ROOT)).returncode == 0
    assert run(tmp_path, SLURM_SUBMIT_DIR=str(ROOT)).returncode == 0
