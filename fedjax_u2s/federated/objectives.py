"""Training objectives the federated engine differentiates.

The engine is generic over the trained pytree and the loss. A loss is a
:data:`LossFn`: it maps one micro-batch to the SUM of per-token losses and the
number of counted tokens, so that gradient accumulation over micro-batches and
token-weighted means across clients stay exact (sum the sums, divide once).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_u2s import lora as lora_lib
from fedjax_u2s.models import llama
from fedjax_u2s.models.config import ModelConfig

PyTree = Any

# (trainable, frozen, one micro-batch, rng or None) -> (loss_sum, weight), both
# float32 scalars. rng is None at evaluation (no dropout).
LossFn = Callable[[PyTree, PyTree, PyTree, "jax.Array | None"],
                  tuple[jax.Array, jax.Array]]


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] in float32.

  Args:
    logits: [..., V].
    targets: [...] int.

  Returns:
    [...] float32 per-token losses.
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - target_logit


def causal_lm_loss(lora: PyTree, base_params: PyTree, batch: PyTree,
                   rng: jax.Array | None, *, model_config: ModelConfig,
                   lora_config: lora_lib.LoraConfig,
                   logits_chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy of the LoRA-adapted decoder on one micro-batch.

  Position ``t`` predicts ``tokens[:, t + 1]``; it counts where
  ``loss_mask[:, t + 1]`` is True (response tokens only) and, in packed rows,
  ``t + 1`` belongs to the same example as ``t``.

  Args:
    lora: the trainable adapter pytree.
    base_params: the frozen base parameters.
    batch: ``{"tokens": int [B, T], "input_mask": bool [B, T],
      "loss_mask": bool [B, T]}``, and for packed rows
      (``data/batching.py``) ``"segment_ids"`` and ``"positions"`` int
      [B, T]: each example attends only to itself, from position 0.
    rng: LoRA dropout key, or None for no dropout.
    model_config: the decoder's config.
    lora_config: the adapter's config.
    logits_chunk_size: if positive and smaller than ``T - 1``, the [B, T, V]
      logits are never materialised: the loss is computed over chunks of this
      many positions, each rematerialised in the backward pass (for large
      vocabularies, e.g. 49152).

  Returns:
    ``(loss_sum, weight)``: float32 sum of counted token losses and their
    number.
  """
  tokens = batch["tokens"]
  segments = batch.get("segment_ids")
  hidden, _ = llama.forward(
      base_params, tokens, config=model_config, input_mask=batch["input_mask"],
      positions=batch.get("positions"), segment_ids=segments,
      lora=lora, lora_config=lora_config, dropout_rng=rng, return_hidden=True)
  hidden = hidden[:, :-1]  # [B, T-1, D]
  targets = tokens[:, 1:]
  counted = batch["loss_mask"][:, 1:]
  if segments is not None:  # Never predict the next example's first token.
    counted &= segments[:, 1:] == segments[:, :-1]
  weights = counted.astype(jnp.float32)
  weight = jnp.sum(weights)
  t = hidden.shape[1]

  if logits_chunk_size <= 0 or logits_chunk_size >= t:
    logits = llama.logits_from_hidden(base_params, hidden, config=model_config)
    return jnp.sum(token_cross_entropy(logits, targets) * weights), weight

  n = -(-t // logits_chunk_size)
  pad = n * logits_chunk_size - t
  b = hidden.shape[0]

  def chunks(x):  # [B, T-1, ...] -> [n, B, chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n, logits_chunk_size) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1)

  @jax.checkpoint
  def chunk_loss(h, y, w):
    logits = llama.logits_from_hidden(base_params, h, config=model_config)
    return jnp.sum(token_cross_entropy(logits, y) * w)

  def body(total, xs):
    return total + chunk_loss(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (chunks(hidden), chunks(targets), chunks(weights)))
  return total, weight


def make_causal_lm_loss(model_config: ModelConfig,
                        lora_config: lora_lib.LoraConfig,
                        logits_chunk_size: int = 0) -> LossFn:
  """:func:`causal_lm_loss` with its static configs bound: a :data:`LossFn`."""

  def loss_fn(lora, base_params, batch, rng):
    return causal_lm_loss(lora, base_params, batch, rng,
                          model_config=model_config, lora_config=lora_config,
                          logits_chunk_size=logits_chunk_size)

  return loss_fn
