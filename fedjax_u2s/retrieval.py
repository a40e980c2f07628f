"""Maximum inner product search over an embedding pool, and demonstration choice.

One API for every backend::

    index = build_index(pool_embeddings, method="auto", num_neighbors=10)
    ids, scores = index.search(query_embeddings, k=5)     # [Q, 5] int64, float32

Scores are dot products, i.e. cosine similarities for the unit-norm vectors
:class:`fedjax_u2s.models.bert.Embedder` returns. Methods, a registry by name
(:data:`INDEX_BUILDERS`):

* ``"exact"``: numpy matmul + ``argpartition`` over query chunks. Rows are
  sorted by descending score; ties are broken by the smaller id, so results
  are deterministic.
* ``"scann"``: ScaNN's tree (k-means partitioning) + anisotropic asymmetric
  hashing + exact reordering. Approximate; defaults aim at recall@10 >= 0.95.
* ``"auto"``: exact below ``AUTO_EXACT_BELOW`` vectors (where brute force is
  both fast and exact, and a tree has too little data to train), ScaNN above;
  exact, with a warning, if ScaNN is not installed or fails to build.

Asking for ``k`` larger than the pool returns ``N`` columns: ``k`` is clipped
to the pool size for every method and strategy.

Few-shot demonstrations are chosen by strategies (:data:`STRATEGIES`):
``retrieval`` (top-k by similarity), ``random`` (uniform without replacement,
per query, seeded by ``(seed, query index)``) and ``fixed`` (one seeded draw of
k, shared by every query); see :func:`select_demonstrations`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import tempfile
from typing import Any, Callable, Protocol

from absl import logging
import numpy as np

# Pools smaller than this are searched exactly by method="auto". Below it our
# default ScaNN settings probe few leaves and can miss the 0.95 recall@10
# target, while exact search of a query costs well under a millisecond; from
# it up ScaNN's recall is ~0.99 and its queries several times cheaper
# (docs/benchmarks.md, "Retrieval").
AUTO_EXACT_BELOW = 8192
# Exact search scores at most this many (query, pool) pairs at once (128 MiB).
_EXACT_CHUNK_ELEMENTS = 1 << 25


class Index(Protocol):
  """A searchable pool of ``size`` vectors of dimension ``dim``."""
  method: str
  size: int
  dim: int

  def search(self, queries: np.ndarray, k: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """[Q, D] queries -> ids [Q, min(k, size)] int64, scores float32, best first."""


def _as_pool(embeddings: Any) -> np.ndarray:
  x = np.asarray(embeddings)
  if x.ndim != 2:
    raise ValueError(f"pool embeddings must be [N, D], got shape {x.shape}.")
  if x.shape[0] == 0:
    raise ValueError("the pool is empty (0 embeddings); there is nothing to "
                     "search. Build the pool from at least one example.")
  if x.shape[1] == 0:
    raise ValueError(f"pool embeddings have dimension 0 (shape {x.shape}).")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"pool embeddings must be floating point, got {x.dtype}.")
  x = np.ascontiguousarray(x, dtype=np.float32)
  if not np.isfinite(x).all():
    bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
    raise ValueError(f"pool embedding row {bad} holds NaN or inf.")
  return x


def _as_queries(queries: Any, dim: int) -> np.ndarray:
  q = np.asarray(queries)
  if q.ndim == 1:
    raise ValueError(f"queries must be [Q, {dim}], got a 1-D array of shape "
                     f"{q.shape}; use queries[None] for a single query.")
  if q.ndim != 2 or q.shape[1] != dim:
    raise ValueError(f"queries must be [Q, {dim}] to match the pool, got shape "
                     f"{q.shape}.")
  return np.ascontiguousarray(q, dtype=np.float32)


def _check_k(k: int, size: int) -> int:
  if int(k) != k or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}.")
  return min(int(k), size)


def topk_exact(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Row-wise top ``k`` of ``scores`` [Q, N], ties broken by smaller column.

  Returns:
    ``(ids [Q, k] int64, top scores [Q, k])``, descending.
  """
  q, n = scores.shape
  if k >= n:
    cand = np.broadcast_to(np.arange(n), (q, n))
  else:
    cand = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  cand_scores = np.take_along_axis(scores, cand, axis=1)
  order = np.lexsort((cand, -cand_scores), axis=-1)
  ids = np.take_along_axis(cand, order, axis=1).astype(np.int64)
  if k < n:
    # argpartition picks arbitrarily among scores tied with the k-th; redo
    # those (rare) rows so the smallest ids win.
    kth = cand_scores.min(axis=1, keepdims=True)
    tied = np.flatnonzero((scores >= kth).sum(axis=1) > k)
    for r in tied:
      c = np.flatnonzero(scores[r] >= kth[r, 0])
      ids[r] = c[np.lexsort((c, -scores[r, c]))[:k]]
  return ids, np.take_along_axis(scores, ids, axis=1)


@dataclasses.dataclass
class ExactIndex:
  """Brute-force inner product search (deterministic, exact)."""
  embeddings: np.ndarray          # [N, D] float32
  num_neighbors: int = 10
  method: str = dataclasses.field(default="exact", init=False)

  @property
  def size(self) -> int:
    return self.embeddings.shape[0]

  @property
  def dim(self) -> int:
    return self.embeddings.shape[1]

  @classmethod
  def build(cls, embeddings: Any, *, num_neighbors: int = 10) -> "ExactIndex":
    return cls(_as_pool(embeddings), num_neighbors=num_neighbors)

  def search(self, queries: Any, k: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` (default ``num_neighbors``) pool ids and scores per query."""
    q = _as_queries(queries, self.dim)
    k = _check_k(self.num_neighbors if k is None else k, self.size)
    ids = np.empty((q.shape[0], k), np.int64)
    scores = np.empty((q.shape[0], k), np.float32)
    chunk = max(1, _EXACT_CHUNK_ELEMENTS // self.size)
    for s in range(0, q.shape[0], chunk):
      full = q[s:s + chunk] @ self.embeddings.T               # [chunk, N]
      ids[s:s + chunk], scores[s:s + chunk] = topk_exact(full, k)
    return ids, scores


@dataclasses.dataclass(frozen=True)
class ScannConfig:
  """ScaNN parameters; ``None`` fields are derived from the pool size N.

  Attributes:
    num_leaves: k-means partitions; default ``round(sqrt(N))``, at most N // 50
      so every leaf can hold ScaNN's minimum partition of ~50 points.
    num_leaves_to_search: partitions probed per query; default 10% of the
      leaves (at least 8 and at most all).
    training_sample_size: points used to train the tree and the quantizer;
      default ``min(N, 100_000)``.
    dims_per_block: AH subspace width (2 = 4 bits per 2 dims with lut16).
    anisotropic_quantization_threshold: AH's anisotropic loss threshold (0.2
      is ScaNN's recommendation for unit-norm vectors).
    reorder: candidates rescored exactly; default ``max(100, 10 * k)``.
    parallel: use ScaNN's multithreaded batched search.
  """
  num_leaves: int | None = None
  num_leaves_to_search: int | None = None
  training_sample_size: int | None = None
  dims_per_block: int = 2
  anisotropic_quantization_threshold: float = 0.2
  reorder: int | None = None
  parallel: bool = True

  def resolve(self, n: int, k: int) -> "ScannConfig":
    leaves = self.num_leaves or max(1, min(round(math.sqrt(n)), n // 50))
    leaves = min(leaves, n)
    search = self.num_leaves_to_search or min(leaves, max(8, -(-leaves // 10)))
    return dataclasses.replace(
        self, num_leaves=leaves, num_leaves_to_search=min(search, leaves),
        training_sample_size=min(self.training_sample_size or 100_000, n),
        reorder=self.reorder or max(100, 10 * k))


@contextlib.contextmanager
def _native_log_to_absl():
  """ScaNN's C++ log lines, written straight to file descriptor 2, go to absl.

  They would land in the user's terminal between progress bars; captured
  here, each becomes an absl INFO line (in the run's log file, see
  ``fedjax_u2s/main.py``). Python's own stderr is flushed first so nothing
  of it is caught.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode("utf-8", "replace").splitlines():
        logging.info("scann: %s", line)


def _import_scann():
  try:
    import scann  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "method='scann' needs ScaNN: `pip install scann==1.4.2` (no "
        "TensorFlow needed; installing TensorFlow next to it breaks "
        f"`import scann`). Or use method='exact'. ({e})") from e
  return scann


@dataclasses.dataclass
class ScannIndex:
  """Approximate inner product search with ScaNN (tree + AH + reordering)."""
  searcher: Any
  config: ScannConfig             # Resolved: no None fields.
  size: int
  dim: int
  num_neighbors: int = 10
  method: str = dataclasses.field(default="scann", init=False)

  @classmethod
  def build(cls, embeddings: Any, *, num_neighbors: int = 10,
            config: ScannConfig | None = None, **config_fields) -> "ScannIndex":
    """Trains a ScaNN searcher on ``embeddings``.

    Args:
      embeddings: [N, D] pool.
      num_neighbors: default k of :meth:`search`.
      config: a :class:`ScannConfig`; or give its fields as keywords.
    """
    scann = _import_scann()
    db = _as_pool(embeddings)
    n, d = db.shape
    config = dataclasses.replace(config or ScannConfig(), **config_fields)
    k = min(num_neighbors, n)
    cfg = config.resolve(n, k)
    builder = scann.scann_ops_pybind.builder(db, k, "dot_product")
    if cfg.num_leaves > 1:
      builder = builder.tree(
          num_leaves=cfg.num_leaves,
          num_leaves_to_search=cfg.num_leaves_to_search,
          training_sample_size=cfg.training_sample_size)
    builder = builder.score_ah(
        cfg.dims_per_block,
        anisotropic_quantization_threshold=cfg.anisotropic_quantization_threshold,
        training_sample_size=cfg.training_sample_size)
    with _native_log_to_absl():
      searcher = builder.reorder(cfg.reorder).build()
    return cls(searcher=searcher, config=cfg, size=n, dim=d,
               num_neighbors=num_neighbors)

  def search(self, queries: Any, k: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top ``k`` (default ``num_neighbors``) ids and scores."""
    q = _as_queries(queries, self.dim)
    k = _check_k(self.num_neighbors if k is None else k, self.size)
    if q.shape[0] == 0:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    pre = max(self.config.reorder, k)
    fn = (self.searcher.search_batched_parallel if self.config.parallel
          else self.searcher.search_batched)
    with _native_log_to_absl():
      ids, scores = fn(q, final_num_neighbors=k, pre_reorder_num_neighbors=pre)
    ids = np.asarray(ids).astype(np.int64)
    scores = np.asarray(scores, np.float32)
    short = np.flatnonzero(np.isnan(scores).any(axis=1))
    if short.size:
      # ScaNN pads with NaN scores when the probed leaves hold fewer than k
      # points; search every leaf for those queries.
      ids2, scores2 = fn(q[short], final_num_neighbors=k,
                         pre_reorder_num_neighbors=pre,
                         leaves_to_search=self.config.num_leaves)
      ids[short] = np.asarray(ids2)
      scores[short] = np.asarray(scores2, np.float32)
      if np.isnan(scores).any():
        raise RuntimeError(f"ScaNN found fewer than k={k} neighbours in a pool "
                           f"of {self.size} even searching every leaf.")
    return ids, scores


INDEX_BUILDERS: dict[str, Callable[..., Index]] = {
    "exact": ExactIndex.build,
    "scann": ScannIndex.build,
}


def build_index(embeddings: Any, *, method: str = "auto",
                num_neighbors: int = 10, **kwargs) -> Index:
  """Builds a search index over ``embeddings`` [N, D].

  Args:
    embeddings: the pool, [N, D] floats (unit-norm for cosine similarity).
    method: ``"auto"``, or a key of :data:`INDEX_BUILDERS` (``"exact"``,
      ``"scann"``).
    num_neighbors: the default ``k`` of ``search``.
    **kwargs: backend options, e.g. :class:`ScannConfig` fields for ScaNN
      (ignored by ``auto`` when it picks exact search).

  Raises:
    ValueError: unknown method, empty pool, wrong rank, NaN/inf values.
    ImportError: ``method="scann"`` without ScaNN installed.
  """
  if method == "auto":
    n = np.shape(embeddings)[0] if np.ndim(embeddings) >= 1 else 0
    if n < AUTO_EXACT_BELOW:
      return ExactIndex.build(embeddings, num_neighbors=num_neighbors)
    try:
      _import_scann()
    except ImportError as e:
      logging.warning("build_index(method='auto'): %s; using exact search.", e)
      return ExactIndex.build(embeddings, num_neighbors=num_neighbors)
    pool = _as_pool(embeddings)   # Input errors are raised, not fallen back on.
    try:
      return INDEX_BUILDERS["scann"](pool, num_neighbors=num_neighbors, **kwargs)
    except (RuntimeError, ValueError) as e:
      logging.warning("build_index(method='auto'): ScaNN could not build an "
                      "index over %d vectors (%s); using exact search.",
                      len(pool), e)
      return ExactIndex.build(pool, num_neighbors=num_neighbors)
  if method not in INDEX_BUILDERS:
    raise ValueError(f"unknown index method {method!r}; expected 'auto' or "
                     f"one of {sorted(INDEX_BUILDERS)}.")
  return INDEX_BUILDERS[method](embeddings, num_neighbors=num_neighbors, **kwargs)


# ----------------------------------------------------------------------------
# Demonstration selection.


def _retrieval(queries: np.ndarray, pool: Index, k: int, seed: int) -> np.ndarray:
  del seed  # Deterministic given the index.
  return pool.search(queries, k)[0]


def _random(queries: np.ndarray, pool: Index, k: int, seed: int) -> np.ndarray:
  out = np.empty((queries.shape[0], k), np.int64)
  for i in range(queries.shape[0]):
    rng = np.random.default_rng([seed, 0, i])
    out[i] = rng.choice(pool.size, size=k, replace=False)
  return out


def _fixed(queries: np.ndarray, pool: Index, k: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, 1])
  ids = np.sort(rng.choice(pool.size, size=k, replace=False)).astype(np.int64)
  return np.broadcast_to(ids, (queries.shape[0], k)).copy()


# name -> fn(queries [Q, D], pool index, k (already clipped), seed) -> [Q, k].
STRATEGIES: dict[str, Callable[[np.ndarray, Index, int, int], np.ndarray]] = {
    "retrieval": _retrieval,
    "random": _random,
    "fixed": _fixed,
}


def select_demonstrations(strategy: str, query_embeddings: Any, pool_index: Index,
                          k: int, seed: int = 0) -> np.ndarray:
  """Pool ids of the few-shot demonstrations for each query.

  Args:
    strategy: a key of :data:`STRATEGIES`: ``"retrieval"`` (the k most
      similar pool entries, best first), ``"random"`` (k distinct uniform
      draws per query, from ``np.random.default_rng([seed, 0, i])`` for query
      ``i``, so a query's draw does not depend on the others) or ``"fixed"``
      (one sorted draw of k shared by every query, from ``[seed, 1]``).
    query_embeddings: [Q, D].
    pool_index: the index over the demonstration pool (any :class:`Index`).
    k: demonstrations per query; clipped to the pool size.
    seed: integer seed for ``random`` and ``fixed``.

  Returns:
    [Q, min(k, pool size)] int64 pool ids; each row has distinct ids.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown demonstration strategy {strategy!r}; expected "
                     f"one of {sorted(STRATEGIES)}.")
  queries = _as_queries(query_embeddings, pool_index.dim)
  k = _check_k(k, pool_index.size)
  if int(seed) != seed or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
  return STRATEGIES[strategy](queries, pool_index, k, int(seed))
