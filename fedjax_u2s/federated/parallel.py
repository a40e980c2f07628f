"""Clients across devices: a 1-D mesh over a "clients" axis.

The round's :class:`~fedjax_u2s.federated.state.ClientBatches` are sharded on
their leading client axis; the frozen base parameters and the server state
are replicated (one copy per device, never one per client). The jitted round
takes those shardings explicitly and donates the server state::

    mesh = parallel.make_mesh()
    algorithm = parallel.build(fed_config, loss_fn, mesh)
    state = parallel.replicate(algorithm.init(lora, key, num_clients), mesh)
    frozen = parallel.replicate(base_params, mesh)
    batches = parallel.shard_clients(
        parallel.pad_clients(batches, parallel.client_multiple(algorithm, mesh)), mesh)
    state, metrics = algorithm.apply(state, frozen, batches)

Each scan step of the round holds ``clients_per_chunk`` clients on every
device; XLA sums the per-device partial delta sums for the aggregate.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_u2s.federated import algorithms
from fedjax_u2s.federated import objectives
from fedjax_u2s.federated.state import ClientBatches, pad_clients

PyTree = Any

CLIENT_AXIS = "clients"

__all__ = ["CLIENT_AXIS", "make_mesh", "replicated_sharding", "client_sharding",
           "replicate", "shard_clients", "pad_clients", "client_multiple", "build"]


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (default: all)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"make_mesh: num_devices={num_devices} but {len(devices)} "
                     "devices are available.")
  return Mesh(np.asarray(devices[:n]), (CLIENT_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def client_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the clients axis."""
  return NamedSharding(mesh, P(CLIENT_AXIS))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, replicated_sharding(mesh))


def shard_clients(client_batches: ClientBatches, mesh: Mesh) -> ClientBatches:
  """Shards every leaf of ``client_batches`` on its client axis.

  ``C`` must be a multiple of the mesh size (see :func:`pad_clients`).
  """
  c = client_batches.num_examples.shape[0]
  if c % mesh.size:
    raise ValueError(f"shard_clients: {c} clients do not split over {mesh.size} "
                     "devices; pad them first with pad_clients(batches, "
                     "client_multiple(algorithm, mesh)).")
  return jax.device_put(client_batches, client_sharding(mesh))


def client_multiple(algorithm: algorithms.FederatedAlgorithm, mesh: Mesh) -> int:
  """What ``C`` should be a multiple of: devices x clients_per_chunk."""
  return mesh.size * max(algorithm.config.clients_per_chunk, 1)


def build(fed_config: Any, loss_fn: objectives.LossFn, mesh: Mesh, *,
          local_loss_fn: objectives.LossFn | None = None
          ) -> algorithms.FederatedAlgorithm:
  """:func:`algorithms.build` with ``apply``/``evaluate`` jitted over ``mesh``.

  ``apply`` takes the server state and frozen params replicated and the
  client batches sharded on the client axis; it donates the server state.
  ``evaluate`` takes everything replicated. With ``local_loss_fn``,
  ``apply_isolated`` likewise, with the stacked local adapters replicated
  (they are small, and every client of a chunk gathers its own row) and
  donated.
  """
  def constrain(chunk_xs):  # leaves [chunk, ...]: the chunk axis is split.
    return jax.lax.with_sharding_constraint(chunk_xs, client_sharding(mesh))

  alg = algorithms.build(fed_config, loss_fn, num_client_shards=mesh.size,
                         chunk_sharding=constrain, local_loss_fn=local_loss_fn)
  rep, cli = replicated_sharding(mesh), client_sharding(mesh)
  apply = jax.jit(alg.apply, in_shardings=(rep, rep, cli),
                  out_shardings=(rep, rep), donate_argnums=(0,))
  evaluate = jax.jit(alg.evaluate, in_shardings=(rep, rep, rep),
                     out_shardings=(rep, rep))
  apply_isolated = None
  if alg.apply_isolated is not None:
    apply_isolated = jax.jit(alg.apply_isolated,
                             in_shardings=(rep, rep, rep, cli, cli),
                             out_shardings=(rep, rep, rep), donate_argnums=(0, 1))
  return alg._replace(apply=apply, evaluate=evaluate, apply_isolated=apply_isolated)
