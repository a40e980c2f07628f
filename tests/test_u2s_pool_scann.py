"""The generation stage over a 10k-demonstration pool file, through ScaNN.

A synthetic Dolly file of 10,000 rows (100 topics of 10 words each) is the
pool; a hashing embedder (a fixed random vector per word, summed and
normalised) embeds it and the client pieces, so neighbours are real but
nothing needs a download; a tiny random chat model generates. ``auto`` must
pick ScaNN at this size, the demonstrations each piece's prompt showed must
be the exact top-k (tie-aware recall against exact search), the pool's
embeddings must be cached in the workdir and read back, and a changed pool
file must stop a rerun with a message naming it.
"""

import json
import os
import zlib

import numpy as np
import pytest

from fedjax_u2s import pipelines
from fedjax_u2s import retrieval
from fedjax_u2s import testing
from fedjax_u2s.pipelines import common
from fedjax_u2s.pipelines import workdir as workdir_lib
from fedjax_u2s.u2s import pool as pool_lib
from fedjax_u2s.u2s import stage
from fedjax_u2s.u2s import writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "u2s_wiki.py")
POOL_SIZE = 10_000
TOPICS = 100
K = 3


class HashEmbedder:
  """Sum of a fixed random 32-d vector per word, L2-normalised."""

  def __init__(self):
    self.calls = 0

  def embed(self, texts):
    self.calls += 1
    out = np.zeros((len(texts), 32), np.float32)
    for i, t in enumerate(texts):
      for w in t.lower().split():
        out[i] += np.random.default_rng(zlib.crc32(w.encode())).normal(size=32)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _topic_words(t):
  return [f"w{t}x{j}" for j in range(10)]


def _text(rng, topic, n):
  words = list(rng.choice(_topic_words(topic), size=n - 2)) + [
      f"common{int(c)}" for c in rng.integers(0, 50, size=2)]
  rng.shuffle(words)
  return " ".join(words)


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("pool") / "dolly_10k.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    for i in range(POOL_SIZE):
      f.write(json.dumps({"instruction": f"Question {i} about topic {i % TOPICS}?",
                          "context": _text(rng, i % TOPICS, 12),
                          "response": f"Answer {i}.", "category": "synthetic"}) + "\n")
  return str(path)


@pytest.fixture
def corpus_dir(tmp_path):
  rng = np.random.default_rng(1)
  for c in range(2):
    d = tmp_path / "corpus" / f"client{c}"
    d.mkdir(parents=True)
    for j in range(3):
      (d / f"doc{j}.txt").write_text(_text(rng, 7 * c + 13 * j, 40) + ".\n")
  return str(tmp_path / "corpus")


def _config(model, corpus_dir, pool_path, **kw):
  return testing.load_config(CONFIG, "smoke", **{
      "model.name": model, "corpus.kind": "folder", "corpus.path": corpus_dir,
      "corpus.partition": "natural", "corpus.num_clients": 0,
      "corpus.holdout_fraction": 0.0, "corpus.topics": (),
      "chunking.max_pieces_per_client": 3, "chunking.min_tokens": 8,
      "pool.path": pool_path, "retrieval.method": "auto",
      "u2s.num_demonstrations": K, "u2s.max_new_tokens": 4, "u2s.batch_size": 3,
      "u2s.sampling.pad_multiple": 128, "federated.clients_per_round": 1, **kw})


def _tie_aware_recall(rows, queries, pool_emb, k):
  """Share of retrieved rows scoring at least the exact k-th best score."""
  scores = queries @ pool_emb.T
  kth = -np.sort(-scores, axis=1)[:, k - 1]
  hits = [np.sum(scores[q, r] >= kth[q] - 1e-5) for q, r in enumerate(rows)]
  return float(np.sum(hits)) / (k * len(rows))


def test_generation_with_a_10k_pool_uses_scann_and_finds_the_exact_top_k(
    tmp_path, smollm2_path, pool_file, corpus_dir):
  del smollm2_path  # The tiny model borrows SmolLM2's tokenizer.
  model_dir = testing.write_tiny_chat_model(str(tmp_path / "tiny"))
  config = _config(model_dir, corpus_dir, pool_file)
  workdir = str(tmp_path / "run")
  workdir_lib.check_and_record(config, workdir, (common.generation_stage(("generated",)),))
  embedder = HashEmbedder()
  gen = stage.run_generation(config, workdir, model=common.load_model(config),
                             embedder=embedder)
  assert gen["pool"] == {"path": pool_file, "size": POOL_SIZE, "index": "scann"}
  assert POOL_SIZE >= retrieval.AUTO_EXACT_BELOW

  # What each piece's prompt showed, against exact search over the same vectors.
  demos = pool_lib.load_pool(pool_file)
  row_of = {d.id: i for i, d in enumerate(demos)}
  pool_emb = HashEmbedder().embed([d.text for d in demos])
  pieces = {(p["client_id"], p["piece_id"]): p["text"] for p in writer.read_records(
      os.path.join(workdir, "generated", stage.PIECES_FILE))}
  records = [r for c in range(2) for r in
             writer.read_records(writer.client_path(writer.generated_dir(workdir), c))
             + writer.read_records(writer.rejected_path(writer.generated_dir(workdir), c))]
  assert len(records) == 6 and all(len(r["demo_ids"]) == K for r in records)
  queries = HashEmbedder().embed([pieces[(r["client_id"], r["piece_id"])] for r in records])
  rows = np.asarray([[row_of[d] for d in r["demo_ids"]] for r in records])
  assert _tie_aware_recall(rows, queries, pool_emb, K) >= 0.9
  # The recorded retrieval scores are the cosines of the shown demonstrations.
  np.testing.assert_allclose(
      [r["retrieval_scores"] for r in records],
      np.einsum("qd,qkd->qk", queries, pool_emb[rows]), atol=1e-5)

  # Embedded once: the cache is read back, not recomputed.
  cached = os.listdir(os.path.join(workdir, stage.POOL_CACHE_DIR))
  assert sorted(f.rsplit(".", 1)[1] for f in cached) == ["json", "npy"]
  again = HashEmbedder()
  emb = stage.pool_embeddings(demos, again, workdir, pool_file, "auto",
                              config.embedder.name)
  assert again.calls == 0
  np.testing.assert_array_equal(emb, pool_emb)


def test_a_changed_pool_file_or_index_method_stops_a_rerun(tmp_path):
  pool_path = tmp_path / "pool.jsonl"
  row = {"instruction": "Q?", "context": "Some context.", "response": "A."}
  pool_path.write_text(json.dumps(row) + "\n", encoding="utf-8")
  config = testing.load_config(CONFIG, "smoke", **{"pool.path": str(pool_path)})
  stages = (common.generation_stage(("generated",)),)
  record = workdir_lib.fingerprint(config, stages[0], workdir_lib._HashCache(None))
  assert record["config.retrieval.method"] == "auto"
  assert record["config.pool.format"] == "auto"
  assert "pool.jsonl" in record["file.pool"]
  wd = str(tmp_path / "wd")
  workdir_lib.check_and_record(config, wd, stages)
  os.makedirs(os.path.join(wd, "generated"))
  embed = lambda emb: stage.pool_embeddings(pool_lib.load_pool(str(pool_path)), emb, wd,
                                            str(pool_path), "auto", "all-minilm-l6-v2")
  first, second = HashEmbedder(), HashEmbedder()
  embed(first), embed(second)
  assert (first.calls, second.calls) == (1, 0)  # Embedded once, then read back.
  pool_path.write_text(json.dumps(dict(row, response="B.")) + "\n", encoding="utf-8")
  changed = HashEmbedder()
  embed(changed)
  assert changed.calls == 1  # Another file: embedded anew, beside the old entry.
  assert len(os.listdir(os.path.join(wd, stage.POOL_CACHE_DIR))) == 4
  with pytest.raises(workdir_lib.WorkdirMismatchError,
                     match=r"file\.pool: contents differ: pool\.jsonl \(changed\)"):
    workdir_lib.check_and_record(config, wd, stages)
  other = testing.load_config(CONFIG, "smoke", **{"pool.path": str(pool_path),
                                                  "retrieval.method": "exact"})
  with pytest.raises(workdir_lib.WorkdirMismatchError,
                     match=r"config\.retrieval\.method: \"auto\" \(workdir\) -> \"exact\""):
    workdir_lib.check_and_record(other, wd, stages)
