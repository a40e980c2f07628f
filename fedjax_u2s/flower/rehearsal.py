"""Per-node data directories for a one-machine rehearsal of the federation.

In a real deployment every SuperNode already holds its own instruction file.
To rehearse on one machine, this splits the fedit job's data exactly as the
in-process simulation splits it (:func:`fedjax_u2s.pipelines.fedit.client_and_eval_examples`)
and writes client ``i``'s examples to ``OUT/node<i>/instructions.jsonl`` (chat
``messages`` rows, which read back to the same examples) and the held-out
pairs to ``OUT/server/eval.jsonl`` (the server's own eval set)::

  python -m fedjax_u2s.flower.rehearsal --config=configs/fedit_instructions.py:smoke \
      --out=/tmp/w/nodes partition.num_clients=3

For a U2S config (``configs/u2s_wiki.py``) every node gets raw text
instead: client ``i``'s documents of the in-process job's corpus split
(:func:`fedjax_u2s.u2s.corpus.load_corpora_and_holdout`, e.g. the wiki
articles of its topic) as ``OUT/node<i>/text/NNNN_<title>.txt``, one file
per document, in the client's document order; the node generates its own
pairs from them (:mod:`fedjax_u2s.flower.node_u2s`), as the in-process job
does for that client. No server eval file then: the job's held-out pairs are
the clients' own and stay on the nodes.

For a FedPIT config (``configs/fedpit.py``) client ``i``'s few real
examples (:func:`fedjax_u2s.pipelines.fedpit.split_articles`, the job's
split) go to ``OUT/node<i>/instructions.jsonl`` and the non-member examples
(the job's held-out loss) to ``OUT/server/eval.jsonl``; each node
self-generates and keeps its local adapter in ``OUT/node<i>/fedpit/``
(:mod:`fedjax_u2s.flower.node_fedpit`).

Prints one line per node; ``launch/flower_local.sh`` starts one SuperNode
per directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Sequence

import ml_collections

from fedjax_u2s import config_blocks
from fedjax_u2s.data import instructions
from fedjax_u2s.flower import server as server_lib
from fedjax_u2s.pipelines import fedit


def _row(example: instructions.Example) -> dict:
  row = {"messages": [dict(m) for m in example.messages]}
  if "category" in example.meta:
    row["category"] = example.meta["category"]
  return row


def _write_jsonl(path: str, examples: Sequence[instructions.Example]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for ex in examples:
      f.write(json.dumps(_row(ex), ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def _file_name(k: int, doc_id: str) -> str:
  """``0003_Heart_failure.txt``: sorts in document order, readable."""
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", doc_id).strip("._")[:60]
  return f"{k:04d}_{safe or 'document'}.txt"


def write_text_dirs(config: ml_collections.ConfigDict, out: str) -> dict:
  """Writes each U2S client's documents to ``out/node<i>/text/`` (module doc).

  The bytes are the documents' text as UTF-8, unchanged, so the node reads
  back exactly the strings the in-process job chunks.
  """
  from fedjax_u2s.u2s import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  clients, _ = corpus_lib.load_corpora_and_holdout(config.corpus)
  nodes = []
  for i, client in enumerate(clients):
    d = os.path.join(out, f"node{i}", "text")
    if os.path.isdir(d):  # A rerun writes the same files anew.
      for name in os.listdir(d):
        os.remove(os.path.join(d, name))
    os.makedirs(d, exist_ok=True)
    for k, doc in enumerate(client.documents):
      path = os.path.join(d, _file_name(k, doc.doc_id))
      with open(path + ".tmp", "wb") as f:
        f.write(doc.text.encode("utf-8"))
      os.replace(path + ".tmp", path)
    nodes.append(os.path.dirname(d))
  return {"nodes": nodes, "eval_file": ""}


def clients_key(config: ml_collections.ConfigDict) -> str:
  """The config field that sets the number of clients (= SuperNodes)."""
  return "corpus.num_clients" if config.get("pipeline") == "u2s" else (
      "partition.num_clients")


def write_node_dirs(config: ml_collections.ConfigDict, out: str) -> dict:
  """Writes ``out/node<i>/instructions.jsonl`` and ``out/server/eval.jsonl``.

  For a U2S config, ``out/node<i>/text/`` (:func:`write_text_dirs`).

  Returns:
    ``{"nodes": [dir of client i, ...], "eval_file": path or ""}``.
  """
  if config.get("pipeline") == "u2s":
    return write_text_dirs(config, out)
  if config.get("pipeline") == "fedpit":
    from fedjax_u2s.pipelines import fedpit  # pylint: disable=g-import-not-at-top
    client_examples, eval_examples, _ = fedpit.split_articles(config)
  else:
    client_examples, eval_examples, _ = fedit.client_and_eval_examples(config)
  nodes = []
  for i, examples in enumerate(client_examples):
    d = os.path.join(out, f"node{i}")
    _write_jsonl(os.path.join(d, "instructions.jsonl"), examples)
    nodes.append(d)
  eval_file = ""
  if eval_examples:
    eval_file = os.path.join(out, "server", "eval.jsonl")
    _write_jsonl(eval_file, eval_examples)
  return {"nodes": nodes, "eval_file": eval_file}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="FILE.py[:ARG]")
  parser.add_argument("--out", required=True)
  parser.add_argument("--clients-key", action="store_true",
                      help="print the config field of the number of clients and exit")
  parser.add_argument("overrides", nargs="*", help="dotted.key=value")
  args = parser.parse_args(argv)
  path, arg = server_lib.resolve_config_path(args.config)
  config = config_blocks.load(path, arg, **server_lib.parse_overrides(
      " ".join(args.overrides)))
  if args.clients_key:
    print(clients_key(config))
    return
  made = write_node_dirs(config, args.out)
  for i, d in enumerate(made["nodes"]):
    print(f"node {i}: {d}")
  print(f"server eval: {made['eval_file'] or '(none)'}")


if __name__ == "__main__":
  main()
