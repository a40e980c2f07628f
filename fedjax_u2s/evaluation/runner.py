"""Evaluate a model (base, or base + LoRA) on a list of suites.

::

    tasks = [suites.build_suite("wiki_mc", topics=("medicine",), seed=0),
             suites.build_suite("math", num_questions=100)]
    base = evaluate(config, params, tokenizer, tasks, batch_size=16)
    tuned = evaluate(config, params, tokenizer, tasks, lora=lora,
                     lora_config=lora_config, batch_size=16)
    print(report.compare_table({"base": base, "tuned": tuned}))
"""

from __future__ import annotations

from typing import Any, Sequence

import tqdm

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s.evaluation import scoring
from fedjax_u2s.evaluation import suites as suites_lib
from fedjax_u2s.evaluation import tasks as tasks_lib
from fedjax_u2s.models.config import ModelConfig

PyTree = Any

def _resolve(suite) -> tasks_lib.Task:
  if isinstance(suite, str):
    return suites_lib.build_suite(suite)
  if isinstance(suite, tuple) and len(suite) == 2 and isinstance(suite[0], str):
    return suites_lib.build_suite(suite[0], **dict(suite[1]))
  if isinstance(suite, (tasks_lib.MultipleChoiceTask, tasks_lib.GenerationTask,
                        tasks_lib.PerplexityTask)):
    return suite
  raise TypeError(f"A suite must be a task, a registered name or (name, kwargs); "
                  f"got {type(suite).__name__}.")


def evaluate(model_config: ModelConfig, params: PyTree, tokenizer, suites: Sequence, *,
             lora: PyTree | None = None,
             lora_config: lora_lib.LoraConfig | None = None, batch_size: int = 8,
             seed: int = 0, max_length: int | None = 1024, length_multiple: int = 32,
             decode: str = "auto", progress: bool = True,
             logprob_fn: scoring.LogprobFn | None = None) -> dict:
  """Runs every suite; results by task name.

  Args:
    model_config: the decoder's config.
    params: base parameters.
    tokenizer: a :class:`fedjax_u2s.tokenizer.Tokenizer` (or a test fake with
      ``encode``, ``decode``, ``token_bytes``, ``eos_ids``, ``pad_id``).
    suites: tasks, registered suite names, or ``(name, kwargs)`` pairs.
    lora, lora_config: optional adapter (the tuned model); applied in every
      forward pass and in the sampler.
    batch_size: rows per forward pass / sampler call.
    seed: sampler seed (decoding is greedy, so results do not depend on it).
    max_length: longest scored row; longer contexts are cut from the left.
    length_multiple: padded lengths are multiples of this (bounds recompiles).
    decode: the sampler's decode path (see :mod:`fedjax_u2s.decoding`):
      "auto" decodes fastest, "scan" compiles fastest.
    progress: show tqdm bars.
    logprob_fn: replaces the decoder for log-likelihood tasks (tests).

  Returns:
    ``{task_name: result}``; each result has ``kind``, ``n``, ``headline``,
    the metrics of its kind (see :data:`fedjax_u2s.evaluation.report.METRICS`), ``description`` and
    per-question ``records``.
  """
  if lora is not None and lora_config is None:
    raise ValueError("evaluate(lora=...) needs lora_config.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  tasks = [_resolve(s) for s in suites]
  names = [t.name for t in tasks]
  if len(set(names)) != len(names):
    raise ValueError(f"Task names must be unique, got {names}; pass name=... to "
                     "the suite builders.")
  if logprob_fn is None:
    logprob_fn = scoring.llama_logprob_fn(model_config, params, lora=lora,
                                          lora_config=lora_config)
  sampler = None
  results = {}
  for task in tasks:
    if task.kind == "multiple_choice":
      total = sum(len(q.options) for q in task.questions)
    elif task.kind == "generation":
      total = len(task.questions)
    else:
      total = len(task.examples)
    with tqdm.tqdm(total=total, desc=task.name, disable=not progress,
                   leave=False) as bar:
      common = dict(batch_size=batch_size, progress=bar.update)
      if task.kind == "multiple_choice":
        res = tasks_lib.run_multiple_choice(
            task, logprob_fn, tokenizer, max_length=max_length,
            length_multiple=length_multiple, **common)
      elif task.kind == "generation":
        if sampler is None:
          sampler = sampler_lib.Sampler(model_config, tokenizer,
                                        pad_multiple=length_multiple,
                                        decode=decode)
        res = tasks_lib.run_generation(task, sampler, params, lora=lora,
                                       lora_config=lora_config, seed=seed, **common)
      else:
        res = tasks_lib.run_perplexity(task, logprob_fn, tokenizer,
                                       max_length=max_length,
                                       length_multiple=length_multiple, **common)
    res["description"] = task.description
    results[task.name] = res
  return results
