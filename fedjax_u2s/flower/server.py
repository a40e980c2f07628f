"""The server side: rounds over a Flower ``Grid`` with our sampling and aggregation.

:func:`serve` is the ServerApp's body. Each round ``r`` it

1. samples clients with :func:`fedjax_u2s.federated.sampling.sample_clients`
   (``seed``, ``r``), exactly as the simulation;
2. sends each sampled client's SuperNode a ``train`` message: the global
   adapter, the experiment config, the round, the client's data cursor and
   its key ``fold_in(fold_in(root, r), client_id)`` (the simulation's);
3. waits for the replies until all came, the node left the federation, or
   ``round-timeout`` passed; a round needs ``min-replies`` of them, and the
   metrics row names every client that did not answer and why;
4. sums the deltas in client order and takes the server step with the
   simulation's own functions (:func:`algorithms.add_clients`: weights, DP
   clipping, SCAFFOLD's controls; :func:`algorithms.server_step`;
   :func:`algorithms.keep_old_if_nonfinite`) on the same
   :class:`~fedjax_u2s.federated.state.ServerState`;
5. writes the metrics row (``metrics.jsonl``, the simulation's fields plus
   ``answered``, ``dropped`` and the serialized message bytes) and the orbax
   checkpoint (:mod:`fedjax_u2s.checkpoint`, the simulation's format: the
   server state and the data cursors).

A ServerApp started again with the same workdir resumes from the newest
intact checkpoint. At the end the adapter is exported in PEFT format
(``workdir/adapter``) as the fedit job does, and ``workdir/flower_run.json``
summarizes the run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import optax

from fedjax_u2s import checkpoint as checkpoint_lib
from fedjax_u2s import config_blocks
from fedjax_u2s import export
from fedjax_u2s import lora as lora_lib
from fedjax_u2s import metrics as metrics_lib
from fedjax_u2s.data import batching
from fedjax_u2s.data import instructions
from fedjax_u2s.federated import algorithms
from fedjax_u2s.federated import privacy
from fedjax_u2s.federated import sampling
from fedjax_u2s.federated.config import AlgorithmConfig
from fedjax_u2s.federated.state import ServerState
from fedjax_u2s.flower import node as node_lib
from fedjax_u2s.flower import wire

PyTree = Any

TRAIN = "train"
DESCRIBE = "query.describe"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------
# Settings from the run config ([tool.flwr.app.config] and `flwr run -c`).


@dataclasses.dataclass(frozen=True)
class Settings:
  """The ServerApp's run config (``flower-app/pyproject.toml`` documents each).

  Attributes:
    config: the experiment config (file, argument and overrides applied).
    workdir: checkpoints, metrics, adapter (on the server's host).
    num_nodes: SuperNodes (= clients) of the federation; the ServerApp waits
      for all of them before round 1.
    min_replies: a round is applied with at least this many replies.
    round_timeout: seconds a round waits for replies.
    connect_timeout: seconds to wait for ``num_nodes`` SuperNodes.
    eval_file: server-side held-out instruction file for the eval loss ("":
      none).
    audit_dir: where to write what every reply carried ("": nowhere); see
      :func:`audit_reply`.
    poll_seconds: how often replies are polled.
  """
  config: ml_collections.ConfigDict
  workdir: str
  num_nodes: int
  min_replies: int
  round_timeout: float
  connect_timeout: float
  eval_file: str
  audit_dir: str = ""
  poll_seconds: float = 0.2


PIPELINES = ("fedit", "u2s", "fedpit")
FINISH = "query.finish"


def config_num_clients(config: ml_collections.ConfigDict) -> int:
  """The number of clients a config's simulation has (0: it does not say).

  fedit: ``partition.num_clients``; u2s: ``corpus.num_clients``, where 0 on
  the wiki corpus split by topic means one client per topic.
  """
  if config.get("pipeline") != "u2s":
    return int(config.partition.num_clients)
  c = config.corpus
  if c.num_clients:
    return int(c.num_clients)
  if c.kind == "wiki" and c.partition == "topic":
    return len(c.topics)
  return 0


def parse_overrides(text: str) -> dict[str, Any]:
  """``"federated.algorithm=fedadam train.batch_size=2"`` -> typed values.

  A value is read as a Python literal (numbers, booleans, tuples, quoted
  strings) when it parses as one, else kept as a string.
  """
  import ast  # pylint: disable=g-import-not-at-top
  out = {}
  for item in text.split():
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"run config overrides: {item!r} is not key=value "
                       "(e.g. overrides=\"federated.num_rounds=3\").")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def resolve_config_path(spec: str) -> tuple[str, str]:
  """``"configs/x.py:smoke"`` -> (absolute path, argument).

  A relative path is taken from the current directory, else from the
  repository root of the installed ``fedjax_u2s``.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(REPO, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"run config config={spec!r}: {path} does not exist.")
  return path, arg


def settings_from_run_config(run_config: dict[str, Any]) -> Settings:
  """:class:`Settings` from Flower's run config (every key checked)."""
  def get(key, kind):
    if key not in run_config:
      raise ValueError(f"Run config has no {key!r}; declare it in "
                       "flower-app/pyproject.toml [tool.flwr.app.config].")
    value = run_config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
      raise ValueError(f"Run config {key}={value!r}: must be {kind.__name__}.")
    return value
  path, arg = resolve_config_path(get("config", str))
  config = config_blocks.load(path, arg, **parse_overrides(get("overrides", str)))
  if config.get("pipeline") not in PIPELINES:
    raise ValueError(f"Run config config={get('config', str)!r} is a "
                     f"{config.get('pipeline')!r} config; the Flower app runs the "
                     "fedit job (configs/fedit_instructions.py: nodes hold "
                     "instruction files), the u2s job (configs/u2s_wiki.py: "
                     "nodes hold raw text and generate their own pairs) or the "
                     "fedpit job (configs/fedpit.py: nodes hold a few real "
                     "examples, self-generate and keep a local adapter).")
  workdir = get("workdir", str)
  if not workdir:
    raise ValueError("Run config workdir is empty: flwr run ... -c "
                     "'workdir=\"/path/on/the/server\"'.")
  num_nodes = get("num-nodes", int) or config_num_clients(config)
  if num_nodes < 1:
    raise ValueError(f"Run config num-nodes={num_nodes}: set it to the number of "
                     "SuperNodes (the config does not fix its number of clients).")
  s = Settings(config=config, workdir=os.path.abspath(workdir), num_nodes=num_nodes,
               min_replies=get("min-replies", int),
               round_timeout=get("round-timeout", float),
               connect_timeout=get("connect-timeout", float),
               eval_file=get("eval-file", str), audit_dir=get("audit-dir", str))
  fed = AlgorithmConfig.from_config(config.federated)
  if fed.clients_per_round > s.num_nodes:
    raise ValueError(f"config.federated.clients_per_round={fed.clients_per_round} "
                     f"but the federation has num-nodes={s.num_nodes}.")
  if not 1 <= s.min_replies <= fed.clients_per_round:
    raise ValueError(f"Run config min-replies={s.min_replies}: must be in [1, "
                     f"clients_per_round={fed.clients_per_round}].")
  if s.round_timeout <= 0 or s.connect_timeout <= 0:
    raise ValueError("Run config round-timeout and connect-timeout must be > 0.")
  return s


# ----------------------------------------------------------------------------
# The server step: the simulation's aggregation, one client at a time.


@functools.partial(jax.jit, static_argnames=("fed",))
def aggregate_and_step(state: ServerState, deltas: PyTree, weights: jax.Array,
                       ids: jax.Array, nonfinite: jax.Array,
                       control_deltas: PyTree | None, *, fed: AlgorithmConfig
                       ) -> tuple[ServerState, jax.Array, jax.Array, jax.Array]:
  """Sums the answered clients' deltas and takes the server step.

  The clients are added in order, each as a chunk of one, with the
  simulation's own steps (``algorithms.add_clients``, ``server_step``,
  ``keep_old_if_nonfinite``), so the result is the simulation's bit for bit.

  Args:
    state: the server state before the round.
    deltas: the clients' deltas, leaves ``[C, ...]`` in client-id order.
    weights: float32 [C], each client's example count.
    ids: int32 [C], their client ids.
    nonfinite: bool [C], a client reported a non-finite loss or gradient.
    control_deltas: SCAFFOLD: leaves ``[C, ...]``; else None.
    fed: the algorithm config.

  Returns:
    ``(new state, mean delta's norm, clipped count, non-finite flag)``.
  """
  opt = algorithms.server_optimizer(fed)
  one = lambda x: x[:, None]  # A chunk of one client.

  def body(sums, xs):
    d, w, i, bad, c = xs
    return algorithms.add_clients(fed, sums, d, w, i, bad, c), None

  xs = (jax.tree.map(one, deltas), one(weights), one(ids), one(nonfinite),
        jax.tree.map(one, control_deltas) if fed.spec.scaffold else None)
  sums, _ = jax.lax.scan(
      body, algorithms.empty_sums(fed, state.params, state.client_controls), xs)
  new, mean_delta = algorithms.server_step(fed, opt, state, sums)
  new, bad = algorithms.keep_old_if_nonfinite(state, new, sums.nonfinite)
  return new, optax.tree.norm(mean_delta), sums.clipped, bad


def audit_reply(audit_dir: str, name: str, content) -> None:
  """Writes what one reply carried: ``<name>.json`` and ``<name>.bin``.

  The JSON lists every record of the reply (its kind, and for arrays dtype
  and shape, for metrics and configs the values); the ``.bin`` file is the
  reply's serialized arrays and records, byte for byte. An operator (or a
  test) can check that nothing but adapter-shaped floats and scalar metrics
  left the nodes.
  """
  if not audit_dir:
    return
  os.makedirs(audit_dir, exist_ok=True)
  manifest, blobs = {}, []
  for key, record in content.array_records.items():
    manifest[key] = {"kind": "arrays", "arrays": {
        n: {"dtype": str(record[n].dtype), "shape": list(record[n].shape)}
        for n in record.keys()}}
    blobs += [record[n].data for n in record.keys()]
  for kind, records in (("metrics", content.metric_records),
                        ("config", content.config_records)):
    for key, record in records.items():
      manifest[key] = {"kind": kind, "values": {
          k: (v if isinstance(v, (int, float, bool, str)) else repr(v))
          for k, v in record.items()}}
      blobs.append(record.deflate())
  with open(os.path.join(audit_dir, name + ".json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  with open(os.path.join(audit_dir, name + ".bin"), "wb") as f:
    f.write(b"".join(blobs))


def client_key_data(state: ServerState, round_: int, client: int) -> np.ndarray:
  """Raw key data of ``fold_in(fold_in(root, round), client)`` (the simulation's)."""
  key = jax.random.fold_in(jax.random.fold_in(state.key(), round_), client)
  return np.asarray(jax.random.key_data(key))


def local_key_data(state: ServerState, round_: int, client: int) -> np.ndarray:
  """Raw key data of the client's FedPIT local-phase key (the simulation's,
  :func:`algorithms.local_key`)."""
  return np.asarray(jax.random.key_data(
      algorithms.local_key(state.key(), round_, client)))


# ----------------------------------------------------------------------------
# Talking to the SuperNodes.


def _message(content, node_id: int, message_type: str, group: str):
  from flwr.app import Message  # pylint: disable=g-import-not-at-top
  return Message(content, dst_node_id=node_id, message_type=message_type,
                 group_id=group)


def exchange(grid, messages: Sequence[Any], *, timeout: float, poll: float
             ) -> tuple[dict[int, Any], dict[int, str]]:
  """Sends ``messages``; their replies by destination node, and who failed why.

  Waits until every message has a reply, its node left the federation (the
  SuperNode deactivated, or the SuperLink saw it miss its heartbeats), or
  ``timeout`` seconds passed. A reply carrying an error counts as failed.

  Returns:
    ``({node_id: reply message}, {node_id: reason})``.
  """
  ids = list(grid.push_messages(messages))
  pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
  replies, failed = {}, {}
  deadline = time.monotonic() + timeout
  while pending:
    for reply in grid.pull_messages(list(pending)):
      mid = reply.metadata.reply_to_message_id
      node = pending.pop(mid, None)
      if node is None:
        continue
      if reply.has_error():
        failed[node] = f"error {reply.error.code}: {reply.error.reason}"
      else:
        replies[node] = reply
    if not pending:
      break
    online = set(grid.get_node_ids())
    for mid, node in list(pending.items()):
      if node not in online:
        failed[node] = "node left the federation"
        del pending[mid]
    if time.monotonic() > deadline:
      for node in pending.values():
        failed[node] = f"no reply within round-timeout={timeout:g}s"
      break
    time.sleep(poll)
  return replies, failed


class Federation:
  """Which SuperNode holds which client.

  Nodes declare their client id (``--node-config client-id=i``) in answer to
  a ``describe`` query; nodes that declare none get the free ids in order of
  node id. A node that joins later (a restarted SuperNode) is asked again,
  so its client can be sampled again.
  """

  def __init__(self, grid, num_clients: int, poll: float, audit_dir: str = ""):
    self.grid, self.num_clients, self.poll = grid, num_clients, poll
    self.audit_dir = audit_dir
    self.node_of: dict[int, int] = {}    # client id -> node id
    self.client_of: dict[int, int] = {}  # node id -> client id

  def refresh(self, timeout: float = 60.0) -> None:
    """Asks nodes not seen before for their client id."""
    online = set(self.grid.get_node_ids())
    for n in [n for n in self.client_of if n not in online]:
      self.node_of.pop(self.client_of.pop(n), None)
    new = sorted(online - set(self.client_of))
    if not new:
      return
    from flwr.app import RecordDict  # pylint: disable=g-import-not-at-top
    msgs = [_message(RecordDict(), n, DESCRIBE, "describe") for n in new]
    replies, failed = exchange(self.grid, msgs, timeout=timeout, poll=self.poll)
    declared = {}
    for n, reply in replies.items():
      audit_reply(self.audit_dir, f"describe-node{n}", reply.content)
      cid = int(reply.content["node"]["client-id"])
      declared[n] = None if cid < 0 else cid
    for n, why in failed.items():
      print(f"[flower] node {n} did not describe itself ({why}); ignored.")
    for n, cid in sorted(declared.items()):
      if cid is None:
        continue
      if not 0 <= cid < self.num_clients:
        raise ValueError(f"SuperNode {n} declares client-id={cid}, outside "
                         f"[0, num-nodes={self.num_clients}).")
      if cid in self.node_of and self.node_of[cid] != n:
        raise ValueError(f"SuperNodes {self.node_of[cid]} and {n} both declare "
                         f"client-id={cid}; give each node its own id.")
      self.node_of[cid], self.client_of[n] = n, cid
    free = [c for c in range(self.num_clients) if c not in self.node_of]
    for n in sorted(n for n, cid in declared.items() if cid is None):
      if not free:
        raise ValueError(f"More SuperNodes than num-nodes={self.num_clients}: "
                         f"node {n} has no client id left.")
      c = free.pop(0)
      self.node_of[c], self.client_of[n] = n, c

  def wait_for_all(self, timeout: float) -> None:
    """Waits until every client id has a node (or raises after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
      self.refresh()
      if len(self.node_of) >= self.num_clients:
        return
      if time.monotonic() > deadline:
        raise TimeoutError(
            f"Only {len(self.node_of)} of num-nodes={self.num_clients} SuperNodes "
            f"connected within connect-timeout={timeout:g}s (clients "
            f"{sorted(self.node_of)}). Start the others, or lower num-nodes.")
      time.sleep(max(self.poll, 0.5))


# ----------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class _Server:
  settings: Settings
  fed: AlgorithmConfig
  model: Any
  lora_config: lora_lib.LoraConfig
  template: PyTree
  lora_bytes: int
  evaluate: Callable[[PyTree], float] | None
  # FedPIT: nodes keep a local adapter (sent its key, asked to export at the end).
  isolated: bool = False


def _setup(s: Settings) -> tuple[_Server, ServerState]:
  config = s.config
  fed = AlgorithmConfig.from_config(config.federated)
  model = node_lib.load_model(config)
  lcfg = node_lib.lora_config(config)
  loss = node_lib.loss_fn(config, model.config)
  rng = jax.random.key(config.seed)
  init_lora = lora_lib.init(jax.random.fold_in(rng, 0), model.config, lcfg)
  algo = algorithms.build(fed, loss)
  fresh = jax.jit(lambda p: algo.init(p, jax.random.fold_in(rng, 1),
                                      s.num_nodes))(init_lora)
  evaluate: Callable[[PyTree], float] | None = None
  if s.eval_file and config.train_eval.every:
    examples = instructions.load_examples(s.eval_file)
    eval_set = instructions.tokenize(list(examples), model.tokenizer,
                                     config.train.max_length,
                                     system_prompt=config.data.system_prompt or None,
                                     name="held-out pairs")
    batch = batching.eval_batches(eval_set, config.train_eval.batch_size,
                                  **node_lib.packing(config))
    ev = jax.jit(algo.evaluate)

    def eval_loss(params):
      loss_sum, weight = ev(params, model.params, batch)
      return float(loss_sum) / max(float(weight), 1.0)
    evaluate = eval_loss
  isolated = False
  if config.get("pipeline") == "fedpit":
    from fedjax_u2s.pipelines import fedpit  # pylint: disable=g-import-not-at-top
    isolated = config.fedpit.variant in fedpit.ISOLATED
  srv = _Server(settings=s, fed=fed, model=model, lora_config=lcfg,
                template=jax.eval_shape(lambda: init_lora),
                lora_bytes=wire.tree_bytes(init_lora), evaluate=evaluate,
                isolated=isolated)
  return srv, fresh


def _train_content(srv: _Server, state: ServerState, config_json: str, r: int,
                   client: int, cursor: int):
  from flwr.app import RecordDict  # pylint: disable=g-import-not-at-top
  round_config = {
      "config-json": config_json, "round": r, "client-id": client,
      "cursor": int(cursor),
      "key-data": [int(x) for x in client_key_data(state, r, client)]}
  if srv.isolated:  # The local phase's key; the local adapter is the node's.
    round_config.update({
        "local-key-data": [int(x) for x in local_key_data(state, r, client)],
        "num-clients": srv.settings.num_nodes})
  content = RecordDict({
      "params": wire.to_record(state.params),
      "round": wire.config_record(round_config),
  })
  if srv.fed.spec.scaffold:
    content["control"] = wire.to_record(state.control)
    content["client-control"] = wire.to_record(
        jax.tree.map(lambda x: x[client], state.client_controls))
  return content


def _parse_reply(srv: _Server, reply, client: int, node: int):
  what = f"the reply of node {node} (client {client})"
  content = reply.content
  for name in content.config_records:
    raise ValueError(f"{what} carries a config record {name!r}; a node sends "
                     "only arrays and metrics.")
  m = dict(content["metrics"])
  for k in ("num-examples", "cursor", "loss-sum", "num-tokens", "nonfinite"):
    if k not in m:
      raise ValueError(f"{what}: metric {k!r} missing.")
  zeros = lambda: jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), srv.template)
  if "delta" not in content.array_records:
    # A FedPIT node with nothing to train the global adapter on this round
    # (no kept synthetic pair) uploads nothing: weight 0, as in the simulation.
    if m["num-examples"] != 0:
      raise ValueError(f"{what}: no delta but num-examples={m['num-examples']}.")
    return zeros(), zeros() if srv.fed.spec.scaffold else None, m
  delta = wire.from_record(content["delta"], srv.template, f"{what}: delta")
  control = None
  if srv.fed.spec.scaffold:
    control = wire.from_record(content["control-delta"], srv.template,
                               f"{what}: control delta")
  return delta, control, m


def _run_round(srv: _Server, grid, fed_nodes: Federation, state: ServerState,
               cursors: np.ndarray, r: int, config_json: str
               ) -> tuple[ServerState, dict[str, Any]]:
  s, fed = srv.settings, srv.fed
  t0 = time.perf_counter()
  ids = sampling.sample_clients(s.config.seed, r, s.num_nodes, fed.clients_per_round)
  fed_nodes.refresh()
  dropped = []
  messages, bytes_down, wire_down = [], 0, 0
  for c in ids:
    node = fed_nodes.node_of.get(int(c))
    if node is None:
      dropped.append({"client": int(c), "node": None, "reason": "no node online"})
      continue
    content = _train_content(srv, state, config_json, r, int(c), cursors[c])
    bytes_down += wire.array_bytes(content)
    wire_down += wire.content_bytes(content)
    messages.append(_message(content, node, TRAIN, str(r + 1)))
  replies, failed = exchange(grid, messages, timeout=s.round_timeout,
                             poll=s.poll_seconds) if messages else ({}, {})
  for node, why in failed.items():
    dropped.append({"client": fed_nodes.client_of.get(node), "node": node,
                    "reason": why})
  answered, deltas, controls, metrics = [], [], [], []
  bytes_up = wire_up = 0
  for c in ids:
    node = fed_nodes.node_of.get(int(c))
    if node not in replies:
      continue
    audit_reply(s.audit_dir, f"round{r + 1}-client{int(c)}", replies[node].content)
    delta, control, m = _parse_reply(srv, replies[node], int(c), node)
    bytes_up += wire.array_bytes(replies[node].content)
    wire_up += wire.content_bytes(replies[node].content)
    answered.append(int(c))
    deltas.append(delta)
    controls.append(control)
    metrics.append(m)
  dropped.sort(key=lambda d: (d["client"] is None, d["client"]))
  for d in dropped:
    print(f"[flower] round {r + 1}: client {d['client']} (node {d['node']}) "
          f"dropped: {d['reason']}", flush=True)
  if len(answered) < s.min_replies:
    raise RuntimeError(
        f"Round {r + 1}: {len(answered)} of {len(ids)} sampled clients answered, "
        f"fewer than min-replies={s.min_replies} (dropped: {dropped}). The round "
        "was not applied; the last checkpoint is intact and a new `flwr run` "
        "with the same workdir resumes from it.")
  stack = lambda trees: jax.tree.map(lambda *x: np.stack(x), *trees)
  new_state, update_norm, clipped, bad = aggregate_and_step(
      state, stack(deltas),
      np.asarray([m["num-examples"] for m in metrics], np.float32),
      np.asarray(answered, np.int32),
      np.asarray([bool(m["nonfinite"]) for m in metrics]),
      stack(controls) if fed.spec.scaffold else None, fed=fed)
  if bool(bad):
    raise FloatingPointError(
        f"Round {r + 1}: a client produced a non-finite loss or gradient (client "
        f"losses {[m['loss-sum'] / max(m['num-tokens'], 1.0) for m in metrics]}). "
        "The update was not applied; the last checkpoint is intact. Lower "
        "config.federated.client_lr, enable grad_clip, or use float32.")
  for c, m in zip(answered, metrics):
    cursors[c] = int(m["cursor"])
  # float32, as the simulation's round metrics.
  loss_sum = np.sum(np.asarray([m["loss-sum"] for m in metrics], np.float32))
  tokens = np.sum(np.asarray([m["num-tokens"] for m in metrics], np.float32))
  seconds = time.perf_counter() - t0
  row = {"train_loss": float(loss_sum / np.maximum(tokens, np.float32(1.0))),
         "num_tokens": int(tokens),
         "tokens_per_s": float(tokens) / max(seconds, 1e-9), "seconds": seconds,
         "update_norm": float(update_norm),
         "clients": [int(i) for i in ids],
         "bytes_down": int(bytes_down), "bytes_up": int(bytes_up),
         "answered": answered, "dropped": dropped,
         "client_loss": [m["loss-sum"] / max(m["num-tokens"], 1.0) for m in metrics],
         "wire_bytes_down": int(wire_down), "wire_bytes_up": int(wire_up)}
  synthetic = {}
  for c, m in zip(answered, metrics):
    if "synthetic-made" in m:
      from fedjax_u2s.flower import node_fedpit  # pylint: disable=g-import-not-at-top
      counts = node_fedpit.synthetic_counts(m)
      if counts is not None:
        synthetic[str(c)] = counts
  if synthetic:  # The simulation's fields (pipelines/fedpit.SelfGeneration).
    row["synthetic"] = synthetic
    row["synthetic_kept"] = sum(c.get("kept", 0) for c in synthetic.values())
  if fed.dp.enabled:
    # Over the clients that sent a delta (a weight-0 FedPIT node is not
    # one), in float32 as the simulation's round metric.
    sent = sum(1 for m in metrics if m["num-examples"] > 0)
    row["dp_clipped_fraction"] = float(np.float32(clipped) / np.float32(max(sent, 1)))
    eps = privacy.epsilon(
        noise_multiplier=fed.dp.noise_multiplier,
        sampling_rate=privacy.sampling_rate(fed.clients_per_round, s.num_nodes),
        rounds=r + 1, delta=fed.dp.delta)
    row["dp_epsilon"] = eps if math.isfinite(eps) else None
  return new_state, row


def serve(grid, s: Settings) -> dict[str, Any]:
  """Runs (or resumes) the federated rounds; exports the adapter. See the module doc."""
  config, fed = s.config, AlgorithmConfig.from_config(s.config.federated)
  if fed.dp.enabled:
    privacy.check_accountant()
  os.makedirs(s.workdir, exist_ok=True)
  t_start = time.perf_counter()
  srv, fresh = _setup(s)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(s.workdir, "checkpoints"),
                                     keep=config.checkpoint.keep)
  restored = ckpt.restore_newest_intact(checkpoint_lib.abstract(fresh))
  if restored is None:
    state, cursors, start = fresh, np.zeros(s.num_nodes, np.int64), 0
  else:
    state, meta, start = restored
    cursors = np.asarray(meta["cursors"], np.int64)
    if len(cursors) != s.num_nodes:
      raise ValueError(f"{ckpt.directory}/{start} was written for {len(cursors)} "
                       f"clients, this federation has {s.num_nodes}: use a fresh "
                       "workdir.")
    print(f"[flower] resuming from the checkpoint of round {start} in "
          f"{ckpt.directory}", flush=True)
  del fresh
  with open(os.path.join(s.workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  writer = metrics_lib.MetricWriter(s.workdir, resume_round=start,
                                    tensorboard=config.train.tensorboard)
  federation = Federation(grid, s.num_nodes, s.poll_seconds, s.audit_dir)
  halt = config.train.halt_after_round or fed.num_rounds
  config_json = config.to_json()
  try:
    federation.wait_for_all(s.connect_timeout)
    print(f"[flower] {s.num_nodes} SuperNodes: client -> node "
          f"{dict(sorted(federation.node_of.items()))}", flush=True)
    if start == 0 and srv.evaluate is not None:
      writer.write(0, {"eval_loss": srv.evaluate(state.params)})
    for r in range(start, min(fed.num_rounds, halt)):
      state, row = _run_round(srv, grid, federation, state, cursors, r, config_json)
      done = r + 1
      every = config.train_eval.every
      if srv.evaluate is not None and every and (done % every == 0 or
                                                 done == fed.num_rounds):
        row["eval_loss"] = srv.evaluate(state.params)
      writer.write(done, row)
      if done % config.checkpoint.every == 0 or done in (fed.num_rounds, halt):
        ckpt.save(done, state, {"cursors": cursors, "round": done})
      print(f"[flower] round {done}/{fed.num_rounds}: train loss "
            f"{row['train_loss']:.4f}, answered {row['answered']}, "
            f"{row['seconds']:.1f}s", flush=True)
    exported = None
    if srv.isolated and int(state.round) == fed.num_rounds:
      exported = finish_nodes(srv, grid, federation, state, config_json)
  finally:
    writer.close()
    ckpt.close()
  rows = metrics_lib.read_jsonl(os.path.join(s.workdir, "metrics.jsonl"))
  _finish(srv, state, rows, time.perf_counter() - t_start, exported)
  return {"rounds": int(state.round), "rows": rows}


def finish_nodes(srv: _Server, grid, federation: Federation, state: ServerState,
                 config_json: str) -> dict[str, Any]:
  """FedPIT: every node exports its adapters (global, local, personal).

  Each node gets the final global adapter in a ``finish`` query and writes
  them into its own dir (:func:`fedjax_u2s.flower.node_fedpit.finish`); the
  reply carries no array. A node offline now exports at the next run's end.

  Returns:
    ``{"exported": [client ids], "missing": [{"client", "reason"}]}``.
  """
  from flwr.app import RecordDict  # pylint: disable=g-import-not-at-top
  s = srv.settings
  federation.refresh()
  messages, missing = [], []
  for c in range(s.num_nodes):
    node = federation.node_of.get(c)
    if node is None:
      missing.append({"client": c, "reason": "no node online"})
      continue
    content = RecordDict({
        "params": wire.to_record(state.params),
        "round": wire.config_record({
            "config-json": config_json, "round": int(state.round),
            "client-id": c, "num-clients": s.num_nodes})})
    messages.append(_message(content, node, FINISH, "finish"))
  replies, failed = exchange(grid, messages, timeout=s.round_timeout,
                             poll=s.poll_seconds) if messages else ({}, {})
  for node, reply in replies.items():
    audit_reply(s.audit_dir, f"finish-client{federation.client_of[node]}",
                reply.content)
  for node, why in failed.items():
    missing.append({"client": federation.client_of.get(node), "reason": why})
  exported = sorted(federation.client_of[n] for n in replies)
  for m in missing:
    print(f"[flower] client {m['client']} did not export its adapters: "
          f"{m['reason']}", flush=True)
  print(f"[flower] nodes {exported} wrote their global, local and personal "
        "adapters into their own dirs", flush=True)
  return {"exported": exported, "missing": missing}


def _finish(srv: _Server, state: ServerState, rows: list, seconds: float,
            exported: dict[str, Any] | None = None) -> None:
  s, config = srv.settings, srv.settings.config
  lora = jax.tree.map(np.asarray, state.params)
  if config.export.peft:
    export.save_peft(os.path.join(s.workdir, "adapter"), lora, srv.lora_config,
                     base_model=config.model.name)
  if config.export.merged:
    export.save_merged(os.path.join(s.workdir, "merged"), srv.model.config,
                       srv.model.params, lora, srv.lora_config,
                       srv.model.tokenizer, base_model=config.model.name)
  if rows:
    from fedjax_u2s.evaluation import report  # pylint: disable=g-import-not-at-top
    report.plot_curves(rows, ["train_loss", "eval_loss", "tokens_per_s"],
                       os.path.join(s.workdir, "curves.png"),
                       title=f"{srv.fed.algorithm} over Flower: {s.num_nodes} nodes")
  summary = {"rounds": int(state.round), "num_nodes": s.num_nodes,
             "algorithm": srv.fed.algorithm, "seconds": seconds,
             "dropped": [dict(d, round=r["round"]) for r in rows
                         for d in r.get("dropped", [])]}
  if exported is not None:
    summary["node_exports"] = exported
  with open(os.path.join(s.workdir, "flower_run.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  print(f"[flower] done: {summary['rounds']} rounds in {seconds:.0f}s; adapter in "
        f"{os.path.join(s.workdir, 'adapter')}", flush=True)
