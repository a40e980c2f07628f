"""Every config field checked before any work: before the model loads.

A bad value found late costs what ran before it (a round of training, an
evaluation, a generation); found here it costs nothing. Each rule is keyed by
the field's dotted path and applies when the config has that field, so one
table serves every job. Errors name the field, its value and what is allowed,
and list every bad field at once.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable

import ml_collections

from fedjax_u2s import decoding
from fedjax_u2s.data import instructions
from fedjax_u2s.federated import algorithms

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Rule:
  """``check(value) -> bool`` and the words for what passes it."""
  check: Callable[[Any], bool]
  allowed: str


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def int_at_least(lo: int) -> Rule:
  return Rule(lambda v: _is_int(v) and v >= lo, f"an integer >= {lo}")


def number_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
              ) -> Rule:
  def check(v):
    if not _is_num(v):
      return False
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  return Rule(check, f"a number in {'(' if lo_open else '['}{lo}, {hi}"
                     f"{')' if hi_open else ']'}")


def positive() -> Rule:
  return Rule(lambda v: _is_num(v) and v > 0, "a number > 0")


def one_of(*values: str) -> Rule:
  return Rule(lambda v: v in values, "one of " + ", ".join(repr(x) for x in values))


RULES: dict[str, Rule] = {
    "seed": int_at_least(0),
    "model.dtype": one_of(*DTYPES),
    "model.param_dtype": one_of(*DTYPES),
    "lora.rank": int_at_least(1),
    "lora.alpha": positive(),
    "lora.dropout": number_in(0, 1, hi_open=True),
    "train.max_length": int_at_least(1),
    "train.batch_size": int_at_least(1),
    "train.grad_accum": int_at_least(1),
    "train.local_steps": int_at_least(0),
    "train.local_epochs": number_in(0, float("inf")),
    "train.max_local_steps": int_at_least(0),
    "train.logits_chunk_size": int_at_least(0),
    "train.halt_after_round": int_at_least(0),
    "train_eval.every": int_at_least(0),
    "train_eval.batch_size": int_at_least(1),
    "checkpoint.every": int_at_least(1),
    "checkpoint.keep": int_at_least(1),
    "mesh.num_devices": int_at_least(0),
    "data.eval_fraction": number_in(0, 1, hi_open=True),
    "data.max_examples": int_at_least(0),
    "data.format": one_of("auto", *instructions.FORMATS),
    "partition.method": one_of("iid", "dirichlet", "natural"),
    "partition.num_clients": int_at_least(1),
    "partition.alpha": positive(),
    "partition.min_size": int_at_least(0),
    "corpus.kind": one_of("wiki", "folder", "files"),
    "corpus.partition": one_of("topic", "dirichlet", "natural", "iid"),
    "corpus.num_clients": int_at_least(0),
    "corpus.alpha": positive(),
    "corpus.max_docs_per_client": int_at_least(0),
    "corpus.holdout_fraction": number_in(0, 1, hi_open=True),
    "corpus.decode_errors": one_of("strict", "replace"),
    "chunking.max_tokens": int_at_least(1),
    "chunking.min_tokens": int_at_least(0),
    "chunking.max_pieces_per_client": int_at_least(0),
    "u2s.num_demonstrations": int_at_least(0),
    "u2s.selection": one_of("retrieval", "random", "fixed"),
    "u2s.prompt_style": one_of("multiturn", "single"),
    "u2s.max_prompt_tokens": int_at_least(0),
    "u2s.batch_size": int_at_least(1),
    "u2s.max_new_tokens": int_at_least(1),
    "evaluate.num_wiki_questions": int_at_least(0),
    "evaluate.num_math_questions": int_at_least(0),
    "evaluate.math_max_new_tokens": int_at_least(1),
    "evaluate.batch_size": int_at_least(1),
    "evaluate.seed": int_at_least(0),
}
# Sampler blocks: the same rules wherever a job keeps one.
for _block in ("sampling", "u2s.sampling"):
  RULES.update({
      f"{_block}.strategy": one_of("greedy", "temperature", "top_k", "top_p"),
      f"{_block}.temperature": positive(),
      f"{_block}.top_p": number_in(0, 1, lo_open=True),
      f"{_block}.top_k": int_at_least(1),
  })
RULES["sampling.max_new_tokens"] = int_at_least(1)
for _block in ("sampling", "u2s.sampling", "evaluate"):
  RULES[f"{_block}.decode"] = one_of(*decoding.DECODES)
RULES["u2s.sampling.pad_multiple"] = int_at_least(1)


def _lookup(config: ml_collections.ConfigDict, path: str):
  node = config
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return False, None
    node = node[part]
  return True, node


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """One line per bad field: ``config.<path>=<value>: must be <allowed>``."""
  out = []
  for path, rule in RULES.items():
    present, value = _lookup(config, path)
    if present and not rule.check(value):
      out.append(f"config.{path}={value!r}: must be {rule.allowed}.")

  def get(path):
    return _lookup(config, path)[1]

  if _lookup(config, "train.local_steps")[0]:
    if get("train.local_steps") == 0 and not get("train.local_epochs"):
      out.append("config.train.local_steps=0 and config.train.local_epochs=0: set "
                 "one of them > 0 (steps per round, or epochs per round).")
  if _lookup(config, "chunking.min_tokens")[0]:
    if get("chunking.min_tokens") > get("chunking.max_tokens"):
      out.append(f"config.chunking.min_tokens={get('chunking.min_tokens')} exceeds "
                 f"config.chunking.max_tokens={get('chunking.max_tokens')}.")
  if _lookup(config, "federated")[0]:
    try:
      algorithms.AlgorithmConfig.from_config(config.federated)
    except (ValueError, TypeError, KeyError) as e:
      out.append(str(e))
    cpr, n = get("federated.clients_per_round"), get("partition.num_clients")
    if (_lookup(config, "partition.method")[0] and get("partition.method") != "natural"
        and _is_int(cpr) and _is_int(n) and cpr > n):
      out.append(f"config.federated.clients_per_round={cpr} exceeds "
                 f"config.partition.num_clients={n}.")
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError listing every bad field (see :data:`RULES`)."""
  found = problems(config)
  if found:
    raise ValueError("The config has bad values (nothing was run):\n  "
                     + "\n  ".join(found))
