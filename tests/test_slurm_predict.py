"""slurm/predict.sbatch arrays on the real local cluster: the union of the tasks' outputs is the
cohort with no input done twice; the afterok summary step runs; a task cancelled midway and
resubmitted alone (SEG_NUM_PARTS) finishes its own part without redoing anything.

Needs the cluster from tools/slurm_cluster.sh (see tests/slurm_helpers.py for skip/fail).
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest
from predict_fixtures import make_checkpoint, random_image, write_image
from slurm_helpers import ROOT, manifest_inputs, sbatch, wait_for, wait_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
PREDICT = str(ROOT / "slurm" / "predict.sbatch")
SUMMARIZE = str(ROOT / "slurm" / "summarize.sbatch")


def _cohort(folder: Path, n: int, size: int) -> list[str]:
    paths = [write_image(folder / f"sub{i % 2}" / f"img{i:03d}.png", random_image(size, size, seed=i)) for i in range(n)]
    return sorted(str(p) for p in paths)


def _args(ckpt: Path, cohort: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_path", str(ckpt), "--image_dir", str(cohort), "--output_dir", str(out),
            "--num_workers", "0", "--writer_threads", "1", "--no_progress", *extra]


def test_array_union_is_the_cohort_and_summary_runs_after(slurm_cluster, tmp_path):
    env = slurm_cluster
    ckpt = make_checkpoint(tmp_path / "model.pth", image_size=32)
    cohort = _cohort(tmp_path / "cohort", 22, 48)
    out = tmp_path / "preds"
    array = sbatch(["--array=0-3", "--cpus-per-task=1", PREDICT,
                    *_args(ckpt, tmp_path / "cohort", out, "--unit_size", "2")], tmp_path, env)
    summary = sbatch([f"--dependency=afterok:{array}", SUMMARIZE, str(out)], tmp_path, env)
    states = wait_job(array, env, timeout=240, expect={f"{array}_{i}" for i in range(4)})
    assert states == {f"{array}_{i}": "COMPLETED" for i in range(4)}
    assert wait_job(summary, env, timeout=120) == {summary: "COMPLETED"}
    done = manifest_inputs(out)
    inputs = [path for _, path in done]
    assert sorted(inputs) == cohort, "the union of the array's outputs is not the cohort"
    assert not [p for p, n in Counter(inputs).items() if n > 1], "an input was predicted twice"
    assert {worker for worker, _ in done} == {0, 1, 2, 3}, "every array task took a part"
    masks = sorted(out.rglob("*_mask.png"))
    assert len(masks) == len(cohort)
    log = (tmp_path / "logs" / f"seg-summarize-{summary}.out").read_text()
    assert "11/11 units" in log and "22 images" in log, log


def test_cancelled_task_resubmitted_alone_redoes_only_its_part(slurm_cluster, tmp_path):
    env = slurm_cluster
    ckpt = make_checkpoint(tmp_path / "model.pth", image_size=32)
    cohort = _cohort(tmp_path / "cohort", 32, 128)
    out = tmp_path / "preds"
    # 32 units of one image, tiled (about 0.5 s each, 8 per task): slow enough to cancel task 2
    # midway (it is cancelled as soon as its first unit is recorded).
    args = _args(ckpt, tmp_path / "cohort", out, "--unit_size", "1", "--tile_size", "32", "--precision", "fp32")
    array = sbatch(["--array=0-3", "--cpus-per-task=1", PREDICT, *args], tmp_path, env)
    wait_for(lambda: any(w == 2 for w, _ in manifest_inputs(out)), 180, "task 2's first finished unit", 0.1)
    subprocess.run(["scancel", f"{array}_2"], env=env, check=True)
    states = wait_job(array, env, timeout=240, expect={f"{array}_{i}" for i in range(4)})
    assert states[f"{array}_2"] == "CANCELLED"
    assert all(states[f"{array}_{i}"] == "COMPLETED" for i in (0, 1, 3)), states
    before = manifest_inputs(out)
    part2 = [p for i, p in enumerate(cohort) if i % 4 == 2]  # unit i -> worker i mod 4 (units sorted)
    done2 = [p for w, p in before if w == 2]
    assert 1 <= len(done2) < len(part2), (
        f"task 2 was not cancelled midway ({len(done2)}/{len(part2)} done): if prediction got much faster, "
        "make the units slower (bigger images)")

    rerun = sbatch(["--array=2", "--export=ALL,SEG_NUM_PARTS=4", "--cpus-per-task=1", PREDICT, *args], tmp_path, env)
    assert wait_job(rerun, env, timeout=240, expect={f"{rerun}_2"}) == {f"{rerun}_2": "COMPLETED"}
    after = manifest_inputs(out)
    new = after[len(before):]
    assert after[:len(before)] == before
    assert sorted(p for _, p in new) == sorted(set(part2) - set(done2)), "the rerun did more or less than task 2's rest"
    assert {w for w, _ in new} == {2}
    inputs = [p for _, p in after]
    assert sorted(inputs) == cohort and len(set(inputs)) == len(inputs)
