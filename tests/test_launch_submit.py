"""launch/submit.py without a cluster: the sbatch text of every submission kind (golden files),
one argument parser shared with `seg train`, and usage errors that submit nothing.

submitit writes the sbatch script and hands it to ``sbatch``; here ``sbatch`` is a stand-in on
PATH that checks the script is valid bash and answers as Slurm does ("Submitted batch job N"),
and ``srun`` exists so that submitit picks its Slurm executor. Everything else is the real
launcher: the script submitit wrote is kept in the job folder (``<id>_submission.sh``) and
compared, paths and interpreter normalised, with tests/golden/submitit/. The same launcher on a
real cluster is tests/test_slurm_submitit.py.

After an intended change of the generated text, rewrite the golden files with
``SEG_UPDATE_GOLDEN=1 pytest tests/test_launch_submit.py`` and review the diff.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "submitit"
SMOKE = str(ROOT / "configs" / "cpu-smoke.yaml")

SBATCH = """#!/bin/bash
# stand-in for sbatch: the script must be valid bash; answers with the next job id
bash -n "$1" || exit 1
n=$(( $(cat "$SEG_TEST_JOB_COUNTER" 2>/dev/null || echo 100) + 1 ))
echo "$n" > "$SEG_TEST_JOB_COUNTER"
echo "Submitted batch job $n"
"""


@pytest.fixture
def submit_cli(tmp_path):
    """Run launch/submit.py with the stand-in sbatch; returns (run, log folder)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(os.environ, SEG_TEST_JOB_COUNTER=str(tmp_path / "counter"),
               PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    logs = tmp_path / "logs"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), *args],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    return run, logs


def _normalised(path: Path, tmp_path: Path) -> str:
    text = path.read_text()
    return text.replace(shlex.quote(sys.executable), "<PYTHON>").replace(str(tmp_path), "<TMP>")


def _check_golden(name: str, text: str) -> None:
    golden = GOLDEN / name
    if os.environ.get("SEG_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"{golden} is missing: run SEG_UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == golden.read_text(), (
        f"the generated sbatch text differs from {golden}:\n{text}\n"
        f"if the change is intended: SEG_UPDATE_GOLDEN=1 pytest {__file__}")


def _flags(text: str) -> dict[str, str]:
    return dict(line[len("#SBATCH --"):].partition("=")[::2] for line in text.splitlines()
                if line.startswith("#SBATCH --"))


@pytest.mark.timeout(180)
def test_train_sbatch_golden(submit_cli, tmp_path):
    run, logs = submit_cli
    # dotted overrides between flags, as `seg train` accepts them
    out = run("train", "--nodes", "2", "--gpus_per_node", "4", "--partition", "gpu", "--account", "A",
              "--qos", "Q", "--constraint", "a100", "--mem_gb", "64", "--time", "1-12", "--log_dir",
              str(logs / "%j"), "--config", SMOKE, "train.lr=1e-3", "--seed", "2", "train.epochs=3")
    assert out.returncode == 0, out.stderr
    assert "job 101" in out.stdout
    text = _normalised(logs / "101" / "101_submission.sh", tmp_path)
    _check_golden("train.sbatch", text)
    flags = _flags(text)
    assert flags["account"] == "A" and flags["qos"] == "Q" and flags["time"] == str(36 * 60)
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "4" and flags["gpus-per-node"] == "4"


@pytest.mark.timeout(180)
def test_predict_and_summarize_sbatch_golden(submit_cli, tmp_path):
    run, logs = submit_cli
    out = run("predict", "--parts", "3", "--parallel", "2", "--gpus_per_node", "1", "--summarize",
              "--partition", "gpu", "--account", "A", "--qos", "Q", "--time", "02:30:00", "--log_dir",
              str(logs / "%j"), "--model_path", "m.pth", "--image_dir", "cohort", "--output_dir", "preds")
    assert out.returncode == 0, out.stderr
    assert "array job 101 with 3 task(s)" in out.stdout and "summary (afterok): job 102" in out.stdout
    array = _normalised(logs / "101" / "101_submission.sh", tmp_path)
    summary = _normalised(logs / "102" / "102_submission.sh", tmp_path)
    _check_golden("predict.sbatch", array)
    _check_golden("predict-summarize.sbatch", summary)
    for text in (array, summary):  # every Slurm flag in every job, the afterok one included
        flags = _flags(text)
        assert (flags["account"], flags["qos"], flags["partition"], flags["time"]) == ("A", "Q", "gpu", "150")
    assert _flags(array)["array"] == "0-2%2" and "dependency" not in _flags(array)
    summary_flags = _flags(summary)
    assert summary_flags["dependency"] == "afterok:101"
    assert "gpus-per-node" not in summary_flags and summary_flags["cpus-per-task"] == "1"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("train_args", [
    ["--config", SMOKE, "train.lr=1e-3", "--seed", "2", "train.epochs=3"],  # overrides between flags
    ["train.epochs=3", "--config", SMOKE, "--no_resume", "model.base_channels=4"],
    ["--config", SMOKE, "--seed", "x"],                           # argparse error
    ["--config", SMOKE, "train.epochs=0"],                        # config validation error
    ["--config", SMOKE, "--no_such_flag"],
])
def test_launcher_accepts_and_refuses_what_seg_train_does(submit_cli, tmp_path, train_args):
    run, logs = submit_cli
    seg_train = subprocess.run([sys.executable, "-m", "seg.train", *train_args, "--print_config"],
                               capture_output=True, text=True, timeout=120)
    launcher = run("train", "--log_dir", str(logs / "%j"), *train_args)
    assert seg_train.returncode in (0, 2), seg_train.stderr
    assert launcher.returncode == seg_train.returncode, (launcher.stderr, seg_train.stderr)
    if seg_train.returncode:
        assert not logs.exists(), "nothing may be submitted for arguments `seg train` refuses"
        last_line = seg_train.stderr.strip().splitlines()[-1].split(": ", 1)[-1]
        assert last_line in launcher.stderr  # the same message
    else:
        assert (logs / "101" / "101_submission.sh").is_file()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["train", "predict"])
def test_bad_time_limit_is_a_usage_error_naming_the_forms(submit_cli, kind):
    run, logs = submit_cli
    extra = ["--config", SMOKE] if kind == "train" else ["--parts", "2", "--output_dir", "p"]
    out = run(kind, "--time", "1:2:3:4", "--log_dir", str(logs / "%j"), *extra)
    assert out.returncode == 2, out.stderr
    assert "'1:2:3:4'" in out.stderr and "D-HH:MM:SS" in out.stderr
    assert not logs.exists()
