#!/usr/bin/env bash
# Creates .venv-ref: the project plus the PyTorch peers (transformers + CPU
# torch) for benchmarks/ and the live parity tests. Kept apart from .venv so
# the tests there prove nothing needs torch.
#   bash launch/setup_reference_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-ref bash launch/setup_env.sh test
# torch==2.13.0 is a CPU build; a plain `torch` would pull a multi-GB CUDA one.
.venv-ref/bin/python -m pip install -q -e ".[test,reference]"
