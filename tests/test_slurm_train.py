"""slurm/train.sbatch on the real local cluster: 1 node x 2 processes, 2 nodes x 2 processes,
and preemption (USR1 to the batch shell) -> save -> requeue -> resume -> complete.

Needs the cluster from tools/slurm_cluster.sh (see tests/slurm_helpers.py for skip/fail).
"""

from __future__ import annotations

import pytest
from slurm_helpers import ROOT, RUN_FILES, history_epochs, node_count, sbatch, smoke_train_args, wait_for, wait_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
TRAIN = str(ROOT / "slurm" / "train.sbatch")


def _log(tmp_path, job: str) -> str:
    return (tmp_path / "logs" / f"seg-train-{job}.out").read_text()


def _assert_run_complete(run_dir, epochs: int) -> None:
    missing = [name for name in RUN_FILES if not (run_dir / name).exists()]
    assert not missing, f"run folder {run_dir} lacks {missing}"
    assert history_epochs(run_dir) == list(range(1, epochs + 1))


@pytest.mark.parametrize("nodes", [1, 2])
def test_train_sbatch_completes(slurm_cluster, smoke_shards, tmp_path, nodes):
    env = slurm_cluster
    if node_count(env) < nodes:
        pytest.skip(f"the running cluster has fewer than {nodes} nodes (restart it with --nodes 2)")
    run_dir = tmp_path / "run"
    job = sbatch(["--nodes", str(nodes), "--cpus-per-task", "2", "--time", "10", TRAIN,
                  *smoke_train_args(smoke_shards, run_dir)], tmp_path, env)
    states = wait_job(job, env, timeout=240)
    log = _log(tmp_path, job)
    assert states == {job: "COMPLETED"}, log
    world = 2 * nodes
    assert f"= world size {world}" in log
    assert f"seg train: {world} process(es)" in log  # the trainer's own view of the world size
    assert "requeueing" not in log
    assert "\r" not in log and "epoch 2/2: " in log and " batch (100%)" in log  # progress lines, no bar frames
    _assert_run_complete(run_dir, epochs=2)


def test_train_sbatch_preemption_requeues_and_resumes(slurm_cluster, smoke_shards, tmp_path):
    env = slurm_cluster
    run_dir = tmp_path / "run"
    epochs = 12
    job = sbatch(["--cpus-per-task", "2", "--time", "10", TRAIN,
                  *smoke_train_args(smoke_shards, run_dir, f"train.epochs={epochs}")], tmp_path, env)
    wait_for(lambda: len(history_epochs(run_dir)) >= 2, 180, "two epochs in history.csv")
    import subprocess

    subprocess.run(["scancel", "-b", "-s", "USR1", job], env=env, check=True)
    states = wait_job(job, env, timeout=300)
    log = _log(tmp_path, job)
    assert states == {job: "COMPLETED"}, log
    assert "got SIGUSR1" in log and f"requeueing job {job}" in log, log
    assert "worker exit codes: 75" in log
    assert "SLURM_RESTART_COUNT=1" in log
    assert "resuming" in log  # the requeued job continued from last/
    _assert_run_complete(run_dir, epochs=epochs)  # every epoch exactly once


def test_train_sbatch_failure_is_not_requeued(slurm_cluster, tmp_path):
    env = slurm_cluster
    job = sbatch(["--cpus-per-task", "2", "--time", "5", TRAIN,
                  *smoke_train_args(tmp_path / "no-shards", tmp_path / "run")], tmp_path, env)
    states = wait_job(job, env, timeout=180)
    log = _log(tmp_path, job)
    assert states == {job: "FAILED"}, log
    assert "worker exit codes: 2" in log and "not requeueing" in log
    assert "SLURM_RESTART_COUNT=1" not in log
