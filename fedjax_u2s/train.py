"""The federated training loop: rounds of sampled clients, checkpoints, metrics.

:func:`train` is shared by every pipeline that tunes adapters (ready instruction
data, U2S-generated data, experiments): it takes tokenized client datasets and
runs ``config.federated.num_rounds`` rounds of the algorithm named by the
config, one jitted call per round (all sampled clients vmapped in chunks, the
client axis sharded over every device of every process).

Exact resume: everything a round depends on is either in the checkpointed
server state (adapter, optimizer state, controls, round, rng) or a pure
function of ``(seed, round)`` (client sampling) or of the checkpointed data
cursors (which examples each client sees next). A run killed at any point and
started again with the same command ends with bit-identical adapters.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Sequence

from absl import logging
import jax
from jax.sharding import NamedSharding
import ml_collections
import numpy as np

from fedjax_u2s import checkpoint as checkpoint_lib
from fedjax_u2s import lora as lora_lib
from fedjax_u2s import metrics as metrics_lib
from fedjax_u2s.data import batching
from fedjax_u2s.federated import objectives
from fedjax_u2s.federated import parallel
from fedjax_u2s.federated import sampling

PyTree = Any


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` hands back.

  Attributes:
    lora: the final global adapter (host numpy leaves).
    lora_config: its static config.
    rounds: rounds completed (== num_rounds unless halted early).
    metrics: the rows of ``metrics.jsonl``.
  """
  lora: PyTree
  lora_config: lora_lib.LoraConfig
  rounds: int
  metrics: list[dict[str, Any]]


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
          base_params: PyTree, client_sets: Sequence[Any],
          eval_set: Any | None = None) -> TrainResult:
  """Runs (or resumes) federated LoRA tuning.

  Args:
    config: the experiment config; reads ``seed``, ``lora``, ``federated``,
      ``train``, ``checkpoint``, ``eval``, ``mesh``.
    workdir: checkpoints go to ``workdir/checkpoints``, metrics to
      ``workdir/metrics.jsonl`` and ``workdir/tensorboard``, plots next to them.
    model_config: the base model's ``ModelConfig``.
    base_params: the frozen base parameters (shared by all clients).
    client_sets: one tokenized dataset per client
      (:class:`fedjax_u2s.data.batching.TokenizedSet`), index = client id.
    eval_set: optional held-out tokenized pairs for the eval loss.

  Returns:
    The final adapter and the metric rows.
  """
  fed = config.federated
  tcfg = config.train
  num_clients = len(client_sets)
  if num_clients == 0:
    raise ValueError("No clients: the data produced zero client datasets.")
  for cid, cs in enumerate(client_sets):
    if len(cs.tokens) == 0:
      raise ValueError(
          f"Client {cid} has no training examples (after tokenization and "
          "filtering). Lower partition min sizes, or drop the client.")
  if fed.clients_per_round > num_clients:
    raise ValueError(
        f"config.federated.clients_per_round={fed.clients_per_round} but only "
        f"{num_clients} clients exist; lower it to at most {num_clients}.")

  lcfg = lora_config_from(config.lora)
  # train.logits_chunk_size > 0 computes the loss over chunks of positions,
  # recomputed in the backward pass: on a GPU (H100) 128 with remat was the
  # fastest and lightest setting; on a CPU full logits without remat was
  # (docs/benchmarks.md).
  loss_fn = functools.partial(objectives.causal_lm_loss, model_config=model_config,
                              lora_config=lcfg,
                              logits_chunk_size=config.train.logits_chunk_size)
  lead = jax.process_index() == 0

  # Devices: the client axis is sharded over all of them; the rest replicated.
  mesh = parallel.make_mesh(config.mesh.num_devices or None)
  algo = parallel.build(fed, loss_fn, mesh)
  replicated = parallel.replicated_sharding(mesh)
  by_client = parallel.client_sharding(mesh)
  multiple = parallel.client_multiple(algo, mesh)

  base = jax.tree.map(lambda x: _global_array(np.asarray(x), replicated), base_params)
  rng = jax.random.key(config.seed)
  init_lora = lora_lib.init(jax.random.fold_in(rng, 0), model_config, lcfg)
  fresh = jax.jit(lambda p: algo.init(p, jax.random.fold_in(rng, 1), num_clients),
                  out_shardings=replicated)(init_lora)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     keep=config.checkpoint.keep)
  cursors = np.zeros(num_clients, np.int64)
  restored = ckpt.restore(checkpoint_lib.abstract(fresh))
  if restored is None:
    server, start = fresh, 0
  else:
    server, meta, start = restored
    cursors = np.asarray(meta["cursors"], np.int64)
    if len(cursors) != num_clients:
      raise ValueError(
          f"{ckpt.directory}/{start} was written for {len(cursors)} clients, "
          f"this run has {num_clients}: use a fresh --workdir.")
    if lead:
      print(f"Resuming from the checkpoint of round {start} in {ckpt.directory}")
  del fresh

  eval_batch = None
  if eval_set is not None:
    eval_batch = jax.tree.map(lambda x: _global_array(x, replicated),
                              batching.eval_batches(eval_set, config.train_eval.batch_size))

  writer = metrics_lib.MetricWriter(workdir, resume_round=start,
                                    tensorboard=config.train.tensorboard) if lead else None
  lora_bytes = _tree_bytes(init_lora)
  num_rounds = fed.num_rounds
  halt = config.train.halt_after_round or num_rounds
  progress = None
  if lead:
    from tqdm import tqdm
    progress = tqdm(total=num_rounds, initial=start, desc="rounds", unit="round",
                    dynamic_ncols=True)

  def run_eval():
    loss_sum, weight = algo.evaluate(server.params, base, eval_batch)
    return float(loss_sum) / max(float(weight), 1.0)

  # The round compiled ahead of time per batch shape, so a round's tokens/s
  # never includes compilation (reported apart as compile_s).
  executables = {}

  def compiled_round(server, batches):
    key = tuple((x.shape, x.dtype) for x in jax.tree.leaves(batches))
    compile_s = 0.0
    if key not in executables:
      begin = time.perf_counter()
      executables[key] = algo.apply.lower(server, base, batches).compile()
      compile_s = time.perf_counter() - begin
    return executables[key], compile_s

  r = start
  try:
    if start == 0 and eval_set is not None and config.train_eval.every:
      loss0 = run_eval()
      if writer:
        writer.write(0, {"eval_loss": loss0})
    for r in range(start, min(num_rounds, halt)):
      t0 = time.perf_counter()
      ids = sampling.sample_clients(config.seed, r, num_clients, fed.clients_per_round)
      host_batches, new_cursors = batching.round_batches(
          [client_sets[i] for i in ids], ids, cursors[ids],
          batch_size=tcfg.batch_size, grad_accum=tcfg.grad_accum,
          local_steps=tcfg.local_steps or None,
          local_epochs=tcfg.local_epochs or None,
          max_local_steps=tcfg.max_local_steps or None, seed=config.seed)
      host_batches = parallel.pad_clients(host_batches, multiple)
      batches = jax.tree.map(lambda x: _global_array(x, by_client), host_batches)
      step, compile_s = compiled_round(server, batches)
      t1 = time.perf_counter()
      server, m = step(server, base, batches)
      loss = float(m["loss"])  # Syncs: the round is done.
      seconds = time.perf_counter() - t0
      if bool(m["nonfinite"]):
        last = ckpt.latest_round()
        where = (f"the last good checkpoint (round {last}) in {ckpt.directory} is "
                 "intact and a rerun resumes from it" if last is not None else
                 "no checkpoint had been written yet")
        raise FloatingPointError(
            f"Round {r + 1}: a client produced a non-finite loss or gradient "
            f"(client losses {np.asarray(m['client_loss']).round(4).tolist()}). "
            f"The update was not applied; {where}. Lower "
            "config.federated.client_lr, enable grad_clip, or use float32.")
      cursors[ids] = new_cursors
      n_sampled = len(ids)
      row = {"train_loss": loss, "num_tokens": int(m["num_tokens"]),
             "tokens_per_s": float(m["num_tokens"]) / (time.perf_counter() - t1),
             "seconds": seconds, "update_norm": float(m["update_norm"]),
             **({"compile_s": compile_s} if compile_s else {}),
             "clients": [int(i) for i in ids],
             "bytes_down": n_sampled * lora_bytes, "bytes_up": n_sampled * lora_bytes}
      done = r + 1
      if eval_set is not None and config.train_eval.every and (
          done % config.train_eval.every == 0 or done == num_rounds):
        row["eval_loss"] = run_eval()
      if writer:
        writer.write(done, row)
      if done % config.checkpoint.every == 0 or done == num_rounds or done == halt:
        ckpt.save(done, server, {"cursors": cursors, "round": done})
      if progress:
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
      r = done
  finally:
    if progress:
      progress.close()
    if writer:
      writer.close()
    ckpt.close()

  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if lead else []
  if lead and rows:
    metrics_lib.plot_curves(rows, ["train_loss", "eval_loss", "tokens_per_s"],
                            os.path.join(workdir, "curves.png"),
                            title=f"{fed.algorithm}: {num_clients} clients")
  return TrainResult(lora=_to_host(server.params), lora_config=lcfg,
                     rounds=int(r), metrics=rows)
