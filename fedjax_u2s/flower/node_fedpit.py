"""FedPIT on a SuperNode: self-generation, the global phase, the private local adapter.

A FedPIT node (the server runs a ``configs/fedpit.py`` config) holds its few
real examples as ``DATA_DIR/instructions.jsonl`` (any format
:func:`fedjax_u2s.data.instructions.load_examples` reads). For every
``train`` message of round ``r`` it does what the in-process job
(:mod:`fedjax_u2s.pipelines.fedpit`, ``algorithms.apply_isolated``) does for
that client, with the job's own pieces:

1. **self-generation** (:class:`fedjax_u2s.pipelines.fedpit.SelfGeneration`
   over this one client): its real examples prompt base + the received
   global adapter (merged once), the same prompts, seeds, parser and filters
   (``near_copy`` included) as the job; pairs are kept in
   ``STATE/synthetic/`` (:class:`fedjax_u2s.u2s.selfgen.SyntheticStore`) and
   refreshed every ``fedpit.selfgen.every`` rounds;
2. **the global phase** on the synthetic pairs
   (:func:`fedjax_u2s.flower.node.client_program`, the data cursor the
   server sent): the delta goes back, with the example count and scalar
   metrics; a node with no kept pair sends no delta (weight 0);
3. **the local phase**: its local adapter (restored from
   ``STATE/local_checkpoints/``, or the job's initial one for this client)
   trains on its real + synthetic pairs beside the base and the received
   global adapter (:func:`fedjax_u2s.federated.algorithms.train_local_adapter`,
   the local-phase key the server sent), and is checkpointed (orbax, with
   its data cursor and loss) as the state after round ``r``.

The local adapter, its cursor and its loss never leave the node: the reply
holds the global delta and the global phase's numbers only. Flower runs
each message in a fresh process, so every round restores the local state
from disk, and a SuperNode restarted between rounds simply goes on. A round
the server asks for again (its ServerApp restarted from an older checkpoint)
starts from the local state saved before that round: newer local
checkpoints are dropped first, so the node follows the server's history.

At the end the server sends ``finish`` with the final global adapter, and
the node writes ``STATE/adapter/`` (that global adapter),
``STATE/local_adapters/client_XXXX/`` (the local adapter, applied on top of
base + global: the job's layout) and ``STATE/personal_adapter/`` (base +
global + local as one PEFT adapter of twice the rank), all PEFT.

``STATE`` is ``DATA_DIR/fedpit/<run id>/``, the run id a digest of the
config fields that determine training (:func:`run_id`), so different
experiments on the same node keep apart and a rerun of one continues it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_u2s import checkpoint as checkpoint_lib
from fedjax_u2s import export
from fedjax_u2s import lora as lora_lib
from fedjax_u2s.data import batching
from fedjax_u2s.data import instructions
from fedjax_u2s.federated import algorithms
from fedjax_u2s.federated.config import AlgorithmConfig
from fedjax_u2s.flower import node as node_lib
from fedjax_u2s.pipelines import common
from fedjax_u2s.pipelines import fedpit
from fedjax_u2s.pipelines import workdir as workdir_lib

PyTree = Any

STATE_DIR = "fedpit"
RUN_FILE = "run.json"
LOCAL_CHECKPOINTS = "local_checkpoints"
# What determines a node's training state: the fedpit job's train stage.
RUN_FIELDS = common.TRAIN_FIELDS + ("fedpit",)


def run_id(config: ml_collections.ConfigDict) -> str:
  """A digest of the config fields that determine training (not halting,
  TensorBoard, checkpoint cadence or evaluation)."""
  fields = workdir_lib.config_fields(config, RUN_FIELDS, common.TRAIN_IGNORE)
  text = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def state_dir(data_dir: str, config: ml_collections.ConfigDict) -> str:
  return os.path.join(data_dir, STATE_DIR, run_id(config))


def _open_state(data_dir: str, config: ml_collections.ConfigDict, client: int
                ) -> str:
  """The node's state dir for this run (made, with ``run.json``, on first use)."""
  d = state_dir(data_dir, config)
  path = os.path.join(d, RUN_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if old["client_id"] != client:
      raise ValueError(f"{path}: this node trained as client {old['client_id']}, "
                       f"the server now asks for client {client}; give the node "
                       "its own client-id, or a fresh data dir.")
    return d
  os.makedirs(d, exist_ok=True)
  from fedjax_u2s.u2s import writer  # pylint: disable=g-import-not-at-top
  writer.atomic_write_json(path, {
      "client_id": client, "run_id": run_id(config),
      "fields": workdir_lib.config_fields(config, RUN_FIELDS, common.TRAIN_IGNORE)})
  return d


def real_examples(data_dir: str) -> list[instructions.Example]:
  """The node's real examples (its one instruction file)."""
  path = node_lib.data_file(data_dir)
  examples = instructions.load_examples(path)
  if not examples:
    raise ValueError(f"{path}: no usable examples ({examples.drops.summary()}); "
                     "a FedPIT node needs a few real examples to show.")
  return list(examples)


def initial_local(config: ml_collections.ConfigDict, model_config, client: int,
                  num_clients: int) -> PyTree:
  """Client ``client``'s local adapter before its first round: the job's row
  (``train.py`` stacks ``init_stacked(fold_in(key(seed), 2), num_clients)``)."""
  lcfg = node_lib.lora_config(config)
  stacked = jax.jit(lambda: lora_lib.init_stacked(
      jax.random.fold_in(jax.random.key(config.seed), 2), num_clients,
      model_config, lcfg))()
  return jax.tree.map(lambda x: np.asarray(x[client]), stacked)


@dataclasses.dataclass
class LocalState:
  """The node's private state after some round (never sent).

  Attributes:
    adapter: the local adapter (host numpy tree).
    cursor: examples of the local phase's data consumed so far.
    round: rounds completed when it was saved (0: initial).
    loss_sum, num_tokens: the local phase's loss of that round.
  """
  adapter: PyTree
  cursor: int
  round: int
  loss_sum: float = 0.0
  num_tokens: float = 0.0


class LocalStore:
  """The local adapter's orbax checkpoints in ``STATE/local_checkpoints/<round>/``.

  Every checkpoint is the state after the round it is named by; all are
  kept (one adapter each) so a server that resumes from an older round
  finds the matching one.
  """

  def __init__(self, directory: str):
    self.directory = directory

  def rounds(self) -> list[int]:
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

  def before(self, round_: int, template: PyTree) -> LocalState | None:
    """The newest state saved after at most ``round_`` rounds, or None."""
    done = [r for r in self.rounds() if r <= round_]
    if not done:
      return None
    like = checkpoint_lib.abstract(
        {"local": jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), template)})
    ckpt = checkpoint_lib.Checkpointer(self.directory, keep=max(len(self.rounds()), 1))
    try:
      adapter, meta, r = ckpt.restore(like, round_=done[-1])
    finally:
      ckpt.close()
    return LocalState(adapter=jax.tree.map(np.asarray, adapter["local"]),
                      cursor=int(meta["cursor"]), round=r,
                      loss_sum=float(meta["loss_sum"]),
                      num_tokens=float(meta["num_tokens"]))

  def save(self, state: LocalState) -> None:
    """Writes ``state``, first dropping states of later rounds (a history the
    server rolled back)."""
    for r in self.rounds():
      if r >= state.round:
        shutil.rmtree(os.path.join(self.directory, str(r)))
    ckpt = checkpoint_lib.Checkpointer(self.directory, keep=len(self.rounds()) + 1)
    try:
      ckpt.save(state.round, {"local": state.adapter},
                {"cursor": state.cursor, "round": state.round,
                 "loss_sum": state.loss_sum, "num_tokens": state.num_tokens})
    finally:
      ckpt.close()


@functools.lru_cache(maxsize=4)
def local_program(fed: AlgorithmConfig, local_loss):
  """The jitted local phase of one client, as ``apply_isolated`` runs it.

  ``(start, frozen, global params, batch [1, S, A, B, T], step_mask [1, S],
  key_data [2], round) -> (trained [1, ...], ClientOutput [1, ...])``: a
  vmapped chunk of one client, like the job's scan step.
  """
  def run(start, frozen, global_params, batch, step_mask, key_data, round_):
    optimizer, lr = algorithms.client_optimizer(fed, round_)

    def one_client(s, b, m, k):
      return algorithms.train_local_adapter(fed, local_loss, s, (frozen, global_params),
                                            b, m, k, optimizer, lr)

    keys = jax.random.wrap_key_data(key_data)[None]
    return jax.vmap(one_client)(jax.tree.map(lambda x: x[None], start), batch,
                                step_mask, keys)

  return jax.jit(run)


def _batches(config: ml_collections.ConfigDict, ts, client: int, cursor: int):
  tc = config.train
  return batching.round_batches(
      [ts], [client], [cursor], batch_size=tc.batch_size, grad_accum=tc.grad_accum,
      local_steps=tc.local_steps or None, local_epochs=tc.local_epochs or None,
      max_local_steps=tc.max_local_steps or None, seed=config.seed,
      **node_lib.packing(config))


def local_update(config: ml_collections.ConfigDict, data_dir: str, *,
                 params: PyTree, client: int, round_: int, cursor: int,
                 key_data: np.ndarray, local_key_data: np.ndarray,
                 num_clients: int, control: PyTree | None = None,
                 client_control: PyTree | None = None) -> node_lib.LocalResult:
  """One FedPIT round on this node (see the module doc).

  Returns:
    The global phase's :class:`~fedjax_u2s.flower.node.LocalResult` (its
    ``delta`` None when the node had nothing to train the global adapter
    on). Its metrics add the self-generation counts of a round that made
    pairs (``synthetic-made`` 1, ``synthetic-<reason>``); nothing of the
    local phase.
  """
  t0 = time.perf_counter()
  fed = AlgorithmConfig.from_config(config.federated)
  variant = config.fedpit.variant
  model = node_lib.load_model(config)
  state = _open_state(data_dir, config, client)
  real = {client: real_examples(data_dir)}
  lcfg = node_lib.lora_config(config)
  system = config.data.system_prompt or None

  def tokenize(exs, name):
    return instructions.tokenize(exs, model.tokenizer, config.train.max_length,
                                 system_prompt=system, name=name, log=False)

  gen = (fedpit.SelfGeneration(config, state, model, real, lcfg)
         if variant in fedpit.SYNTHETIC else None)
  global_data, local_data = fedpit.node_phases(variant, tokenize, real, gen)
  params = jax.tree.map(jnp.asarray, params)
  t_gen = time.perf_counter()
  ts = global_data.sets(round_, [client], params)[0]
  extra = global_data.round_metrics(round_)
  gen_seconds = time.perf_counter() - t_gen
  loss = node_lib.loss_fn(config, model.config)

  # The global phase: on the synthetic pairs (whatever the variant gives it).
  metrics = {"num-examples": 0, "cursor": int(cursor), "loss-sum": 0.0,
             "num-tokens": 0.0, "num-steps": 0, "nonfinite": 0}
  delta = control_delta = None
  seconds = 0.0
  t_global = time.perf_counter()
  if ts is not None and len(ts.tokens):
    batches, new_cursor = _batches(config, ts, client, cursor)
    zeros = jax.tree.map(jnp.zeros_like, params)
    cc = jax.tree.map(lambda x: x[None], zeros if client_control is None
                      else client_control)
    t1 = time.perf_counter()
    out = node_lib.client_program(fed, loss)(
        params, model.params, batches.batch, batches.step_mask,
        jnp.asarray(key_data, jnp.uint32), jnp.asarray(round_, jnp.int32),
        zeros if control is None else control, cc)
    out = jax.tree.map(lambda x: np.asarray(x)[0], out)
    seconds = time.perf_counter() - t1
    delta = out.delta
    control_delta = out.control_delta if fed.spec.scaffold else None
    metrics.update({"num-examples": int(batches.num_examples[0]),
                    "cursor": int(new_cursor[0]), "loss-sum": float(out.loss_sum),
                    "num-tokens": float(out.num_tokens),
                    "num-steps": int(out.num_steps),
                    "nonfinite": int(bool(out.nonfinite))})

  # The local phase: stays here.
  if local_data is not None:
    template = node_lib.adapter_template(config, model.config)
    store = LocalStore(os.path.join(state, LOCAL_CHECKPOINTS))
    before = store.before(round_, template)
    if before is None:
      before = LocalState(initial_local(config, model.config, client, num_clients),
                          cursor=0, round=0)
    lts = local_data.sets(round_, [client], params)[0]
    batches, new_cursor = _batches(config, lts, client, before.cursor)
    trained, out = local_program(fed, algorithms.personal_loss(loss))(
        jax.tree.map(jnp.asarray, before.adapter), model.params, params,
        batches.batch, batches.step_mask, jnp.asarray(local_key_data, jnp.uint32),
        jnp.asarray(round_, jnp.int32))
    trained = jax.tree.map(lambda x: np.asarray(x)[0], trained)
    bad = bool(np.asarray(out.nonfinite)[0]) or not all(
        np.isfinite(x).all() for x in jax.tree.leaves(trained))
    if bad:  # The job applies neither phase then; the server stops the run.
      metrics["nonfinite"] = 1
    elif not metrics["nonfinite"]:
      store.save(LocalState(adapter=trained, cursor=int(new_cursor[0]),
                            round=round_ + 1,
                            loss_sum=float(np.asarray(out.loss_sum)[0]),
                            num_tokens=float(np.asarray(out.num_tokens)[0])))
  # Seconds of the global phase and what came before it; the local phase's
  # time is not reported.
  metrics.update({"train-seconds": seconds,
                  "setup-seconds": t_global - t0 - gen_seconds,
                  "generation-seconds": gen_seconds})
  made = extra.get("synthetic", {}).get(str(client))
  if made is not None:  # Counts: numbers about its own data, as a U2S node's.
    metrics["synthetic-made"] = 1
    metrics.update({f"synthetic-{reason}": int(k) for reason, k in made.items()})
  return node_lib.LocalResult(delta=delta, control_delta=control_delta,
                              metrics=metrics)


def synthetic_counts(metrics: dict) -> dict[str, int] | None:
  """The self-generation counts a reply's metrics carry (None: none made)."""
  if not metrics.get("synthetic-made"):
    return None
  return {k[len("synthetic-"):]: int(v) for k, v in sorted(metrics.items())
          if k.startswith("synthetic-") and k != "synthetic-made"}


def finish(config: ml_collections.ConfigDict, data_dir: str, *, params: PyTree,
           client: int, rounds: int, num_clients: int) -> dict[str, Any]:
  """Writes the node's adapters (module doc) after ``rounds`` rounds.

  A client never sampled exports its initial local adapter, as the job does.

  Returns:
    Where they went and after which round the local adapter was saved.
  """
  model = node_lib.load_model(config)
  state = _open_state(data_dir, config, client)
  lcfg = node_lib.lora_config(config)
  template = node_lib.adapter_template(config, model.config)
  local = LocalStore(os.path.join(state, LOCAL_CHECKPOINTS)).before(rounds, template)
  adapter = (local.adapter if local is not None else
             initial_local(config, model.config, client, num_clients))
  params = jax.tree.map(np.asarray, params)
  name = config.model.name
  export.save_peft(os.path.join(state, "adapter"), params, lcfg, base_model=name)
  local_dir = os.path.join(state, "local_adapters", f"client_{client:04d}")
  export.save_peft(local_dir, adapter, lcfg, base_model=name)
  # One adapter of rank 2r whose update is global + local: PEFT scales by
  # alpha / r, so alpha doubles with the rank.
  personal = dataclasses.replace(lcfg, rank=2 * lcfg.rank, alpha=2 * lcfg.alpha)
  export.save_peft(os.path.join(state, "personal_adapter"),
                   jax.tree.map(np.asarray, lora_lib.concat_rank(params, adapter)),
                   personal, base_model=name)
  return {"state": state, "local_round": 0 if local is None else local.round}
