#!/usr/bin/env bash
# A one-machine rehearsal of the real federation over Flower's deployment engine.
#
#   WORKDIR=/tmp/fl bash launch/flower_local.sh [dotted.key=value ...]
#
# Installs what is needed (launch/setup_env.sh), splits the job's data into one
# directory per node (fedjax_u2s.flower.rehearsal: exactly the simulation's
# split), starts a SuperLink and NODES=3 SuperNodes on loopback (insecure unless
# TLS=1, below: docs/DEPLOY.md has TLS and node authentication), runs
# `flwr run flower-app` of CONFIG (configs/fedit_instructions.py:smoke), stops
# every process it started and exits 0 with the final adapter in
# WORKDIR/adapter/ (PEFT format). WORKDIR also holds metrics.jsonl, curves.png,
# checkpoints/ (a rerun resumes), nodes/ (each node's data) and logs/.
# Extra arguments are config overrides, e.g. federated.algorithm=fedadam.
#
#   CONFIG=configs/u2s_wiki.py:smoke WORKDIR=/tmp/fl_u2s bash launch/flower_local.sh
#
# rehearses FedIT-U2S with generation on the nodes: each node's dir gets the raw
# text (text/*.txt) the in-process job gives that client, and every SuperNode
# turns it into its own pairs (nodes/node<i>/generated/) before its first
# training reply.
#
#   CONFIG=configs/fedpit.py:smoke WORKDIR=/tmp/fl_fedpit bash launch/flower_local.sh
#
# rehearses FedPIT: each node's dir gets the few real examples the in-process
# fedpit job gives that client (instructions.jsonl) and the server the
# non-members (eval.jsonl); every round a sampled SuperNode self-generates pairs
# with base + global, uploads the global delta and trains its private local
# adapter, which it keeps in nodes/node<i>/fedpit/<run id>/ (checkpoints, and at
# the end adapter/, local_adapters/client_000i/, personal_adapter/).
#
#   TLS=1 WORKDIR=/tmp/fl_tls bash launch/flower_local.sh
#
# rehearses docs/DEPLOY.md's secured setup: a CA and a certificate for
# localhost/127.0.0.1 (openssl) and one ECDSA key per node (ssh-keygen), made in
# WORKDIR/pki/; the SuperLink serves HTTPS with --enable-supernode-auth, every
# node key is registered with `flwr supernode register`, and the SuperNodes
# verify the SuperLink with the CA and sign with their keys.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
bash launch/setup_env.sh
VENV=${VENV:-.venv}
CONFIG=${CONFIG:-configs/fedit_instructions.py:smoke}
NODES=${NODES:-3}
TLS=${TLS:-0}
WORKDIR=$(realpath -m "${WORKDIR:-workdir/flower_local}")
# flower-superlink and flower-supernode start flower-superexec by name.
export PATH="$REPO/$VENV/bin:$PATH"
export FLWR_HOME="$WORKDIR/flwr_home"
PY="$REPO/$VENV/bin/python"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=${PORT:-$(free_port)}
mkdir -p "$WORKDIR/logs" "$FLWR_HOME"
start=$(date +%s)
# partition.num_clients (fedit) or corpus.num_clients (u2s).
CLIENTS_KEY=$("$PY" -m fedjax_u2s.flower.rehearsal --config="$CONFIG" --out=/dev/null --clients-key "$@")
OVERRIDES="$CLIENTS_KEY=$NODES $*"

"$PY" -m fedjax_u2s.flower.rehearsal --config="$CONFIG" --out="$WORKDIR/nodes" $OVERRIDES
EVAL_FILE=""
[ -f "$WORKDIR/nodes/server/eval.jsonl" ] && EVAL_FILE="$WORKDIR/nodes/server/eval.jsonl"
LINK_SECURITY=(--insecure)
NODE_SECURITY=(--insecure)
FLWR_SECURITY="insecure = true"
if [ "$TLS" = 1 ]; then
  PKI="$WORKDIR/pki"
  mkdir -p "$PKI"
  ( cd "$PKI"
    if [ ! -f server.pem ]; then
      openssl req -x509 -newkey rsa:2048 -sha256 -days 30 -nodes \
        -keyout ca.key -out ca.crt -subj "/CN=fedjax-u2s rehearsal CA" 2>/dev/null
      openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
        -subj "/CN=localhost" 2>/dev/null
      printf "subjectAltName=DNS:localhost,IP:127.0.0.1\n" > san.ext
      openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out server.pem -days 30 -sha256 -extfile san.ext 2>/dev/null
    fi
    for ((i = 0; i < NODES; i++)); do
      [ -f "node$i.key" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -f "node$i.key"
    done )
  LINK_SECURITY=(--ssl-ca-certfile "$PKI/ca.crt" --ssl-certfile "$PKI/server.pem"
                 --ssl-keyfile "$PKI/server.key" --enable-supernode-auth)
  FLWR_SECURITY="root-certificates = \"$PKI/ca.crt\""
fi
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "rehearsal"

[superlink.rehearsal]
address = "127.0.0.1:$PORT"
$FLWR_SECURITY
EOF

pids=()
descendants() { local c; for c in $(pgrep -P "$1" || true); do echo "$c"; descendants "$c"; done; }
cleanup() {
  local all=() p
  for p in "${pids[@]}"; do all+=("$p" $(descendants "$p")); done
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
  sleep 2
  for p in "${all[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Each in its own session (setsid), so cleanup stops it with all its children.
setsid flower-superlink "${LINK_SECURITY[@]}" --disable-runtime-dependency-installation \
  --port "$PORT" > "$WORKDIR/logs/superlink.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  "$PY" -c "import socket,sys; sys.exit(socket.socket().connect_ex(('127.0.0.1',$PORT)))" && break
  sleep 0.2
done
for ((i = 0; i < NODES; i++)); do
  if [ "$TLS" = 1 ]; then
    # The SuperLink admits only registered keys (its state is in memory: every run).
    flwr supernode register "$PKI/node$i.key.pub" rehearsal >> "$WORKDIR/logs/register.log"
    NODE_SECURITY=(--root-certificates "$PKI/ca.crt" --auth-supernode-private-key "$PKI/node$i.key")
  fi
  setsid flower-supernode "${NODE_SECURITY[@]}" --superlink "127.0.0.1:$PORT" --port "$(free_port)" \
    --node-config "data-dir=\"$WORKDIR/nodes/node$i\" client-id=$i cache-dir=\"$WORKDIR/jax_cache\"" \
    > "$WORKDIR/logs/node$i.log" 2>&1 &
  pids+=($!)
done

rm -f "$WORKDIR/flower_run.json"
flwr run flower-app rehearsal --stream -c "config=\"$CONFIG\" overrides=\"$OVERRIDES\" \
workdir=\"$WORKDIR\" num-nodes=$NODES eval-file=\"$EVAL_FILE\"" 2>&1 | tee "$WORKDIR/logs/serverapp.log"

if [ ! -f "$WORKDIR/flower_run.json" ] || [ ! -f "$WORKDIR/adapter/adapter_model.safetensors" ]; then
  echo "error: the Flower run did not finish; see $WORKDIR/logs/ (serverapp.log, node*.log, superlink.log)" >&2
  exit 1
fi
echo "Flower rehearsal done in $(( $(date +%s) - start ))s: adapter in $WORKDIR/adapter, metrics in $WORKDIR/metrics.jsonl"
for d in "$WORKDIR"/nodes/node*/fedpit/*/personal_adapter; do
  [ -d "$d" ] && echo "  node adapters (global, local, personal): $(dirname "$d")"
done
exit 0
