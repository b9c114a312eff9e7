"""The real local Slurm cluster for the tests, and helpers to submit to it and wait.

``cluster()`` is the body of the ``slurm_cluster`` fixture (tests/conftest.py). Skip or fail,
decided here:
- A cluster already up (``tools/slurm_cluster.sh start``, as ``tools/test.sh`` does) is used.
- Otherwise the session starts one with ``tools/slurm_cluster.sh start --nodes 2`` and stops
  it at the end, when this machine allows it (root and apt-get, or Slurm installed).
- When it cannot (no root, no apt-get) or the start fails, Slurm tests are skipped with the
  reason, except when ``CI=true`` or ``SEG_SLURM=1``: then they fail, because CI must run them.

Each test uses a fresh folder (``tmp_path``): job ids restart at 1 whenever the cluster is
restarted, so nothing may be looked up by job id alone across runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tools" / "slurm_cluster.sh"
STATE = Path(os.environ.get("SEG_SLURM_DIR", "/tmp/seg-slurm"))
CONF = STATE / "etc" / "slurm.conf"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def slurm_required() -> bool:
    """True in CI (CI=true) or under tools/test.sh after it started the cluster (SEG_SLURM=1)."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("SEG_SLURM") == "1"


def _not_available(reason: str):
    if slurm_required():
        pytest.fail(f"the local Slurm cluster is required here (CI=true or SEG_SLURM=1) but {reason}")
    pytest.skip(f"Slurm tests skipped: {reason}")


def _cluster(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=timeout)


def _up(env: dict) -> bool:
    if not CONF.is_file() or shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True)
    return ping.returncode == 0 and "UP" in ping.stdout


def slurm_env(extra: dict | None = None) -> dict:
    """This process's environment plus SLURM_CONF, the venv on PATH and one torch thread."""
    env = dict(os.environ)
    env["SLURM_CONF"] = str(CONF)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("SEG_ROOT", None)  # the scripts find the repository from their own path (scontrol Command=)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def cluster():
    """A running cluster: yields the environment for sbatch/squeue/sacct; skips or fails otherwise."""
    env = slurm_env()
    started = False
    if not _up(env):
        why = _cluster("can-run", timeout=30)
        if why.returncode == 3:
            _not_available(why.stdout.strip() or why.stderr.strip())
        start = _cluster("start", "--nodes", "2", timeout=600)
        if start.returncode != 0:
            _not_available(f"`tools/slurm_cluster.sh start` failed (exit {start.returncode}):\n{start.stderr[-3000:]}")
        started = True
    os.environ["SLURM_CONF"] = str(CONF)  # submitit calls sbatch/sacct with os.environ
    yield env
    if started:
        _cluster("stop", timeout=120)


def node_count(env: dict) -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], env=env, capture_output=True, text=True, check=True)
    return len(set(out.stdout.split()))


def sbatch(args: list[str], cwd: Path, env: dict) -> str:
    """Submit; returns the job id. ``args`` are sbatch options, the script and its arguments."""
    (cwd / "logs").mkdir(exist_ok=True)
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"sbatch {' '.join(args)} failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_states(job: str, env: dict) -> dict[str, str]:
    """{job id (array tasks as ID_N): state} from sacct, without steps."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "JobID,State"], env=env,
                         capture_output=True, text=True)
    states = {}
    for line in out.stdout.split():
        jid, _, state = line.partition("|")
        states[jid] = state.split()[0] if state else ""
    return states


def queued(job: str, env: dict) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], env=env, capture_output=True, text=True)
    return bool(out.stdout.strip())


def wait_job(job: str, env: dict, timeout: float = 240, expect: set[str] | None = None) -> dict[str, str]:
    """Wait until the job (every array task) left the queue; returns the final states.

    Accounting lags the queue, task by task on a loaded machine (sacct listed one task of four,
    or an array task under its job id alone): the states count once every one is terminal, two
    reads a second apart agree and, when given, the job ids are ``expect``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not queued(job, env):
            previous = None
            for _ in range(60):
                states = job_states(job, env)
                if states and all(s in TERMINAL for s in states.values()) and states == previous \
                        and (expect is None or set(states) == expect):
                    return states
                previous = states
                time.sleep(1)
            return job_states(job, env)
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} did not finish within {timeout} s (cancelled); states: {job_states(job, env)}")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def history_epochs(run_dir: Path) -> list[int]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    if not lines:
        return []
    col = lines[0].split(",").index("epoch")
    return [int(float(line.split(",")[col])) for line in lines[1:] if line.strip()]


def manifest_inputs(out_dir: Path) -> list[tuple[int, str]]:
    """[(worker, input path)] for every image of every finished unit in manifest.jsonl."""
    import json

    path = out_dir / "manifest.jsonl"
    if not path.is_file():
        return []
    found = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            found += [(rec["worker"], img["input"]) for img in rec["images"]]
    return found


def smoke_train_args(shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    """`seg train` arguments of the CPU smoke preset on ``shards``, writing to ``run_dir``."""
    return ["--config", str(ROOT / "configs" / "cpu-smoke.yaml"), "--data_dir", str(shards),
            "--checkpoint_dir", str(run_dir), *overrides]


RUN_FILES = ("config.yaml", "history.csv", "best_model.pth", "final_model.pth", "last")
