"""The ``fedit`` job: federated LoRA tuning on ready instruction data (FedIT / Shepherd).

Reads the instruction rows ``config.data`` names, holds out
``data.eval_fraction`` for the eval loss, splits the rest over clients as
``config.partition`` says, trains and exports; ``configs/fedit_instructions.py``.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from fedjax_u2s.data import builtin
from fedjax_u2s.data import instructions
from fedjax_u2s.data import partition
from fedjax_u2s.data import wiki
from fedjax_u2s.pipelines import common


def _data_files(config: ml_collections.ConfigDict) -> dict[str, str]:
  path = config.data.path
  return {**common.model_file(config),
          "data": wiki.resolve_path() if path == "builtin:wiki" else path}


STAGES = (common.train_stage(files=_data_files),)


def load_instruction_data(cfg: ml_collections.ConfigDict, seed: int
                          ) -> tuple[list, instructions.DropReport | None]:
  """Examples from ``cfg.path`` (``builtin:wiki`` or a local data file).

  Returns:
    ``(examples, what the reader dropped)``; the report is None for the
    built-in rows, which are made here and drop nothing.
  """
  drops = None
  if cfg.path == "builtin:wiki":
    examples = builtin.wiki_instructions(topics=tuple(cfg.topics) or None, seed=seed)
  elif cfg.path.startswith("builtin:"):
    raise ValueError(f"config.data.path={cfg.path!r}: the only built-in "
                     "instruction set is 'builtin:wiki'.")
  else:
    loaded = instructions.load_examples(cfg.path, format=cfg.format, fields=cfg.fields)
    drops, examples = loaded.drops, list(loaded)
    print(drops.summary())
  if cfg.max_examples and len(examples) > cfg.max_examples:
    keep = np.sort(np.random.default_rng(seed).choice(
        len(examples), cfg.max_examples, replace=False))
    examples = [examples[i] for i in keep]
  return examples, drops


def split_clients(examples: list, cfg: ml_collections.ConfigDict, seed: int,
                  dropped: instructions.DropReport | None = None) -> list[list]:
  """Partitions examples over clients as ``config.partition`` says.

  ``dropped`` (what the reader dropped) goes into a too-few-examples error,
  so it says why there are few before it blames the partition sizes.
  """

  def labels():
    missing = [i for i, e in enumerate(examples) if cfg.label_field not in e.meta]
    if missing:
      raise ValueError(
          f"config.partition.method={cfg.method!r} needs the field "
          f"{cfg.label_field!r} in every example; example {missing[0]} has only "
          f"{sorted(examples[missing[0]].meta)}. Set config.partition.label_field "
          "or use method=iid.")
    return [e.meta[cfg.label_field] for e in examples]

  if cfg.method == "iid":
    parts = partition.iid(len(examples), cfg.num_clients, seed, min_size=cfg.min_size,
                          dropped=dropped)
  elif cfg.method == "dirichlet":
    parts = partition.dirichlet(labels(), cfg.num_clients, cfg.alpha, seed,
                                min_size=cfg.min_size, dropped=dropped)
  elif cfg.method == "natural":
    parts, _ = partition.natural(labels(), dropped=dropped)
  else:
    raise ValueError(f"config.partition.method={cfg.method!r} is not one of "
                     "['dirichlet', 'iid', 'natural'].")
  return [[examples[i] for i in idx] for idx in parts]


def client_and_eval_examples(config: ml_collections.ConfigDict
                             ) -> tuple[list[list], list, instructions.DropReport | None]:
  """The job's data: each client's examples, the held-out ones, the drops.

  One definition of the split, so the Flower rehearsal
  (:mod:`fedjax_u2s.flower.rehearsal`) gives every node exactly the examples
  this job gives that client.
  """
  examples, drops = load_instruction_data(config.data, config.seed)
  order = np.random.default_rng(config.seed + 1).permutation(len(examples))
  n_eval = int(round(config.data.eval_fraction * len(examples)))
  eval_examples = [examples[i] for i in order[:n_eval]]
  train_examples = [examples[i] for i in np.sort(order[n_eval:])]
  client_examples = split_clients(train_examples, config.partition, config.seed,
                                  dropped=drops)
  return client_examples, eval_examples, drops


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Loads and splits the data, trains federated, exports, prints a summary."""
  model = common.load_model(config)
  client_examples, eval_examples, drops = client_and_eval_examples(config)
  with common.stage("train", f"{config.federated.num_rounds} rounds of "
                    f"{config.federated.algorithm} over {len(client_examples)} clients"):
    result, stats = common.tune_and_export(config, workdir, model, client_examples,
                                           eval_examples, read=drops)
  rows = result.metrics
  if rows:
    last = [r for r in rows if "train_loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    print(f"\nTrained {result.rounds} rounds over {len(client_examples)} clients "
          f"({sum(c['kept'] for c in stats['clients'])} examples); final train loss "
          f"{last[-1]['train_loss']:.4f}" + (
              f", eval loss {evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f}"
              if evals else "") + f". Outputs in {workdir}")
