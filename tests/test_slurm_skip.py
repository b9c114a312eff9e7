"""The Slurm tests' skip/fail rule, for real: a cluster that cannot start makes them skip with
the reason, except in CI (CI=true), where they fail.

A second cluster in another state folder cannot start while the session's cluster holds the
ports, which gives a real start failure without touching the running cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from slurm_helpers import ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _nested_pytest(tmp_path, **extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SEG_SLURM", "SLURM_CONF")}
    env.update(SEG_SLURM_DIR=str(tmp_path / "other-cluster"), **extra)
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_slurm_train.py"), "-k", "failure",
           "-rs", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "bt"), "-q"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cluster_that_cannot_start_skips_outside_ci_and_fails_in_ci(slurm_cluster, tmp_path):
    skipped = _nested_pytest(tmp_path / "a")
    assert skipped.returncode == 0, skipped.stdout[-2000:]
    assert "1 skipped" in skipped.stdout and "Slurm tests skipped" in skipped.stdout
    assert "already in use" in skipped.stdout  # the reason is shown
    failed = _nested_pytest(tmp_path / "b", CI="true")
    assert failed.returncode == 1, failed.stdout[-2000:]
    assert "the local Slurm cluster is required here (CI=true or SEG_SLURM=1)" in failed.stdout
