#!/usr/bin/env bash
# Runs one job as N JAX processes on this machine (multi-controller runtime on
# localhost, CPU devices, gloo collectives): a rehearsal of a multi-host run.
#
#   NPROC=2 DEVICES_PER_PROC=4 bash launch/multihost_local.sh \
#       --config=configs/fedit_instructions.py:smoke --workdir=workdir/mh
#
# Every process runs the same command with its own process_id; process 0 is
# the coordinator and writes metrics, reports and exports; all processes take
# part in every jitted round and in the orbax checkpoint saves.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
NPROC=${NPROC:-2}
DEVICES_PER_PROC=${DEVICES_PER_PROC:-1}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < NPROC; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROC} ${XLA_FLAGS:-}" \
  JAX_PLATFORMS=cpu "$VENV/bin/python" -m fedjax_u2s.main "$@" \
    --config.multihost.enabled=True \
    --config.multihost.coordinator_address="127.0.0.1:${PORT}" \
    --config.multihost.num_processes="$NPROC" \
    --config.multihost.process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
