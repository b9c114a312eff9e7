#!/usr/bin/env bash
# Install what is needed (into .venv) and run the whole test suite.
#   bash tools/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest "$@"
