"""Aggregation of client deltas and the server optimizers.

Aggregation is a pure ``jax.tree.map``: the engine scans over chunks of
clients and accumulates the example-weighted SUM of deltas and the total
weight in the scan carry (:func:`accumulate`), dividing once at the end
(:func:`weighted_mean`), so all ``C`` deltas never exist at the same time.

The server treats ``-mean_delta`` as a pseudo-gradient and feeds it to an
optax transformation (Reddi et al. 2021, "Adaptive Federated Optimization"):

* ``sgd``: ``x += lr * mean_delta``; ``server_lr = 1`` is plain FedAvg.
* ``momentum``: optax SGD with (heavy-ball) momentum: FedAvgM.
* ``adagrad`` / ``adam`` / ``yogi``: :func:`scale_by_adaptive_server`, the
  paper's Algorithm 2 exactly. optax's own optimizers differ from the paper:
  ``optax.adam`` bias-corrects both moments (the paper does not);
  ``optax.adagrad`` has no first moment, puts ``eps`` inside the square root
  and starts the accumulator at 0.1; ``optax.yogi`` bias-corrects and starts
  both moments at 1e-6. The paper uses ``m_{-1} = 0``, ``v_{-1} = tau^2``,
  no bias correction and ``x += lr * m / (sqrt(v) + tau)``, which is what
  :func:`scale_by_adaptive_server` implements.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

ADAPTIVE_KINDS = ("adagrad", "adam", "yogi")


def weighted_sum(deltas: PyTree, weights: jax.Array) -> PyTree:
  """``sum_c weights[c] * deltas[c]`` over the leading client axis.

  Args:
    deltas: pytree with leaves ``[C, ...]``.
    weights: float32 [C] (0 for padding clients).

  Returns:
    Pytree with the client axis summed out.
  """
  def one(d):
    w = weights.astype(d.dtype).reshape((-1,) + (1,) * (d.ndim - 1))
    return jnp.sum(w * d, axis=0)
  return jax.tree.map(one, deltas)


def accumulate(total: PyTree, deltas: PyTree, weights: jax.Array) -> PyTree:
  """Adds one chunk's weighted delta sum to the running ``total``."""
  return jax.tree.map(jnp.add, total, weighted_sum(deltas, weights))


def weighted_mean(total: PyTree, total_weight: jax.Array) -> PyTree:
  """``total / total_weight``; all zeros when the total weight is 0."""
  inv = jnp.where(total_weight > 0, 1.0 / jnp.where(total_weight > 0,
                                                    total_weight, 1.0), 0.0)
  return jax.tree.map(lambda t: t * inv.astype(t.dtype), total)


class AdaptiveServerState(NamedTuple):
  """State of :func:`scale_by_adaptive_server`: first and second moments."""
  mu: PyTree
  nu: PyTree


def scale_by_adaptive_server(kind: str, b1: float = 0.9, b2: float = 0.99,
                             tau: float = 1e-3) -> optax.GradientTransformation:
  """FedAdagrad / FedAdam / FedYogi direction (Reddi et al. 2021, Alg. 2).

  With pseudo-gradient ``g = -Delta``::

      m = b1 * m + (1 - b1) * g
      adagrad: v = v + g^2
      adam:    v = b2 * v + (1 - b2) * g^2
      yogi:    v = v - (1 - b2) * g^2 * sign(v - g^2)
      update = m / (sqrt(v) + tau)

  with ``m`` starting at 0 and ``v`` at ``tau^2``; no bias correction.
  Chain with ``optax.scale(-lr)``.

  Args:
    kind: "adagrad", "adam" or "yogi".
    b1, b2: moment decays.
    tau: the adaptivity (epsilon) ``tau``.

  Returns:
    An optax GradientTransformation.
  """
  if kind not in ADAPTIVE_KINDS:
    raise ValueError(f"Unknown adaptive server kind {kind!r}; valid: {ADAPTIVE_KINDS}.")

  def init_fn(params):
    return AdaptiveServerState(
        mu=jax.tree.map(jnp.zeros_like, params),
        nu=jax.tree.map(lambda p: jnp.full_like(p, tau * tau), params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
    if kind == "adagrad":
      nu = jax.tree.map(lambda g, v: v + g * g, updates, state.nu)
    elif kind == "adam":
      nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * g * g, updates, state.nu)
    else:
      nu = jax.tree.map(lambda g, v: v - (1 - b2) * g * g * jnp.sign(v - g * g),
                        updates, state.nu)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), mu, nu)
    return out, AdaptiveServerState(mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def make_server_optimizer(kind: str, *, learning_rate: float,
                          momentum: float = 0.0, b1: float = 0.9,
                          b2: float = 0.99,
                          tau: float = 1e-3) -> optax.GradientTransformation:
  """The server optimizer over pseudo-gradients ``-mean_delta``.

  Args:
    kind: "sgd", "momentum", or one of :data:`ADAPTIVE_KINDS`.
    learning_rate: the server learning rate.
    momentum: FedAvgM momentum (kind "momentum").
    b1, b2, tau: adaptive optimizers (see :func:`scale_by_adaptive_server`).

  Returns:
    An optax GradientTransformation.
  """
  if kind == "sgd":
    return optax.sgd(learning_rate)
  if kind == "momentum":
    return optax.sgd(learning_rate, momentum=momentum)
  if kind in ADAPTIVE_KINDS:
    return optax.chain(scale_by_adaptive_server(kind, b1=b1, b2=b2, tau=tau),
                       optax.scale(-learning_rate))
  raise ValueError(f"Unknown server optimizer {kind!r}; valid: "
                   f"{('sgd', 'momentum') + ADAPTIVE_KINDS}.")


def server_update(params: PyTree, opt_state: PyTree, mean_delta: PyTree,
                  optimizer: optax.GradientTransformation) -> tuple[PyTree, PyTree]:
  """One server step on the pseudo-gradient ``-mean_delta``."""
  pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
  updates, opt_state = optimizer.update(pseudo_grad, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
