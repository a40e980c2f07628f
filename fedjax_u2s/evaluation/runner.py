"""Evaluate a model (base, or base + LoRA) on a list of suites; write tables.

::

    tasks = [suites.build_suite("wiki_mc", topics=("medicine",), seed=0),
             suites.build_suite("math", num_questions=100)]
    base = evaluate(config, params, tokenizer, tasks, batch_size=16)
    tuned = evaluate(config, params, tokenizer, tasks, lora=lora,
                     lora_config=lora_config, batch_size=16)
    print(compare_table({"base": base, "tuned": tuned}))
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import tqdm

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s.evaluation import scoring
from fedjax_u2s.evaluation import suites as suites_lib
from fedjax_u2s.evaluation import tasks as tasks_lib
from fedjax_u2s.models.config import ModelConfig

PyTree = Any

# Metrics shown per task kind, the headline first.
METRICS = {
    "multiple_choice": ("acc_norm", "accuracy", "acc_token_norm"),
    "generation": ("accuracy",),
    "perplexity": ("perplexity", "nll"),
}
# Direction of "better" for deltas.
LOWER_IS_BETTER = {"perplexity", "nll"}


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
             unroll_layers: bool = True, progress: bool = True,
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
    unroll_layers: passed to the sampler (faster decoding, slower compile).
    progress: show tqdm bars.
    logprob_fn: replaces the decoder for log-likelihood tasks (tests).

  Returns:
    ``{task_name: result}``; each result has ``kind``, ``n``, ``headline``,
    the metrics of its kind (see :data:`METRICS`), ``description`` and
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
                                        unroll_layers=unroll_layers)
        res = tasks_lib.run_generation(task, sampler, params, lora=lora,
                                       lora_config=lora_config, seed=seed, **common)
      else:
        res = tasks_lib.run_perplexity(task, logprob_fn, tokenizer,
                                       max_length=max_length,
                                       length_multiple=length_multiple, **common)
    res["description"] = task.description
    results[task.name] = res
  return results


# ----------------------------------------------------------------------------
# Reporting.


def _fmt(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def summary(results: Mapping[str, dict]) -> dict:
  """``{task: {metric: value}}`` without the records."""
  return {name: {k: v for k, v in res.items() if k != "records"}
          for name, res in results.items()}


def results_table(results: Mapping[str, dict]) -> str:
  """A markdown table of one model's results, one row per task."""
  lines = ["| task | kind | n | headline | value | other metrics |",
           "|---|---|---|---|---|---|"]
  for name, res in results.items():
    metrics = METRICS[res["kind"]]
    head = res["headline"]
    others = ", ".join(f"{m}={_fmt(res.get(m))}" for m in metrics if m != head)
    if res["kind"] == "multiple_choice":
      others += f", chance={_fmt(res.get('chance'))}"
    lines.append(f"| {name} | {res['kind']} | {res['n']} | {head} | "
                 f"{_fmt(res.get(head))} | {others} |")
  return "\n".join(lines) + "\n"


def write_results(results: Mapping[str, dict], directory: str, name: str) -> tuple[str, str]:
  """Writes ``<directory>/<name>.json`` (everything) and ``<name>.md`` (table).

  Returns:
    The two paths.
  """
  os.makedirs(directory, exist_ok=True)
  json_path = os.path.join(directory, f"{name}.json")
  md_path = os.path.join(directory, f"{name}.md")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, ensure_ascii=False, default=_json_default)
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(f"# {name}\n\n" + results_table(results))
  return json_path, md_path


def _json_default(x):
  if hasattr(x, "item"):  # NumPy / JAX scalars.
    return x.item()
  if isinstance(x, (set, tuple)):
    return list(x)
  return str(x)


def compare_table(results_by_model: Mapping[str, Mapping[str, dict]]) -> str:
  """Markdown: one row per (task, metric), one column per model, then deltas.

  The first model is the baseline; ``Δ <model>`` is ``model - baseline``
  (for perplexity / nll lower is better, as marked). Tasks missing from a
  model show "-". The headline metric of each task is marked with ``*``.
  """
  models = list(results_by_model)
  if not models:
    raise ValueError("compare_table needs at least one model.")
  task_names: list[str] = []
  for res in results_by_model.values():
    task_names += [t for t in res if t not in task_names]
  header = ["task", "metric", "n"] + models + [f"Δ {m}" for m in models[1:]]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for task in task_names:
    ref = next(r[task] for r in results_by_model.values() if task in r)
    for metric in METRICS[ref["kind"]]:
      values = [results_by_model[m].get(task, {}).get(metric) for m in models]
      deltas = []
      for v in values[1:]:
        b = values[0]
        deltas.append("-" if v is None or b is None else f"{v - b:+.4f}")
      star = "*" if metric == ref["headline"] else ""
      label = metric + star + (" (lower better)" if metric in LOWER_IS_BETTER else "")
      row = [task, label, str(ref["n"])] + [_fmt(v) for v in values] + deltas
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"
