"""Orbax checkpoints of the federated server state, for exact resume.

Only what changes is saved: the server state (global adapter, server optimizer
state, control variates, round, rng) and the host-side data cursors, never the
frozen base weights. A checkpoint is written to a temporary directory and
renamed when complete (orbax's atomic commit), so a process killed at any point
leaves the previous checkpoint intact; the last ``keep`` are kept.

Restore takes an abstract target (``jax.eval_shape`` of the freshly
initialised state) so pytree node types (dataclasses, NamedTuples of optax
states) come back as they went in, with the shardings asked for.

Two ways a restore can fail are kept apart:

* the checkpoint was written by a run with another config (LoRA rank,
  targets, algorithm): its saved tree differs from this run's state, read from
  metadata that parses. :class:`CheckpointMismatchError`; nothing is touched.
* the checkpoint cannot be read (emptied or truncated files after a kill, a
  disk error): :class:`CorruptCheckpointError`.
  :meth:`Checkpointer.restore_newest_intact` moves such a checkpoint aside to
  ``<directory>_corrupt/<round>-<timestamp>`` (never deleting it; outside the
  directory orbax manages, so orbax no longer sees it) and falls back to the
  next newest one.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointMismatchError(ValueError):
  """A checkpoint's saved state has another structure than this run's."""


class CorruptCheckpointError(ValueError):
  """A checkpoint cannot be read back (torn, emptied or truncated files)."""


class Checkpointer:
  """Saves and restores ``(state, meta)`` pairs keyed by round.

  Args:
    directory: where checkpoints live (``<directory>/<round>/``).
    keep: how many of the most recent checkpoints to keep (>= 1).
  """

  def __init__(self, directory: str, keep: int = 3):
    if keep < 1:
      raise ValueError(f"config.checkpoint.keep={keep}: must be >= 1 (the "
                       "checkpoints to keep; resuming needs at least one).")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True),
        # Named handlers, so the saved tree's metadata can be read on its own.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  @property
  def corrupt_directory(self) -> str:
    """Where unreadable checkpoints are moved (beside ``directory``)."""
    return self.directory + "_corrupt"

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

    Raises:
      CheckpointMismatchError: the saved state has other paths, shapes or
        dtypes than ``abstract_state`` (a run with another config).
      CorruptCheckpointError: the checkpoint cannot be read.
    """
    round_ = self.latest_round() if round_ is None else round_
    if round_ is None:
      return None
    path = os.path.join(self.directory, str(round_))
    saved = self._saved_structure(round_, path)
    _check_structure(saved, _structure(abstract_state), path)
    try:
      out = self._manager.restore(round_, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax / TensorStore / JSON: unreadable files.
      raise CorruptCheckpointError(
          f"Checkpoint {path} cannot be read: {_reason(e)}") from e
    logging.info("Restored checkpoint of round %d from %s", round_, self.directory)
    return out["state"], dict(out["meta"]), round_

  def restore_newest_intact(self, abstract_state: PyTree
                            ) -> tuple[PyTree, dict[str, Any], int] | None:
    """Restores the newest checkpoint that reads back, moving corrupt ones aside.

    Each unreadable checkpoint, newest first, is moved to
    :attr:`corrupt_directory` with a warning naming it and the reason. Returns
    None when there is no checkpoint, or when every one was unreadable (then
    with a warning saying training starts from scratch).

    Raises:
      CheckpointMismatchError: as :meth:`restore` (never a fallback: an older
        checkpoint of the same workdir has the same structure).
    """
    multi = jax.process_count() > 1
    if multi:  # Everyone lists the rounds before process 0 may move any.
      ocp.multihost.sync_global_processes("fedjax_u2s_checkpoint_list")
    rounds = self.all_rounds()
    moved = []
    out = None
    for round_ in reversed(rounds):
      try:
        out = self.restore(abstract_state, round_)
        break
      except CorruptCheckpointError as e:
        moved.append(self._move_aside(round_, e))
    if multi:
      # Every process enters, whether or not its own restore failed: the
      # files are shared, so all saw the same ones fail; process 0 moved them.
      ocp.multihost.sync_global_processes("fedjax_u2s_checkpoint_fallback")
    if moved:
      self._manager.reload()
      if out is None:
        logging.warning(
            "All %d checkpoints in %s were unreadable and moved to %s; "
            "training starts from scratch.", len(moved), self.directory,
            self.corrupt_directory)
    return out

  def _saved_structure(self, round_: int, path: str) -> dict[str, tuple]:
    """``{path: (shape, dtype)}`` of the saved state, from its metadata."""
    try:
      metadata = self._manager.item_metadata(round_)["state"]
    except Exception as e:  # Emptied or torn metadata files.
      raise CorruptCheckpointError(
          f"Checkpoint {path} cannot be read: its state metadata is "
          f"unreadable ({_reason(e)})") from e
    if metadata is None:
      raise CorruptCheckpointError(
          f"Checkpoint {path} cannot be read: its state metadata is missing.")
    return _structure(getattr(metadata, "tree", metadata))

  def _move_aside(self, round_: int, error: Exception) -> str:
    """Moves checkpoint ``round_`` into :attr:`corrupt_directory`; its new path."""
    src = os.path.join(self.directory, str(round_))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dst = os.path.join(self.corrupt_directory, f"{round_}-{stamp}")
    if jax.process_index() == 0:
      os.makedirs(self.corrupt_directory, exist_ok=True)
      n = 1
      while os.path.exists(dst):
        n += 1
        dst = os.path.join(self.corrupt_directory, f"{round_}-{stamp}-{n}")
      os.rename(src, dst)
    logging.warning("Checkpoint of round %d is unreadable and was moved to %s "
                    "(%s); resuming from the previous one, if any.",
                    round_, dst, error)
    return dst

  def close(self) -> None:
    self._manager.close()


def abstract(tree: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct`` leaves (keeping shardings) for :meth:`restore`."""
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


def _key_name(k) -> str:
  """One pytree key as orbax names it (dict key, attribute or index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _structure(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{"params.q.a": (shape, dtype)}`` of a state or of saved metadata.

  Key paths are named the same for a live state (attributes of dataclasses
  and NamedTuples) and for orbax's metadata (dicts and lists).
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(_key_name(k) for k in path):
          (tuple(getattr(x, "shape", ())), str(np.dtype(x.dtype)))
          for path, x in leaves}


def _check_structure(saved: dict, wanted: dict, path: str) -> None:
  """Raises CheckpointMismatchError listing how ``saved`` differs from ``wanted``."""
  diffs = [f"{k}: saved {saved[k][0]} {saved[k][1]}, this run {wanted[k][0]} "
           f"{wanted[k][1]}" for k in sorted(saved.keys() & wanted.keys())
           if saved[k] != wanted[k]]
  diffs += [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - wanted.keys())]
  diffs += [f"{k}: only in this run" for k in sorted(wanted.keys() - saved.keys())]
  if diffs:
    more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
    raise CheckpointMismatchError(
        f"Checkpoint {path} does not match this run's state: "
        f"{'; '.join(diffs[:4])}{more}. Was the workdir made with another "
        "config (adapter rank, targets, algorithm)? Use the config it was made "
        "with, or a fresh --workdir.")


def _reason(e: Exception) -> str:
  """The first line of an orbax / TensorStore error, without its spec dump."""
  first = (str(e).strip().splitlines() or [""])[0]
  if len(first) > 240:
    first = first[:240] + "..."
  return f"{type(e).__name__}: {first}"
