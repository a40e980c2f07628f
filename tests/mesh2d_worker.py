"""Rounds, sampling and evaluation of a tiny Llama over (clients, model) meshes.

Used by tests/test_mesh2d.py in a subprocess, because the number of emulated
CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) must be
set before JAX initialises::

    python tests/mesh2d_worker.py OUT_DIR

Writes ``OUT_DIR/results.npz`` (every run's final adapter and metrics, keyed
``<algorithm>_<clients>x<model>_...``; ``1x1`` is one device), the sampled
tokens and evaluation results as JSON, and the compiled round of the 2x4
mesh as HLO text.
"""

import functools
import json
import os
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s import testing
from fedjax_u2s.evaluation import runner
from fedjax_u2s.evaluation import suites
from fedjax_u2s.federated import objectives
from fedjax_u2s.federated import parallel
from fedjax_u2s.federated.state import ClientBatches
from fedjax_u2s.models import llama

TOK = testing.ByteTokenizer()
# Vocabulary 264 (the tokenizer's 259 rounded up to a multiple of 8) so the
# embedding and LM head split on the vocabulary; the other dimensions
# (hidden 32, MLP 48, q 32, k/v 16) divide 2, 4 and 8 as well.
CONFIG = testing.tiny_llama_config(vocab_size=264, intermediate_size=48)
LORA = lora_lib.LoraConfig(rank=2, alpha=4.0, targets=("*",))
NUM_CLIENTS = 10
C, S, A, B, T = 4, 2, 1, 2, 12  # sampled clients, steps, micro-batches, rows, length
ROUNDS = 3
SHAPES = ((8, 1), (4, 2), (2, 4), (1, 8))


def client_batches(round_):
  rs = np.random.default_rng(100 + round_)
  lengths = rs.integers(6, T + 1, (C, S, A, B))
  input_mask = np.arange(T) < lengths[..., None]
  tokens = np.where(input_mask, rs.integers(1, 256, (C, S, A, B, T)), 0)
  step_mask = np.ones((C, S), bool)
  step_mask[2, 1] = False
  return ClientBatches(
      batch={"tokens": tokens.astype(np.int32), "input_mask": input_mask,
             "loss_mask": input_mask & (np.arange(T) >= 3)},
      step_mask=step_mask, num_examples=rs.integers(1, 9, C).astype(np.float32),
      client_ids=rs.permutation(NUM_CLIENTS)[:C].astype(np.int32))


def fed_config(algorithm):
  return testing.federated_config(
      algorithm=algorithm, client_optimizer="adamw", client_lr=0.02,
      server_lr=0.05 if algorithm == "fedadam" else 1.0, clients_per_chunk=1,
      clients_per_round=C, lr_schedule="constant", warmup_rounds=0)


def run_rounds(mesh, algorithm, base):
  """ROUNDS rounds over ``mesh``; the final adapter and per-round losses."""
  loss_fn = functools.partial(objectives.causal_lm_loss, model_config=CONFIG,
                              lora_config=LORA)
  alg = parallel.build(fed_config(algorithm), loss_fn, mesh,
                       base_sharding=parallel.base_sharding(base, mesh))
  frozen = parallel.shard_base(base, mesh)
  lora = lora_lib.init(jax.random.key(1), CONFIG, LORA)
  state = parallel.replicate(alg.init(lora, jax.random.key(2), NUM_CLIENTS), mesh)
  losses, compiled = [], None
  for r in range(ROUNDS):
    batches = parallel.shard_clients(
        parallel.pad_clients(client_batches(r), parallel.client_multiple(alg, mesh)),
        mesh)
    if compiled is None:
      compiled = alg.apply.lower(state, frozen, batches).compile()
    state, metrics = compiled(state, frozen, batches)
    assert not bool(metrics["nonfinite"]), (algorithm, mesh.shape)
    losses.append(float(metrics["loss"]))
  out = {"/".join(map(str, k)): np.asarray(v) for k, v in
         jax.tree_util.tree_flatten_with_path(state.params)[0]}
  loss_sum, weight = alg.evaluate(state.params, frozen, parallel.replicate(
      jax.tree.map(lambda x: x[0, 0], client_batches(7).batch), mesh))
  out["eval_loss"] = np.asarray(loss_sum / weight)
  out["losses"] = np.asarray(losses)
  return out, compiled


def sample_and_evaluate(params):
  """Greedy tokens (two decode paths) and evaluation results of ``params``."""
  prompts = ["The cat", "Once upon a", "2 + 2 ="]
  out = {}
  for decode in ("unrolled", "auto"):
    s = sampler_lib.Sampler(CONFIG, TOK, pad_multiple=8, decode=decode)
    out[decode] = s(params, prompts, max_new_tokens=8, eos_ids=()).tokens
  tasks = [suites.heldout_ppl(pairs=[("What is red?", "An apple."),
                                     ("Say hi.", "Hi there.")]),
           suites.math("arithmetic", num_questions=2, seed=0, max_new_tokens=5)]
  res = runner.evaluate(CONFIG, params, TOK, tasks, batch_size=2, max_length=64,
                        length_multiple=32, decode="unrolled", progress=False)
  out["eval"] = {name: {k: v for k, v in r.items() if k != "description"}
                 for name, r in res.items()}
  return out


def main(out_dir):
  assert jax.device_count() == 8, jax.device_count()
  base = llama.init_params(jax.random.key(0), CONFIG)
  base = jax.tree.map(np.asarray, base)
  results = {}
  begin = time.perf_counter()
  tick = lambda what: print(f"{time.perf_counter() - begin:7.1f}s {what}",
                            file=sys.stderr, flush=True)
  for algorithm in ("fedavg", "fedadam"):
    one, _ = run_rounds(parallel.make_mesh(1), algorithm, base)
    results.update({f"{algorithm}_1x1_{k}": v for k, v in one.items()})
    for c, m in SHAPES:
      mesh = parallel.make_mesh(model_parallel=m)
      assert dict(mesh.shape) == {"clients": c, "model": m}, mesh.shape
      got, compiled = run_rounds(mesh, algorithm, base)
      results.update({f"{algorithm}_{c}x{m}_{k}": v for k, v in got.items()})
      tick(f"{algorithm} {c}x{m}")
      if (c, m) == (2, 4) and algorithm == "fedavg":
        with open(os.path.join(out_dir, "round_2x4.hlo.txt"), "w") as f:
          f.write(compiled.as_text())
        stats = compiled.memory_analysis()
        results["hlo_2x4_argument_bytes"] = np.asarray(stats.argument_size_in_bytes)
  # The 1-D mesh of before gives the (8, 1) mesh's result bit for bit.
  legacy = Mesh(np.asarray(jax.devices()), (parallel.CLIENT_AXIS,),
                axis_types=(jax.sharding.AxisType.Auto,))
  got, _ = run_rounds(legacy, "fedavg", base)
  results.update({f"fedavg_legacy_{k}": v for k, v in got.items()})
  # Shard sizes of the base on the 2x4 mesh (per device).
  mesh = parallel.make_mesh(model_parallel=4)
  sharded = parallel.shard_base(base, mesh)
  results["base_bytes"] = np.asarray(sum(x.nbytes for x in jax.tree.leaves(base)))
  results["base_bytes_device0"] = np.asarray(sum(
      s.data.nbytes for x in jax.tree.leaves(sharded) for s in x.addressable_shards
      if s.device == jax.devices()[0]))
  specs = {"/".join(map(str, k)): str(v.sharding.spec) for k, v in
           jax.tree_util.tree_flatten_with_path(sharded)[0]}
  samples = {"one": sample_and_evaluate(jax.device_put(base, jax.devices()[0]))}
  tick("sampler and evaluation, one device")
  for m in (4, 8):
    samples[f"model{m}"] = sample_and_evaluate(
        parallel.shard_base(base, parallel.make_mesh(model_parallel=m)))
    tick(f"sampler and evaluation, model_parallel={m}")
  np.savez(os.path.join(out_dir, "results.npz"), **results)
  with open(os.path.join(out_dir, "samples.json"), "w") as f:
    json.dump({"samples": samples, "specs": specs}, f, default=float)


if __name__ == "__main__":
  main(sys.argv[1])
