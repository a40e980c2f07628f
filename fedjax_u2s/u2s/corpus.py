"""Client corpora: the raw text each federated client turns into instructions.

A corpus is a list of :class:`ClientCorpus`, one per client, each holding
:class:`Document` s. Three sources, chosen by ``config.kind``:

* ``"wiki"``: the built-in Wikipedia lead paragraphs of
  :mod:`fedjax_u2s.data.wiki`. Clients get articles by topic (one or several
  clients per topic), by a Dirichlet split over topics, or IID. A held-out
  fraction of every topic is reserved first and given to no client, so the
  evaluation can ask about titles nobody trained on
  (:func:`wiki_holdout`, :func:`load_corpora_and_holdout`).
* ``"folder"``: a folder of ``.txt`` / ``.md`` files, one document each
  (recursive, sorted). With ``partition="natural"`` every immediate
  sub-folder is a client.
* ``"files"``: JSON / JSONL / Parquet / CSV records read with HF ``datasets``
  from local files, with a configurable text field, optional id field and
  optional client field (``partition="natural"`` groups by it).

Usage::

    cfg = corpus.default_config()
    cfg.kind = "wiki"; cfg.topics = ("medicine", "math")
    clients = corpus.load_client_corpora(cfg)

Text files are decoded honestly (:func:`decode_text`): as
``corpus.encoding`` (UTF-8 by default), strictly, so an undecodable file is an
error naming the file and the byte offset; ``corpus.decode_errors="replace"``
opts into U+FFFD replacement, with a warning giving the count (also in
``ClientCorpus.stats``: ``replaced_files``, ``replaced_bytes``). Files that
look binary (NUL bytes, or many control characters, in the first 8 KB) are
refused. Files of other extensions are skipped and counted
(``skipped_files``).
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import os
import tempfile
import threading
import zlib
from typing import Any, Sequence

from absl import logging
import ml_collections
import numpy as np

from fedjax_u2s.data import champ
from fedjax_u2s.data import partition as partition_lib
from fedjax_u2s.data import wiki

FOLDER_EXTENSIONS = (".txt", ".md")
# File suffix -> HF datasets builder name.
RECORD_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet",
                  ".csv": "csv"}
PARTITIONS = ("topic", "dirichlet", "natural", "iid")
DECODE_ERRORS = ("strict", "replace")
# Binary sniffing: the first BINARY_SNIFF_BYTES bytes of a file; more than
# BINARY_CONTROL_FRACTION of them control bytes (other than tab, newlines,
# form feed, vertical tab, backspace and escape) -> binary.
BINARY_SNIFF_BYTES = 8192
BINARY_CONTROL_FRACTION = 0.05
_CONTROL_BYTES = bytes(sorted((set(range(32)) - {8, 9, 10, 11, 12, 13, 27})
                              | {127}))


@dataclasses.dataclass(frozen=True)
class Document:
  """One raw text.

  Attributes:
    doc_id: unique within its corpus (wiki: the title; folder: the relative
      path; records: the id field or ``"<file>:<row>"``).
    text: the raw text.
    meta: provenance (wiki: ``article_id``, ``topic``; files: ``path``,
      ``row``).
  """
  doc_id: str
  text: str
  meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ClientCorpus:
  """The documents one client holds.

  Attributes:
    client_id: 0..C-1, the client's position in the returned list.
    name: readable name ("medicine", "medicine-1", "client-3", a folder name).
    documents: the client's documents, in a deterministic order.
    stats: reading statistics (``source``: the file/folder read,
      ``documents``, ``replaced_files``, ``replaced_bytes``, ...).
  """
  client_id: int
  name: str
  documents: list[Document]
  stats: dict = dataclasses.field(default_factory=dict)


def default_config() -> ml_collections.ConfigDict:
  """The ``corpus`` block of an experiment config (locked: typos raise)."""
  c = ml_collections.ConfigDict()
  c.kind = "wiki"              # wiki (built-in) | champ (built-in math) | folder (.txt/.md) | files.
  c.path = ""                  # Folder, file or glob; wiki: JSON ("" = packaged).
  c.text_field = "text"        # files: the field holding the document text.
  c.id_field = ""              # files: document id field ("" = "<file>:<row>").
  c.client_field = ""          # files: client (natural) / label (dirichlet).
  c.topics = ("medicine", "math", "physics")  # wiki: wiki.TOPICS names/labels.
  c.num_clients = 0            # 0 = one per topic/group; topic: k * len(topics).
  c.partition = "topic"        # topic (wiki) | dirichlet | natural | iid.
  c.alpha = 0.5                # Dirichlet concentration (small = skewed).
  c.max_docs_per_client = 0    # Seeded sample per client (0 = all documents).
  c.seed = 0                   # Seed of holdout, splits and sampling.
  c.holdout_fraction = 0.0     # wiki: share of each topic held by no client;
                               # champ: share of each category's problems held out.
  c.encoding = "utf-8"         # folder: the text files' encoding (e.g. latin-1, cp1252).
  c.decode_errors = "strict"   # folder: strict (undecodable file = error) | replace (U+FFFD, warned).
  c.lock()
  return c


# ----------------------------------------------------------------------------
# Decoding.


class BinaryFileError(ValueError):
  """A corpus file that is not text."""


class UndecodableFileError(ValueError):
  """A corpus text file that is not valid in the configured encoding."""


_REPLACED = threading.local()


def _count_replace(e: UnicodeDecodeError) -> tuple[str, int]:
  """errors="replace", counting the bytes replaced in ``_REPLACED.n``."""
  _REPLACED.n += e.end - e.start
  return "\ufffd", e.end


codecs.register_error("fedjax_u2s_count_replace", _count_replace)


def looks_binary(data: bytes, encoding: str = "utf-8") -> str:
  """Why ``data`` looks like a binary file ("" if it looks like text).

  Checks the first :data:`BINARY_SNIFF_BYTES`: a NUL byte, or more than
  :data:`BINARY_CONTROL_FRACTION` control bytes. Skipped for UTF-16/32
  encodings, whose text is full of NUL bytes.
  """
  name = codecs.lookup(encoding).name
  if name.startswith(("utf-16", "utf-32")):
    return ""
  head = data[:BINARY_SNIFF_BYTES]
  if b"\x00" in head:
    return f"a NUL byte at offset {head.index(0)}"
  control = len(head) - len(head.translate(None, _CONTROL_BYTES))
  if head and control > BINARY_CONTROL_FRACTION * len(head):
    return (f"{control} control bytes in its first {len(head)} "
            f"({100 * control / len(head):.0f}%)")
  return ""


def decode_text(data: bytes, path: str, encoding: str = "utf-8",
                errors: str = "strict") -> tuple[str, int]:
  """Decodes a corpus file's bytes, refusing binary data.

  Args:
    data: the file's bytes.
    path: names the file in errors.
    encoding: ``corpus.encoding``, any Python codec name.
    errors: ``"strict"`` (undecodable bytes are an error) or ``"replace"``
      (each maximal undecodable run -> U+FFFD, as ``bytes.decode`` does).

  Returns:
    ``(text, replaced_bytes)``: the text and how many bytes were replaced
    (always 0 with ``"strict"``).

  Raises:
    BinaryFileError: the data looks binary (:func:`looks_binary`).
    UndecodableFileError: with ``"strict"``, bytes invalid in ``encoding``;
      names the file and the byte offset.
    ValueError: an unknown encoding or ``errors`` value.
  """
  if errors not in DECODE_ERRORS:
    raise ValueError(f"corpus.decode_errors={errors!r}; use one of "
                     f"{list(DECODE_ERRORS)}.")
  try:
    codecs.lookup(encoding)
  except LookupError:
    raise ValueError(f"corpus.encoding={encoding!r} is not a known text "
                     "encoding; use e.g. 'utf-8', 'latin-1' or 'cp1252'.") from None
  why = looks_binary(data, encoding)
  if why:
    raise BinaryFileError(
        f"{path}: looks like a binary file, not text ({why}); remove it from "
        "the corpus folder (corpus.path) or convert it to plain text.")
  if errors == "strict":
    try:
      return data.decode(encoding), 0
    except UnicodeDecodeError as e:
      bad = data[e.start:e.end]
      raise UndecodableFileError(
          f"{path}: not valid {encoding} at byte offset {e.start} "
          f"(byte(s) {bad.hex(' ')}: {e.reason}). Set corpus.encoding to the "
          "file's encoding (e.g. --config.corpus.encoding=latin-1 or cp1252), "
          "or --config.corpus.decode_errors=replace to replace undecodable "
          "bytes with U+FFFD, or remove the file.") from None
  _REPLACED.n = 0
  text = data.decode(encoding, errors="fedjax_u2s_count_replace")
  return text, _REPLACED.n


# ----------------------------------------------------------------------------
# Folder reader.


def read_folder(path: str, extensions: Sequence[str] = FOLDER_EXTENSIONS,
                encoding: str = "utf-8", errors: str = "strict"
               ) -> tuple[list[Document], dict]:
  """Reads every ``.txt`` / ``.md`` file under ``path``, one document each.

  Files are found recursively and sorted by relative path; ``doc_id`` is the
  relative path with ``/`` separators. Hidden files and folders are skipped;
  files of other extensions are skipped and counted (and logged).

  Args:
    path: the folder (``corpus.path``).
    extensions: the suffixes read (case-insensitive).
    encoding: the files' encoding (``corpus.encoding``).
    errors: ``"strict"`` or ``"replace"`` (``corpus.decode_errors``); see
      :func:`decode_text`. Replacements are logged as a warning with the
      count.

  Returns:
    (documents, stats) with stats ``files`` (read), ``skipped_files`` (other
    extensions), ``replaced_files`` (files with undecodable bytes, only with
    ``errors="replace"``) and ``replaced_bytes`` (bytes replaced by U+FFFD).

  Raises:
    FileNotFoundError: ``path`` is not a folder.
    BinaryFileError: a file looks binary (names it).
    UndecodableFileError: with ``errors="strict"``, a file is not valid in
      ``encoding`` (names it and the byte offset).
    ValueError: no matching file under ``path``.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"Corpus folder {path!r} does not exist or is not a folder; set "
        "corpus.path to a folder of .txt/.md files.")
  rels, skipped = [], {}
  for root, dirs, files in os.walk(path):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    for name in files:
      if name.startswith("."):
        continue
      if not name.lower().endswith(tuple(extensions)):
        ext = os.path.splitext(name)[1].lower() or "(none)"
        skipped[ext] = skipped.get(ext, 0) + 1
        continue
      rels.append(os.path.relpath(os.path.join(root, name), path)
                  .replace(os.sep, "/"))
  rels.sort()
  if not rels:
    raise ValueError(
        f"Corpus folder {path!r} holds no {'/'.join(extensions)} files; add "
        "some or point corpus.path elsewhere.")
  if skipped:
    logging.info("Corpus folder %s: read %d %s file(s); skipped %d other "
                 "file(s) by extension: %s.", path, len(rels),
                 "/".join(extensions), sum(skipped.values()),
                 ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
  docs, stats = [], {"files": len(rels), "skipped_files": sum(skipped.values()),
                     "replaced_files": 0, "replaced_bytes": 0}
  for rel in rels:
    full = os.path.join(path, rel)
    with open(full, "rb") as f:
      text, bad = decode_text(f.read(), full, encoding, errors)
    if bad:
      stats["replaced_files"] += 1
      stats["replaced_bytes"] += bad
      logging.warning("%s: replaced %d undecodable byte(s) with U+FFFD "
                      "(corpus.decode_errors=replace; not valid %s).", full,
                      bad, encoding)
    docs.append(Document(doc_id=rel, text=text,
                         meta={"path": full, "invalid_bytes": bad}))
  if stats["replaced_files"]:
    logging.warning(
        "Corpus folder %s: %d of %d file(s) had undecodable bytes; %d byte(s) "
        "replaced with U+FFFD. Set corpus.encoding to their encoding to read "
        "them exactly.", path, stats["replaced_files"], len(rels),
        stats["replaced_bytes"])
  return docs, stats


# ----------------------------------------------------------------------------
# Record files (HF datasets).


def _record_files(path: str) -> list[str]:
  files = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
  if not files or not all(os.path.isfile(f) for f in files):
    raise FileNotFoundError(
        f"Corpus file(s) {path!r} not found; set corpus.path to a .json, "
        ".jsonl, .parquet or .csv file (or a glob of them).")
  return files


def read_records(path: str, text_field: str = "text", id_field: str = "",
                 client_field: str = "") -> tuple[list[Document], dict]:
  """Reads JSON / JSONL / Parquet / CSV records with HF ``datasets``.

  Args:
    path: a file, or a glob of files of one format.
    text_field: the column holding the text.
    id_field: optional column holding a document id; ids must be unique.
    client_field: optional column naming the record's client; its value is kept
      as ``meta["client"]`` (a string).

  Returns:
    (documents, stats): stats ``files``, ``rows``, ``replaced_rows`` (texts
    containing U+FFFD, e.g. from bytes the reader replaced).

  Raises:
    FileNotFoundError: no such file.
    ValueError: an unknown format, a missing column, or a row whose text is not
      a string (naming file, row and field), duplicate ids, no records.
  """
  import datasets  # pylint: disable=g-import-not-at-top  (slow import)

  files = _record_files(path)
  suffixes = {os.path.splitext(f)[1].lower() for f in files}
  builders = {RECORD_FORMATS.get(s) for s in suffixes}
  if None in builders or len(builders) != 1:
    raise ValueError(
        f"Corpus files {files} have suffixes {sorted(suffixes)}; use one of "
        f"{sorted(RECORD_FORMATS)} for all of them.")
  builder = builders.pop()
  docs, seen = [], {}
  stats = {"files": len(files), "rows": 0, "replaced_rows": 0}
  for file in files:
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
      # A throw-away cache: the records are kept in memory, and reading never
      # leaves files behind in ~/.cache or serves a stale copy.
      with tempfile.TemporaryDirectory(prefix="fedjax_u2s_corpus_") as tmp:
        ds = datasets.load_dataset(builder, data_files=file, split="train",
                                   keep_in_memory=True, cache_dir=tmp)
    except Exception as e:  # datasets wraps parse errors in many types.
      raise ValueError(f"{file}: could not read as {builder} ({e}); check the "
                       "file's format.") from e
    finally:
      if bars:
        datasets.enable_progress_bars()
    for field, what in ((text_field, "corpus.text_field"),
                        (id_field, "corpus.id_field"),
                        (client_field, "corpus.client_field")):
      if field and field not in ds.column_names:
        raise ValueError(
            f"{file}: no field {field!r} (set by {what}); the records have "
            f"fields {ds.column_names}.")
    texts = ds[text_field]
    ids = ds[id_field] if id_field else None
    clients = ds[client_field] if client_field else None
    for row, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(
            f"{file}: row {row} field {text_field!r} is "
            f"{'missing' if text is None else type(text).__name__}, expected a "
            "string; fix the record or drop it.")
      if ids is not None:
        if ids[row] is None:
          raise ValueError(f"{file}: row {row} has no id in field {id_field!r}.")
        doc_id = str(ids[row])
      else:
        doc_id = f"{os.path.basename(file)}:{row}"
      if doc_id in seen:
        raise ValueError(
            f"{file}: row {row} repeats document id {doc_id!r} (first at "
            f"{seen[doc_id]}); ids in {id_field or 'file:row'} must be unique.")
      seen[doc_id] = f"{file} row {row}"
      meta: dict[str, Any] = {"path": file, "row": row}
      if clients is not None:
        if clients[row] is None:
          raise ValueError(
              f"{file}: row {row} has no client in field {client_field!r}.")
        meta["client"] = str(clients[row])
      if "\ufffd" in text:
        stats["replaced_rows"] += 1
      docs.append(Document(doc_id=doc_id, text=text, meta=meta))
    stats["rows"] += len(texts)
  if not docs:
    raise ValueError(f"Corpus file(s) {path!r} hold no records.")
  return docs, stats


# ----------------------------------------------------------------------------
# Splits.


def _stable_seed(seed: int, name: str) -> list[int]:
  """A seed for ``name`` that does not depend on what else is in the config."""
  return [int(seed), zlib.crc32(name.encode("utf-8"))]


def sample_documents(docs: Sequence[Document], max_docs: int, seed: int,
                     name: str = "") -> list[Document]:
  """At most ``max_docs`` documents (seeded sample), in their original order."""
  docs = list(docs)
  if not max_docs or len(docs) <= max_docs:
    return docs
  rng = np.random.default_rng(_stable_seed(seed, "sample:" + name))
  keep = np.sort(rng.choice(len(docs), size=max_docs, replace=False))
  return [docs[i] for i in keep]


# ----------------------------------------------------------------------------
# Wiki.


def _wiki_doc(a: wiki.Article) -> Document:
  return Document(doc_id=a.title, text=a.text,
                  meta={"article_id": a.id, "topic": a.topic,
                        "description": a.description})


def _short_topic(topic: str) -> str:
  full = wiki.topic_name(topic)
  return next(k for k, v in wiki.TOPICS.items() if v == full)


def _wiki_split(topics: Sequence[str], holdout_fraction: float, seed: int,
                path: str | None
                ) -> tuple[dict[str, list[wiki.Article]], list[wiki.Article]]:
  """Per-topic articles available to clients, and the held-out articles."""
  if not 0.0 <= holdout_fraction < 1.0:
    raise ValueError(
        f"corpus.holdout_fraction must be in [0, 1), got {holdout_fraction}.")
  if not topics:
    raise ValueError("corpus.topics is empty; name at least one wiki topic, "
                     f"e.g. {sorted(wiki.TOPICS)[:3]}.")
  shorts = [_short_topic(t) for t in topics]
  if len(set(shorts)) != len(shorts):
    raise ValueError(f"corpus.topics {tuple(topics)} repeats a topic.")
  available, holdout = {}, []
  for short in shorts:
    arts = wiki.articles_by_topic(short, path)
    if not arts:
      raise ValueError(f"wiki topic {short!r} has no articles in "
                       f"{path or wiki.resolve_path()}.")
    n_hold = int(round(holdout_fraction * len(arts)))
    rng = np.random.default_rng(_stable_seed(seed, "holdout:" + short))
    held = set(rng.choice(len(arts), size=n_hold, replace=False).tolist())
    holdout.extend(a for i, a in enumerate(arts) if i in held)
    available[short] = [a for i, a in enumerate(arts) if i not in held]
  holdout.sort(key=lambda a: a.id)
  return available, holdout


def wiki_holdout(topics: Sequence[str], holdout_fraction: float, seed: int = 0,
                 path: str | None = None) -> list[Document]:
  """The held-out wiki articles of ``topics``: held by no client.

  Depends only on (topic, fraction, seed), not on the partition or on the other
  topics listed, so the evaluation can recompute it from the corpus config.
  """
  _, held = _wiki_split(topics, holdout_fraction, seed, path)
  return [_wiki_doc(a) for a in held]


def wiki_clients(topics: Sequence[str] = ("medicine", "math", "physics"),
                 partition: str = "topic", num_clients: int = 0,
                 alpha: float = 0.5, max_docs_per_client: int = 0,
                 seed: int = 0, holdout_fraction: float = 0.0,
                 path: str | None = None
                 ) -> tuple[list[ClientCorpus], list[Document]]:
  """Splits wiki articles of ``topics`` over clients, minus a holdout.

  Args:
    topics: short topic names (``wiki.TOPICS``) or full labels.
    partition: ``"topic"``: ``num_clients // len(topics)`` clients per topic
      (``num_clients=0``: one each), a topic's articles shuffled (seeded) and
      cut evenly; ``"dirichlet"``: ``num_clients`` clients with topic shares
      from Dir(alpha) (:func:`fedjax_u2s.data.partition.dirichlet`); ``"iid"``: an even seeded split.
    num_clients: see ``partition``.
    alpha: Dirichlet concentration.
    max_docs_per_client: seeded sample per client (0 = all).
    seed: seed of every random choice.
    holdout_fraction: per-topic fraction reserved (:func:`wiki_holdout`).
    path: a summaries JSON (None = the packaged one).

  Returns:
    (clients, holdout documents). Documents are ordered by article id within
    each client; ``doc_id`` is the title and ``meta["article_id"]`` the id.
  """
  available, held = _wiki_split(topics, holdout_fraction, seed, path)
  shorts = list(available)
  groups: list[tuple[str, list[wiki.Article]]] = []
  if partition == "topic":
    per = 1 if not num_clients else num_clients // len(shorts)
    if num_clients and num_clients % len(shorts):
      raise ValueError(
          f"corpus.num_clients={num_clients} is not a multiple of the "
          f"{len(shorts)} topics {shorts}; use 0 (one client per topic) or a "
          "multiple.")
    for short in shorts:
      arts = available[short]
      if len(arts) < per:
        raise ValueError(f"wiki topic {short!r} has {len(arts)} articles left "
                         f"after the holdout, fewer than {per} clients.")
      if per == 1:
        groups.append((short, arts))
        continue
      for k, idx in enumerate(partition_lib.iid(
          len(arts), per, _stable_seed(seed, "split:" + short))):
        groups.append((f"{short}-{k}", [arts[i] for i in idx]))
  elif partition in ("dirichlet", "iid"):
    if not num_clients:
      raise ValueError(f"corpus.partition={partition!r} needs "
                       "corpus.num_clients > 0.")
    arts = sorted((a for s in shorts for a in available[s]), key=lambda a: a.id)
    if partition == "dirichlet":
      parts = partition_lib.dirichlet([a.topic for a in arts], num_clients, alpha, seed)
    else:
      parts = partition_lib.iid(len(arts), num_clients, seed)
    groups = [(f"client-{k}", [arts[i] for i in p]) for k, p in enumerate(parts)]
  else:
    raise ValueError(
        f"corpus.partition={partition!r} is not one of 'topic', 'dirichlet', "
        "'iid' for the wiki corpus.")
  clients = []
  for k, (name, arts) in enumerate(groups):
    docs = sample_documents([_wiki_doc(a) for a in arts], max_docs_per_client,
                            seed, name)
    topics_held = sorted({d.meta["topic"] for d in docs})
    clients.append(ClientCorpus(client_id=k, name=name, documents=docs,
                                stats={"documents": len(docs),
                                       "topics": topics_held,
                                       "source": path or "wiki"}))
  return clients, [_wiki_doc(a) for a in held]


# ----------------------------------------------------------------------------
# Local files -> clients.


def _split_local(docs: list[Document], labels: list[str] | None, config,
                 source: str) -> list[tuple[str, list[Document]]]:
  """Groups local documents into clients by ``config.partition``."""
  partition, n = config.partition, config.num_clients
  if partition == "natural":
    if labels is None:
      raise ValueError(
          f"corpus.partition='natural' on {source!r} needs a client per record "
          "(set corpus.client_field) or sub-folders (kind='folder').")
    names = sorted(set(labels))
    if n and n != len(names):
      raise ValueError(
          f"corpus.num_clients={n} but {source!r} has {len(names)} natural "
          f"clients {names[:5]}...; set num_clients=0 or {len(names)}.")
    return [(name, [d for d, l in zip(docs, labels) if l == name])
            for name in names]
  if partition == "iid":
    parts = partition_lib.iid(len(docs), n or 1, config.seed)
  elif partition == "dirichlet":
    if labels is None:
      raise ValueError(
          f"corpus.partition='dirichlet' on {source!r} needs labels: set "
          "corpus.client_field (records) or use sub-folders (kind='folder').")
    if not n:
      raise ValueError("corpus.partition='dirichlet' needs corpus.num_clients.")
    parts = partition_lib.dirichlet([str(l) for l in labels], n, config.alpha, config.seed)
  else:
    raise ValueError(
        f"corpus.partition={partition!r} does not apply to local files; use "
        "'natural', 'iid' or 'dirichlet'.")
  return [(f"client-{k}", [docs[i] for i in p]) for k, p in enumerate(parts)]


def _local_clients(config) -> list[ClientCorpus]:
  if not config.path:
    raise ValueError(f"corpus.kind={config.kind!r} needs corpus.path.")
  if config.kind == "folder":
    docs, stats = read_folder(config.path, encoding=config.encoding,
                              errors=config.decode_errors)
    labels = [d.doc_id.split("/", 1)[0] if "/" in d.doc_id else "" for d in docs]
    if config.partition in ("natural", "dirichlet") and "" in labels:
      top = [d.doc_id for d, l in zip(docs, labels) if not l][:3]
      raise ValueError(
          f"corpus.partition={config.partition!r} on folder {config.path!r} "
          f"uses sub-folders as clients/labels, but {top} lie at the top level; "
          "move them into a sub-folder or use partition='iid'.")
  else:
    docs, stats = read_records(config.path, config.text_field, config.id_field,
                               config.client_field)
    labels = ([d.meta["client"] for d in docs] if config.client_field
              else None)
  groups = _split_local(docs, labels, config, config.path)
  out = []
  for k, (name, group) in enumerate(groups):
    group = sample_documents(group, config.max_docs_per_client, config.seed, name)
    if not any(d.text.strip() for d in group):
      raise ValueError(
          f"Client {name!r} from {config.path!r} holds no non-empty document.")
    out.append(ClientCorpus(client_id=k, name=name, documents=group,
                            stats=dict(stats, documents=len(group),
                                       source=config.path)))
  return out


def champ_clients(num_clients: int = 0, holdout_fraction: float = 0.3,
                  max_docs_per_client: int = 0, seed: int = 0,
                  path: str | None = None
                  ) -> tuple[list[ClientCorpus], list[Document]]:
  """CHAMP competition math as clients' text, and the problems no client holds.

  The math setting in which a client's text can teach what the evaluation
  measures (:mod:`fedjax_u2s.data.champ`): the clients hold concept statements
  and worked problems (statement, solution, answer); the held-out problems,
  whose concepts those documents show at work, are the returned holdout
  (``doc_id`` = the problem id, which ``evaluate.num_champ_questions`` turns
  into multiple-choice questions). Clients are the five categories
  (``num_clients=0``) or the categories dealt in order over ``num_clients``
  clients, so each client's text is one kind of mathematics (non-IID by
  construction).

  Args:
    num_clients: 0 = one per category, else 1..5.
    holdout_fraction: share of each category's single-number problems held
      out (:func:`fedjax_u2s.data.champ.split`).
    max_docs_per_client: seeded sample per client (0 = all).
    seed: seed of the split and the sampling.
    path: CHAMP's v0.json (default: the packaged one).
  """
  cats = champ.CATEGORIES
  n = num_clients or len(cats)
  if not 1 <= n <= len(cats):
    raise ValueError(f"corpus.num_clients={num_clients} with corpus.kind='champ': "
                     f"use 0 (one client per category) or 1..{len(cats)}.")
  if not 0.0 < holdout_fraction < 1.0:
    raise ValueError(f"corpus.holdout_fraction={holdout_fraction} with corpus.kind="
                     "'champ': set the share of problems held out for evaluation, "
                     "in (0, 1).")
  s = champ.split(holdout_fraction, seed, path=path)
  groups: list[list[Document]] = [[] for _ in range(n)]
  owner = {c: i % n for i, c in enumerate(cats)}
  # A concept of a problem category goes with that category; a general one
  # (e.g. "Algebra") to the client whose kept problems use it most (ties:
  # lowest id).
  uses: dict[str, list[int]] = {}
  for p in s.kept:
    for cid in p.concepts:
      uses.setdefault(cid, [0] * n)[owner[p.category]] += 1
  for doc_id, cat, text in champ.client_texts(s):
    k = owner[cat] if cat in owner else int(np.argmax(uses[doc_id]))
    groups[k].append(Document(doc_id=doc_id, text=text,
                              meta={"category": cat, "source": "champ"}))
  out = []
  for k, group in enumerate(groups):
    name = "math:" + "+".join(c for c in cats if owner[c] == k)
    group = sample_documents(group, max_docs_per_client, seed, name)
    out.append(ClientCorpus(client_id=k, name=name, documents=group,
                            stats={"documents": len(group), "source": "champ"}))
  held = [Document(doc_id=p.id, text=p.text, meta={"category": p.category,
                                                    "source": "champ"})
          for p in s.held]
  return out, held


# ----------------------------------------------------------------------------
# Entry point.


def load_corpora_and_holdout(config) -> tuple[list[ClientCorpus], list[Document]]:
  """Client corpora and the held-out documents (empty unless wiki + holdout).

  Args:
    config: a ConfigDict shaped like :func:`default_config` (missing fields
      take their defaults).
  """
  defaults = default_config().to_dict()
  given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"Unknown corpus config field(s) {unknown}; known fields: "
                     f"{sorted(defaults)}.")
  cfg = ml_collections.ConfigDict({**defaults, **given})
  if cfg.kind == "wiki":
    clients, held = wiki_clients(
        topics=tuple(cfg.topics), partition=cfg.partition,
        num_clients=cfg.num_clients, alpha=cfg.alpha,
        max_docs_per_client=cfg.max_docs_per_client, seed=cfg.seed,
        holdout_fraction=cfg.holdout_fraction, path=cfg.path or None)
    return clients, held
  if cfg.kind == "champ":
    return champ_clients(num_clients=cfg.num_clients,
                         holdout_fraction=cfg.holdout_fraction,
                         max_docs_per_client=cfg.max_docs_per_client,
                         seed=cfg.seed, path=cfg.path or None)
  if cfg.kind in ("folder", "files"):
    if cfg.holdout_fraction:
      raise ValueError("corpus.holdout_fraction applies to kind='wiki' only.")
    return _local_clients(cfg), []
  raise ValueError(
      f"corpus.kind={cfg.kind!r} is unknown; use 'wiki', 'champ', 'folder' or 'files'.")


def load_client_corpora(config) -> list[ClientCorpus]:
  """The client corpora described by a ``corpus`` config block."""
  return load_corpora_and_holdout(config)[0]
