"""The node side: a SuperNode's own data and the local update on it.

A SuperNode is started with ``--node-config 'data-dir="/path"'`` (and
optionally ``client-id=3``, ``cache-dir="/path"``). Its data directory holds
exactly one instruction file ``instructions.{jsonl,json,parquet,csv}`` in any
format :func:`fedjax_u2s.data.instructions.load_examples` reads, or raw text
(``text/`` of .txt/.md files, or ``corpus.jsonl``) from which the node
generates its own pairs with U2S before its first training reply
(:mod:`fedjax_u2s.flower.node_u2s`); neither ever leaves the node. For every
``train`` message the node

1. reads the experiment config the server sent (model, LoRA, optimizer,
   batch sizes: the node trains exactly as the simulation's client would),
2. loads the base model and tokenizes its own file (a text node: its
   generated pairs, generating them first if not done yet),
3. takes the round's batches from its data stream at the cursor the server
   sent (:func:`fedjax_u2s.data.batching.round_batches`: the same examples,
   in the same order, as the simulation's client with that id),
4. runs :func:`fedjax_u2s.federated.client.client_update`, jitted and vmapped
   over a chunk of one client as :mod:`fedjax_u2s.federated.algorithms` runs
   it, with the round's client key and learning rate,

and answers with the adapter delta, its example count, the new cursor and
scalar metrics. Flower runs each message in a fresh ``flwr-clientapp``
process, so ``cache-dir`` (JAX's persistent compilation cache) saves the
recompile of every round after the first.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_u2s import lora as lora_lib
from fedjax_u2s.data import batching
from fedjax_u2s.data import instructions
from fedjax_u2s.federated import algorithms
from fedjax_u2s.federated import client as client_lib
from fedjax_u2s.federated import objectives
from fedjax_u2s.federated.config import AlgorithmConfig

PyTree = Any

DATA_PATTERN = "instructions.*"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def data_file(data_dir: str) -> str:
  """The node's one instruction file in ``data_dir``."""
  if not data_dir:
    raise ValueError("This SuperNode has no data: start it with --node-config "
                     "'data-dir=\"/path/to/its/data\"' (a directory holding "
                     "instructions.jsonl, or raw text for U2S: text/ or "
                     "corpus.jsonl).")
  found = sorted(p for p in glob.glob(os.path.join(data_dir, DATA_PATTERN))
                 if p.endswith(DATA_SUFFIXES))
  if len(found) != 1:
    raise ValueError(f"Node data dir {data_dir}: expected exactly one of "
                     f"instructions{{{','.join(DATA_SUFFIXES)}}}, found "
                     f"{[os.path.basename(p) for p in found] or 'none'}.")
  return found[0]


def holds_text(data_dir: str) -> bool:
  """Whether the node holds raw text to generate its pairs from (U2S), not
  an instruction file (:mod:`fedjax_u2s.flower.node_u2s`)."""
  from fedjax_u2s.flower import node_u2s  # pylint: disable=g-import-not-at-top
  if not data_dir:
    data_file(data_dir)  # The error that names the missing data-dir.
  has_instructions = any(p.endswith(DATA_SUFFIXES) for p in
                         glob.glob(os.path.join(data_dir, DATA_PATTERN)))
  source = node_u2s.text_source(data_dir)
  if source is not None and has_instructions:
    raise ValueError(f"Node data dir {data_dir}: holds both an instruction file and "
                     f"raw text ({source[1]}); keep one (the node trains on "
                     "instructions, or generates its pairs from its text).")
  return source is not None


def client_id(node_config: dict) -> int | None:
  """The client id this node declares (``client-id``), or None."""
  value = node_config.get("client-id")
  if value is None or value == "":
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"--node-config client-id={value!r}: must be an integer >= 0.")
  return int(value)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """The experiment config the server sent (locked, so typos raise)."""
  config = ml_collections.ConfigDict(json.loads(text))
  config.lock()
  return config


@functools.lru_cache(maxsize=2)
def _model(name: str, dtype: str, param_dtype: str, remat: bool):
  from fedjax_u2s.models import registry  # pylint: disable=g-import-not-at-top
  return registry.load(name, dtype=dtype, param_dtype=param_dtype, remat=remat)


def load_model(config: ml_collections.ConfigDict):
  m = config.model
  return _model(m.name, m.dtype, m.param_dtype, bool(m.get("remat", False)))


def lora_config(config: ml_collections.ConfigDict) -> lora_lib.LoraConfig:
  c = config.lora
  return lora_lib.LoraConfig(rank=c.rank, alpha=c.alpha, targets=tuple(c.targets),
                             dropout=c.dropout)


def loss_fn(config: ml_collections.ConfigDict, model_config) -> objectives.LossFn:
  """The training loss ``train.py`` builds, from the same config fields."""
  return functools.partial(objectives.causal_lm_loss, model_config=model_config,
                           lora_config=lora_config(config),
                           logits_chunk_size=config.train.logits_chunk_size)


def adapter_template(config: ml_collections.ConfigDict, model_config) -> PyTree:
  """Shapes and dtypes of the adapter (what the server's params look like)."""
  return jax.eval_shape(lambda: lora_lib.init(jax.random.key(0), model_config,
                                              lora_config(config)))


def tokenized_set(config: ml_collections.ConfigDict, data_dir: str, tokenizer,
                  name: str = "node", client: int | None = None
                  ) -> instructions.TokenizedSet:
  """The node's training data, tokenized as the simulation tokenizes a client.

  An instruction file as it is; U2S pairs (``client`` given, the node holds
  text) as the u2s job takes a client's kept pairs.
  """
  if client is not None and holds_text(data_dir):
    from fedjax_u2s.flower import node_u2s  # pylint: disable=g-import-not-at-top
    examples = node_u2s.training_examples(config, data_dir, client)
  else:
    path = data_file(data_dir)
    examples = instructions.load_examples(path)
    if not examples:
      raise ValueError(f"{path}: no usable examples ({examples.drops.summary()}).")
  return instructions.tokenize(list(examples), tokenizer, config.train.max_length,
                               system_prompt=config.data.system_prompt or None,
                               name=name)


def packing(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The batching's packing arguments, when the config has them.

  A node packs its own examples alone, while the simulation lays out the
  packed rows of all of a round's clients together: the same math, but the
  row shapes (and so float rounding) can differ. With ``train.pack`` off the
  node's batches are the simulation's exactly.
  """
  if "pack" not in config.train:
    return {}
  return {"pack": config.train.pack, "pack_length": config.train.pack_length}


@functools.lru_cache(maxsize=4)
def client_program(fed: AlgorithmConfig, loss: objectives.LossFn):
  """The jitted local update of one client, as the simulation runs it.

  ``(params, frozen, batch [1, S, A, B, T], step_mask [1, S], key_data [2],
  round, control, client_control [1, ...]) -> ClientOutput [1, ...]``: the
  client axis of one is vmapped, as a chunk of one client in
  :mod:`fedjax_u2s.federated.algorithms`, so the node computes what the
  simulation computes for that client.
  """
  spec = fed.spec
  prox_mu = fed.prox_mu if spec.prox else 0.0

  def run(params, frozen, batch, step_mask, key_data, round_, control,
          client_control):
    optimizer, lr = algorithms.client_optimizer(fed, round_)

    def one_client(b, mask, key, cc):
      return client_lib.client_update(
          params, frozen, b, mask, key, loss_fn=loss, optimizer=optimizer,
          learning_rate=lr, grad_clip=fed.grad_clip, prox_mu=prox_mu,
          server_control=control if spec.scaffold else None,
          client_control=cc if spec.scaffold else None)

    keys = jax.random.wrap_key_data(key_data)[None]
    return jax.vmap(one_client)(batch, step_mask, keys, client_control)

  return jax.jit(run)


@dataclasses.dataclass
class LocalResult:
  """What a node sends back for one round (all derived from its own data).

  Attributes:
    delta: the adapter delta (host numpy tree).
    control_delta: SCAFFOLD's control delta, or None.
    metrics: scalars: ``num-examples`` (the aggregation weight), ``cursor``
      (examples consumed after this round), ``loss-sum``, ``num-tokens``,
      ``num-steps``, ``nonfinite`` (0/1), ``train-seconds``, ``setup-seconds``.
  """
  delta: PyTree
  control_delta: PyTree | None
  metrics: dict[str, float | int]


def local_update(config: ml_collections.ConfigDict, data_dir: str, *,
                 params: PyTree, client: int, round_: int, cursor: int,
                 key_data: np.ndarray, control: PyTree | None = None,
                 client_control: PyTree | None = None,
                 node_config: dict | None = None) -> LocalResult:
  """One round of local training on this node's data (see the module doc).

  A node holding raw text first makes sure its U2S pairs exist
  (:func:`fedjax_u2s.flower.node_u2s.ensure_pairs`: generated at its first
  ``train`` message, read back after).
  """
  t0 = time.perf_counter()
  fed = AlgorithmConfig.from_config(config.federated)
  model = load_model(config)
  generation = None
  if holds_text(data_dir):
    from fedjax_u2s.flower import node_u2s  # pylint: disable=g-import-not-at-top
    generation = node_u2s.ensure_pairs(config, data_dir, client, node_config or {},
                                       model=model)
    t0 += generation.seconds  # setup-seconds leaves generation out.
  ts = tokenized_set(config, data_dir, model.tokenizer, name=f"client {client}",
                     client=client)
  tc = config.train
  batches, new_cursor = batching.round_batches(
      [ts], [client], [cursor], batch_size=tc.batch_size,
      grad_accum=tc.grad_accum, local_steps=tc.local_steps or None,
      local_epochs=tc.local_epochs or None,
      max_local_steps=tc.max_local_steps or None, seed=config.seed,
      **packing(config))
  loss = loss_fn(config, model.config)
  program = client_program(fed, loss)
  zeros = jax.tree.map(jnp.zeros_like, params)
  control = zeros if control is None else control
  client_control = jax.tree.map(lambda x: x[None], zeros if client_control is None
                                else client_control)
  t1 = time.perf_counter()
  out = program(params, model.params, batches.batch, batches.step_mask,
                jnp.asarray(key_data, jnp.uint32), jnp.asarray(round_, jnp.int32),
                control, client_control)
  out = jax.tree.map(lambda x: np.asarray(x)[0], out)
  seconds = time.perf_counter() - t1
  metrics = {"num-examples": int(batches.num_examples[0]),
             "cursor": int(new_cursor[0]),
             "loss-sum": float(out.loss_sum), "num-tokens": float(out.num_tokens),
             "num-steps": int(out.num_steps), "nonfinite": int(bool(out.nonfinite)),
             "train-seconds": seconds, "setup-seconds": t1 - t0}
  if generation is not None:  # Counts and seconds: numbers about its own data.
    metrics.update({"u2s-kept": generation.kept, "u2s-rejected": generation.rejected,
                    "u2s-pieces": generation.pieces,
                    "generation-seconds": generation.seconds})
  return LocalResult(delta=out.delta,
                     control_delta=out.control_delta if fed.spec.scaffold else None,
                     metrics=metrics)
