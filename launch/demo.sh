#!/usr/bin/env bash
# Installs what is needed and runs the main job on the embedded default.
#   bash launch/demo.sh [--config.x=y ...]     (WORKDIR=... to choose the output dir)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m fedjax_u2s.main --config="${CONFIG:-configs/u2s_wiki.py}" \
  --workdir="${WORKDIR:-workdir/demo}" "$@"
