"""Tests for fedjax_u2s.retrieval: exact and ScaNN search, demonstration choice."""

import logging as logging_lib

import numpy as np
import pytest

from fedjax_u2s import retrieval


def _unit(x):
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(n, d, num_centers, seed, spread=0.15):
  """[n, d] unit vectors around ``num_centers`` random unit centers."""
  rng = np.random.default_rng(seed)
  centers = _unit(rng.normal(size=(num_centers, d)))
  x = centers[rng.integers(num_centers, size=n)]
  return _unit(x + spread * rng.normal(size=(n, d)) / np.sqrt(d) * 3)


def _angles(degrees):
  r = np.deg2rad(np.asarray(degrees, np.float64))
  return np.stack([np.cos(r), np.sin(r)], axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------
# Exact search.


def test_exact_known_neighbours():
  # Pool at 0, 90, 180, 270, 30 degrees; cosine similarity ranks by angle.
  pool = _angles([0, 90, 180, 270, 30])
  index = retrieval.build_index(pool, method="exact", num_neighbors=3)
  assert (index.method, index.size, index.dim) == ("exact", 5, 2)
  ids, scores = index.search(_angles([10, 200]))
  np.testing.assert_array_equal(ids, [[0, 4, 1], [2, 3, 1]])
  want = np.cos(np.deg2rad([[10, 20, 80], [20, 70, 110]]))
  np.testing.assert_allclose(scores, want, atol=1e-6)
  assert ids.dtype == np.int64 and scores.dtype == np.float32
  # Explicit k overrides num_neighbors.
  ids, _ = index.search(_angles([10]), k=1)
  np.testing.assert_array_equal(ids, [[0]])


def test_exact_ties_broken_by_smaller_id():
  scores = np.array([[1.0, 3.0, 3.0, 3.0, 0.0],
                     [2.0, 2.0, 2.0, 2.0, 2.0],
                     [0.0, 5.0, 1.0, 5.0, 4.0]], np.float32)
  ids, top = retrieval.topk_exact(scores, 2)
  np.testing.assert_array_equal(ids, [[1, 2], [0, 1], [1, 3]])
  np.testing.assert_array_equal(top, [[3, 3], [2, 2], [5, 5]])
  ids, _ = retrieval.topk_exact(scores, 4)
  np.testing.assert_array_equal(ids, [[1, 2, 3, 0], [0, 1, 2, 3], [1, 3, 4, 2]])
  # Through the index: duplicated pool vectors rank by id.
  pool = _angles([50, 0, 0, 90, 0])
  ids, _ = retrieval.build_index(pool, method="exact").search(_angles([0]), 3)
  np.testing.assert_array_equal(ids, [[1, 2, 4]])


def test_exact_matches_brute_force_and_chunks(monkeypatch):
  pool = clustered(500, 16, 10, seed=0)
  queries = clustered(37, 16, 10, seed=1)
  full = queries @ pool.T
  want = np.argsort(-full, axis=1, kind="stable")[:, :7]
  index = retrieval.build_index(pool, method="exact")
  ids, scores = index.search(queries, 7)
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), atol=1e-6)
  monkeypatch.setattr(retrieval, "_EXACT_CHUNK_ELEMENTS", 5 * 500)  # 5 queries
  ids2, scores2 = index.search(queries, 7)
  np.testing.assert_array_equal(ids2, ids)
  np.testing.assert_array_equal(scores2, scores)


def test_k_larger_than_pool_is_clipped():
  pool = _angles([0, 90, 45])
  ids, scores = retrieval.build_index(pool, method="exact").search(
      _angles([0]), k=10)
  assert ids.shape == scores.shape == (1, 3)
  np.testing.assert_array_equal(ids, [[0, 2, 1]])


# ----------------------------------------------------------------------------
# ScaNN.


def test_scann_recall_on_clustered_data():
  pool = clustered(20_000, 64, 100, seed=0)
  rng = np.random.default_rng(1)
  queries = _unit(pool[rng.integers(len(pool), size=500)]
                  + 0.05 * rng.normal(size=(500, 64)))
  exact_ids, exact_scores = retrieval.build_index(pool, method="exact").search(
      queries, 10)
  index = retrieval.build_index(pool, method="scann", num_neighbors=10)
  assert index.method == "scann" and (index.size, index.dim) == (20_000, 64)
  assert index.config.num_leaves == 141   # round(sqrt(20000))
  ids, scores = index.search(queries)
  assert ids.shape == (500, 10) and ids.dtype == np.int64
  assert scores.dtype == np.float32
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
  assert recall >= 0.95, recall
  # Reordering rescoring is exact: the returned scores are true dot products.
  np.testing.assert_allclose(
      scores, np.einsum("qd,qkd->qk", queries, pool[ids]), atol=1e-5)
  assert np.all(np.diff(scores, axis=1) <= 1e-6)
  del exact_scores


def test_scann_few_points_in_probed_leaves_and_k_over_n():
  pool = clustered(300, 16, 5, seed=2)
  index = retrieval.build_index(pool, method="scann", num_leaves=6,
                                num_leaves_to_search=1)
  # One probed leaf holds ~50 points, fewer than k: ScaNN pads with NaN and
  # the index re-searches all leaves for those rows.
  ids, scores = index.search(pool[:4], k=120)
  assert ids.shape == (4, 120) and not np.isnan(scores).any()
  assert all(len(set(row)) == 120 for row in ids)
  ids, scores = index.search(pool[:2], k=1000)
  assert ids.shape == (2, 300)
  np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(np.arange(300), (2, 1)))


# ----------------------------------------------------------------------------
# auto.


def test_auto_switches_on_size(monkeypatch):
  monkeypatch.setattr(retrieval, "AUTO_EXACT_BELOW", 1000)
  assert retrieval.build_index(clustered(999, 8, 4, 0)).method == "exact"
  index = retrieval.build_index(clustered(1000, 8, 4, 0))
  assert index.method == "scann"
  assert index.search(clustered(3, 8, 4, 1), 5)[0].shape == (3, 5)


def test_auto_default_threshold_and_fallback_without_scann(monkeypatch):
  assert retrieval.AUTO_EXACT_BELOW == 8192
  pool = clustered(8192, 4, 4, 0)

  def no_scann():
    raise ImportError("no scann here")

  def failing_build(*args, **kwargs):
    raise RuntimeError("cannot train the tree")

  with monkeypatch.context() as m:
    m.setitem(retrieval.INDEX_BUILDERS, "scann", failing_build)
    assert retrieval.build_index(pool).method == "exact"
    with pytest.raises(RuntimeError, match="cannot train"):
      retrieval.build_index(pool, method="scann")
  monkeypatch.setattr(retrieval, "_import_scann", no_scann)
  assert retrieval.build_index(pool).method == "exact"
  with pytest.raises(ImportError, match="no scann here"):
    retrieval.build_index(pool, method="scann")


# ----------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("method", ["exact", "scann", "auto"])
def test_build_errors(method):
  with pytest.raises(ValueError, match="empty"):
    retrieval.build_index(np.zeros((0, 4), np.float32), method=method)
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    retrieval.build_index(np.zeros((4,), np.float32), method=method)
  bad = np.ones((3, 2), np.float32)
  bad[1, 0] = np.nan
  with pytest.raises(ValueError, match="row 1 holds NaN"):
    retrieval.build_index(bad, method=method)


def test_search_errors():
  index = retrieval.build_index(_angles([0, 90]), method="exact")
  with pytest.raises(ValueError, match=r"\[Q, 2\].*\(1, 3\)"):
    index.search(np.ones((1, 3), np.float32))
  with pytest.raises(ValueError, match="queries\\[None\\]"):
    index.search(np.ones((2,), np.float32))
  with pytest.raises(ValueError, match="positive integer"):
    index.search(_angles([0]), k=0)
  with pytest.raises(ValueError, match="unknown index method 'faiss'"):
    retrieval.build_index(_angles([0]), method="faiss")


# ----------------------------------------------------------------------------
# Demonstration strategies.


@pytest.fixture(scope="module")
def pool_and_queries():
  pool = clustered(50, 8, 5, seed=3)
  queries = clustered(6, 8, 5, seed=4)
  return retrieval.build_index(pool, method="exact"), queries


def test_retrieval_strategy_is_top_k(pool_and_queries):
  index, queries = pool_and_queries
  ids = retrieval.select_demonstrations("retrieval", queries, index, k=4, seed=9)
  np.testing.assert_array_equal(ids, index.search(queries, 4)[0])


def test_random_strategy(pool_and_queries):
  index, queries = pool_and_queries
  ids = retrieval.select_demonstrations("random", queries, index, k=5, seed=1)
  assert ids.shape == (6, 5) and ids.dtype == np.int64
  assert all(len(set(r)) == 5 for r in ids)
  assert ids.min() >= 0 and ids.max() < 50
  assert len({tuple(r) for r in ids}) > 1           # Rows differ per query.
  again = retrieval.select_demonstrations("random", queries, index, k=5, seed=1)
  np.testing.assert_array_equal(again, ids)
  # Query i's draw depends only on (seed, i), not on the other queries.
  head = retrieval.select_demonstrations("random", queries[:2], index, k=5, seed=1)
  np.testing.assert_array_equal(head, ids[:2])
  other = retrieval.select_demonstrations("random", queries, index, k=5, seed=2)
  assert not np.array_equal(other, ids)


def test_random_strategy_is_uniform():
  index = retrieval.build_index(np.eye(10, dtype=np.float32), method="exact")
  queries = np.ones((3000, 10), np.float32)
  ids = retrieval.select_demonstrations("random", queries, index, k=3, seed=0)
  counts = np.bincount(ids.ravel(), minlength=10)
  # 900 expected per id; binomial std ~ 27.
  assert np.all(np.abs(counts - 900) < 150), counts


def test_fixed_strategy(pool_and_queries):
  index, queries = pool_and_queries
  ids = retrieval.select_demonstrations("fixed", queries, index, k=4, seed=7)
  assert ids.shape == (6, 4)
  assert np.all(ids == ids[0]) and len(set(ids[0])) == 4
  one = retrieval.select_demonstrations("fixed", queries[:1], index, k=4, seed=7)
  np.testing.assert_array_equal(one[0], ids[0])
  assert not np.array_equal(
      retrieval.select_demonstrations("fixed", queries, index, k=4, seed=8), ids)


@pytest.mark.parametrize("strategy", sorted(retrieval.STRATEGIES))
def test_strategies_clip_k_and_check_inputs(strategy, pool_and_queries):
  index, queries = pool_and_queries
  ids = retrieval.select_demonstrations(strategy, queries, index, k=80, seed=0)
  assert ids.shape == (6, 50)
  assert all(sorted(r) == list(range(50)) for r in ids)
  with pytest.raises(ValueError, match=r"\[Q, 8\]"):
    retrieval.select_demonstrations(strategy, queries[:, :4], index, k=2)


def test_unknown_strategy(pool_and_queries):
  index, queries = pool_and_queries
  with pytest.raises(ValueError, match="unknown demonstration strategy 'knn'.*"
                     "fixed.*random.*retrieval"):
    retrieval.select_demonstrations("knn", queries, index, k=2)


def test_scann_native_log_lines_go_to_absl_not_the_terminal(capfd):
  """ScaNN's C++ writes "I0000 ... partitioner ..." to fd 2; it must reach the log."""
  from absl import logging as absl_logging
  seen = []

  class Keep(logging_lib.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  handler = Keep()
  absl_logging.get_absl_logger().addHandler(handler)
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    x = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = retrieval.ScannIndex.build(x, num_neighbors=5)
    index.search(x[:3])
  finally:
    absl_logging.set_verbosity(verbosity)
    absl_logging.get_absl_logger().removeHandler(handler)
  err = capfd.readouterr().err
  assert "partitioner" not in err and "I0000" not in err
  assert any(m.startswith("scann: ") and "artition" in m for m in seen)
