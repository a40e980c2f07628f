"""Task types, prompt formatting and the run functions of each task kind.

Three kinds of task:

* :class:`MultipleChoiceTask` -- options scored by log-likelihood (cloze
  style: the option text is the assistant's answer). Headline metric:
  ``acc_norm``, the accuracy of the option with the highest log-prob per
  character (lm-eval-harness ``acc_norm``), because options differ a lot in
  length and the raw sum favours short ones. ``accuracy`` (raw sum) and
  ``acc_token_norm`` (mean log-prob per token) are reported too.
* :class:`GenerationTask` -- greedy decoding through the jitted
  :class:`fedjax_u2s.sampler.Sampler`, answer extraction, exact match.
* :class:`PerplexityTask` -- mean negative log-likelihood of the response
  tokens only; perplexity is ``exp`` of the token-weighted mean.

Prompt format: a tokenizer with a chat template renders the prompt as one
user turn followed by the assistant header (``add_generation_prompt``), and the
continuation follows directly. A tokenizer without a template (the tests'
``ByteTokenizer``) gets the plain-text fallback :data:`PLAIN_PROMPT`,
``"Question: {prompt}\\nAnswer:"``, with continuations prefixed by one space.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s.evaluation import report
from fedjax_u2s.evaluation import scoring

PyTree = Any

PLAIN_PROMPT = "Question: {prompt}\nAnswer:"
PLAIN_CONTINUATION_PREFIX = " "


# ----------------------------------------------------------------------------
# Questions and tasks.


@dataclasses.dataclass(frozen=True)
class MCQuestion:
  """A multiple-choice question.

  Attributes:
    id: unique within its task.
    prompt: the user message.
    options: candidate answers (the text the assistant would say).
    answer: index of the correct option.
    meta: free-form provenance (title, topic, source file, ...).
  """
  id: str
  prompt: str
  options: tuple[str, ...]
  answer: int
  meta: dict = dataclasses.field(default_factory=dict, compare=False)

  def __post_init__(self):
    if len(self.options) < 2:
      raise ValueError(f"Question {self.id!r}: needs >= 2 options.")
    if not 0 <= self.answer < len(self.options):
      raise ValueError(f"Question {self.id!r}: answer index {self.answer} out of "
                       f"range for {len(self.options)} options.")


@dataclasses.dataclass(frozen=True)
class GenQuestion:
  """A question answered by generation and compared by exact match.

  Attributes:
    id: unique within its task.
    prompt: the user message.
    answer: the gold answer (a number as text for ``kind="number"``).
    kind: "number" (compare extracted values exactly) or "text" (compare
      normalised first lines).
    meta: free-form provenance.
  """
  id: str
  prompt: str
  answer: str
  kind: str = "number"
  meta: dict = dataclasses.field(default_factory=dict, compare=False)

  def __post_init__(self):
    if scoring.canonical_answer(self.answer, self.kind) is None:
      raise ValueError(f"Question {self.id!r}: gold answer {self.answer!r} is not "
                       f"a {self.kind}.")


@dataclasses.dataclass(frozen=True)
class PPLExample:
  """A held-out instruction--response pair."""
  id: str
  instruction: str
  response: str
  meta: dict = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class MultipleChoiceTask:
  """Questions scored by the log-likelihood of each option.

  Attributes:
    headline: the metric a report leads with and judges on (one of
      ``report.METRICS["multiple_choice"]``). ``acc_norm`` (per character) suits prose options of
      unequal length; for short numeric options it rewards the longer
      number, and ``accuracy`` (the plain sum) is the one that measures.
  """
  name: str
  questions: tuple[MCQuestion, ...]
  description: str = ""
  headline: str = "acc_norm"
  kind = "multiple_choice"

  def __post_init__(self):
    if self.headline not in report.METRICS[self.kind]:
      raise ValueError(f"{self.name}: headline {self.headline!r} is not one of "
                       f"{report.METRICS[self.kind]}.")


@dataclasses.dataclass(frozen=True)
class GenerationTask:
  """Exact-match generation.

  Attributes:
    max_new_tokens: greedy decoding budget per question.
    stop_strings: a row stops once its output contains one of them (the
      tokenizer's end-of-sequence ids stop it too).
  """
  name: str
  questions: tuple[GenQuestion, ...]
  max_new_tokens: int = 64
  stop_strings: tuple[str, ...] = ()
  description: str = ""
  kind = "generation"


@dataclasses.dataclass(frozen=True)
class PerplexityTask:
  """Response-only perplexity.

  Attributes:
    add_eos: score the end-of-sequence token (``tokenizer.eos_ids[0]``, the
      end-of-turn token for chat models) after each response, as training
      with a response-only loss does.
  """
  name: str
  examples: tuple[PPLExample, ...]
  add_eos: bool = True
  description: str = ""
  kind = "perplexity"


Task = MultipleChoiceTask | GenerationTask | PerplexityTask


# ----------------------------------------------------------------------------
# Prompt formatting.


def has_chat_template(tokenizer) -> bool:
  return bool(getattr(tokenizer, "chat_template", None)) and hasattr(
      tokenizer, "apply_chat_template")


def encode(tokenizer, text: str, add_bos: bool | None = None) -> list[int]:
  """``tokenizer.encode`` for tokenizers with or without an ``add_bos`` flag."""
  if add_bos is None:
    return list(tokenizer.encode(text))
  try:
    return list(tokenizer.encode(text, add_bos=add_bos))
  except TypeError:  # e.g. testing.ByteTokenizer, which never adds BOS.
    return list(tokenizer.encode(text))


def prompt_ids(tokenizer, prompt: str) -> list[int]:
  """Token ids of a user turn + assistant header (or the plain fallback)."""
  if has_chat_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    # A template that writes BOS itself must not get a second one.
    return encode(tokenizer, text, add_bos=False if bos and text.startswith(bos)
                  else None)
  return encode(tokenizer, PLAIN_PROMPT.format(prompt=prompt))


def continuation_text(tokenizer, text: str) -> str:
  """The continuation as scored: as is after a chat header, else ' ' + text."""
  return text if has_chat_template(tokenizer) else PLAIN_CONTINUATION_PREFIX + text


def continuation_ids(tokenizer, text: str) -> list[int]:
  return encode(tokenizer, continuation_text(tokenizer, text), add_bos=False)


# ----------------------------------------------------------------------------
# Run functions.


def _mean(xs) -> float:
  return float(np.mean(xs)) if len(xs) else float("nan")


def run_multiple_choice(task: MultipleChoiceTask, logprob_fn: scoring.LogprobFn,
                        tokenizer, *, batch_size: int, max_length: int | None = None,
                        length_multiple: int = 32,
                        progress: Callable[[int], None] | None = None) -> dict:
  """Scores every (question, option) pair; accuracies and per-question records.

  Returns:
    ``{"kind", "n", "accuracy", "acc_norm", "acc_token_norm", "chance",
    "headline": task.headline, "records"}``.
  """
  pairs, texts = [], []
  for q in task.questions:
    ctx = prompt_ids(tokenizer, q.prompt)
    for opt in q.options:
      pairs.append((ctx, continuation_ids(tokenizer, opt)))
      texts.append(continuation_text(tokenizer, opt))
  scores = scoring.score_continuations(
      logprob_fn, pairs, batch_size=batch_size, pad_id=int(tokenizer.pad_id),
      max_length=max_length, length_multiple=length_multiple, progress=progress)
  records, k = [], 0
  for q in task.questions:
    n = len(q.options)
    choice = scoring.choose(scores[k:k + n], texts[k:k + n])
    truncated = max(s.truncated for s in scores[k:k + n])
    k += n
    records.append(dict(
        id=q.id, prompt=q.prompt, options=list(q.options), answer=q.answer,
        logprobs=list(choice.logprobs), per_char=list(choice.per_char),
        per_token=list(choice.per_token), pred=choice.pred,
        pred_norm=choice.pred_norm, pred_token_norm=choice.pred_token_norm,
        correct=choice.pred == q.answer, correct_norm=choice.pred_norm == q.answer,
        correct_token_norm=choice.pred_token_norm == q.answer,
        truncated_tokens=truncated, meta=dict(q.meta)))
  return dict(
      kind=task.kind, n=len(records), headline=task.headline,
      accuracy=_mean([r["correct"] for r in records]),
      acc_norm=_mean([r["correct_norm"] for r in records]),
      acc_token_norm=_mean([r["correct_token_norm"] for r in records]),
      chance=_mean([1.0 / len(q.options) for q in task.questions]),
      records=records)


def run_generation(task: GenerationTask, sampler: sampler_lib.Sampler, params: PyTree,
                   *, batch_size: int, lora: PyTree | None = None,
                   lora_config: lora_lib.LoraConfig | None = None, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> dict:
  """Greedy-decodes every question and checks the extracted answer.

  Questions are sorted by prompt length and decoded ``batch_size`` at a time
  (the last batch is filled with copies, so every call has the same batch
  shape and prompt lengths are bucketed by the sampler's ``pad_multiple``).

  Returns:
    ``{"kind", "n", "accuracy", "no_answer", "headline": "accuracy", "records"}``.
  """
  tok = sampler.tokenizer
  ids = [prompt_ids(tok, q.prompt) for q in task.questions]
  order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
  outputs: list[str | None] = [None] * len(ids)
  reasons: list[str | None] = [None] * len(ids)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    batch = [ids[i] for i in idx]
    batch += [batch[-1]] * (batch_size - len(batch))
    out = sampler(params, batch, max_new_tokens=task.max_new_tokens,
                  strategy=sampler_lib.Greedy(), stop_strings=task.stop_strings,
                  seed=seed, lora=lora, lora_config=lora_config if lora is not None else None)
    for j, i in enumerate(idx):
      outputs[i], reasons[i] = out.texts[j], out.stop_reasons[j]
    if progress is not None:
      progress(len(idx))
  records = []
  for q, text, reason in zip(task.questions, outputs, reasons):
    pred = scoring.extract_answer(text, q.kind)
    gold = scoring.canonical_answer(q.answer, q.kind)
    records.append(dict(id=q.id, prompt=q.prompt, answer=q.answer, gold=gold,
                        output=text, stop_reason=reason, pred=pred,
                        correct=pred is not None and pred == gold, meta=dict(q.meta)))
  return dict(kind=task.kind, n=len(records), headline="accuracy",
              accuracy=_mean([r["correct"] for r in records]),
              no_answer=sum(r["pred"] is None for r in records), records=records)


def run_perplexity(task: PerplexityTask, logprob_fn: scoring.LogprobFn, tokenizer, *,
                   batch_size: int, max_length: int | None = None,
                   length_multiple: int = 32,
                   progress: Callable[[int], None] | None = None) -> dict:
  """Response-only NLL of every pair; token-weighted perplexity of the task.

  Returns:
    ``{"kind", "n", "num_tokens", "nll" (mean per token), "perplexity",
    "headline": "perplexity", "records"}``.
  """
  eos = list(tokenizer.eos_ids)[:1] if task.add_eos else []
  if task.add_eos and not eos:
    raise ValueError(f"Task {task.name!r}: add_eos=True but the tokenizer has no "
                     "eos_ids; set add_eos=False.")
  pairs = [(prompt_ids(tokenizer, ex.instruction),
            continuation_ids(tokenizer, ex.response) + eos) for ex in task.examples]
  scores = scoring.score_continuations(
      logprob_fn, pairs, batch_size=batch_size, pad_id=int(tokenizer.pad_id),
      max_length=max_length, length_multiple=length_multiple, progress=progress)
  records = [dict(id=ex.id, nll=-s.logprob, num_tokens=s.num_tokens,
                  perplexity=scoring.perplexity(-s.logprob, s.num_tokens),
                  truncated_tokens=s.truncated, meta=dict(ex.meta))
             for ex, s in zip(task.examples, scores)]
  total_nll = float(sum(r["nll"] for r in records))
  total_tokens = int(sum(r["num_tokens"] for r in records))
  return dict(kind=task.kind, n=len(records), headline="perplexity",
              num_tokens=total_tokens, nll=total_nll / max(1, total_tokens),
              perplexity=scoring.perplexity(total_nll, total_tokens),
              records=records)
