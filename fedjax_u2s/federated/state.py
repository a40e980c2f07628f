"""State and data types of the federated engine (all pytrees)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

PyTree = Any


@flax.struct.dataclass
class ClientBatches:
  """One round's training data for ``C`` sampled clients, padded and masked.

  Every leaf of ``batch`` has the leading axes ``[C, S, A, B]``: clients,
  local steps, gradient-accumulation micro-batches, examples per micro-batch.
  For the causal LM (:mod:`fedjax_u2s.data.batching`) ``batch`` is::

      {"tokens":     int32 [C, S, A, B, T],
       "input_mask": bool  [C, S, A, B, T],   # False at padding
       "loss_mask":  bool  [C, S, A, B, T]}   # True where token t is a target

  ``loss_mask[..., t]`` marks that the prediction of ``tokens[..., t]`` from
  ``tokens[..., :t]`` counts (response tokens only).

  Attributes:
    batch: the pytree above.
    step_mask: bool [C, S]; False for padded local steps (no update).
    num_examples: float32 [C]; the client's aggregation weight (its example
      count; 0 for padding clients).
    client_ids: int32 [C]; global client index (rngs, per-client state).
  """
  batch: PyTree
  step_mask: jax.Array
  num_examples: jax.Array
  client_ids: jax.Array


@flax.struct.dataclass
class ServerState:
  """Everything the server carries from one round to the next.

  Attributes:
    params: the global trainable pytree (e.g. the LoRA adapter).
    opt_state: the server optimizer's state (optax).
    control: SCAFFOLD server control variate ``c``, same tree as ``params``
      (zeros when the algorithm does not use it).
    client_controls: SCAFFOLD per-client controls ``c_i`` stacked on a leading
      ``[num_clients]`` axis, or None when the algorithm does not use them.
    round: int32 scalar, the number of rounds applied so far.
    rng: uint32 raw key data (``jax.random.key_data``) of the run's root key;
      raw data so it round-trips through orbax. See :meth:`key`.
  """
  params: PyTree
  opt_state: PyTree
  control: PyTree
  client_controls: PyTree | None
  round: jax.Array
  rng: jax.Array

  def key(self) -> jax.Array:
    """The root PRNG key as a typed ``jax.random.key`` array."""
    return jax.random.wrap_key_data(self.rng)


def key_data(rng: jax.Array) -> jax.Array:
  """Raw uint32 data of ``rng``, a typed key or already raw key data."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return jnp.asarray(rng, jnp.uint32)


def pad_clients(client_batches: ClientBatches, multiple: int) -> ClientBatches:
  """Pads the client axis ``C`` up to a multiple of ``multiple``.

  The added clients have all-zero batches, every step masked out and
  aggregation weight 0, so they change nothing (client id 0 is harmless:
  their SCAFFOLD control delta is exactly zero).

  Args:
    client_batches: the round's batches, leaves ``[C, ...]``.
    multiple: a positive int.

  Returns:
    ClientBatches with ``C' = ceil(C / multiple) * multiple`` clients.
  """
  if multiple <= 0:
    raise ValueError(f"pad_clients: multiple must be positive, got {multiple}.")
  c = client_batches.num_examples.shape[0]
  extra = -c % multiple
  if extra == 0:
    return client_batches

  def pad(x):
    widths = [(0, extra)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths)

  return ClientBatches(
      batch=jax.tree.map(pad, client_batches.batch),
      step_mask=pad(jnp.asarray(client_batches.step_mask, bool)),
      num_examples=pad(jnp.asarray(client_batches.num_examples, jnp.float32)),
      client_ids=pad(jnp.asarray(client_batches.client_ids, jnp.int32)))
