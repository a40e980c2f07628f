"""Client-level differential privacy: DP-FedAvg and its (epsilon, delta) accountant.

The mechanism (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"), run inside the jitted round when
``config.federated.dp.enabled``:

1. **Clip** each sampled client's update, its delta from the global adapter
   over the whole LoRA pytree, to global L2 norm ``C = dp.clip_norm``:
   ``d_c * min(1, C / ||d_c||)`` (:func:`clip_factors`). Clipping is folded
   into the aggregation weights, so clipped deltas are never materialised.
2. **Sum** the clipped updates with weight 1 each and **add Gaussian noise**
   ``N(0, (z * C)^2)`` per coordinate, ``z = dp.noise_multiplier``
   (:func:`noised_mean`).
3. **Divide by the fixed expected number of clients** ``m =
   clients_per_round``, not by the realised (example-)weighted sum. With
   uniform weights and a fixed denominator, adding or removing one client
   changes the sum by at most ``C`` whatever its data, which is the
   sensitivity the noise is calibrated to; example-count weights (data
   dependent, unbounded) and a data-dependent denominator would break that.
   So DP **overrides** the example-count weighting of plain FedAvg (there is
   no switch to keep it): ``ClientBatches.num_examples`` only tells real
   clients (> 0) from padding ones.
4. The noised mean is then the pseudo-gradient of the server optimizer exactly
   as without DP (FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi; FedProx only
   changes the client objective): post-processing, so the guarantee holds.
   SCAFFOLD is refused by :class:`~fedjax_u2s.federated.config.AlgorithmConfig`
   (its control-variate updates bypass the mechanism).

**Accounting.** :func:`epsilon` composes ``rounds`` Poisson-subsampled Gaussian
mechanisms with ``q = clients_per_round / num_clients`` and noise multiplier
``z`` in ``dp_accounting``'s RDP accountant (add-or-remove-one adjacency) and
converts to ``epsilon`` at ``dp.delta``. Our sampler
(:func:`fedjax_u2s.federated.sampling.sample_clients`) draws a fixed-size
subset without replacement, not a Poisson sample: the reported epsilon is the
Poisson-subsampling figure, as is common practice (TFF, Opacus, McMahan et
al. 2018 all report it for fixed-size batches); it is not a proof for the
fixed-size sampler. The accountant holds no state: epsilon is a pure function
of the config and the number of completed rounds, so a resumed run reports
the same values without checkpointing anything.

**Randomness.** Round ``r`` draws its noise from :func:`noise_key`:
``fold_in(fold_in(root, r), NOISE_STREAM)``, where ``root`` is the server
state's rng. Clients use ``fold_in(fold_in(root, r), client_id)`` with
``client_id < NOISE_STREAM``, so the streams never collide; each round gets
fresh noise and a resumed run draws the same noise bit for bit.

``dp_accounting`` is the ``privacy`` extra (``pip install -e ".[privacy]"``,
in ``[all]``); it is imported only when epsilon is computed.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

# fold_in data of the noise stream: above every client id (int32 < 2**31 - 1).
NOISE_STREAM = 2**31 - 1


def client_norms(deltas: PyTree) -> jax.Array:
  """Global L2 norm of each client's update; float32 [C].

  Args:
    deltas: pytree with leaves ``[C, ...]`` (one update per client).
  """
  leaves = jax.tree.leaves(deltas)
  sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1),
                   axis=1) for x in leaves)
  return jnp.sqrt(sq)


def clip_factors(deltas: PyTree, clip_norm: float) -> tuple[jax.Array, jax.Array]:
  """``min(1, C / ||d_c||)`` per client: scaling ``d_c`` by it clips it to ``C``.

  Args:
    deltas: pytree with leaves ``[C, ...]``.
    clip_norm: the bound ``C`` > 0.

  Returns:
    ``(factors, norms)``, float32 [C] each; a zero update has factor 1.
  """
  norms = client_norms(deltas)
  factors = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))
  return factors, norms


def noise_key(root: jax.Array, round_: jax.Array) -> jax.Array:
  """The key of round ``round_``'s noise (see the module docstring)."""
  return jax.random.fold_in(jax.random.fold_in(root, round_), NOISE_STREAM)


def gaussian_noise(key: jax.Array, like: PyTree, stddev: float | jax.Array
                   ) -> PyTree:
  """Independent ``N(0, stddev^2)`` for every coordinate of ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  noise = [stddev * jax.random.normal(k, x.shape, jnp.float32)
           for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, [n.astype(x.dtype)
                                      for n, x in zip(noise, leaves)])


def noised_mean(clipped_sum: PyTree, key: jax.Array, *, clip_norm: float,
                noise_multiplier: float, expected_clients: int) -> PyTree:
  """``(sum of clipped updates + N(0, (z C)^2)) / m``: the private mean update.

  Args:
    clipped_sum: the sum over the round's clients of their clipped updates.
    key: the round's :func:`noise_key`.
    clip_norm: ``C``.
    noise_multiplier: ``z`` (0: no noise).
    expected_clients: ``m = clients_per_round``, the fixed denominator.
  """
  total = clipped_sum
  if noise_multiplier > 0:
    noise = gaussian_noise(key, clipped_sum, noise_multiplier * clip_norm)
    total = jax.tree.map(jnp.add, clipped_sum, noise)
  return jax.tree.map(lambda t: t / jnp.asarray(expected_clients, t.dtype), total)


def sampling_rate(clients_per_round: int, num_clients: int) -> float:
  """``q = clients_per_round / num_clients``, the accountant's Poisson rate."""
  if not 0 < clients_per_round <= num_clients:
    raise ValueError(f"sampling_rate: clients_per_round={clients_per_round} must "
                     f"be in [1, num_clients={num_clients}].")
  return clients_per_round / num_clients


def _dp_accounting():
  """The ``dp_accounting`` module, or an ImportError saying how to get it."""
  try:
    import dp_accounting  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "config.federated.dp.enabled needs the dp-accounting package for the "
        "(epsilon, delta) accountant: pip install -e \".[privacy]\" (or "
        "pip install dp-accounting).") from e
  return dp_accounting


def check_accountant() -> None:
  """Raises ImportError (saying what to install) if epsilon cannot be computed."""
  _dp_accounting()


@functools.lru_cache(maxsize=4096)
def epsilon(*, noise_multiplier: float, sampling_rate: float, rounds: int,
            delta: float) -> float:
  """Cumulative epsilon after ``rounds`` rounds (RDP, Poisson subsampling).

  Args:
    noise_multiplier: ``z``; 0 gives ``inf`` (no guarantee).
    sampling_rate: ``q`` (see :func:`sampling_rate`).
    rounds: completed rounds (0 gives 0).
    delta: the target delta.

  Returns:
    epsilon of the ``(epsilon, delta)`` guarantee of the first ``rounds`` rounds.
  """
  if rounds <= 0:
    return 0.0
  if noise_multiplier <= 0:
    return math.inf
  dpa = _dp_accounting()
  event = dpa.SelfComposedDpEvent(
      dpa.PoissonSampledDpEvent(sampling_rate,
                                dpa.GaussianDpEvent(noise_multiplier)), rounds)
  accountant = dpa.rdp.RdpAccountant(
      neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
  accountant.compose(event)
  return float(accountant.get_epsilon(delta))
