"""Partitioners: which examples each client holds.

Each returns a list with one int64 array of example indices per client
(sorted ascending; together a disjoint cover of all items), deterministic in
its seed:

* :func:`iid`: a random permutation cut into near-equal parts.
* :func:`dirichlet`: label-skewed non-IID split as in FedIT/Shepherd: for each
  label, its items are shuffled and divided among clients in proportions drawn
  from ``Dir(alpha)``; smaller ``alpha`` -> more skew. Redrawn until every
  client has ``min_size`` items.
* :func:`natural`: one client per distinct key (e.g. an author or a topic).

:data:`PARTITIONERS` holds them by name for configs; :func:`partition` calls
one by name.

Errors about too few items say first what was dropped before partitioning
when the caller passes ``dropped=`` (a
:class:`fedjax_u2s.data.instructions.DropReport`, or any text), so rows lost
to a reader or tokenizer are not blamed on the number of clients.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import numpy as np


def dropped_note(dropped: Any) -> str:
  """The sentence an error adds about rows dropped before partitioning.

  Args:
    dropped: a ``DropReport`` (its ``note()``), a string, or None.

  Returns:
    ``" Before partitioning, <what was dropped and why>."``, or "" when
    nothing was dropped.
  """
  if dropped is None:
    return ""
  note = dropped.note() if hasattr(dropped, "note") else str(dropped)
  note = note.strip().rstrip(".")
  return f" Before partitioning, {note}." if note else ""


def _check(num_items: int, num_clients: int, min_size: int,
           dropped: Any = None) -> None:
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
  if min_size < 0:
    raise ValueError(f"min_size must be >= 0, got {min_size}.")
  if num_items < num_clients * min_size:
    note = dropped_note(dropped)
    raise ValueError(
        f"Cannot give {num_clients} clients at least {min_size} item(s) each "
        f"from {num_items} items (needs {num_clients * min_size}).{note} "
        + ("Recover the dropped rows, or use" if note else "Use")
        + " fewer clients or a smaller min_size.")


def iid(num_items: int, num_clients: int, seed: int,
        min_size: int = 1, *, dropped: Any = None) -> list[np.ndarray]:
  """A uniformly random split into sizes differing by at most one.

  Args:
    num_items: N.
    num_clients: C.
    seed: seeds the permutation.
    min_size: least items per client.
    dropped: what was dropped before (a ``DropReport`` or text), said first
      in the error.

  Raises:
    ValueError: ``num_items < num_clients * min_size``.
  """
  _check(num_items, num_clients, min_size, dropped)
  perm = np.random.default_rng(seed).permutation(num_items)
  return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def dirichlet(labels: Sequence[Hashable] | np.ndarray, num_clients: int,
              alpha: float, seed: int, min_size: int = 1,
              max_tries: int = 100, *, dropped: Any = None
              ) -> list[np.ndarray]:
  """Label-skewed split with per-label client proportions ~ Dir(alpha).

  For every label (in sorted order) its items are shuffled and cut at
  ``floor(cumsum(p) * n_label)`` with ``p ~ Dir(alpha * 1_C)``. If some client
  ends with fewer than ``min_size`` items, everything is redrawn (from the
  same generator), at most ``max_tries`` times.

  Args:
    labels: one label per item (e.g. the Dolly category).
    num_clients: C.
    alpha: concentration (> 0); large -> close to IID, small -> each label
      lands on few clients.
    seed: seeds the generator.
    min_size: least items per client.
    max_tries: draws before giving up.
    dropped: what was dropped before (a ``DropReport`` or text), said in the
      errors.

  Raises:
    ValueError: bad arguments, ``len(labels) < num_clients * min_size``, or no
      draw within ``max_tries`` satisfied ``min_size`` (try a larger alpha,
      fewer clients or a smaller min_size).
  """
  labels = np.asarray(labels)
  n = len(labels)
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}.")
  _check(n, num_clients, min_size, dropped)
  try:
    uniq = sorted(set(labels.tolist()))
  except TypeError as e:
    raise ValueError(f"Labels must be mutually comparable ({e}).") from None
  groups = [np.flatnonzero(labels == u) for u in uniq]
  rng = np.random.default_rng(seed)
  sizes = None
  for _ in range(max_tries):
    parts = [[] for _ in range(num_clients)]
    for idx in groups:
      idx = rng.permutation(idx)
      p = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
      for client, chunk in enumerate(np.split(idx, cuts)):
        parts[client].append(chunk)
    out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    sizes = [len(o) for o in out]
    if min(sizes) >= min_size:
      return out
  raise ValueError(
      f"dirichlet: no split of {n} items with {len(groups)} labels over "
      f"{num_clients} clients (alpha={alpha}) gave every client >= {min_size} "
      f"items in {max_tries} tries (last sizes: min {min(sizes)}, max "
      f"{max(sizes)}).{dropped_note(dropped)} Raise alpha or max_tries, or "
      "lower num_clients or min_size.")


def natural(keys: Sequence[Hashable], *, dropped: Any = None
            ) -> tuple[list[np.ndarray], list[Any]]:
  """One client per distinct key, clients in sorted key order.

  ``dropped``: what was dropped before (a ``DropReport`` or text), said in
  the error for no items.

  Returns:
    ``(parts, client_keys)``: indices per client and the key of each client.

  Raises:
    ValueError: no items, or keys that cannot be sorted (e.g. None mixed with
      strings).
  """
  keys = list(keys)
  if not keys:
    raise ValueError(f"natural: no items to partition.{dropped_note(dropped)}")
  try:
    uniq = sorted(set(keys))
  except TypeError as e:
    raise ValueError(f"natural: keys must be mutually comparable to order the "
                     f"clients ({e}); map missing keys to a string first.") from None
  pos = {k: i for i, k in enumerate(uniq)}
  parts = [[] for _ in uniq]
  for i, k in enumerate(keys):
    parts[pos[k]].append(i)
  return [np.asarray(p, np.int64) for p in parts], uniq


PARTITIONERS: dict[str, Callable[..., Any]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "natural": natural,
}


def partition(name: str, *args, **kwargs):
  """Calls the partitioner ``name`` of :data:`PARTITIONERS` with the arguments.

  Raises:
    ValueError: unknown name (lists the known ones).
  """
  if name not in PARTITIONERS:
    raise ValueError(f"Unknown partitioner {name!r}; use one of "
                     f"{sorted(PARTITIONERS)}.")
  return PARTITIONERS[name](*args, **kwargs)
