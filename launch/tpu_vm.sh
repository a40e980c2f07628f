#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU VM slice (one JAX process per
# host; jax.distributed discovers the slice from the TPU metadata).
#
#   TPU=my-v5e-8 ZONE=us-west4-a bash launch/tpu_vm.sh \
#       --config=configs/u2s_wiki.py:tpu --workdir=gs://bucket/runs/u2s
#
# The `:tpu` variants (config_blocks.accelerator) are the CPU defaults' jobs
# with bf16 matmuls, remat, chunked logits and every client in one step. A
# model that does not fit one chip splits its frozen base over the model axis
# (--config.mesh.model_parallel=M, federated/parallel.py); plan it first, on
# any machine, without weights:
#
#   python -m fedjax_u2s.plan --config=configs/plans/llama3_8b.py:v5e-8 --search
#
# and pass what it prints (mesh.model_parallel, federated.clients_per_chunk).
# PLAN=1 also prints that plan on the slice itself before training (the TPU
# backend's own memory_analysis, which the CPU's only approximates).
#
# What has run where: docs/benchmarks.md ("Accelerators"). Nothing here has
# run on a TPU yet; the mesh layouts were checked on 8 emulated CPU devices
# (tests/test_mesh2d.py).
#
# Assumes the repository is checked out at ~/fedjax_u2s on every worker (e.g.
# `gcloud compute tpus tpu-vm scp --recurse --worker=all . $TPU:~/fedjax_u2s`)
# and installs the TPU build of jax there once. The workdir should be shared by
# all hosts (a GCS bucket or NFS): orbax writes one checkpoint from all of them.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
args=$(printf '%q ' "$@")
plan=""
if [ "${PLAN:-0}" = 1 ]; then
  # The planner reads the same --config and --config.* overrides; --workdir is the job's.
  plan_args=$(printf '%q ' "$@" | sed -E 's/--workdir=[^ ]*//g')
  plan=".venv/bin/python -m fedjax_u2s.plan $plan_args;"
fi
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; cd ~/fedjax_u2s
  [ -x .venv/bin/python ] || { bash launch/setup_env.sh && .venv/bin/pip install -q 'jax[tpu]'; }
  $plan
  .venv/bin/python -m fedjax_u2s.main $args --config.multihost.enabled=True"
