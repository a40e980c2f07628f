"""Per-node data directories for a one-machine rehearsal of the federation.

In a real deployment every SuperNode already holds its own instruction file.
To rehearse on one machine, this splits the fedit job's data exactly as the
in-process simulation splits it (:func:`fedjax_u2s.pipelines.fedit.client_and_eval_examples`)
and writes client ``i``'s examples to ``OUT/node<i>/instructions.jsonl`` (chat
``messages`` rows, which read back to the same examples) and the held-out
pairs to ``OUT/server/eval.jsonl`` (the server's own eval set)::

  python -m fedjax_u2s.flower.rehearsal --config=configs/fedit_instructions.py:smoke \
      --out=/tmp/w/nodes partition.num_clients=3

Prints one line per node; ``launch/flower_local.sh`` starts one SuperNode
per directory.
"""

from __future__ import annotations

import argparse
import json
import os
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


def write_node_dirs(config: ml_collections.ConfigDict, out: str) -> dict:
  """Writes ``out/node<i>/instructions.jsonl`` and ``out/server/eval.jsonl``.

  Returns:
    ``{"nodes": [dir of client i, ...], "eval_file": path or ""}``.
  """
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
  parser.add_argument("overrides", nargs="*", help="dotted.key=value")
  args = parser.parse_args(argv)
  path, arg = server_lib.resolve_config_path(args.config)
  config = config_blocks.load(path, arg, **server_lib.parse_overrides(
      " ".join(args.overrides)))
  made = write_node_dirs(config, args.out)
  for i, d in enumerate(made["nodes"]):
    print(f"node {i}: {d}")
  print(f"server eval: {made['eval_file'] or '(none)'}")


if __name__ == "__main__":
  main()
