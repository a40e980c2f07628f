"""One client's local update, written for a single client and vmapped outside.

Starting from the global parameters, a client runs ``S`` local steps as a
``lax.scan``; each step scans over ``A`` micro-batches accumulating the
gradient of the summed token loss, divides once by the step's token count
(the token-mean loss of the step), optionally adds the FedProx proximal term,
clips, adds the SCAFFOLD correction and applies the client optimizer. Padded
steps (``step_mask`` False) leave parameters and optimizer state untouched,
selected with ``jnp.where`` rather than Python branches, so the same program
serves every client of a vmapped chunk.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_u2s.federated import objectives
from fedjax_u2s.federated.config import CLIENT_OPTIMIZERS

PyTree = Any


def make_client_optimizer(name: str, learning_rate: jax.Array | float, *,
                          b1: float = 0.9, b2: float = 0.999,
                          weight_decay: float = 0.0,
                          eps: float = 1e-8) -> optax.GradientTransformation:
  """The client optimizer, built per round with that round's learning rate.

  Args:
    name: "adamw" or "sgd" (plain SGD; ``weight_decay`` as decoupled decay).
    learning_rate: a scalar (may be traced: it comes from the round schedule).
    b1, b2, eps: AdamW moments.
    weight_decay: decoupled weight decay (AdamW-style for both).

  Returns:
    An optax GradientTransformation.
  """
  if name == "adamw":
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                       weight_decay=weight_decay)
  if name == "sgd":
    if weight_decay:
      return optax.chain(optax.add_decayed_weights(weight_decay),
                         optax.sgd(learning_rate))
    return optax.sgd(learning_rate)
  raise ValueError(f"Unknown client_optimizer {name!r}; valid: {CLIENT_OPTIMIZERS}.")


def clip_by_global_norm(tree: PyTree, max_norm: float) -> PyTree:
  """Scales ``tree`` so its global norm is at most ``max_norm`` (0 = off)."""
  if not max_norm or max_norm <= 0:
    return tree
  norm = optax.tree.norm(tree)
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda g: (g * scale).astype(g.dtype), tree)


def all_finite(tree: PyTree) -> jax.Array:
  """True iff every leaf of ``tree`` is finite (a bool scalar)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


@flax.struct.dataclass
class ClientOutput:
  """What one client sends back (all float32 unless noted).

  Attributes:
    delta: ``y_i - x_global``, same tree as the params.
    loss_sum: summed token loss over the real steps (each step's loss taken
      at the parameters before that step's update).
    num_tokens: tokens counted in ``loss_sum``.
    num_steps: int32, the number of real (unmasked) local steps ``K``.
    nonfinite: bool, a real step produced a non-finite loss or gradient.
    control_delta: SCAFFOLD ``c_i^+ - c_i`` (same tree as params), or None.
  """
  delta: PyTree
  loss_sum: jax.Array
  num_tokens: jax.Array
  num_steps: jax.Array
  nonfinite: jax.Array
  control_delta: PyTree | None


def client_update(global_params: PyTree, frozen: PyTree, batch: PyTree,
                  step_mask: jax.Array, rng: jax.Array, *,
                  loss_fn: objectives.LossFn,
                  optimizer: optax.GradientTransformation,
                  learning_rate: jax.Array | float,
                  grad_clip: float = 0.0,
                  prox_mu: float = 0.0,
                  server_control: PyTree | None = None,
                  client_control: PyTree | None = None) -> ClientOutput:
  """Runs one client's local training (a single client; vmap for many).

  Args:
    global_params: ``x``, the round's starting point.
    frozen: frozen pytree passed to ``loss_fn`` (e.g. the base model).
    batch: this client's data, leaves ``[S, A, B, ...]``.
    step_mask: bool [S]; False for padded steps.
    rng: this client's typed key; step ``s`` micro-batch ``a`` uses
      ``fold_in(fold_in(rng, s), a)``.
    loss_fn: see :data:`objectives.LossFn`.
    optimizer: the client optimizer; its state starts fresh here.
    learning_rate: the client learning rate of this round (SCAFFOLD needs it
      for the control update; it must be the rate ``optimizer`` uses).
    grad_clip: global-norm clip of the step gradient (0 = off), applied
      after the proximal term and before the SCAFFOLD correction.
    prox_mu: FedProx ``mu``; adds ``mu / 2 ||w - x||^2`` to each step's
      token-mean loss (its gradient ``mu (w - x)`` is added analytically).
    server_control: SCAFFOLD ``c``; with ``client_control`` enables SCAFFOLD.
    client_control: SCAFFOLD ``c_i`` of this client.

  Returns:
    A :class:`ClientOutput`.
  """
  scaffold = server_control is not None
  if scaffold and client_control is None:
    raise ValueError("client_update: SCAFFOLD needs both server_control and "
                     "client_control.")
  correction = (jax.tree.map(jnp.subtract, server_control, client_control)
                if scaffold else None)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(carry, xs):
    params, opt_state, loss_sum, num_tokens, bad = carry
    step_batch, valid, s = xs
    step_rng = jax.random.fold_in(rng, s)

    def micro(acc, mxs):
      gsum, lsum, wsum = acc
      mb, a = mxs
      (l, w), g = grad_fn(params, frozen, mb, jax.random.fold_in(step_rng, a))
      gsum = jax.tree.map(lambda x, y: x + y.astype(x.dtype), gsum, g)
      return (gsum, lsum + l.astype(jnp.float32), wsum + w.astype(jnp.float32)), None

    num_micro = jax.tree.leaves(step_batch)[0].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, params)
    (gsum, lsum, wsum), _ = jax.lax.scan(
        micro, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
        (step_batch, jnp.arange(num_micro)))
    denom = jnp.maximum(wsum, 1.0)  # A step without counted tokens: zero grad.
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), gsum)
    if prox_mu:
      grads = jax.tree.map(lambda g, w, x: g + prox_mu * (w - x),
                           grads, params, global_params)
    step_bad = valid & ~(jnp.isfinite(lsum) & all_finite(grads))
    grads = clip_by_global_norm(grads, grad_clip)
    if scaffold:
      grads = jax.tree.map(jnp.add, grads, correction)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params = _select(valid, new_params, params)
    opt_state = _select(valid, new_opt_state, opt_state)
    loss_sum = loss_sum + jnp.where(valid, lsum, 0.0)
    num_tokens = num_tokens + jnp.where(valid, wsum, 0.0)
    return (params, opt_state, loss_sum, num_tokens, bad | step_bad), None

  num_steps_total = step_mask.shape[0]
  init = (global_params, optimizer.init(global_params),
          jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.array(False))
  (params, _, loss_sum, num_tokens, bad), _ = jax.lax.scan(
      step, init, (batch, step_mask, jnp.arange(num_steps_total)))
  delta = jax.tree.map(jnp.subtract, params, global_params)
  num_steps = jnp.sum(step_mask.astype(jnp.int32))

  control_delta = None
  if scaffold:
    # Option II of Karimireddy et al.: c_i+ = c_i - c + (x - y_i) / (K lr),
    # so c_i+ - c_i = -c - delta / (K lr). Clients without steps keep c_i.
    lr = jnp.asarray(learning_rate, jnp.float32)
    ok = (num_steps > 0) & (lr > 0)
    inv = jnp.where(ok, 1.0 / jnp.where(ok, num_steps * lr, 1.0), 0.0)
    control_delta = jax.tree.map(
        lambda c, d: jnp.where(ok, -c - d * inv.astype(d.dtype), 0.0).astype(d.dtype),
        server_control, delta)

  return ClientOutput(delta=delta, loss_sum=loss_sum, num_tokens=num_tokens,
                      num_steps=num_steps, nonfinite=bad,
                      control_delta=control_delta)
