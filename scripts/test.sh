#!/usr/bin/env bash
# Installs what is missing into .venv, then runs the test suite (extra args go to pytest):
#   bash scripts/test.sh                 # everything, real-asset (slow) tests included
#   bash scripts/test.sh -m "not slow"   # the quick part
set -euo pipefail
source "$(dirname "$0")/env.sh"
ensure_venv dev
cd "$REPO_ROOT"
exec "$PY" -m pytest "$@"
