"""launch/submit.py (submitit) on the real local cluster: training completes and survives a
forced timeout (USR2 -> save -> requeue -> resume); prediction with map_array completes and
its afterok summary runs.

Needs the cluster from tools/slurm_cluster.sh (see tests/slurm_helpers.py for skip/fail).
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter

import pytest
from predict_fixtures import make_checkpoint, random_image, write_image
from slurm_helpers import ROOT, RUN_FILES, history_epochs, manifest_inputs, smoke_train_args, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def submit():
    """launch/submit.py imported as a module (launch/ is not a package)."""
    spec = importlib.util.spec_from_file_location("seg_launch_submit", ROOT / "launch" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_submitit_train_survives_a_forced_timeout(slurm_cluster, smoke_shards, tmp_path, submit, capsys):
    run_dir = tmp_path / "run"
    epochs = 10
    job = submit.submit_train(["--tasks_per_node", "2", "--time", "00:10:00", "--log_dir", str(tmp_path / "sub" / "%j"),
                               *smoke_train_args(smoke_shards, run_dir, f"train.epochs={epochs}")])
    printed = capsys.readouterr().out
    assert f"job {job.job_id}" in printed and str(job.paths.stdout) in printed
    wait_for(lambda: len(history_epochs(run_dir)) >= 2, 180, "two epochs in history.csv")
    job._interrupt(timeout=True)  # submitit's own test hook: USR2 to every task, as before a time limit
    results = job.results()  # waits; raises if a task failed
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["exit_code"] == 0 and r["restarts"] >= 1 for r in results), results
    log = job.stdout()
    assert "saved last/ and exited 75" in log and "SLURM_RESTART_COUNT=1" in log
    assert not [n for n in RUN_FILES if not (run_dir / n).exists()]
    assert history_epochs(run_dir) == list(range(1, epochs + 1))


def test_submitit_predict_map_array(slurm_cluster, tmp_path, submit, capsys):
    ckpt = make_checkpoint(tmp_path / "model.pth", image_size=32)
    cohort = sorted(str(write_image(tmp_path / "cohort" / f"{i:02d}.png", random_image(40, 40, seed=i)))
                    for i in range(9))
    out = tmp_path / "preds"
    jobs, summary = submit.submit_predict([
        "--parts", "3", "--time", "10", "--summarize", "--log_dir", str(tmp_path / "sub" / "%j"),
        "--model_path", str(ckpt), "--image_dir", str(tmp_path / "cohort"), "--output_dir", str(out),
        "--unit_size", "2", "--num_workers", "0", "--no_progress"])
    assert len(jobs) == 3
    assert "array job" in capsys.readouterr().out
    assert [job.result() for job in jobs] == [0, 0, 0]
    assert summary.result() == 0
    done = manifest_inputs(out)
    inputs = [p for _, p in done]
    assert sorted(inputs) == cohort and max(Counter(inputs).values()) == 1
    assert {w for w, _ in done} == {0, 1, 2}
    assert "5/5 units" in summary.stdout()
