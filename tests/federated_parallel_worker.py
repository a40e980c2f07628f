"""Runs federated rounds over a client mesh and saves the results to .npz.

Used by tests/test_federated_parallel.py in a subprocess, because the number
of emulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``)
must be set before JAX initialises::

    python tests/federated_parallel_worker.py OUT.npz NUM_DEVICES
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_u2s import testing
from fedjax_u2s.federated import parallel
from fedjax_u2s.federated.state import ClientBatches

NUM_CLIENTS = 12  # population (SCAFFOLD controls)
C, S, A, B, D = 6, 3, 2, 3, 4  # sampled clients per round, steps, micro-batches, ...


def squares_loss(params, frozen, batch, rng):
  """Least squares with a frozen offset and dropout-like noise from rng."""
  m = batch["m"].astype(jnp.float32)
  noise = 0.01 * jax.random.normal(rng, batch["y"].shape) if rng is not None else 0.0
  r = batch["x"] @ params["w"] + frozen["b"] - batch["y"] + noise
  return jnp.sum(0.5 * m * r * r), jnp.sum(m)


def client_batches(round_):
  rs = np.random.default_rng(round_)
  step_mask = np.ones((C, S), bool)
  step_mask[1, 2] = step_mask[4, 1:] = False
  return ClientBatches(
      batch={"x": rs.normal(size=(C, S, A, B, D)).astype(np.float32),
             "y": rs.normal(size=(C, S, A, B)).astype(np.float32),
             "m": rs.random((C, S, A, B)) < 0.8},
      step_mask=step_mask,
      num_examples=rs.integers(1, 10, C).astype(np.float32),
      client_ids=rs.permutation(NUM_CLIENTS)[:C].astype(np.int32))


def main(out_path, num_devices):
  assert jax.device_count() == num_devices, (jax.device_count(), num_devices)
  mesh = parallel.make_mesh()
  cfg = testing.federated_config(
      algorithm="scaffold", client_optimizer="adamw", client_lr=0.05,
      grad_clip=1.0, clients_per_chunk=1, lr_schedule="constant",
      warmup_rounds=0)
  alg = parallel.build(cfg, squares_loss, mesh)
  frozen = parallel.replicate({"b": jnp.float32(0.3)}, mesh)
  state = parallel.replicate(
      alg.init({"w": jnp.linspace(-1.0, 1.0, D)}, jax.random.key(0), NUM_CLIENTS),
      mesh)
  results = {}
  for r in range(2):
    batches = parallel.pad_clients(client_batches(r),
                                   parallel.client_multiple(alg, mesh))
    batches = parallel.shard_clients(batches, mesh)
    state, metrics = alg.apply(state, frozen, batches)
    for k, v in metrics.items():
      results[f"r{r}_{k}"] = np.asarray(v)
  eval_batch = jax.tree.map(lambda x: x[0], client_batches(5).batch)
  loss_sum, weight = alg.evaluate(state.params, frozen,
                                  parallel.replicate(eval_batch, mesh))
  results.update(w=state.params["w"], control=state.control["w"],
                 client_controls=state.client_controls["w"],
                 round=state.round, eval_loss=loss_sum, eval_weight=weight,
                 sharded=len(batches.step_mask.sharding.device_set))
  np.savez(out_path, **{k: np.asarray(v) for k, v in results.items()})


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
