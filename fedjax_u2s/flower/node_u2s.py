"""U2S generation on a SuperNode: the node's own raw text -> its own training pairs.

A node whose data directory holds raw text instead of an instruction file::

  DATA_DIR/text/...            .txt / .md files, one document each (recursive,
                               sorted; :func:`fedjax_u2s.u2s.corpus.read_folder`)
  DATA_DIR/corpus.jsonl        or records: .jsonl / .json / .parquet / .csv with a
                               ``text`` field (``--node-config text-field=...``,
                               ``id-field=...``; :func:`~fedjax_u2s.u2s.corpus.read_records`)

turns it into instruction-response pairs with U2S on its own CPU or
accelerator before its first training reply, exactly as the in-process job
does for one client (:func:`fedjax_u2s.u2s.stage.run_generation`): chunk with
the generator's tokenizer (``config.chunking``), embed the demonstration pool
and the pieces with the MiniLM embedder (``config.embedder``), retrieve k
demonstrations per piece (``config.retrieval``), sample
(``config.u2s.sampling``), parse and filter (``config.u2s.filters``), with the
same seeds (``config.seed`` and the client id). The settings are the
experiment config the server sends with every ``train`` message (a U2S
config, ``configs/u2s_wiki.py``); nothing else is needed from the server.

Everything lands in ``DATA_DIR/generated/`` (the layout of the in-process
job's ``WORKDIR/generated/``): ``pieces.jsonl``, ``client_XXXX.jsonl`` (kept
pairs with provenance), ``client_XXXX.rejected.jsonl``, ``stats.json``, and
``node.json``, which records what made them. Generation is crash-safe and
resumable (the writer appends whole batches; a rerun skips finished pieces
and regenerates the rest exactly), so a node stopped mid-generation picks up
at its next ``train`` message. Once ``node.json`` says done, later rounds
only read the kept pairs back. A node whose ``generated/`` was made with
other settings (another generator, seed, client id, chunking, ...) refuses
to train rather than mix them. A pool file's embeddings (``config.pool.path``;
a path on the node) are cached in ``DATA_DIR/cache/pool_embeddings/`` as the
in-process job caches them in its workdir.

The node trains on its kept pairs minus the share ``config.data.eval_fraction``
that the in-process job holds out (:func:`fedjax_u2s.u2s.stage.split_eval`,
same seed), so with the same text and config its training set is the
simulated client's. The held-out pairs stay on the node. Neither the text nor
the pairs ever leave it: only the adapter delta and scalar metrics do.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from typing import Any

import ml_collections

from fedjax_u2s.u2s import writer as writer_lib

TEXT_DIR = "text"
RECORDS_PATTERN = "corpus.*"
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
NODE_FILE = "node.json"
PIECES_FILE = "pieces.jsonl"
# The config fields that determine a node's generated pairs (the in-process
# job's generation stage fields, common.generation_stage, minus the corpus
# split: the node's text is its own).
GENERATION_FIELDS = ("seed", "model.name", "model.dtype", "model.param_dtype",
                     "generator", "embedder", "chunking", "pool", "retrieval", "u2s")


def text_source(data_dir: str) -> tuple[str, str] | None:
  """``("folder", DATA_DIR/text)``, ``("files", DATA_DIR/corpus.X)`` or None."""
  folder = os.path.join(data_dir, TEXT_DIR)
  records = sorted(p for p in glob.glob(os.path.join(data_dir, RECORDS_PATTERN))
                   if p.endswith(RECORD_SUFFIXES))
  found = ([("folder", folder)] if os.path.isdir(folder) else []) + [
      ("files", p) for p in records]
  if len(found) > 1:
    raise ValueError(f"Node data dir {data_dir}: holds more than one text source "
                     f"({[os.path.basename(p) for _, p in found]}); keep one "
                     f"(a {TEXT_DIR}/ folder of .txt/.md files, or one "
                     f"corpus{{{','.join(RECORD_SUFFIXES)}}} file).")
  return found[0] if found else None


def generated_dir(data_dir: str) -> str:
  return writer_lib.generated_dir(data_dir)


def generation_fingerprint(config: ml_collections.ConfigDict, client: int,
                           source: str, node_config: dict) -> dict[str, Any]:
  """What made a node's pairs: the config fields, its client id, its text source."""
  fields = {}
  for name in GENERATION_FIELDS:
    node = config
    for part in name.split("."):
      node = node[part]
    fields[name] = node.to_dict() if hasattr(node, "to_dict") else node
  return json.loads(json.dumps({
      "client_id": int(client), "source": os.path.basename(source),
      "text_field": str(node_config.get("text-field", "") or "text"),
      "id_field": str(node_config.get("id-field", "") or ""),
      "fields": fields}, sort_keys=True))


def _read_node(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _check_same(data_dir: str, old: dict, new: dict) -> None:
  if old["fingerprint"] == new:
    return
  a, b = old["fingerprint"], new
  diff = sorted(k for k in set(a) | set(b) if k != "fields" and a.get(k) != b.get(k))
  diff += sorted(f"config.{k}" for k in set(a["fields"]) | set(b["fields"])
                 if a["fields"].get(k) != b["fields"].get(k))
  raise ValueError(
      f"Node data dir {data_dir}: {os.path.join('generated', NODE_FILE)} says its "
      f"pairs were generated with other settings (differing: {diff}). Move "
      f"{generated_dir(data_dir)} away to generate anew with this run's config, "
      "or run the config that made them.")


def read_documents(config: ml_collections.ConfigDict, kind: str, path: str,
                   node_config: dict, client: int):
  """The node's documents, as the in-process job reads a client's."""
  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.u2s import corpus as corpus_lib
  c = config.corpus
  if kind == "folder":
    docs, _ = corpus_lib.read_folder(path, encoding=c.encoding,
                                     errors=c.decode_errors)
  else:
    docs, _ = corpus_lib.read_records(
        path, str(node_config.get("text-field", "") or "text"),
        str(node_config.get("id-field", "") or ""))
  docs = corpus_lib.sample_documents(docs, c.max_docs_per_client, c.seed,
                                     f"node-client-{client}")
  if not any(d.text.strip() for d in docs):
    raise ValueError(f"Node text {path}: holds no non-empty document.")
  return docs


@dataclasses.dataclass
class Generation:
  """What :func:`ensure_pairs` did: counts and seconds (numbers only)."""
  kept: int
  rejected: int
  pieces: int
  seconds: float  # 0.0 when the pairs were read back.


def ensure_pairs(config: ml_collections.ConfigDict, data_dir: str, client: int,
                 node_config: dict, model=None) -> Generation:
  """Generates the node's pairs once (resuming an interrupted run); see the module doc.

  Args:
    config: the experiment config the server sent (a U2S config).
    data_dir: the node's data directory.
    client: the client id the server trains this node as.
    node_config: the SuperNode's ``--node-config`` (``text-field``, ``id-field``).
    model: the model being tuned (``registry.LoadedModel``), reused as the
      generator unless ``config.generator.name`` names another one.
  """
  # pylint: disable=g-import-not-at-top
  from fedjax_u2s import sampler as sampler_lib
  from fedjax_u2s.pipelines import common
  from fedjax_u2s.models import bert
  from fedjax_u2s.u2s import chunking
  from fedjax_u2s.u2s import generate as generate_lib
  from fedjax_u2s.u2s import pool as pool_lib
  from fedjax_u2s.u2s import stage
  # pylint: enable=g-import-not-at-top
  source = text_source(data_dir)
  if source is None:
    raise ValueError(f"Node data dir {data_dir}: no text to generate from (a "
                     f"{TEXT_DIR}/ folder or a corpus.jsonl file).")
  if "u2s" not in config:
    raise ValueError(f"Node data dir {data_dir} holds raw text, but the run's config "
                     f"(pipeline {config.get('pipeline')!r}) has no U2S settings: run a "
                     "U2S config (configs/u2s_wiki.py), or give the node an "
                     "instructions.jsonl.")
  kind, path = source
  out_dir = generated_dir(data_dir)
  node_path = os.path.join(out_dir, NODE_FILE)
  pieces_path = os.path.join(out_dir, PIECES_FILE)
  print_ = lambda s: print(f"[node u2s] client {client}: {s}", flush=True)
  fingerprint = generation_fingerprint(config, client, path, node_config)
  node = _read_node(node_path)
  if node is not None:
    _check_same(data_dir, node, fingerprint)
    if node.get("done"):
      counts = writer_lib.ClientWriter(out_dir, client).counts()
      return Generation(kept=counts["kept"], rejected=counts["rejected"],
                        pieces=int(node["pieces"]), seconds=0.0)
  start = time.perf_counter()
  if model is None:
    model = common.load_model(config)
  generator = common.load_generator(config, model)
  generator_name = config.generator.name or config.model.name
  os.makedirs(out_dir, exist_ok=True)
  if node is not None and os.path.exists(pieces_path):
    pieces = [chunking.Piece(**row) for row in writer_lib.read_records(pieces_path)]
    print_(f"resuming generation over {len(pieces)} pieces")
  else:
    docs = read_documents(config, kind, path, node_config, client)
    count = lambda text: len(generator.tokenizer.encode(text))
    pieces, chunk_stats = chunking.chunk_documents(
        docs, count, config.chunking.max_tokens, config.chunking.min_tokens,
        client_id=client, source=path)
    if config.chunking.max_pieces_per_client:
      pieces = pieces[:config.chunking.max_pieces_per_client]
    tmp = pieces_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for p in pieces:
        f.write(writer_lib.dumps(dataclasses.asdict(p)) + "\n")
    os.replace(tmp, pieces_path)
    writer_lib.atomic_write_json(node_path, {
        "fingerprint": fingerprint, "done": False, "pieces": len(pieces),
        "documents": len(docs), "chunking": {k: int(v) for k, v in chunk_stats.items()}})
    print_(f"{len(docs)} documents -> {len(pieces)} pieces; generating")
  embedder = bert.Embedder.load(config.embedder.name)
  pool_format = config.pool.get("format", "auto")
  pool = pool_lib.load_pool(config.pool.path or None, pool_format)
  pool_emb = stage.pool_embeddings(pool, embedder, data_dir, config.pool.path,
                                   pool_format, config.embedder.name)
  select = generate_lib.make_select_fn(
      config.u2s.selection, pool_emb,
      method=config.get("retrieval", {}).get("method", "auto"))
  smp = sampler_lib.Sampler(generator.config, generator.tokenizer,
                            pad_multiple=config.u2s.sampling.pad_multiple,
                            decode=config.u2s.sampling.decode)
  st = generate_lib.generate_client(
      pieces, client_id=client, pool=pool, pool_embeddings=pool_emb,
      select_fn=select, embedder=embedder, sampler=smp, params=generator.params,
      tokenizer=generator.tokenizer, config=config.u2s, out_dir=out_dir,
      generator_name=generator_name, seed=config.seed)
  node = _read_node(node_path)
  node.update(done=True, kept=st.kept, rejected=st.rejected,
              rejected_by_reason=st.rejected_by_reason,
              seconds=round(float(node.get("seconds", 0.0)) +
                            time.perf_counter() - start, 3))
  writer_lib.atomic_write_json(node_path, node)
  print_(f"{st.kept} kept of {st.kept + st.rejected} pieces, rejected "
         f"{st.rejected_by_reason}, {time.perf_counter() - start:.0f}s")
  return Generation(kept=st.kept, rejected=st.rejected, pieces=len(pieces),
                    seconds=time.perf_counter() - start)


def training_examples(config: ml_collections.ConfigDict, data_dir: str, client: int
                      ) -> list:
  """The node's kept pairs minus the held-out share, as training examples."""
  # Deferred: the u2s job pulls JAX, which a node's describe reply avoids.
  from fedjax_u2s.pipelines import u2s  # pylint: disable=g-import-not-at-top
  out_dir = generated_dir(data_dir)
  records = writer_lib.read_records(writer_lib.client_path(out_dir, client))
  train, _ = u2s.split_pairs(config, client, records, f"node {data_dir}",
                             os.path.join(out_dir, "stats.json"))
  return train
