#!/usr/bin/env bash
# Installs what is needed and runs the whole test suite on the CPU.
#   bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh test
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest -q "$@"
