"""Client corpora: local readers, wiki splits by topic / Dirichlet, holdout."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from fedjax_u2s.data import wiki
from fedjax_u2s.u2s import chunking
from fedjax_u2s.u2s import corpus


@pytest.fixture(scope="module")
def wiki_available():
  try:
    wiki.resolve_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))


def config(**overrides):
  cfg = corpus.default_config()
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


# ----------------------------------------------------------------------------
# Decoding and the folder reader.


def test_replacement_counts_invalid_bytes():
  clean = "héllo \ufffd".encode()  # A U+FFFD in the text is not a replacement.
  assert corpus.decode_text(clean, "x.txt", errors="replace") == ("héllo \ufffd", 0)
  data = b"ab\xff\xfecd\xc3"  # 2 stray + 1 truncated.
  text, bad = corpus.decode_text(data, "x.txt", errors="replace")
  assert text == "ab\ufffd\ufffdcd\ufffd" and bad == 3
  assert text == data.decode("utf-8", errors="replace")


def test_folder_reader(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "a" / "deep").mkdir(parents=True)
  (tmp_path / "b" / "two.md").write_text("# Two\n\nSecond doc.", encoding="utf-8")
  (tmp_path / "a" / "deep" / "one.txt").write_text("First doc.", encoding="utf-8")
  (tmp_path / "a" / "bad.txt").write_bytes(b"Caf\xe9 latin-1 \xff.")
  (tmp_path / "a" / "skip.bin").write_bytes(b"\x00\x01")
  (tmp_path / ".hidden").mkdir()
  (tmp_path / ".hidden" / "x.txt").write_text("hidden")
  docs, stats = corpus.read_folder(str(tmp_path), errors="replace")
  assert [d.doc_id for d in docs] == ["a/bad.txt", "a/deep/one.txt", "b/two.md"]
  assert docs[0].text == "Caf\ufffd latin-1 \ufffd."
  assert docs[2].text == "# Two\n\nSecond doc."
  assert stats == {"files": 3, "skipped_files": 1, "replaced_files": 1,
                   "replaced_bytes": 2}
  assert docs[0].meta["invalid_bytes"] == 2 and docs[1].meta["invalid_bytes"] == 0


def _folder(tmp_path, files):
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  return config(kind="folder", path=str(tmp_path), partition="iid",
                num_clients=1)


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_latin1_file_is_an_error_naming_file_and_offset(tmp_path):
  cfg = _folder(tmp_path, {"ok.txt": "Fine.".encode(),
                           "notes.txt": "Un café au lait.".encode("latin-1")})
  assert (cfg.encoding, cfg.decode_errors) == ("utf-8", "strict")
  with pytest.raises(corpus.UndecodableFileError) as e:
    corpus.load_client_corpora(cfg)
  msg = str(e.value)
  assert str(tmp_path / "notes.txt") in msg
  assert "not valid utf-8 at byte offset 6 (byte(s) e9" in msg
  assert "--config.corpus.encoding=latin-1" in msg  # what to do
  assert "decode_errors=replace" in msg and "remove the file" in msg
  # The right encoding reads it exactly.
  cfg.encoding = "latin-1"
  (client,) = corpus.load_client_corpora(cfg)
  assert [d.text for d in client.documents] == ["Un café au lait.", "Fine."]
  assert client.stats["replaced_bytes"] == 0


def test_replacement_is_opt_in_and_warned_with_the_count(tmp_path, caplog):
  cfg = _folder(tmp_path, {"a.txt": b"Caf\xe9 and cr\xe8me \xff\xfe.",
                           "b.txt": b"Clean."})
  cfg.decode_errors = "replace"
  caplog.set_level("INFO")
  (client,) = corpus.load_client_corpora(cfg)
  assert client.documents[0].text == (
      b"Caf\xe9 and cr\xe8me \xff\xfe.".decode("utf-8", errors="replace"))
  assert (client.stats["replaced_files"], client.stats["replaced_bytes"]) == (1, 4)
  warned = _warnings(caplog)
  assert any(str(tmp_path / "a.txt") in w and "replaced 4 undecodable byte(s)"
             in w for w in warned)
  assert any("1 of 2 file(s) had undecodable bytes; 4 byte(s) replaced" in w
             for w in warned)


def test_random_bytes_refused_as_binary(tmp_path):
  rng = np.random.default_rng(0)
  cfg = _folder(tmp_path, {"ok.txt": b"Fine.",
                           "blob.txt": rng.bytes(20_000)})
  for errors in ("strict", "replace"):
    cfg.decode_errors = errors
    with pytest.raises(corpus.BinaryFileError,
                       match=r"blob\.txt: looks like a binary file, not text "
                       r"\(a NUL byte at offset \d+\); remove it"):
      corpus.load_client_corpora(cfg)
  # Control characters without a NUL byte count too; a few do not.
  ctrl = bytes(rng.integers(1, 32, 500).astype(np.uint8)) + b"x" * 500
  assert "control bytes" in corpus.looks_binary(ctrl)
  assert corpus.looks_binary(b"ANSI \x1b[1mbold\x1b[0m\ttab\r\n\x0c") == ""
  # UTF-16 text is full of NUL bytes: not binary when that is the encoding.
  utf16 = "Grüße.".encode("utf-16")
  assert corpus.looks_binary(utf16) and not corpus.looks_binary(utf16, "utf-16")
  assert corpus.decode_text(utf16, "x.txt", "utf-16") == ("Grüße.", 0)


def test_decode_settings_errors(tmp_path):
  cfg = _folder(tmp_path, {"a.txt": b"x"})
  cfg.encoding = "klingon"
  with pytest.raises(ValueError, match="corpus.encoding='klingon' is not a known"):
    corpus.load_client_corpora(cfg)
  cfg.encoding, cfg.decode_errors = "utf-8", "ignore"
  with pytest.raises(ValueError, match=r"corpus.decode_errors='ignore'; use one "
                     r"of \['strict', 'replace'\]"):
    corpus.load_client_corpora(cfg)


def test_folder_natural_partition_and_empty_errors(tmp_path):
  for client, n in (("alice", 2), ("bob", 1)):
    (tmp_path / client).mkdir()
    for i in range(n):
      (tmp_path / client / f"{i}.txt").write_text(f"{client} note {i}.")
  clients = corpus.load_client_corpora(
      config(kind="folder", path=str(tmp_path), partition="natural"))
  assert [(c.client_id, c.name, [d.doc_id for d in c.documents])
          for c in clients] == [(0, "alice", ["alice/0.txt", "alice/1.txt"]),
                                (1, "bob", ["bob/0.txt"])]
  assert clients[0].stats["replaced_files"] == 0
  assert clients[0].stats["source"] == str(tmp_path)
  # A client whose documents yield no piece is an error naming the folder.
  with pytest.raises(ValueError, match=f"'bob from {tmp_path}' yields no pieces"):
    chunking.chunk_documents(clients[1], lambda t: len(t.split()), 10, 5)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "x.pdf").write_bytes(b"%PDF")
  with pytest.raises(ValueError, match=str(empty)):
    corpus.read_folder(str(empty))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    corpus.read_folder(str(tmp_path / "nowhere"))


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_reader_with_fields_and_natural_clients(tmp_path):
  path = tmp_path / "notes.jsonl"
  _write_jsonl(path, [{"body": "Aspirin thins blood.", "key": "n1", "site": "b"},
                      {"body": "Insulin lowers glucose.", "key": "n2", "site": "a"},
                      {"body": "Statins lower LDL.", "key": "n3", "site": "b"}])
  docs, stats = corpus.read_records(str(path), "body", "key", "site")
  assert [(d.doc_id, d.text, d.meta["client"], d.meta["row"]) for d in docs] == [
      ("n1", "Aspirin thins blood.", "b", 0), ("n2", "Insulin lowers glucose.", "a", 1),
      ("n3", "Statins lower LDL.", "b", 2)]
  assert stats == {"files": 1, "rows": 3, "replaced_rows": 0}
  clients = corpus.load_client_corpora(config(
      kind="files", path=str(path), text_field="body", id_field="key",
      client_field="site", partition="natural"))
  assert [(c.name, [d.doc_id for d in c.documents]) for c in clients] == [
      ("a", ["n2"]), ("b", ["n1", "n3"])]
  # Without an id field, ids are file:row; IID over 2 clients covers all rows.
  clients = corpus.load_client_corpora(config(
      kind="files", path=str(path), text_field="body", partition="iid",
      num_clients=2))
  ids = sorted(d.doc_id for c in clients for d in c.documents)
  assert ids == ["notes.jsonl:0", "notes.jsonl:1", "notes.jsonl:2"]


def test_csv_reader(tmp_path):
  path = tmp_path / "t.csv"
  path.write_text('id,text\n7,"Hello, world."\n8,Second row.\n', encoding="utf-8")
  docs, _ = corpus.read_records(str(path), "text", "id")
  assert [(d.doc_id, d.text) for d in docs] == [("7", "Hello, world."),
                                                ("8", "Second row.")]


def test_record_errors_name_file_row_and_field(tmp_path):
  path = tmp_path / "bad.jsonl"
  _write_jsonl(path, [{"text": "ok"}, {"title": "no text here"}])
  with pytest.raises(ValueError, match=r"bad\.jsonl: row 1 field 'text' is missing"):
    corpus.read_records(str(path))
  with pytest.raises(ValueError, match=r"bad\.jsonl: no field 'body'.*corpus.text_field"):
    corpus.read_records(str(path), "body")
  dup = tmp_path / "dup.jsonl"
  _write_jsonl(dup, [{"text": "a", "id": "x"}, {"text": "b", "id": "x"}])
  with pytest.raises(ValueError, match="row 1 repeats document id 'x'"):
    corpus.read_records(str(dup), id_field="id")
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    corpus.read_records(str(tmp_path / "missing.jsonl"))
  with pytest.raises(ValueError, match="suffixes"):
    (tmp_path / "x.xml").write_text("<a/>")
    corpus.read_records(str(tmp_path / "x.xml"))


def test_empty_records_file_is_an_error(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text("", encoding="utf-8")
  with pytest.raises(ValueError, match="empty.jsonl"):
    corpus.read_records(str(path))


def test_config_errors():
  with pytest.raises(ValueError, match="Unknown corpus config field"):
    corpus.load_client_corpora(ml_collections.ConfigDict({"kidn": "wiki"}))
  with pytest.raises(ValueError, match="kind='pdf'|kind=.pdf"):
    corpus.load_client_corpora(config(kind="pdf"))
  with pytest.raises(ValueError, match="needs corpus.path"):
    corpus.load_client_corpora(config(kind="folder"))


# ----------------------------------------------------------------------------
# Splits.


def _ids(client):
  return [d.doc_id for d in client.documents]


def test_wiki_by_topic(wiki_available):
  cfg = config(topics=("medicine", "math"), max_docs_per_client=20, seed=1,
               holdout_fraction=0.1)
  clients, held = corpus.load_corpora_and_holdout(cfg)
  again = corpus.load_client_corpora(cfg)
  assert [_ids(c) for c in clients] == [_ids(c) for c in again]
  assert [c.name for c in clients] == ["medicine", "math"]
  assert [len(c.documents) for c in clients] == [20, 20]
  med = {a.title: a for a in wiki.articles_by_topic("medicine")}
  doc = clients[0].documents[0]
  assert doc.text == med[doc.doc_id].text
  assert doc.meta["article_id"] == med[doc.doc_id].id
  assert all(d.doc_id in med for d in clients[0].documents)
  ids = [d.meta["article_id"] for d in clients[1].documents]
  assert ids == sorted(ids)
  # Holdout: 10% of each topic, none held by a client, recomputable alone.
  assert len(held) == round(0.1 * 1358) + round(0.1 * 256)
  assert {d.doc_id for d in held}.isdisjoint(d for c in clients for d in _ids(c))
  assert [d.doc_id for d in held] == [
      d.doc_id for d in corpus.wiki_holdout(("math", "medicine"), 0.1, seed=1)]


def test_wiki_several_clients_per_topic_cover_the_topic(wiki_available):
  clients, held = corpus.wiki_clients(("math", "physics"), num_clients=4,
                                      seed=0, holdout_fraction=0.25)
  assert [c.name for c in clients] == ["math-0", "math-1", "physics-0",
                                       "physics-1"]
  math_ids = _ids(clients[0]) + _ids(clients[1])
  assert len(set(math_ids)) == len(math_ids)
  held_math = {d.doc_id for d in held if d.meta["topic"] == "Mathematics"}
  assert len(held_math) == 64
  assert set(math_ids) | held_math == {a.title for a in wiki.articles_by_topic("math")}
  assert abs(len(clients[0].documents) - len(clients[1].documents)) <= 1
  with pytest.raises(ValueError, match="not a multiple"):
    corpus.wiki_clients(("math", "physics"), num_clients=3)


def test_wiki_dirichlet(wiki_available):
  kwargs = dict(topics=("math", "history", "geography"), partition="dirichlet",
                num_clients=6, alpha=0.3, seed=5, holdout_fraction=0.05)
  clients, held = corpus.wiki_clients(**kwargs)
  again, held_again = corpus.wiki_clients(**kwargs)
  assert [_ids(c) for c in clients] == [_ids(c) for c in again]
  assert [d.doc_id for d in held] == [d.doc_id for d in held_again]
  all_ids = [i for c in clients for i in _ids(c)]
  assert len(all_ids) == len(set(all_ids))  # disjoint
  assert all(c.documents for c in clients)
  topic_ids = {a.title for t in ("math", "history", "geography")
               for a in wiki.articles_by_topic(t)}
  held_ids = {d.doc_id for d in held}
  assert held_ids.isdisjoint(all_ids)
  assert set(all_ids) | held_ids == topic_ids
  assert [c.name for c in clients] == [f"client-{k}" for k in range(6)]
  # Label skew: the average client's largest topic share is well above 1/3.
  shares = [max(np.unique([d.meta["topic"] for d in c.documents],
                          return_counts=True)[1]) / len(c.documents)
            for c in clients]
  assert np.mean(shares) > 0.5
  # The holdout does not depend on the partition.
  _, held_topic = corpus.wiki_clients(("math", "history", "geography"), seed=5,
                                      holdout_fraction=0.05)
  assert held_ids == {d.doc_id for d in held_topic}
  # max_docs_per_client samples a subset of each client's documents.
  small, _ = corpus.wiki_clients(**kwargs, max_docs_per_client=3)
  assert all(set(_ids(s)) <= set(_ids(c)) and len(s.documents) <= 3
             for s, c in zip(small, clients))


def test_wiki_config_errors(wiki_available):
  with pytest.raises(ValueError, match="Unknown wiki topic"):
    corpus.wiki_clients(("medicin",))
  with pytest.raises(ValueError, match="holdout_fraction"):
    corpus.wiki_clients(("math",), holdout_fraction=1.0)
  with pytest.raises(ValueError, match="needs corpus.num_clients"):
    corpus.wiki_clients(("math",), partition="dirichlet")
