#!/usr/bin/env bash
# Installs what is missing into .venv, then runs the test suite (extra args go to pytest):
#   bash scripts/test.sh                 # everything, real-asset (slow) tests included
#   bash scripts/test.sh -m "not slow"   # the quick part
#   bash scripts/test.sh -n 0 tests/test_stage0.py   # one process (a later -n wins)
# TEST_WORKERS (default 2) processes share the tests, a file per worker at a time (its
# module fixtures are built once).
set -euo pipefail
source "$(dirname "$0")/env.sh"
ensure_venv dev
cd "$REPO_ROOT"
exec "$PY" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
