#!/usr/bin/env bash
# Installs what is missing into .venv, then runs the test suite (extra args go to pytest):
#   bash scripts/test.sh                 # the suite, without the tests marked slow
#   bash scripts/test.sh -m slow         # only those: real-asset runs, multi-process and preemption
#                                        # drills, long learning runs (CI runs both)
#   bash scripts/test.sh -m ""           # everything
#   bash scripts/test.sh -n 0 tests/test_stage0.py   # one process (a later -n or -m wins)
# TEST_WORKERS (default 2) processes share the tests, a file per worker at a time (its
# module fixtures are built once).
set -euo pipefail
source "$(dirname "$0")/env.sh"
ensure_venv dev
cd "$REPO_ROOT"
exec "$PY" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile -m "not slow" "$@"
