"""What crosses the wire: pytrees <-> Flower ``ArrayRecord``, and its size.

An adapter (or a delta, a control variate) is flattened to an ``ArrayRecord``
keyed by the leaf's path (``"q.a"``, ``"v.b"``), in the tree's own leaf order.
Reading one back needs the receiver's template of the tree: names, shapes and
dtypes must match it exactly, so a node cannot make the server allocate or
accept anything but an adapter-shaped float update (and vice versa).

:func:`array_bytes` is the payload the project's accounting counts (the raw
bytes of the arrays, ``train.py``'s ``bytes_up`` / ``bytes_down``);
:func:`content_bytes` is the serialized size of a message's content as
Flower ships it (the arrays' ``.npy`` bytes plus record headers).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

PyTree = Any


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_names(tree: PyTree) -> list[str]:
  """The dotted path of every leaf of ``tree``, in leaf order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [".".join(_key_name(k) for k in path) for path, _ in leaves]


def to_record(tree: PyTree) -> ArrayRecord:
  """``tree`` as an ArrayRecord of host numpy arrays keyed by leaf path."""
  names = leaf_names(tree)
  if len(set(names)) != len(names):
    raise ValueError(f"to_record: leaf names are not unique: {names}.")
  return ArrayRecord({n: Array(np.asarray(x)) for n, x in
                      zip(names, jax.tree.leaves(tree))})


def from_record(record: ArrayRecord, like: PyTree, what: str) -> PyTree:
  """The tree ``record`` holds, checked against the template ``like``.

  Args:
    record: an ArrayRecord written by :func:`to_record`.
    like: a tree with the expected structure (leaves with ``shape`` and
      ``dtype``, e.g. ``jax.ShapeDtypeStruct``).
    what: what the record is, for the error (``"the delta from node 7"``).

  Returns:
    ``like``'s structure with numpy leaves.

  Raises:
    ValueError: naming the first missing, extra or mis-shaped array.
  """
  names = leaf_names(like)
  got = list(record.keys())
  if sorted(got) != sorted(names):
    missing = sorted(set(names) - set(got))
    extra = sorted(set(got) - set(names))
    raise ValueError(f"{what}: arrays do not match the adapter; missing "
                     f"{missing[:4]}, unexpected {extra[:4]}.")
  leaves = []
  for n, t in zip(names, jax.tree.leaves(like)):
    x = record[n].numpy()
    if tuple(x.shape) != tuple(t.shape) or x.dtype != np.dtype(t.dtype):
      raise ValueError(f"{what}: array {n!r} is {x.dtype}{list(x.shape)}, "
                       f"expected {np.dtype(t.dtype)}{list(t.shape)}.")
    leaves.append(x)
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def tree_bytes(tree: PyTree) -> int:
  """Raw bytes of the leaves of ``tree`` (``train.py``'s adapter size)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(tree)))


def array_bytes(content: RecordDict) -> int:
  """Raw bytes of every array in ``content`` (what the accounting counts)."""
  total = 0
  for record in content.array_records.values():
    for name in record.keys():
      a = record[name]
      total += np.dtype(a.dtype).itemsize * int(np.prod(a.shape, dtype=np.int64))
  return int(total)


def content_bytes(content: RecordDict) -> int:
  """Serialized bytes of ``content`` as Flower ships it.

  Every array's ``.npy`` bytes plus the records' own serialized headers;
  identical chunks (e.g. the zero ``b`` matrices of a fresh adapter) count
  every time here, though Flower's object store may send them once.
  """
  total = 0
  for record in content.array_records.values():
    for name in record.keys():
      total += len(record[name].data)
  for rec in list(content.config_records.values()) + list(
      content.metric_records.values()):
    total += len(rec.deflate())
  return int(total)


def config_record(values: Mapping[str, Any]) -> ConfigRecord:
  return ConfigRecord(dict(values))


def metric_record(values: Mapping[str, Any]) -> MetricRecord:
  return MetricRecord({k: (float(v) if isinstance(v, float) else int(v))
                       for k, v in values.items()})
