"""Client sampling per round, on the host, deterministic from (seed, round).

Host numpy rather than jax so the sampled clients are reproduced exactly on
resume, independent of devices, jit and the JAX version.
"""

from __future__ import annotations

import numpy as np


def sample_clients(seed: int, round_: int, num_clients: int,
                   clients_per_round: int) -> np.ndarray:
  """Uniformly samples ``clients_per_round`` distinct clients for a round.

  Args:
    seed: the run's seed.
    round_: the 0-based round index.
    num_clients: the population size ``N``.
    clients_per_round: how many to draw, ``<= N``.

  Returns:
    int32 [clients_per_round] client indices in ``[0, N)``, sorted.
  """
  if num_clients <= 0:
    raise ValueError(f"sample_clients: num_clients must be positive, got "
                     f"{num_clients}.")
  if not 0 < clients_per_round <= num_clients:
    raise ValueError(
        f"sample_clients: clients_per_round={clients_per_round} must be in "
        f"[1, num_clients={num_clients}]; lower clients_per_round or use more "
        "clients.")
  if seed < 0 or round_ < 0:
    raise ValueError(f"sample_clients: seed and round must be >= 0, got "
                     f"{seed} and {round_}.")
  rng = np.random.default_rng([seed, round_])
  chosen = rng.choice(num_clients, size=clients_per_round, replace=False)
  return np.sort(chosen).astype(np.int32)
