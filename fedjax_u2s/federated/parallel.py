"""Clients and model across devices: a 2-D mesh over ("clients", "model").

The round's :class:`~fedjax_u2s.federated.state.ClientBatches` (and so each
client's adapter, optimizer state and activations) are sharded on their
leading client axis over the ``"clients"`` mesh axis. The frozen base is
split over the ``"model"`` axis (``config.mesh.model_parallel`` devices; 1 =
today's layout, the base replicated on every device). The server state (the
global adapter, the server optimizer, SCAFFOLD's controls) is replicated: it
is a few MB. The jitted round takes those shardings explicitly and donates
the server state::

    mesh = parallel.make_mesh(model_parallel=2)
    frozen = parallel.shard_base(base_params, mesh)
    algorithm = parallel.build(fed_config, loss_fn, mesh,
                               base_sharding=parallel.base_sharding(base_params, mesh))
    state = parallel.replicate(algorithm.init(lora, key, num_clients), mesh)
    batches = parallel.shard_clients(
        parallel.pad_clients(batches, parallel.client_multiple(algorithm, mesh)), mesh)
    state, metrics = algorithm.apply(state, frozen, batches)

Each scan step of the round holds ``clients_per_chunk`` clients on every
group of ``model_parallel`` devices; XLA sums the per-device partial delta
sums for the aggregate.

**How the base is split: tensor parallel (Megatron layout), not FSDP.** The
projections that open a block (q, k, v, gate, up; their biases) are split on
their output dimension, the ones that close it (o, down) on their input
dimension, the embedding and the LM head on the vocabulary; norms (and o's /
down's biases) are small and replicated. The layer weights are stacked
``[L, ...]`` and the split is on a non-layer dimension, so the layer scan
slices one layer's shard per step and nothing ever holds a whole layer, let
alone the whole base. We pick this over FSDP (split the weights, all-gather
each layer inside the scan) because a client's data is *not* split over the
model axis (clients, not examples, are the data-parallel unit; a client's
adapter and optimizer state must stay whole): with FSDP every device of a
model group would gather each layer and then run the same client's forward
and backward passes as its peers, ``model_parallel`` times the compute. With
the tensor-parallel split each device multiplies by its own shard only: the
work is divided, and the traffic is two all-reduces of a block's activations
``[B, T, D]`` per layer and pass instead of a layer's weights, which for
LoRA tuning on short rows is the smaller of the two. The LoRA factors are
small and stay whole on every device of a group (XLA sums the partial
products of ``x @ A`` where ``x`` is split). It is all plain ``jit`` with
shardings on the inputs: GSPMD inserts the collectives (``tests/test_mesh2d.py``
checks in the compiled HLO that no all-gather rebuilds a split weight). A
dimension the model axis does not divide falls back to another one that it
divides (or stays replicated), which stays correct but may add resharding;
pick ``model_parallel`` dividing the head counts (Qwen2.5-7B: 28 heads, 4 KV
heads: 2 or 4).

The 1-D API of before (a mesh with only the ``"clients"`` axis, the base
replicated) still works with every function here.
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
MODEL_AXIS = "model"

__all__ = ["CLIENT_AXIS", "MODEL_AXIS", "make_mesh", "client_axis_size",
           "model_axis_size", "replicated_sharding", "client_sharding",
           "base_spec", "base_sharding", "shard_base", "replicate",
           "shard_clients", "pad_clients", "client_multiple", "build"]

# Projections split on their output dimension (the last) and on their input
# dimension (the second to last); the fused inference layouts (qkv, gate_up)
# are column-parallel like their parts.
_COLUMN = ("q", "k", "v", "gate", "up", "qkv", "gate_up")
_ROW = ("o", "down")


def make_mesh(num_devices: int | None = None, model_parallel: int = 1) -> Mesh:
  """A ``(clients, model)`` mesh over the first ``num_devices`` devices.

  Args:
    num_devices: devices in the mesh (default: all of every process).
    model_parallel: devices on the model axis (``config.mesh.model_parallel``);
      the rest, ``num_devices // model_parallel``, on the clients axis.

  With ``model_parallel == 1`` the devices are in ``jax.devices()`` order,
  as the 1-D mesh always was; otherwise ``jax.make_mesh`` orders them for the
  physical topology (a model group on neighbouring chips), falling back to
  ``jax.devices()`` order where it cannot.
  """
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"config.mesh.num_devices={num_devices} but {len(devices)} "
                     "devices are available.")
  if model_parallel < 1 or n % model_parallel:
    raise ValueError(
        f"config.mesh.model_parallel={model_parallel} must be >= 1 and divide "
        f"the {n} devices of the mesh (config.mesh.num_devices="
        f"{num_devices or 0}, 0 = all); the clients axis gets the rest. "
        f"Divisors of {n}: {[d for d in range(1, n + 1) if n % d == 0]}.")
  shape = (n // model_parallel, model_parallel)
  names = (CLIENT_AXIS, MODEL_AXIS)
  auto = (jax.sharding.AxisType.Auto,) * 2
  if model_parallel > 1:
    try:
      return jax.make_mesh(shape, names, axis_types=auto, devices=devices[:n])
    except (ValueError, NotImplementedError, AssertionError):
      pass  # A subset the topology helper cannot lay out: plain order.
  return Mesh(np.asarray(devices[:n]).reshape(shape), names, axis_types=auto)


def client_axis_size(mesh: Mesh) -> int:
  """Devices the client axis is split over."""
  return mesh.shape[CLIENT_AXIS]


def model_axis_size(mesh: Mesh) -> int:
  """Devices the base is split over (1 on a 1-D clients mesh)."""
  return mesh.shape.get(MODEL_AXIS, 1)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def client_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the clients axis (whole on the model axis)."""
  return NamedSharding(mesh, P(CLIENT_AXIS))


def _path_names(path) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return tuple(out)


def base_spec(path: tuple[str, ...], shape: tuple[int, ...], model_size: int) -> P:
  """The partition spec of one base leaf (see the module docstring).

  Args:
    path: the leaf's key path as names, e.g. ``("layers", "q", "w")``.
    shape: the leaf's shape (stacked layers: ``[L, ...]``).
    model_size: devices on the model axis.

  Returns:
    ``P()`` (replicated) or a spec with ``"model"`` on one dimension that
    ``model_size`` divides.
  """
  ndim = len(shape)
  if model_size == 1 or ndim == 0:
    return P()
  is_bias = path[-1] == "b"
  name = path[-2] if len(path) >= 2 and path[-1] in ("w", "b") else path[-1]
  if name in _COLUMN:
    preferred = ndim - 1
  elif name in _ROW and not is_bias:
    preferred = ndim - 2
  elif name == "embed":  # [V, D]: the vocabulary.
    preferred = ndim - 2
  elif name == "lm_head":  # [D, V]
    preferred = ndim - 1
  else:  # Norms, the row-parallel layers' biases: small, replicated.
    return P()
  # Never the stacked layer axis: the layer scan slices it.
  stacked = len(path) >= 2 and path[0] == "layers" and not path[1].isdigit()
  dims = range(1 if stacked else 0, ndim)
  for d in sorted(dims, key=lambda d: (d != preferred, -shape[d])):
    if shape[d] % model_size == 0:
      spec = [None] * ndim
      spec[d] = MODEL_AXIS
      return P(*spec)
  return P()


def base_sharding(base_params: PyTree, mesh: Mesh) -> PyTree:
  """A ``NamedSharding`` per leaf of ``base_params`` (arrays or shape structs)."""
  m = model_axis_size(mesh)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, base_spec(_path_names(path),
                                                     tuple(np.shape(x)), m)),
      base_params)


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
  """``x`` as a global array with ``sharding``, from host data every process has.

  A ``jax.Array`` already laid out so is returned as it is (no copy).
  """
  if isinstance(x, jax.Array):
    if x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    # Within one process, or from one global layout to another: a reshard.
    if x.is_fully_addressable == sharding.is_fully_addressable:
      return jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_base(base_params: PyTree, mesh: Mesh) -> PyTree:
  """The base placed by :func:`base_sharding` (replicated when model is 1)."""
  return jax.tree.map(_place, base_params, base_sharding(base_params, mesh))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, replicated_sharding(mesh))


def shard_clients(client_batches: ClientBatches, mesh: Mesh) -> ClientBatches:
  """Shards every leaf of ``client_batches`` on its client axis.

  ``C`` must be a multiple of the clients axis (see :func:`pad_clients`).
  """
  c = client_batches.num_examples.shape[0]
  n = client_axis_size(mesh)
  if c % n:
    raise ValueError(f"shard_clients: {c} clients do not split over {n} "
                     "devices of the clients axis; pad them first with "
                     "pad_clients(batches, client_multiple(algorithm, mesh)).")
  return jax.device_put(client_batches, client_sharding(mesh))


def client_multiple(algorithm: algorithms.FederatedAlgorithm, mesh: Mesh) -> int:
  """What ``C`` should be a multiple of: clients-axis devices x clients_per_chunk."""
  return client_axis_size(mesh) * max(algorithm.config.clients_per_chunk, 1)


def build(fed_config: Any, loss_fn: objectives.LossFn, mesh: Mesh, *,
          local_loss_fn: objectives.LossFn | None = None,
          base_sharding: PyTree | None = None
          ) -> algorithms.FederatedAlgorithm:
  """:func:`algorithms.build` with ``apply``/``evaluate`` jitted over ``mesh``.

  ``apply`` takes the server state replicated, the frozen params with
  ``base_sharding`` (a tree of shardings like the base, from
  :func:`base_sharding`; None: replicated) and the client batches sharded
  on the client axis; it donates the server state. ``evaluate`` takes the
  adapter and batch replicated and the base as ``apply`` does. With
  ``local_loss_fn``, ``apply_isolated`` likewise, with the stacked local
  adapters replicated (they are small, and every client of a chunk gathers
  its own row) and donated.
  """
  def constrain(chunk_xs):  # leaves [chunk, ...]: the chunk axis is split.
    return jax.lax.with_sharding_constraint(chunk_xs, client_sharding(mesh))

  alg = algorithms.build(fed_config, loss_fn,
                         num_client_shards=client_axis_size(mesh),
                         chunk_sharding=constrain, local_loss_fn=local_loss_fn)
  rep, cli = replicated_sharding(mesh), client_sharding(mesh)
  frozen = rep if base_sharding is None else base_sharding
  apply = jax.jit(alg.apply, in_shardings=(rep, frozen, cli),
                  out_shardings=(rep, rep), donate_argnums=(0,))
  evaluate = jax.jit(alg.evaluate, in_shardings=(rep, frozen, rep),
                     out_shardings=(rep, rep))
  apply_isolated = None
  if alg.apply_isolated is not None:
    apply_isolated = jax.jit(alg.apply_isolated,
                             in_shardings=(rep, rep, frozen, cli, cli),
                             out_shardings=(rep, rep, rep), donate_argnums=(0, 1))
  return alg._replace(apply=apply, evaluate=evaluate, apply_isolated=apply_isolated)
