"""Every config field checked before any work: before the model loads.

A bad value found late costs what ran before it (a round of training, an
evaluation, a generation); found here it costs nothing. Each rule is keyed by
the field's dotted path and applies when the config has that field, so one
table serves every job. Errors name the field, its value and what is allowed,
and list every bad field at once.
"""

from __future__ import annotations

import codecs
import dataclasses
import fnmatch
import numbers
from typing import Any, Callable

import ml_collections

from fedjax_u2s import decoding
from fedjax_u2s import lora
from fedjax_u2s import retrieval
from fedjax_u2s import sampler
from fedjax_u2s.data import instructions
from fedjax_u2s.federated.config import AlgorithmConfig
from fedjax_u2s.u2s import corpus
from fedjax_u2s.u2s import generate
from fedjax_u2s.u2s import pool
from fedjax_u2s.u2s import prompts

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
    "train.pack_length": int_at_least(0),
    "train.halt_after_round": int_at_least(0),
    "train_eval.every": int_at_least(0),
    "train_eval.batch_size": int_at_least(1),
    "checkpoint.every": int_at_least(1),
    "checkpoint.keep": int_at_least(1),
    "mesh.num_devices": int_at_least(0),
    "mesh.model_parallel": int_at_least(1),  # Divides the devices: parallel.make_mesh.
    "data.eval_fraction": number_in(0, 1, hi_open=True),
    "data.max_examples": int_at_least(0),
    "data.format": one_of("auto", *instructions.FORMATS),
    "partition.method": one_of("iid", "dirichlet", "natural"),  # pipelines/fedit.py
    "partition.num_clients": int_at_least(1),
    "partition.alpha": positive(),
    "partition.min_size": int_at_least(0),
    "corpus.kind": one_of("wiki", "champ", "folder", "files"),
    "corpus.partition": one_of(*corpus.PARTITIONS),
    "corpus.num_clients": int_at_least(0),
    "corpus.alpha": positive(),
    "corpus.max_docs_per_client": int_at_least(0),
    "corpus.holdout_fraction": number_in(0, 1, hi_open=True),
    "corpus.decode_errors": one_of(*corpus.DECODE_ERRORS),
    "chunking.max_tokens": int_at_least(1),
    "chunking.min_tokens": int_at_least(0),
    "chunking.max_pieces_per_client": int_at_least(0),
    "u2s.num_demonstrations": int_at_least(0),
    "u2s.selection": one_of(*generate.SELECTIONS),
    "u2s.prompt_style": one_of(*prompts.STYLES),
    "u2s.max_prompt_tokens": int_at_least(0),
    "u2s.batch_size": int_at_least(1),
    "u2s.max_new_tokens": int_at_least(1),
    "u2s.filters.min_grounding": number_in(-1, 1),
    "u2s.filters.max_unsupported_facts": int_at_least(-1),
    "u2s.filters.min_support": number_in(0, 1),
    "pool.format": one_of(*pool.FORMATS),
    "retrieval.method": one_of("auto", *retrieval.INDEX_BUILDERS),
    "evaluate.num_wiki_questions": int_at_least(0),
    "evaluate.num_math_questions": int_at_least(0),
    "evaluate.num_cloze_questions": int_at_least(0),
    "evaluate.num_champ_questions": int_at_least(0),
    "evaluate.cloze_per_article": int_at_least(1),
    "evaluate.math_max_new_tokens": int_at_least(1),
    "evaluate.batch_size": int_at_least(1),
    "evaluate.seed": int_at_least(0),
}
# Sampler blocks: the same rules wherever a job keeps one. A strategy's own
# parameters are checked only when it is chosen (greedy ignores temperature).
SAMPLER_BLOCKS = ("sampling", "u2s.sampling")
for _block in SAMPLER_BLOCKS:
  RULES[f"{_block}.strategy"] = one_of(*sampler.STRATEGIES)
STRATEGY_RULES: dict[str, dict[str, Rule]] = {
    "temperature": {"temperature": positive()},
    "top_k": {"temperature": positive(), "top_k": int_at_least(1)},
    "top_p": {"temperature": positive(), "top_p": number_in(0, 1, lo_open=True)},
}
RULES["sampling.max_new_tokens"] = int_at_least(1)
# FedPIT (pipelines/fedpit.py; the variant names are listed there too).
RULES.update({
    "fedpit.variant": one_of("fedpit", "no_isolation", "fedit", "local"),
    "fedpit.selfgen.every": int_at_least(1),
    "fedpit.selfgen.per_client": int_at_least(1),
    "fedpit.selfgen.num_demonstrations": int_at_least(1),
    "fedpit.selfgen.max_prompt_tokens": int_at_least(0),
    "fedpit.selfgen.max_new_tokens": int_at_least(1),
    "fedpit.selfgen.near_copy_ngram": int_at_least(1),
    "fedpit.selfgen.max_near_copy": number_in(0, 1),
    "data.articles_per_client": int_at_least(1),
    "data.num_non_member_articles": int_at_least(1),
    "evaluate.num_questions": int_at_least(1),
    "audit.prefix_tokens": int_at_least(0),
    "audit.min_tokens": int_at_least(1),
    "audit.max_new_tokens": int_at_least(0),
    "audit.near_threshold": number_in(0, 1),
})
SAMPLER_BLOCKS += ("fedpit.selfgen.sampling",)
RULES["fedpit.selfgen.sampling.strategy"] = one_of(*sampler.STRATEGIES)
RULES["fedpit.selfgen.sampling.decode"] = one_of(*decoding.DECODES)
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
  if _lookup(config, "train.pack_length")[0]:
    pack_length, max_length = get("train.pack_length"), get("train.max_length")
    if _is_int(pack_length) and 0 < pack_length < max_length:
      out.append(f"config.train.pack_length={pack_length} is shorter than "
                 f"config.train.max_length={max_length}: a packed row must hold "
                 "the longest example (0 = batch_size * max_length).")
  if _lookup(config, "evaluate.num_champ_questions")[0]:
    kind = get("corpus.kind") if _lookup(config, "corpus.kind")[0] else None
    if _is_int(get("evaluate.num_champ_questions")) and get(
        "evaluate.num_champ_questions") > 0 and kind != "champ":
      out.append(f"config.evaluate.num_champ_questions={get('evaluate.num_champ_questions')} "
                 f"needs config.corpus.kind='champ' (got {kind!r}): the questions are "
                 "the CHAMP problems the run's corpus held out from every client.")
  if _lookup(config, "chunking.min_tokens")[0]:
    if get("chunking.min_tokens") > get("chunking.max_tokens"):
      out.append(f"config.chunking.min_tokens={get('chunking.min_tokens')} exceeds "
                 f"config.chunking.max_tokens={get('chunking.max_tokens')}.")
  for block in SAMPLER_BLOCKS:
    present, strategy = _lookup(config, f"{block}.strategy")
    for name, rule in STRATEGY_RULES.get(strategy, {}).items() if present else ():
      value = get(f"{block}.{name}")
      if not rule.check(value):
        out.append(f"config.{block}.{name}={value!r}: must be {rule.allowed} "
                   f"with strategy {strategy!r}.")
  present, targets = _lookup(config, "lora.targets")
  if present:
    idle = [p for p in targets
            if not any(fnmatch.fnmatchcase(n, p) for n in lora.ALL_TARGETS)]
    if idle or not targets:
      out.append(f"config.lora.targets={tuple(targets)!r}: every pattern must match "
                 f"one of {lora.ALL_TARGETS}; {idle or 'none given'} "
                 f"{'matches' if len(idle) == 1 else 'match'} nothing.")
  present, encoding = _lookup(config, "corpus.encoding")
  if present:
    try:
      codecs.lookup(encoding)
    except (LookupError, TypeError):
      out.append(f"config.corpus.encoding={encoding!r}: not a codec Python knows "
                 "(e.g. 'utf-8', 'latin-1', 'cp1252').")
  present, fields = _lookup(config, "data.fields")
  if present:
    unknown = sorted(set(fields) - set(instructions.FIELD_ROLES))
    if unknown:
      out.append(f"config.data.fields has {unknown}; the roles are "
                 f"{list(instructions.FIELD_ROLES)}.")
  out += _client_counts(config, get)
  if _lookup(config, "federated")[0]:
    try:
      AlgorithmConfig.from_config(config.federated)
    except (ValueError, TypeError, KeyError) as e:
      out.append(str(e))
  if _lookup(config, "experiment")[0] and get("train.local_steps") == 0:
    out.append("config.train.local_steps=0: the claim experiment matches compute in "
               "optimizer steps; set it > 0 (local_epochs would give clients with "
               "more data more steps).")
  return out


def _client_counts(config: ml_collections.ConfigDict, get) -> list[str]:
  """How many clients the data gives, against ``federated.clients_per_round``."""
  out = []
  cpr = get("federated.clients_per_round")
  if _lookup(config, "partition.method")[0]:
    n, field = get("partition.num_clients"), "config.partition.num_clients"
    if get("partition.method") == "natural":
      n = None  # Known only once the data is read.
  elif _lookup(config, "corpus.num_clients")[0]:
    n, field = get("corpus.num_clients"), "config.corpus.num_clients"
    topics = tuple(get("corpus.topics") or ())
    if get("corpus.kind") == "wiki" and get("corpus.partition") == "topic" and topics:
      if n and n % len(topics):
        out.append(f"config.corpus.num_clients={n} is not a multiple of the "
                   f"{len(topics)} topics {topics} (partition='topic' gives each "
                   "topic the same number of clients).")
      n = n or len(topics)
    elif not n:
      n = None  # One client per group of the data: known once it is read.
  else:
    return out
  if _is_int(cpr) and _is_int(n) and cpr > n:
    out.append(f"config.federated.clients_per_round={cpr} exceeds {field}={n}.")
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError listing every bad field (see :data:`RULES`)."""
  found = problems(config)
  if found:
    raise ValueError("The config has bad values (nothing was run):\n  "
                     + "\n  ".join(found))
