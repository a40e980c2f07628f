"""The U2S generation stage over all clients, resumable from the workdir.

Reads the client corpora, chunks them with the generator's tokenizer, embeds
the demonstration pool and every piece once, and runs
:func:`~fedjax_u2s.u2s.generate.generate_client` for each client in turn.
Everything it produces lands under ``WORKDIR/generated/``:

* ``pieces.jsonl``: every client's pieces (id, client, document, offsets), the
  input of generation, written once so a rerun chunks nothing;
* ``client_XXXX.jsonl`` / ``client_XXXX.rejected.jsonl``: kept pairs with
  provenance and rejected pieces with their reason (see ``writer.py``);
* ``stats.json``: yield and rejection counts per client;
* ``corpus.json``: the clients (name, documents) and the held-out titles that
  no client holds (the evaluation asks about both).

A pool file (``config.pool.path``) is embedded once and cached in
``WORKDIR/cache/pool_embeddings/``, keyed by the file's sha256, the pool
format and the embedder (name and weights' sha256): a rerun, or a
``--redo=generate``, reads the cache; a changed file or embedder embeds anew.
The index over the pool is ``config.retrieval.method`` (``auto``: exact
search below :data:`fedjax_u2s.retrieval.AUTO_EXACT_BELOW` demonstrations,
ScaNN from there up).

Nothing here leaves a client except through its own files: in a real
deployment each client runs this stage on its own machine with its own text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

from absl import logging
import ml_collections
import numpy as np
import tqdm

from fedjax_u2s import export
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s.models import bert
from fedjax_u2s.u2s import chunking
from fedjax_u2s.u2s import corpus as corpus_lib
from fedjax_u2s.u2s import generate as generate_lib
from fedjax_u2s.u2s import pool as pool_lib
from fedjax_u2s.u2s import writer as writer_lib

PIECES_FILE = "pieces.jsonl"
CORPUS_FILE = "corpus.json"
POOL_CACHE_DIR = os.path.join("cache", "pool_embeddings")  # Under the workdir.


def prepare_pieces(config: ml_collections.ConfigDict, workdir: str, tokenizer
                   ) -> tuple[list[list[chunking.Piece]], dict[str, Any]]:
  """Client pieces, chunked once and then read back from ``pieces.jsonl``.

  Returns:
    ``(pieces per client, corpus summary)``; the summary holds client names,
    chunking stats and the held-out documents' titles.
  """
  out_dir = writer_lib.generated_dir(workdir)
  os.makedirs(out_dir, exist_ok=True)
  pieces_path = os.path.join(out_dir, PIECES_FILE)
  corpus_path = os.path.join(out_dir, CORPUS_FILE)
  if os.path.exists(pieces_path) and os.path.exists(corpus_path):
    with open(corpus_path, encoding="utf-8") as f:
      summary = json.load(f)
    per_client: list[list[chunking.Piece]] = [[] for _ in summary["clients"]]
    for row in writer_lib.read_records(pieces_path):
      per_client[row["client_id"]].append(chunking.Piece(**row))
    return per_client, summary

  clients, holdout = corpus_lib.load_corpora_and_holdout(config.corpus)
  count = lambda text: len(tokenizer.encode(text))
  chunked = chunking.chunk_corpora(clients, count, config.chunking.max_tokens,
                                   config.chunking.min_tokens)
  per_client = []
  summary = {"clients": [], "holdout": [d.doc_id for d in holdout]}
  for corpus, (pieces, stats) in zip(clients, chunked):
    if config.chunking.max_pieces_per_client:
      pieces = pieces[:config.chunking.max_pieces_per_client]
    per_client.append(pieces)
    summary["clients"].append({
        "client_id": corpus.client_id, "name": corpus.name,
        "documents": len(corpus.documents), "pieces": len(pieces),
        "doc_ids": sorted({p.doc_id for p in pieces}),
        "chunking": {k: int(v) for k, v in stats.items()}})
  tmp = pieces_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for pieces in per_client:
      for p in pieces:
        f.write(writer_lib.dumps(dataclasses.asdict(p)) + "\n")
  os.replace(tmp, pieces_path)
  writer_lib.atomic_write_json(corpus_path, summary)
  return per_client, summary


def run_generation(config: ml_collections.ConfigDict, workdir: str, *, model,
                   embedder) -> dict[str, Any]:
  """Generates every client's pairs (skipping what earlier runs finished).

  Args:
    config: the experiment config (``corpus``, ``chunking``, ``pool``, ``u2s``,
      ``generator``, ``seed``).
    workdir: the run directory.
    model: the generator (``registry.LoadedModel``): the model being tuned
      unless ``config.generator.name`` names another one (the caller loads it).
    embedder: a :class:`fedjax_u2s.models.bert.Embedder`.

  Returns:
    ``{"stats"``: the ``stats.json`` content, ``"corpus"``: the corpus
    summary, ``"pool"``: its path, size and the index that searched it
    (``exact`` or ``scann``)``}``.
  """
  generator_name = config.generator.name or config.model.name
  per_client, summary = prepare_pieces(config, workdir, model.tokenizer)
  pool_format = config.pool.get("format", "auto")
  pool = pool_lib.load_pool(config.pool.path or None, pool_format)
  pool_emb = pool_embeddings(pool, embedder, workdir, config.pool.path,
                             pool_format, config.embedder.name)
  method = config.get("retrieval", {}).get("method", "auto")
  start = time.perf_counter()
  select = generate_lib.make_select_fn(config.u2s.selection, pool_emb, method=method)
  logging.info("U2S pool: %d demonstrations, index %r (config.retrieval.method=%r) "
               "built in %.1fs", len(pool), select.index.method, method,
               time.perf_counter() - start)
  smp = sampler_lib.Sampler(model.config, model.tokenizer,
                            pad_multiple=config.u2s.sampling.pad_multiple,
                            decode=config.u2s.sampling.decode)
  out_dir = writer_lib.generated_dir(workdir)
  all_stats = []
  done = sum(len(writer_lib.ClientWriter(out_dir, cid).done_ids()
                 & {str(p.piece_id) for p in pieces})
             for cid, pieces in enumerate(per_client))
  bar = tqdm.tqdm(total=sum(len(p) for p in per_client), initial=done,
                  desc="U2S generation", unit="piece", dynamic_ncols=True)
  for cid, pieces in enumerate(per_client):
    start = time.perf_counter()
    name = summary["clients"][cid]["name"]
    bar.set_postfix_str(f"client {cid} ({name})")
    st = generate_lib.generate_client(
        pieces, client_id=cid, pool=pool, pool_embeddings=pool_emb,
        select_fn=select, embedder=embedder, sampler=smp, params=model.params,
        tokenizer=model.tokenizer, config=config.u2s, out_dir=out_dir,
        generator_name=generator_name, seed=config.seed, on_batch=bar.update)
    all_stats.append(st)
    tqdm.tqdm.write(f"U2S client {cid} ({name}): {st.kept} kept of "
                    f"{st.kept + st.rejected} pieces ({st.skipped} done earlier), "
                    f"rejected {st.rejected_by_reason}, "
                    f"{time.perf_counter() - start:.0f}s")
  bar.close()
  stats = writer_lib.rebuild_stats(out_dir)
  generated = sum(s.generated for s in all_stats)
  seconds = sum(s.seconds for s in all_stats)
  if generated:
    logging.info("U2S: %d pieces in %.0fs (%.1f pieces/min)", generated, seconds,
                 60 * generated / max(seconds, 1e-9))
  return {"stats": stats, "corpus": summary,
          "pool": {"path": config.pool.path or pool_lib.DEFAULT_POOL,
                   "size": len(pool), "index": select.index.method}}


def _embedder_id(embedder, name: str) -> dict[str, str]:
  """What makes an embedder's vectors: its name and its weights' sha256."""
  out = {"embedder": str(name)}
  source = getattr(embedder, "source", "")
  weights = os.path.join(source, bert.WEIGHTS_NAME) if source else ""
  if weights and os.path.isfile(weights):
    out["weights_sha256"] = export.file_sha256(weights)
  else:  # Not a file-backed embedder (tests): its class stands for it.
    out["class"] = type(embedder).__qualname__
  return out


def pool_embeddings(pool, embedder, workdir: str, path: str, pool_format: str,
                    embedder_name: str) -> np.ndarray:
  """[P, D] embeddings of the pool texts; a pool file's are cached.

  The packaged pool (``path`` "") is embedded every run (42 texts, about a
  second). A pool file is embedded once per (file sha256, format, embedder)
  and kept in ``workdir/cache/pool_embeddings/<key>.npy`` with a ``.json``
  note of what made it; a cache entry whose row count does not match the
  pool is ignored and rewritten.
  """
  texts = [d.text for d in pool]
  if not path:
    return np.asarray(embedder.embed(texts), np.float32)
  note = {"pool": os.path.abspath(path), "pool_sha256": export.file_sha256(path),
          "format": pool_format, **_embedder_id(embedder, embedder_name),
          "num_demonstrations": len(texts)}
  key = hashlib.sha256(json.dumps({k: v for k, v in note.items() if k != "pool"},
                                  sort_keys=True).encode()).hexdigest()[:20]
  cache_dir = os.path.join(workdir, POOL_CACHE_DIR)
  npy = os.path.join(cache_dir, key + ".npy")
  if os.path.exists(npy):
    emb = np.load(npy)
    if emb.ndim == 2 and emb.shape[0] == len(texts):
      logging.info("U2S pool: %d embeddings read from %s", len(texts), npy)
      return emb
    logging.warning("U2S pool: %s holds %s embeddings for %d demonstrations; "
                    "embedding again.", npy, emb.shape, len(texts))
  start = time.perf_counter()
  emb = np.asarray(embedder.embed(texts), np.float32)
  logging.info("U2S pool: embedded %d demonstrations in %.1fs; cached in %s",
               len(texts), time.perf_counter() - start, npy)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{npy}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    np.save(f, emb)
  os.replace(tmp, npy)
  writer_lib.atomic_write_json(os.path.join(cache_dir, key + ".json"), note)
  return emb


def load_pairs(workdir: str, num_clients: int) -> list[list[dict[str, Any]]]:
  """Every client's kept records, in file order."""
  out_dir = writer_lib.generated_dir(workdir)
  return [writer_lib.read_records(writer_lib.client_path(out_dir, c))
          for c in range(num_clients)]


def split_eval(records: list[dict[str, Any]], fraction: float, seed: int,
               client_id: int) -> tuple[list[dict], list[dict]]:
  """A seeded per-client train/held-out split of generated pairs."""
  n_eval = int(round(fraction * len(records)))
  if n_eval == 0:
    return records, []
  order = np.random.default_rng([seed, client_id, 7]).permutation(len(records))
  held = set(order[:n_eval].tolist())
  return ([r for i, r in enumerate(records) if i not in held],
          [r for i, r in enumerate(records) if i in held])
