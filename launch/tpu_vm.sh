#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU VM slice (one JAX process per
# host; jax.distributed discovers the slice from the TPU metadata).
#
#   TPU=my-v4-32 ZONE=us-central2-b bash launch/tpu_vm.sh \
#       --config=configs/u2s_wiki.py --workdir=gs://bucket/runs/u2s
#
# Assumes the repository is checked out at ~/fedjax_u2s on every worker (e.g.
# `gcloud compute tpus tpu-vm scp --recurse --worker=all . $TPU:~/fedjax_u2s`)
# and installs the TPU build of jax there once. The workdir should be shared by
# all hosts (a GCS bucket or NFS): orbax writes one checkpoint from all of them.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; cd ~/fedjax_u2s
  [ -x .venv/bin/python ] || { bash launch/setup_env.sh && .venv/bin/pip install -q 'jax[tpu]'; }
  .venv/bin/python -m fedjax_u2s.main $args --config.multihost.enabled=True"
