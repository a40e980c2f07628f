"""Orbax checkpoints of the federated server state, for exact resume.

Only what changes is saved: the server state (global adapter, server optimizer
state, control variates, round, rng) and the host-side data cursors, never the
frozen base weights. A checkpoint is written to a temporary directory and
renamed when complete (orbax's atomic commit), so a process killed at any point
leaves the previous checkpoint intact; the last ``keep`` are kept.

Restore takes an abstract target (``jax.eval_shape`` of the freshly
initialised state) so pytree node types (dataclasses, NamedTuples of optax
states) come back as they went in, with the shardings asked for.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
  """Saves and restores ``(state, meta)`` pairs keyed by round.

  Args:
    directory: where checkpoints live (``<directory>/<round>/``).
    keep: how many of the most recent checkpoints to keep.
  """

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True))

  def latest_round(self) -> int | None:
    return self._manager.latest_step()

  def all_rounds(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, round_: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Writes the checkpoint of the state *after* ``round_`` rounds.

    Args:
      round_: number of completed rounds.
      state: the server state pytree (jax or numpy leaves).
      meta: JSON-serialisable metadata (data cursors, config digest, ...).
        numpy arrays in it are stored as lists.
    """
    meta = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
            for k, v in meta.items()}
    self._manager.save(round_, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)
    self._manager.wait_until_finished()
    logging.info("Saved checkpoint of round %d to %s", round_, self.directory)

  def restore(self, abstract_state: PyTree, round_: int | None = None
              ) -> tuple[PyTree, dict[str, Any], int] | None:
    """Restores the given (default: latest) checkpoint, or None if none.

    Args:
      abstract_state: the state's structure, ``jax.ShapeDtypeStruct`` leaves
        (with ``sharding`` where the arrays should land).
      round_: which checkpoint; the latest by default.

    Returns:
      ``(state, meta, round)`` or None when the directory holds no checkpoint.
    """
    round_ = self.latest_round() if round_ is None else round_
    if round_ is None:
      return None
    try:
      out = self._manager.restore(round_, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"Checkpoint {os.path.join(self.directory, str(round_))} does not "
          f"match this run's state ({e}). Was the workdir made with another "
          "config (adapter rank, targets, algorithm)? Use a fresh --workdir "
          "or the config it was made with.") from e
    logging.info("Restored checkpoint of round %d from %s", round_, self.directory)
    return out["state"], dict(out["meta"]), round_

  def close(self) -> None:
    self._manager.close()


def abstract(tree: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct`` leaves (keeping shardings) for :meth:`restore`."""
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)
