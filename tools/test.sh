#!/usr/bin/env bash
# Install what is needed (into .venv) and run the whole test suite.
#   bash tools/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

# --- Slurm: a real local cluster for the tests marked `slurm` (tools/slurm_cluster.sh) ---------
# Started here before pytest (2 nodes, about 10 s once the packages are installed) and stopped
# after, by the PIDs it recorded; a cluster that was already running is used and left running.
# SEG_SLURM=1 tells the tests the cluster is meant to be up: they fail instead of skipping. With
# CI=true the tests fail too if it could not start; elsewhere, without root or apt-get, they skip
# and say why (tests/slurm_helpers.py). SEG_SLURM_TESTS=0 skips all of this.
if [ "${SEG_SLURM_TESTS:-1}" != 0 ]; then
  if bash tools/slurm_cluster.sh status >/dev/null 2>&1; then
    echo "[test] using the running local Slurm cluster"
    export SEG_SLURM=1
  elif why="$(bash tools/slurm_cluster.sh can-run 2>&1)"; then
    echo "[test] starting a local Slurm cluster (tools/slurm_cluster.sh start --nodes 2)"
    if bash tools/slurm_cluster.sh start --nodes 2 >/dev/null; then
      export SEG_SLURM=1
      trap 'bash tools/slurm_cluster.sh stop' EXIT
    else
      echo "[test] the local Slurm cluster did not start: Slurm tests will $([ "${CI:-}" = true ] && echo fail || echo skip)"
    fi
  else
    echo "[test] no local Slurm cluster ($why): Slurm tests will $([ "${CI:-}" = true ] && echo fail || echo skip)"
  fi
  [ -z "${SEG_SLURM:-}" ] || source "$(bash tools/slurm_cluster.sh env)"
fi

# --- Chromium: the report's browser test (tools/chromium.sh) -----------------------------------
# Installed with apt-get when missing (root). SEG_BROWSER=1 tells the test a browser is meant to be
# there: it fails instead of skipping, as with CI=true (tests/browser_fixtures.py).
if [ "${SEG_BROWSER_TESTS:-1}" != 0 ]; then
  if why="$(bash tools/chromium.sh install 2>&1)"; then
    export SEG_BROWSER=1
  else
    echo "[test] no Chromium ($why): the browser test will $([ "${CI:-}" = true ] && echo fail || echo skip)"
  fi
fi

python -m pytest "$@"
