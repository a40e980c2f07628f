#!/usr/bin/env bash
# Installs what is needed and runs the whole test suite on the CPU.
#   bash launch/test.sh [pytest args]
#
# The suite runs in $TEST_WORKERS pytest-xdist processes (default: one per
# core, at most 4), each file whole on one worker (--dist loadfile: module
# fixtures and conftest's per-file cache clearing stay per file). Most tests
# are single-threaded XLA compiles, so two cores halve the wall time.
# TEST_WORKERS=1 runs everything in this one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh test
VENV=${VENV:-.venv}
workers=${TEST_WORKERS:-$("$VENV/bin/python" -c 'import os; print(min(4, os.cpu_count() or 1))')}
if [ "$workers" -gt 1 ]; then
  exec "$VENV/bin/python" -m pytest -q -n "$workers" --dist loadfile "$@"
fi
exec "$VENV/bin/python" -m pytest -q "$@"
