"""Partitioners: sizes, disjoint covers, determinism, skew, errors."""

import numpy as np
import pytest

from fedjax_u2s.data import partition as P


def _assert_cover(parts, n):
  allidx = np.concatenate(parts)
  assert len(allidx) == n  # disjoint ...
  np.testing.assert_array_equal(np.sort(allidx), np.arange(n))  # ... cover
  for p in parts:
    assert p.dtype == np.int64
    np.testing.assert_array_equal(p, np.sort(p))


def test_iid():
  parts = P.iid(10, 3, seed=0)
  assert [len(p) for p in parts] == [4, 3, 3]
  _assert_cover(parts, 10)
  again = P.iid(10, 3, seed=0)
  for a, b in zip(parts, again):
    np.testing.assert_array_equal(a, b)
  other = P.iid(10, 3, seed=1)
  assert any(not np.array_equal(a, b) for a, b in zip(parts, other))
  # Equals the documented construction.
  perm = np.random.default_rng(0).permutation(10)
  np.testing.assert_array_equal(parts[0], np.sort(perm[:4]))
  with pytest.raises(ValueError, match=r"3 clients at least 4 item\(s\) each "
                     r"from 10 items \(needs 12\)"):
    P.iid(10, 3, seed=0, min_size=4)


def _labels():
  return np.repeat(np.array(["a", "b", "c", "d"]), 50)  # 200 items


def _mean_entropy(parts, labels):
  ents = []
  for p in parts:
    _, counts = np.unique(labels[p], return_counts=True)
    q = counts / counts.sum()
    ents.append(-(q * np.log(q)).sum())
  return float(np.mean(ents))


def test_dirichlet_cover_determinism_min_size():
  labels = _labels()
  parts = P.dirichlet(labels, 5, alpha=0.5, seed=0, min_size=3)
  _assert_cover(parts, 200)
  assert min(len(p) for p in parts) >= 3
  again = P.dirichlet(list(labels), 5, alpha=0.5, seed=0, min_size=3)
  for a, b in zip(parts, again):
    np.testing.assert_array_equal(a, b)
  other = P.dirichlet(labels, 5, alpha=0.5, seed=1, min_size=3)
  assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_smaller_alpha_is_more_skewed():
  labels = _labels()
  full = np.log(4)  # entropy of the uniform label mix
  ent = {alpha: np.mean([_mean_entropy(P.dirichlet(labels, 5, alpha, seed=s),
                                       labels) for s in range(5)])
         for alpha in (0.05, 1.0, 1000.0)}
  assert ent[0.05] < ent[1.0] < ent[1000.0]
  assert ent[0.05] < 0.5 * full  # most clients hold one or two labels
  assert ent[1000.0] > 0.97 * full  # nearly IID
  # Per-client label shares at alpha=1000 stay close to the global 1/4.
  for p in P.dirichlet(labels, 5, 1000.0, seed=0):
    _, counts = np.unique(labels[p], return_counts=True)
    assert np.abs(counts / counts.sum() - 0.25).max() < 0.1


def test_dirichlet_errors():
  with pytest.raises(ValueError, match=r"6 clients at least 2 item\(s\) each "
                     r"from 10 items \(needs 12\)"):
    P.dirichlet(np.arange(10) % 2, 6, alpha=1.0, seed=0, min_size=2)
  with pytest.raises(ValueError, match=r"10 items with 2 labels over 5 "
                     r"clients \(alpha=0.01\).*>= 2 items in 3 tries"):
    P.dirichlet(np.arange(10) % 2, 5, alpha=0.01, seed=0, min_size=2,
                max_tries=3)
  with pytest.raises(ValueError, match="alpha must be > 0"):
    P.dirichlet(np.arange(10) % 2, 2, alpha=0.0, seed=0)


def test_natural():
  parts, keys = P.natural(["b", "a", "b", "c", "a"])
  assert keys == ["a", "b", "c"]
  assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]
  _assert_cover(parts, 5)
  with pytest.raises(ValueError, match="mutually comparable"):
    P.natural(["a", None])
  with pytest.raises(ValueError, match="no items"):
    P.natural([])


def test_registry():
  assert set(P.PARTITIONERS) == {"iid", "dirichlet", "natural"}
  for a, b in zip(P.partition("iid", 10, 3, seed=2), P.iid(10, 3, seed=2)):
    np.testing.assert_array_equal(a, b)
  parts, keys = P.partition("natural", [2, 1, 2])
  assert keys == [1, 2]
  with pytest.raises(ValueError, match=r"Unknown partitioner 'zipf'.*'dirichlet'"):
    P.partition("zipf", 10, 3, seed=0)


def test_errors_say_what_was_dropped_before_partitioning():
  from fedjax_u2s.data.instructions import DropReport
  report = DropReport("rows of data.jsonl", 40, 10, {"missing_response": 30,
                                                     "empty_response": 0})
  with pytest.raises(ValueError) as e:
    P.iid(10, 20, seed=0, dropped=report)
  msg = str(e.value)
  assert ("Cannot give 20 clients at least 1 item(s) each from 10 items "
          "(needs 20). Before partitioning, 30 of 40 rows of data.jsonl were "
          "dropped (30 missing_response) -- missing_response: is the response "
          "in another column? map it with config.data.fields") in msg
  assert "Recover the dropped rows, or use fewer clients" in msg
  with pytest.raises(ValueError, match=r"from 10 items.*Before partitioning, "
                     r"2 rows had no label\. Recover"):
    P.dirichlet(np.arange(10) % 2, 6, alpha=1.0, seed=0, min_size=2,
                dropped="2 rows had no label.")
  with pytest.raises(ValueError, match=r"no items to partition\. Before "
                     r"partitioning, 30 of 40"):
    P.natural([], dropped=report)
  # Nothing dropped: the old message.
  with pytest.raises(ValueError, match=r"\(needs 20\)\. Use fewer clients"):
    P.iid(10, 20, seed=0, dropped=DropReport("rows", 10, 10, {"x": 0}))
