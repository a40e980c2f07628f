"""The federated training loop: rounds of sampled clients, checkpoints, metrics.

:func:`train` is shared by every pipeline that tunes adapters (ready instruction
data, U2S-generated data, experiments): it takes tokenized client datasets and
runs ``config.federated.num_rounds`` rounds of the algorithm named by the
config, one jitted call per round (all sampled clients vmapped in chunks, the
client axis sharded over every device of every process, the base split over
``config.mesh.model_parallel`` of them: :mod:`fedjax_u2s.federated.parallel`).

Exact resume: everything a round depends on is either in the checkpointed
server state (adapter, optimizer state, controls, round, rng) or a pure
function of ``(seed, round)`` (client sampling) or of the checkpointed data
cursors (which examples each client sees next). A run killed at any point and
started again with the same command ends with bit-identical adapters.

With ``config.federated.dp.enabled`` every metrics row carries ``dp_epsilon``,
the cumulative epsilon after that round at ``dp.delta``
(:func:`fedjax_u2s.federated.privacy.epsilon`), and ``dp_clipped_fraction``.
The accountant is a pure function of the rounds completed, so nothing of it
is checkpointed; the DP noise comes from the checkpointed rng.

Client data may change between rounds (FedPIT's synthetic pairs, written by
the current global model): ``client_sets`` is then a :class:`RoundData`,
asked for the sampled clients' sets at the start of each round. With
``local_sets`` the run is parameter-isolated (FedPIT): every client also
trains a private local adapter on those sets, stacked on a client axis,
checkpointed beside the server state and never aggregated
(``algorithms.apply_isolated``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Protocol, Sequence, runtime_checkable

from absl import logging
import jax
from jax.sharding import NamedSharding
import ml_collections
import numpy as np
from tqdm import tqdm

from fedjax_u2s import checkpoint as checkpoint_lib
from fedjax_u2s import lora as lora_lib
from fedjax_u2s import metrics as metrics_lib
from fedjax_u2s.data import batching
from fedjax_u2s.evaluation import report
from fedjax_u2s.federated import algorithms
from fedjax_u2s.federated import objectives
from fedjax_u2s.federated import parallel
from fedjax_u2s.federated import privacy
from fedjax_u2s.federated import sampling
from fedjax_u2s.federated import state as state_lib
from fedjax_u2s.federated.config import AlgorithmConfig

PyTree = Any


@runtime_checkable
class RoundData(Protocol):
  """Client data that may change from round to round.

  Attributes:
    num_clients: the population size.
  """
  num_clients: int

  def sets(self, round_: int, client_ids: Sequence[int], params: PyTree
           ) -> list[Any | None]:
    """The tokenized sets of ``client_ids`` for round ``round_`` (0-based).

    ``params`` is the global adapter at the start of the round. A client
    whose set is None or empty trains nothing in this phase and carries
    weight 0. Must be a pure function of its arguments and the run's inputs,
    so a resumed run sees the same data.
    """

  def round_metrics(self, round_: int) -> dict[str, Any]:
    """Extra fields for the metrics row of round ``round_`` (may be empty)."""


class FixedSets:
  """:class:`RoundData` of sets that never change (the usual case)."""

  def __init__(self, client_sets: Sequence[Any]):
    self.client_sets = list(client_sets)
    self.num_clients = len(self.client_sets)

  def sets(self, round_, client_ids, params):
    del round_, params
    return [self.client_sets[i] for i in client_ids]

  def round_metrics(self, round_):
    del round_
    return {}


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` hands back.

  Attributes:
    lora: the final global adapter (host numpy leaves).
    lora_config: its static config.
    rounds: rounds completed (== num_rounds unless halted early).
    metrics: the rows of ``metrics.jsonl``.
    local: with ``local_sets``, every client's local adapter stacked on a
      leading client axis (host numpy leaves); else None.
  """
  lora: PyTree
  lora_config: lora_lib.LoraConfig
  rounds: int
  metrics: list[dict[str, Any]]
  local: PyTree | None = None


def lora_config_from(cfg: ml_collections.ConfigDict) -> lora_lib.LoraConfig:
  return lora_lib.LoraConfig(rank=cfg.rank, alpha=cfg.alpha,
                             targets=tuple(cfg.targets), dropout=cfg.dropout)


def maybe_initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
  """``jax.distributed.initialize`` when ``cfg.enabled`` (multi-host runs).

  On Cloud TPU / GPU clusters the arguments are discovered from the
  environment; a local multi-process CPU run passes them explicitly (see
  ``launch/multihost_local.sh``).
  """
  if not cfg.enabled or jax.distributed.is_initialized():
    return
  kw = {}
  if cfg.coordinator_address:
    kw = dict(coordinator_address=cfg.coordinator_address,
              num_processes=cfg.num_processes, process_id=cfg.process_id)
  # Cross-process collectives of CPU devices (a no-op for GPU/TPU devices).
  # Nothing here may touch the backend before initialize().
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def _global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from a host array every process holds in full."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _to_host(tree: PyTree) -> PyTree:
  """Fully replicated global arrays -> numpy (works across processes)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))
                      if isinstance(x, jax.Array) else np.asarray(x), tree)


def _tree_bytes(tree: PyTree) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * np.size(x) for x in jax.tree.leaves(tree)))


def train(config: ml_collections.ConfigDict, workdir: str, *, model_config,
          base_params: PyTree, client_sets: Sequence[Any] | RoundData,
          eval_set: Any | None = None,
          local_sets: Sequence[Any] | RoundData | None = None) -> TrainResult:
  """Runs (or resumes) federated LoRA tuning.

  Args:
    config: the experiment config; reads ``seed``, ``lora``, ``federated``,
      ``train``, ``checkpoint``, ``train_eval``, ``mesh``.
    workdir: checkpoints go to ``workdir/checkpoints`` (unreadable ones are
      moved to ``workdir/checkpoints_corrupt``), metrics to
      ``workdir/metrics.jsonl`` and ``workdir/tensorboard``, plots next to them.
    model_config: the base model's ``ModelConfig``.
    base_params: the frozen base parameters (shared by all clients).
    client_sets: one tokenized dataset per client
      (:class:`fedjax_u2s.data.batching.TokenizedSet`), index = client id;
      or a :class:`RoundData` whose sets may change every round.
    eval_set: optional held-out tokenized pairs for the eval loss.
    local_sets: given, the run is parameter-isolated (FedPIT): what each
      client's private local adapter trains on (``client_sets`` then trains
      the global adapter alone).

  Returns:
    The final adapter and the metric rows.
  """
  data = client_sets if isinstance(client_sets, RoundData) else FixedSets(client_sets)
  local = (None if local_sets is None else local_sets
           if isinstance(local_sets, RoundData) else FixedSets(local_sets))
  fed = _validate(config, data, local)
  run, fresh = _setup(config, fed, model_config, base_params, data, local,
                      eval_set)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     keep=config.checkpoint.keep)
  state, cursors, start = _restore_or_init(run, ckpt, fresh)
  del fresh
  writer, progress = _open_outputs(run, workdir, start)
  halt = config.train.halt_after_round or fed.num_rounds
  r = start
  try:
    if start == 0 and run.eval_batch is not None and config.train_eval.every:
      loss0 = _eval_loss(run, state)
      if writer:
        writer.write(0, {"eval_loss": loss0})
    for r in range(start, min(fed.num_rounds, halt)):
      state, row = _run_round(run, ckpt, state, cursors, r)
      done = r + 1
      if _eval_due(run, done):
        row["eval_loss"] = _eval_loss(run, state)
      if writer:
        writer.write(done, row)
      if done % config.checkpoint.every == 0 or done in (fed.num_rounds, halt):
        ckpt.save(done, state, {**{f"{k}cursors": v for k, v in cursors.items()},
                                 "round": done})
      if progress:
        progress.update(1)
        progress.set_postfix(loss=f"{row['train_loss']:.3f}",
                             tok_s=f"{row['tokens_per_s']:.0f}",
                             **({"eps": f"{row['dp_epsilon']:.2f}"}
                                if row.get("dp_epsilon") is not None else {}))
      r = done
  finally:
    if progress:
      progress.close()
    if writer:
      writer.close()
    ckpt.close()
  rows = _write_curves(run, workdir)
  if run.isolated:
    return TrainResult(lora=_to_host(state["server"].params),
                       lora_config=run.lora_config, rounds=int(r), metrics=rows,
                       local=_to_host(state["local"]))
  return TrainResult(lora=_to_host(state.params), lora_config=run.lora_config,
                     rounds=int(r), metrics=rows)


@dataclasses.dataclass
class _Run:
  """What the rounds of one :func:`train` call share (built by :func:`_setup`).

  Attributes:
    config: the experiment config.
    fed: ``config.federated``, checked.
    data: the clients' data (of the global adapter).
    local: with parameter isolation, the data of the local adapters.
    lora_config: the adapter's static config.
    algo: the algorithm, jitted over the client mesh.
    replicated, by_client: shardings of replicated and per-client arrays.
    multiple: the sampled clients are padded to a multiple of this.
    base: the frozen base parameters, split over the mesh's model axis
      (replicated when ``config.mesh.model_parallel`` is 1).
    eval_batch: the held-out micro-batches, replicated (None: no eval).
    lora_bytes: bytes of one adapter (what a client downloads and uploads).
    lead: this is process 0 (writes metrics, plots and progress).
    executables: the round compiled ahead of time, per batch shape.
  """
  config: ml_collections.ConfigDict
  fed: AlgorithmConfig
  data: RoundData
  local: RoundData | None
  lora_config: lora_lib.LoraConfig
  algo: Any
  replicated: NamedSharding
  by_client: NamedSharding
  multiple: int
  base: PyTree
  eval_batch: PyTree | None
  lora_bytes: int
  lead: bool
  executables: dict = dataclasses.field(default_factory=dict)

  @property
  def isolated(self) -> bool:
    return self.local is not None

  @property
  def num_clients(self) -> int:
    return self.data.num_clients


def _validate(config: ml_collections.ConfigDict, data: RoundData,
              local: RoundData | None) -> AlgorithmConfig:
  """Checks the config and the data before any work; ``config.federated``."""
  fed = AlgorithmConfig.from_config(config.federated)
  for field in ("every", "keep"):
    value = config.checkpoint[field]
    if value < 1:
      raise ValueError(f"config.checkpoint.{field}={value}: must be >= 1.")
  if config.train.halt_after_round < 0:
    raise ValueError(f"config.train.halt_after_round={config.train.halt_after_round}: "
                     "must be >= 0 (0 = off).")
  num_clients = data.num_clients
  if num_clients == 0:
    raise ValueError("No clients: the data produced zero client datasets.")
  if local is not None and local.num_clients != num_clients:
    raise ValueError(f"{num_clients} clients train the global adapter but "
                     f"{local.num_clients} have local data; they must match.")
  # Every client needs data it always trains on: the fixed sets (the local
  # ones when isolated). Changing sets (FedPIT's synthetic pairs) may be
  # empty for a round; the client then trains nothing in that phase.
  always = data if local is None else local
  for cid, cs in enumerate(always.client_sets if isinstance(always, FixedSets) else ()):
    if len(cs.tokens) == 0:
      drops = getattr(cs, "drops", None)
      why = (f" Tokenization kept none: {drops.note()}." if drops is not None
             and drops.num_dropped else " Lower partition min sizes, or drop the client.")
      raise ValueError(f"Client {cid} has no training examples.{why}")
  if fed.clients_per_round > num_clients:
    raise ValueError(
        f"config.federated.clients_per_round={fed.clients_per_round} but only "
        f"{num_clients} clients exist; lower it to at most {num_clients}.")
  if fed.dp.enabled:
    privacy.check_accountant()
  return fed


def _setup(config: ml_collections.ConfigDict, fed: AlgorithmConfig, model_config,
           base_params: PyTree, data: RoundData, local: RoundData | None,
           eval_set: Any | None) -> tuple[_Run, PyTree]:
  """The mesh, the algorithm, the replicated base and eval data, round-0 state.

  With ``local`` the round-0 state is ``{"server": ServerState, "local":
  stacked local adapters}``, each local adapter a fresh one (``b`` = 0, so
  the personal model starts as the global one).
  """
  lcfg = lora_config_from(config.lora)
  # train.logits_chunk_size > 0 computes the loss over chunks of positions,
  # recomputed in the backward pass; which setting is fastest depends on the
  # device (docs/benchmarks.md).
  loss_fn = functools.partial(objectives.causal_lm_loss, model_config=model_config,
                              lora_config=lcfg,
                              logits_chunk_size=config.train.logits_chunk_size)
  # Devices: a (clients, model) mesh; the base split over the model axis,
  # the clients over the other, the server state replicated.
  mesh = parallel.make_mesh(config.mesh.num_devices or None,
                            model_parallel=config.mesh.get("model_parallel", 1))
  # FedPIT: the personal model base + global + local trains the local adapter.
  local_loss_fn = None if local is None else algorithms.personal_loss(loss_fn)
  base_sharding = parallel.base_sharding(base_params, mesh)
  algo = parallel.build(fed, loss_fn, mesh, local_loss_fn=local_loss_fn,
                        base_sharding=base_sharding)
  replicated = parallel.replicated_sharding(mesh)
  # A base already laid out so (pipelines/common.load_model) is used as it is.
  base = parallel.shard_base(base_params, mesh)
  rng = jax.random.key(config.seed)
  init_lora = lora_lib.init(jax.random.fold_in(rng, 0), model_config, lcfg)
  num_clients = data.num_clients
  fresh = jax.jit(lambda p: algo.init(p, jax.random.fold_in(rng, 1), num_clients),
                  out_shardings=replicated)(init_lora)
  if local is not None:
    stacked = jax.jit(lambda: lora_lib.init_stacked(
        jax.random.fold_in(rng, 2), num_clients, model_config, lcfg),
                      out_shardings=replicated)()
    fresh = {"server": fresh, "local": stacked}
  eval_batch = None
  if eval_set is not None:
    eval_batch = jax.tree.map(
        lambda x: _global_array(x, replicated),
        batching.eval_batches(eval_set, config.train_eval.batch_size,
                              pack=config.train.pack,
                              pack_length=config.train.pack_length))
  run = _Run(config=config, fed=fed, data=data, local=local, lora_config=lcfg,
             algo=algo, replicated=replicated,
             by_client=parallel.client_sharding(mesh),
             multiple=parallel.client_multiple(algo, mesh), base=base,
             eval_batch=eval_batch, lora_bytes=_tree_bytes(init_lora),
             lead=jax.process_index() == 0)
  return run, fresh


def _restore_or_init(run: _Run, ckpt: checkpoint_lib.Checkpointer, fresh: PyTree
                     ) -> tuple[PyTree, dict[str, np.ndarray], int]:
  """The newest intact checkpoint's state and data cursors, else round 0's.

  Cursors are ``{"": global data, "local_": local data}`` (the prefix of
  their name in the checkpoint's metadata: ``cursors``, ``local_cursors``).
  """
  num_clients = run.num_clients
  names = ("", "local_") if run.isolated else ("",)
  restored = ckpt.restore_newest_intact(checkpoint_lib.abstract(fresh))
  if restored is None:
    return fresh, {k: np.zeros(num_clients, np.int64) for k in names}, 0
  server, meta, start = restored
  cursors = {k: np.asarray(meta[f"{k}cursors"], np.int64) for k in names}
  if len(cursors[""]) != num_clients:
    raise ValueError(
        f"{ckpt.directory}/{start} was written for {len(cursors[''])} clients, "
        f"this run has {num_clients}: use a fresh --workdir.")
  if run.lead:
    print(f"Resuming from the checkpoint of round {start} in {ckpt.directory}")
  return server, cursors, start


def _open_outputs(run: _Run, workdir: str, start: int):
  """The metric writer and progress bar (process 0 only; else None, None)."""
  if not run.lead:
    return None, None
  writer = metrics_lib.MetricWriter(workdir, resume_round=start,
                                    tensorboard=run.config.train.tensorboard)
  progress = tqdm(total=run.fed.num_rounds, initial=start, desc="rounds",
                  unit="round", dynamic_ncols=True)
  return writer, progress


def _eval_loss(run: _Run, state: PyTree) -> float:
  """The global adapter's loss on the held-out pairs."""
  server = state["server"] if run.isolated else state
  loss_sum, weight = run.algo.evaluate(server.params, run.base, run.eval_batch)
  return float(loss_sum) / max(float(weight), 1.0)


def _eval_due(run: _Run, done: int) -> bool:
  """Whether the eval loss is measured after ``done`` rounds."""
  every = run.config.train_eval.every
  return bool(run.eval_batch is not None and every and (
      done % every == 0 or done == run.fed.num_rounds))


def _compiled_round(run: _Run, state: PyTree, batches: tuple[PyTree, ...]):
  """The round compiled ahead of time per batch shape, and the seconds it took.

  So a round's tokens/s never includes compilation (reported apart as
  compile_s). The executable takes ``(state, base, *batches)`` and returns
  ``(state, metrics)``, isolated or not.
  """
  key = tuple((x.shape, x.dtype) for x in jax.tree.leaves(batches))
  compile_s = 0.0
  if key not in run.executables:
    begin = time.perf_counter()
    if run.isolated:
      exe = run.algo.apply_isolated.lower(state["server"], state["local"], run.base,
                                          *batches).compile()
      def step(state, base, *b):
        server, local, m = exe(state["server"], state["local"], base, *b)
        return {"server": server, "local": local}, m
    else:
      step = run.algo.apply.lower(state, run.base, *batches).compile()
    run.executables[key] = step
    compile_s = time.perf_counter() - begin
  return run.executables[key], compile_s


def _round_batches(run: _Run, sets: Sequence[Any | None], ids: np.ndarray,
                   cursors: np.ndarray) -> tuple[Any, np.ndarray]:
  """The sampled clients' batches, padded for the mesh; and the new cursors.

  Clients whose set is None or empty get no steps and weight 0; their
  cursors do not move.
  """
  tcfg = run.config.train
  kw = dict(batch_size=tcfg.batch_size, grad_accum=tcfg.grad_accum,
            local_steps=tcfg.local_steps or None,
            local_epochs=tcfg.local_epochs or None,
            max_local_steps=tcfg.max_local_steps or None, seed=run.config.seed,
            pack=tcfg.pack, pack_length=tcfg.pack_length)
  has = [j for j, s in enumerate(sets) if s is not None and len(s.tokens)]
  new_cursors = cursors.copy()
  if has:
    sub, moved = batching.round_batches([sets[j] for j in has], ids[has],
                                        cursors[has], **kw)
    new_cursors[has] = moved
  else:  # Nobody has data for this phase: one masked step of 2 pad tokens.
    sub = state_lib.ClientBatches(
        batch={k: np.zeros((1, 1, tcfg.grad_accum, tcfg.batch_size, 2),
                           np.int32 if k == "tokens" else bool)
               for k in ("tokens", "input_mask", "loss_mask")},
        step_mask=np.zeros((1, 1), bool), num_examples=np.zeros(1, np.float32),
        client_ids=np.zeros(1, np.int32))
  if len(has) < len(sets):
    rows = np.asarray(has, np.int64)

    def widen(x):
      out = np.zeros((len(sets),) + np.shape(x)[1:], np.asarray(x).dtype)
      out[rows] = np.asarray(x)[:len(rows)]
      return out

    sub = state_lib.ClientBatches(
        batch=jax.tree.map(widen, sub.batch), step_mask=widen(sub.step_mask),
        num_examples=widen(sub.num_examples),
        client_ids=np.asarray(ids, np.int32))
  return parallel.pad_clients(sub, run.multiple), new_cursors


def _run_round(run: _Run, ckpt: checkpoint_lib.Checkpointer, state: PyTree,
               cursors: dict[str, np.ndarray], r: int
               ) -> tuple[PyTree, dict[str, Any]]:
  """Round ``r`` (0-based): sample, batch, train, aggregate; advances ``cursors``.

  Returns:
    The new server state and the round's metric row.

  Raises:
    FloatingPointError: a client went non-finite (the update is not applied).
  """
  config, fed = run.config, run.fed
  t0 = time.perf_counter()
  ids = np.asarray(sampling.sample_clients(config.seed, r, run.num_clients,
                                           fed.clients_per_round), np.int64)
  params = state["server"].params if run.isolated else state.params
  phases = [("", run.data)] + ([("local_", run.local)] if run.isolated else [])
  batches, new_cursors = [], {}
  for name, source in phases:
    host, new_cursors[name] = _round_batches(
        run, source.sets(r, ids, params), ids, cursors[name][ids])
    if not name:  # A client without data for the global adapter (weight 0) sends nothing.
      uploading = int(np.count_nonzero(host.num_examples))
    batches.append(jax.tree.map(lambda x: _global_array(x, run.by_client), host))
  extra = {k: v for _, source in phases for k, v in source.round_metrics(r).items()}
  t_data = time.perf_counter()
  step, compile_s = _compiled_round(run, state, tuple(batches))
  t1 = time.perf_counter()
  state, m = step(state, run.base, *batches)
  loss = float(m["loss"])  # Syncs: the round is done.
  seconds = time.perf_counter() - t0
  if bool(m["nonfinite"]):
    _raise_nonfinite(ckpt, r, m)
  for name, moved in new_cursors.items():
    cursors[name][ids] = moved
  n_sampled = len(ids)
  num_tokens = float(m["num_tokens"]) + float(m.get("local_num_tokens", 0.0))
  row = {"train_loss": loss, "num_tokens": int(m["num_tokens"]),
         "tokens_per_s": num_tokens / (time.perf_counter() - t1),
         "seconds": seconds, "update_norm": float(m["update_norm"]),
         **({"compile_s": compile_s} if compile_s else {}),
         **({"data_s": t_data - t0} if extra else {}),
         "clients": [int(i) for i in ids],
         "bytes_down": n_sampled * run.lora_bytes,
         # Only the global adapter's update leaves a client.
         "bytes_up": uploading * run.lora_bytes}
  if run.isolated:
    row["local_loss"] = float(m["local_loss"])
    row["local_num_tokens"] = int(m["local_num_tokens"])
  row.update(extra)
  if fed.dp.enabled:
    row["dp_clipped_fraction"] = float(m["dp_clipped_fraction"])
    eps = privacy.epsilon(
        noise_multiplier=fed.dp.noise_multiplier,
        sampling_rate=privacy.sampling_rate(fed.clients_per_round,
                                            run.num_clients),
        rounds=r + 1, delta=fed.dp.delta)
    # No noise, no guarantee: null in the JSON (strict JSON has no Infinity).
    row["dp_epsilon"] = eps if math.isfinite(eps) else None
  return state, row


def _raise_nonfinite(ckpt: checkpoint_lib.Checkpointer, r: int,
                     m: dict[str, Any]) -> None:
  last = ckpt.latest_round()
  where = (f"the last good checkpoint (round {last}) in {ckpt.directory} is "
           "intact and a rerun resumes from it" if last is not None else
           "no checkpoint had been written yet")
  raise FloatingPointError(
      f"Round {r + 1}: a client produced a non-finite loss or gradient "
      f"(client losses {np.asarray(m['client_loss']).round(4).tolist()}). "
      f"The update was not applied; {where}. Lower "
      "config.federated.client_lr, enable grad_clip, or use float32.")


def _write_curves(run: _Run, workdir: str) -> list[dict[str, Any]]:
  """Process 0: the metric rows of the whole run, plotted to curves.png."""
  if not run.lead:
    return []
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  if rows:
    report.plot_curves(rows, ["train_loss", "eval_loss", "tokens_per_s"],
                            os.path.join(workdir, "curves.png"),
                            title=f"{run.fed.algorithm}: "
                                  f"{run.num_clients} clients")
  return rows
