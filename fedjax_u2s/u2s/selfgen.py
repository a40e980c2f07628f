"""FedPIT's self-generation: a client's few real examples prompt the global model.

A client with only a handful of real instruction-response pairs shows the
current global model (base + global adapter) ``num_demonstrations`` of them
as chat turns and asks for ONE new pair of the same task about another
subject; it does so ``per_client`` times, each with its own draw of
demonstrations. Answers go through the U2S parser (:mod:`parse`) and the U2S
filters that need no source passage (length, repetition, copied
demonstration instruction, duplicates: :mod:`filters`), plus one of their
own:

* ``near_copy``: the pair shares too much text with a real example of the
  client: the word n-gram Jaccard of the response with a real response, or
  of the whole pair with a real pair, above ``max_near_copy``. The synthetic
  pairs train the global adapter, which leaves the client, so a pair that
  restates a real example would carry that example out; this is the filter
  that stops it.

Everything is a function of ``(seed, client, round)`` and the model, so a
resumed run generates the same pairs (and :class:`SyntheticStore` keeps them
on disk anyway, so it reads them back instead).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s.u2s import filters as filters_lib
from fedjax_u2s.u2s import parse as parse_lib
from fedjax_u2s.u2s import prompts as prompts_lib
from fedjax_u2s.u2s import writer

NEAR_COPY = "near_copy"
UNPARSED = "unparsed"

SYSTEM_PROMPT = (
    "You write training data for an assistant. You are shown examples of one "
    "task: each is an instruction a user gave and the response a helpful "
    "assistant wrote. Write ONE new example of the same task about a "
    "different subject: a new instruction and its correct response. Do not "
    "repeat or rephrase an example. Answer in exactly this format and write "
    "nothing else:\n"
    "Instruction: <the instruction>\n"
    "Response: <the response>")
REQUEST = "Write a new example."


def default_config() -> ml_collections.ConfigDict:
  """Self-generation settings (locked: a misspelt override raises)."""
  c = ml_collections.ConfigDict()
  c.every = 1                     # A sampled client regenerates when its pairs are this many rounds old.
  c.per_client = 8                # Generations per client per refresh (kept pairs are fewer).
  c.num_demonstrations = 3        # Real examples shown per generation.
  c.max_prompt_tokens = 1024      # Demonstrations dropped past this (0: no budget).
  c.max_new_tokens = 128          # Generation budget per pair.
  c.near_copy_ngram = 3           # n of the word n-grams compared with real examples.
  c.max_near_copy = 0.5           # Max n-gram Jaccard with a real example (1.0: off).
  # Warmer than U2S: new subjects are the point, a source passage holds none.
  c.sampling = sampler_lib.config_block(temperature=0.8, top_p=0.95, pad_multiple=64)
  c.filters = filters_lib.default_filter_config()  # Length / repetition / duplicate thresholds.
  # A task's instructions share a template ("Describe X in a few words." is
  # 0.71 word-Jaccard from "Describe Y in a few words."): only a near-exact
  # repeat of a shown instruction is a copy here; copied *content* is what
  # near_copy catches.
  c.filters.max_demo_jaccard = 0.9
  c.lock()
  return c


def build_messages(demos: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
  """Chat messages: the task, each demonstration as a request and its answer."""
  messages = [{"role": "system", "content": SYSTEM_PROMPT}]
  for instruction, response in demos:
    messages.append({"role": "user", "content": REQUEST})
    messages.append({"role": "assistant",
                     "content": prompts_lib.pair_text(instruction, response)})
  messages.append({"role": "user", "content": REQUEST})
  return messages


def build_prompt(tokenizer, demos: Sequence[tuple[str, str]],
                 max_prompt_tokens: int = 0) -> tuple[list[int], int]:
  """Token ids of the prompt (answer prefilled with ``Instruction:``).

  Demonstrations are dropped from the front until the prompt fits.

  Returns:
    ``(token ids, demonstrations kept)``.
  """
  demos = list(demos)
  for start in range(len(demos) + 1):
    text = tokenizer.apply_chat_template(build_messages(demos[start:]),
                                         add_generation_prompt=True)
    ids = prompts_lib.encode_prompt(tokenizer, text + prompts_lib.INSTRUCTION_MARKER)
    if not max_prompt_tokens or len(ids) <= max_prompt_tokens:
      break
  return ids, len(demos) - start


def near_copy_score(instruction: str, response: str,
                    real: Sequence[tuple[str, str]], n: int) -> float:
  """The highest word n-gram Jaccard with a real example.

  Of the response against each real response, and of the whole pair against
  each real pair (a pair that moves a real answer into its instruction is a
  copy too).
  """
  resp = filters_lib.shingles(response, n)
  pair = filters_lib.shingles(filters_lib.pair_text(instruction, response), n)
  best = 0.0
  for ri, rr in real:
    best = max(best, filters_lib.jaccard(resp, filters_lib.shingles(rr, n)),
               filters_lib.jaccard(pair, filters_lib.shingles(
                   filters_lib.pair_text(ri, rr), n)))
  return best


def judge(text: str, demos: Sequence[tuple[str, str]],
          real: Sequence[tuple[str, str]], tracker: filters_lib.DuplicateTracker,
          cfg: ml_collections.ConfigDict) -> tuple[str, parse_lib.ParseResult, float]:
  """``(reason or "kept", the parse, near-copy score)`` of one generation.

  The first failing check names the reason: the parser's reason, length,
  repetition, copied demonstration, near copy of a real example, duplicate
  of a pair already kept (kept pairs are added to ``tracker``).
  """
  parsed = parse_lib.parse_pair(text)
  if not parsed.ok:
    return parsed.reason, parsed, 0.0
  f = cfg.filters
  reason = filters_lib.check_length(parsed.instruction, parsed.response, f)
  if reason is None:
    reason, _ = filters_lib.check_repetition(parsed.instruction, parsed.response, f)
  if reason is None:
    reason, _ = filters_lib.check_demo_copy(parsed.instruction,
                                            [d[0] for d in demos], f)
  score = near_copy_score(parsed.instruction, parsed.response, real,
                          cfg.near_copy_ngram)
  if reason is None and score > cfg.max_near_copy:
    reason = NEAR_COPY
  if reason is None:
    reason, _ = tracker.check(parsed.instruction, parsed.response)
  if reason is None:
    tracker.add(parsed.instruction, parsed.response)
    reason = filters_lib.KEPT
  return reason, parsed, score


def generate(sampler: sampler_lib.Sampler, params: Any, real: Sequence[tuple[str, str]],
             *, client_id: int, round_: int, seed: int,
             cfg: ml_collections.ConfigDict, lora: Any = None,
             lora_config: Any = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """One client's synthetic pairs for one round.

  Args:
    sampler: a :class:`fedjax_u2s.sampler.Sampler` of the model.
    params: base parameters.
    real: the client's real ``(instruction, response)`` pairs (never empty).
    client_id, round_, seed: what the demonstration draws and the sampling
      depend on.
    cfg: :func:`default_config`.
    lora, lora_config: the global adapter the client received.

  Returns:
    ``(kept records, counts by reason)``; a record holds ``instruction``,
    ``response``, ``client``, ``round``, ``demos`` (indices into ``real``)
    and ``near_copy`` (its score).
  """
  if not real:
    raise ValueError(f"Client {client_id} has no real examples to show.")
  rng = np.random.default_rng([seed, client_id, round_])
  k = min(cfg.num_demonstrations, len(real))
  draws = [sorted(rng.choice(len(real), k, replace=False).tolist())
           for _ in range(cfg.per_client)]
  prompts = []
  for j, d in enumerate(draws):
    ids, kept = build_prompt(sampler.tokenizer, [real[i] for i in d],
                             cfg.max_prompt_tokens)
    draws[j] = d[len(d) - kept:]
    prompts.append(ids)
  out = sampler(params, prompts, max_new_tokens=cfg.max_new_tokens,
                strategy=sampler_lib.strategy_from_config(cfg.sampling),
                stop_strings=prompts_lib.STOP_STRINGS,
                seed=int(np.random.default_rng([seed, client_id, round_, 1])
                         .integers(2**31)),
                lora=lora, lora_config=lora_config)
  tracker = filters_lib.DuplicateTracker(cfg.filters)
  counts: collections.Counter = collections.Counter()
  kept = []
  for d, text in zip(draws, out.texts):
    demos = [real[i] for i in d]
    reason, parsed, score = judge(prompts_lib.INSTRUCTION_MARKER + text, demos,
                                  real, tracker, cfg)
    counts[reason] += 1
    if reason == filters_lib.KEPT:
      kept.append({"instruction": parsed.instruction, "response": parsed.response,
                   "client": client_id, "round": round_, "demos": d,
                   "near_copy": round(score, 4)})
  return kept, dict(sorted(counts.items()))


class SyntheticStore:
  """Synthetic pairs on disk: ``dir/round_RRRR/client_CCCC.jsonl`` + counts.

  A client's pairs of round ``r`` are written once (atomically, with their
  counts in ``client_CCCC.counts.json`` written last as the marker), so a
  rerun after a crash reads them back instead of generating again.
  """

  def __init__(self, directory: str):
    self.directory = directory

  def _paths(self, round_: int, client_id: int) -> tuple[str, str]:
    d = os.path.join(self.directory, f"round_{round_:04d}")
    return (os.path.join(d, f"client_{client_id:04d}.jsonl"),
            os.path.join(d, f"client_{client_id:04d}.counts.json"))

  def get(self, round_: int, client_id: int
          ) -> tuple[list[dict], dict[str, int]] | None:
    pairs, counts = self._paths(round_, client_id)
    if not os.path.exists(counts):
      return None
    with open(counts, encoding="utf-8") as f:
      c = json.load(f)
    return writer.read_records(pairs) if os.path.exists(pairs) else [], c

  def put(self, round_: int, client_id: int, records: Sequence[dict],
          counts: dict[str, int]) -> None:
    pairs, marker = self._paths(round_, client_id)
    os.makedirs(os.path.dirname(pairs), exist_ok=True)
    tmp = pairs + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for r in records:
        f.write(writer.dumps(r) + "\n")
    os.replace(tmp, pairs)
    writer.atomic_write_json(marker, counts)

  def rounds(self, client_id: int) -> list[int]:
    """The rounds at which ``client_id`` has finished pairs."""
    if not os.path.isdir(self.directory):
      return []
    out = []
    for name in sorted(os.listdir(self.directory)):
      if name.startswith("round_") and os.path.exists(
          self._paths(int(name[6:]), client_id)[1]):
        out.append(int(name[6:]))
    return out
