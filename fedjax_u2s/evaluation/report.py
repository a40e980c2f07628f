"""Every markdown table, report file and plot the jobs write.

Scoring lives in :mod:`fedjax_u2s.evaluation.runner`, the statistics in
:mod:`fedjax_u2s.evaluation.stats`; this module only turns their results into
what a person reads (``report.md``, ``results.md``, ``results.png``, the
per-model score tables), so a change of presentation touches one file.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import numpy as np

from fedjax_u2s.evaluation import stats

# Metrics shown per task kind, the default headline first (a multiple-choice
# task may lead with another: tasks.MultipleChoiceTask.headline).
METRICS = {
    "multiple_choice": ("acc_norm", "accuracy", "acc_token_norm"),
    "generation": ("accuracy",),
    "perplexity": ("perplexity", "nll"),
}
# Direction of "better" for deltas.
LOWER_IS_BETTER = {"perplexity", "nll"}
# Tasks shown first, in this order, in the claim experiment's tables.
HEADLINE_TASKS = ("wiki_known", "wiki_unseen", "champ_heldout", "math_arithmetic",
                  "heldout_ppl")




def _figure(**kw):
  """A matplotlib ``Figure`` drawn off-screen, or None without matplotlib.

  A bare ``Figure`` renders to files without pyplot, so the global backend
  is left alone (a notebook's inline plots keep working). The import is
  deferred on purpose: matplotlib is the optional ``[eval]`` extra, and
  training (part of the core install) draws its curves through here; a
  missing plot is a warning, never a failed run.
  """
  try:
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("matplotlib is not installed (pip install 'fedjax_u2s[eval]'): "
                    "no plots.")
    return None
  return figure.Figure(**kw)


def plot_curves(rows: Sequence[Mapping[str, Any]], keys: Iterable[str], path: str,
                title: str = "") -> str | None:
  """One PNG with a panel per metric over rounds; None if nothing to plot."""
  keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
  fig = _figure(figsize=(4.5 * max(len(keys), 1), 3.4)) if keys else None
  if fig is None:
    return None
  axes = fig.subplots(1, len(keys), squeeze=False)
  for ax, key in zip(axes[0], keys):
    pts = [(r["round"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
    ax.set_xlabel("round")
    ax.set_title(key)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


# ----------------------------------------------------------------------------
# One model's scores; base vs tuned.


def _fmt(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


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


# ----------------------------------------------------------------------------
# The single-run report (report.md of the fedit / u2s jobs).


def paired_rows(scores_a: Mapping[str, dict], scores_b: Mapping[str, dict]
                ) -> dict[str, dict]:
  """Per task, the headline of ``a`` minus ``b`` on their shared questions.

  A paired bootstrap over questions (:func:`stats.paired_bootstrap`), Holm-
  adjusted over the tasks of the table (:func:`stats.adjust_family`), with
  :func:`stats.verdict`'s reading. Tasks without per-question records are
  left out.
  """
  qa, qb = stats.question_values(scores_a), stats.question_values(scores_b)
  out = {t: stats.paired_bootstrap(qa[t], qb[t]) for t in qa if t in qb}
  stats.adjust_family(list(out.values()))
  for task, r in out.items():
    head = scores_a[task]["headline"]
    r.update(metric=head, a=scores_a[task].get(head), b=scores_b[task].get(head),
             verdict=stats.verdict(r, head in LOWER_IS_BETTER))
  return out


def paired_models_table(rows: Mapping[str, dict], a: str, b: str) -> str:
  """Markdown of :func:`paired_rows`: both values, the difference, its interval."""
  lines = [f"| task | metric | n | {b} | {a} | {a} - {b} [95% paired CI], p | reading |",
           "|---|---|---|---|---|---|---|"]
  for task, r in rows.items():
    lines.append(f"| {task} | {r['metric']} | {r['n']} | {_fmt(r['b'])} | "
                 f"{_fmt(r['a'])} | {stats.format_interval(r)} | {r['verdict']} |")
  return "\n".join(lines) + "\n"


def power_table(rows: Mapping[str, Mapping[str, dict]]) -> str:
  """Markdown: how small a difference each comparison's question set can show.

  ``rows`` is ``{comparison: {task: paired_bootstrap result}}``. Per row: n,
  the SD of the per-question differences, the achieved half-width of the
  95% interval, the minimum detectable effect at alpha 0.05 and power 0.8
  (:func:`stats.minimum_detectable_effect`) and the questions a +/-0.05
  interval would need at this SD. Perplexity rows have no per-question SD.
  Where several questions come from one article (cloze), the SD is the
  effective one (:func:`stats.paired_bootstrap`'s ``sd_effective``): what
  independent questions would need to be as noisy.
  """
  lines = ["| a - b | task | n | SD of paired differences | 95% CI half-width | "
           "MDE (alpha 0.05, power 0.8) | n for +/-0.05 |",
           "|---|---|---|---|---|---|---|"]
  for pair, by_task in rows.items():
    for task, r in by_task.items():
      p = stats.power_analysis(r)
      f3 = lambda x: "-" if x is None else f"{x:.3f}"
      lines.append(f"| {pair} | {task} | {p['n']} | {f3(p['sd'])} | "
                   f"{f3(p['half_width'])} | {f3(p['mde'])} | "
                   f"{p['n_for_target'] if p['n_for_target'] is not None else '-'} |")
  return "\n".join(lines) + "\n"


def write_report(workdir: str, title: str, sections: list[tuple[str, str]]) -> str:
  """Writes ``workdir/report.md``: a title and ``(heading, markdown)`` sections."""
  path = os.path.join(workdir, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"# {title}\n\n")
    for heading, body in sections:
      f.write(f"## {heading}\n\n{body.rstrip()}\n\n")
  return path


def generation_table(gen_stats: dict, corpus: dict) -> str:
  """Markdown: per client its pieces, kept pairs, yield, the share rejected as
  ungrounded, the kept pairs' mean support and the top rejections."""
  lines = ["| client | name | pieces | kept | rejected | yield | ungrounded | "
           "mean support (kept) | top rejection reasons |",
           "|---|---|---|---|---|---|---|---|---|"]
  for c in corpus["clients"]:
    s = gen_stats["clients"].get(f"{c['client_id']:04d}", {})
    kept, rej = s.get("kept", 0), s.get("rejected", 0)
    reasons = sorted(s.get("rejected_by_reason", {}).items(), key=lambda kv: -kv[1])[:3]
    ungrounded = s.get("rejected_by_reason", {}).get("ungrounded", 0)
    support = s.get("mean_support")
    lines.append(f"| {c['client_id']} | {c['name']} | {c['pieces']} | {kept} | {rej} | "
                 f"{kept / max(kept + rej, 1):.0%} | "
                 f"{ungrounded / max(kept + rej, 1):.0%} | "
                 f"{'-' if support is None else f'{support:.2f}'} | "
                 f"{', '.join(f'{k} {v}' for k, v in reasons) or '-'} |")
  return "\n".join(lines)


def u2s_report(workdir: str, config, gen: dict, result, comparison: str,
               paired: str = "", power: str = "") -> str:
  """Writes the ``u2s`` job's ``report.md``: setup, generated data, tuning, scores.

  Args:
    workdir: the run directory.
    config: the run's config.
    gen: the ``generate`` stage summary (``stats``, ``corpus``).
    result: the :class:`fedjax_u2s.train.TrainResult`.
    comparison: :func:`compare_table` of base vs tuned.
    paired: :func:`paired_models_table` of tuned vs base.
    power: :func:`power_table` of the same comparison ("" leaves it out).

  Returns:
    The report's path.
  """
  corpus = gen["corpus"]
  num_clients = len(corpus["clients"])
  rows = result.metrics
  train_rows = [r for r in rows if "train_loss" in r]
  eval_rows = [r for r in rows if "eval_loss" in r]
  tr_lines = [f"- rounds: {result.rounds}, clients: {num_clients}, "
              f"algorithm: {config.federated.algorithm}"]
  if train_rows:
    tr_lines.append(f"- train loss: {train_rows[0]['train_loss']:.4f} (round 1) -> "
                    f"{train_rows[-1]['train_loss']:.4f} (round {train_rows[-1]['round']})")
  if eval_rows:
    tr_lines.append(f"- held-out generated pairs, loss: {eval_rows[0]['eval_loss']:.4f} "
                    f"(round {eval_rows[0]['round']}) -> {eval_rows[-1]['eval_loss']:.4f} "
                    f"(round {eval_rows[-1]['round']})")
  tr_lines.append("\n![training curves](curves.png)")
  totals = gen["stats"]["totals"]
  return write_report(workdir, "FedIT-U2S run", [
      ("Setup", f"- generator and tuned model: `{config.model.name}`\n"
                f"- corpus: `{config.corpus.kind}` topics {tuple(config.corpus.topics)}, "
                f"{num_clients} clients; {len(corpus['holdout'])} documents held by no client\n"
                f"- demonstrations: {config.u2s.selection}, k={config.u2s.num_demonstrations}\n"
                f"- config: `config.json`"),
      ("Generated data", f"{totals.get('kept', 0)} pairs kept of "
                         f"{totals.get('kept', 0) + totals.get('rejected', 0)} pieces.\n\n"
                         + generation_table(gen["stats"], corpus)),
      ("Federated tuning", "\n".join(tr_lines)),
      ("Evaluation: base vs tuned", comparison + "\n\nwiki_known: questions about "
       "articles whose text some client holds; wiki_unseen: articles of the same "
       "topics that no client holds; math: arithmetic with exact answers. Headline "
       "metric starred (acc_norm for multiple choice).\n\n" + (
           "Headline differences on the same questions, with 95% paired-bootstrap "
           "intervals over questions (Holm-adjusted p over the tasks; a difference "
           f"is judged only on at least {stats.MIN_QUESTIONS} questions):\n\n"
           + paired if paired else "")),
  ] + ([("Power of each question set", power + "\nWith per-question paired "
         "differences of SD s over n questions, the minimum detectable effect "
         "is (z_0.975 + z_0.8) s / sqrt(n) = 2.80 s / sqrt(n).")] if power else []))


# ----------------------------------------------------------------------------
# The claim experiment: arms x seeds (results.md, results.png).


def _cell(s: dict | None, digits: int = 3) -> str:
  if not s or s.get("mean") is None:
    return "-"
  text = f"{s['mean']:.{digits}f}"
  if s.get("std") is not None:
    text += f" ± {s['std']:.{digits}f}"
  return text


def _tasks(results: dict) -> list[str]:
  seen = []
  for entry in results["arms"].values():
    seen += [t for t in entry["summary"] if t not in seen]
  ordered = [t for t in HEADLINE_TASKS if t in seen]
  return ordered + [t for t in seen if t not in ordered]


def _headline(results: dict, task: str) -> str:
  for entry in results["arms"].values():
    if task in entry["summary"]:
      return entry["summary"][task]["_headline"]
  raise KeyError(task)


def arms_table(results: dict) -> str:
  """Markdown: arm x task (headline metric), ``mean ± std (n)`` over seeds."""
  tasks = _tasks(results)
  heads = []
  for t in tasks:
    h = _headline(results, t)
    heads.append(f"{t} {h}" + (" ↓" if h in LOWER_IS_BETTER else " ↑"))
  lines = ["| arm | n | client steps | " + " | ".join(heads) + " |",
           "|---|---|---|" + "---|" * len(tasks)]
  for arm, entry in results["arms"].items():
    steps = entry.get("compute", {}).get("client_steps", 0)
    if arm == "local_only" and entry.get("num_clients"):
      steps_txt = f"{steps} per client"
    else:
      steps_txt = str(steps)
    cells = [_cell(entry["summary"].get(t, {}).get(_headline(results, t)))
             for t in tasks]
    lines.append(f"| {arm} | {entry['num_runs']} | {steps_txt} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def findings(results: dict) -> list[str]:
  """Plain statements of the compared arms, per task.

  With per-question comparisons (``results["paired"]``) a difference is clear
  only when its 95% paired-bootstrap interval over questions excludes zero
  (:func:`stats.verdict`). Without them (:func:`summarize` given no
  per-question ``questions``) it falls back to fedit_u2s against each arm by
  seed ranges: clear only when the two [min, max] do not overlap.
  """
  arms = results["arms"]
  if results.get("paired"):
    out = []
    for pair, by_task in results["paired"].items():
      a, b = pair.split(" - ")
      for task in _tasks(results):
        if task not in by_task:
          continue
        head = _headline(results, task)
        verdict = stats.verdict(by_task[task], head in LOWER_IS_BETTER)
        if verdict == "too few questions":
          out.append(f"- {task} ({head}): {a} against {b}: too few questions to "
                     f"judge (n={by_task[task]['n']} < {stats.MIN_QUESTIONS}).")
          continue
        verdict = ("not clearly different from" if verdict == "no clear difference"
                   else verdict + " than")
        out.append(f"- {task} ({head}): {a} is {verdict} {b}: "
                   f"{stats.format_interval(by_task[task])}.")
    return out
  if "fedit_u2s" not in arms:
    return []
  out = []
  for task in _tasks(results):
    head = _headline(results, task)
    lower = head in LOWER_IS_BETTER
    ref = arms["fedit_u2s"]["summary"].get(task, {}).get(head)
    if not ref or ref["mean"] is None:
      continue
    for arm, entry in arms.items():
      if arm == "fedit_u2s":
        continue
      other = entry["summary"].get(task, {}).get(head)
      if not other or other["mean"] is None:
        continue
      diff = ref["mean"] - other["mean"]
      better = diff < 0 if lower else diff > 0
      apart = ref["min"] > other["max"] or ref["max"] < other["min"]
      if not diff:
        verdict, note = "equal to", ""
      elif not apart:
        verdict, note = "not clearly different from", ", seed ranges overlap"
      else:
        verdict, note = ("better than" if better else "worse than"), ""
      out.append(f"- {task} ({head}): fedit_u2s is {verdict} {arm} "
                 f"(mean {diff:+.3f}{note}).")
  return out


def paired_table(results: dict) -> str:
  """Markdown: comparison x task, the paired difference and its interval."""
  tasks = [t for t in _tasks(results)
           if any(t in by_task for by_task in results["paired"].values())]
  lines = ["| a - b | " + " | ".join(f"{t} {_headline(results, t)}" for t in tasks) + " |",
           "|---|" + "---|" * len(tasks)]
  for pair, by_task in results["paired"].items():
    cells = [stats.format_interval(by_task[t]) if t in by_task else "-" for t in tasks]
    lines.append(f"| {pair} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_arms(results: dict, path: str) -> str | None:
  """Bar chart per task (headline metric): mean over seeds, error bar = std."""
  tasks = _tasks(results)
  arms = list(results["arms"])
  if not tasks:
    return None
  width = max(4.0, 0.5 * len(arms) + 1.5)
  fig = _figure(figsize=(width * len(tasks), 3.8))
  if fig is None:
    return None
  axes = fig.subplots(1, len(tasks), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    head = _headline(results, task)
    means, errs = [], []
    for arm in arms:
      s = results["arms"][arm]["summary"].get(task, {}).get(head) or {}
      means.append(s.get("mean") if s.get("mean") is not None else np.nan)
      errs.append(s.get("std") or 0.0)
    ax.bar(range(len(arms)), means, yerr=errs, capsize=3,
           color=["#999999" if a == "base" else "#3b75af" if a == "fedit_u2s"
                  else "#8fb4d9" for a in arms])
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels(arms, rotation=40, ha="right", fontsize=8)
    ax.set_title(f"{task}\n{head}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle("mean ± std over seeds", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def token_lines(results: dict) -> list[str]:
  """Markdown lines: measured loss tokens per client step of each arm.

  From ``results["tokens"]`` (``claim.token_summary``); none without it.
  """
  tokens = results.get("tokens")
  if not tokens or not tokens.get("arms"):
    return []
  lines = ["## Loss tokens per client step (measured)", "",
           "| arm | loss tokens / client step | runs | client steps |",
           "|---|---|---|---|"]
  for arm, t in tokens["arms"].items():
    lines.append(f"| {arm} | {_cell(t['loss_tokens_per_step'], 1)} | "
                 f"{t['loss_tokens_per_step']['n']} | {t['client_steps']} |")
  lines.append("")
  m = tokens.get("raw_vs_u2s")
  if m:
    lines += [f"raw_text / fedit_u2s: {m['ratio']:.3f} "
              f"({'within' if m['within'] else 'OUTSIDE'} the +/-{m['tolerance']:.0%} "
              "tolerance of the matched token budget).", ""]
  return lines


def write_claim_results(workdir: str, results: dict) -> tuple[str, str | None]:
  """Writes ``results.md`` and ``results.png`` of a ``results.json`` content.

  Returns:
    ``(markdown path, plot path or None)``.
  """
  table = arms_table(results)
  png = plot_arms(results, os.path.join(workdir, "results.png"))
  setup = results.get("setup", {})
  lines = ["# FedIT-U2S claim experiment", ""]
  if setup:
    lines += [f"- model `{setup['model']}`, {setup['num_clients']} clients "
              f"({', '.join(setup['clients'] or [])}), algorithm {setup['algorithm']}",
              f"- training seeds {setup['seeds']}; generation seed "
              f"{setup['generation_seed']} (one generation per selection)",
              f"- training pairs per client: {setup['train_pairs']}; "
              f"{setup['num_heldout_pairs']} held-out retrieval pairs for heldout_ppl",
              f"- one client step = {setup['batch_size']} x {setup['grad_accum']} "
              "examples", ""]
  lines += ["## Results (headline metric, mean ± std over seeds)", "", table,
            "n = number of training seeds (base: scored once, it has no training "
            "seed). local_only: each seed's value is the mean over clients of each "
            "client's own adapter; client steps are per client (R rounds x L local "
            "steps), the federated arms' are summed over clients (R x C x L); "
            "centralized takes exactly the federated total on pooled data. "
            "heldout_ppl is measured on retrieval-generated pairs, so it favours "
            "the arms trained on retrieval-generated pairs.", ""]
  lines += token_lines(results)
  if "local_only" in results["arms"] and results["arms"]["local_only"].get("client_spread"):
    lines += ["## local_only spread over clients (all clients x seeds)", "",
              "| task | metric | mean | std | min | max | n |", "|---|---|---|---|---|---|---|"]
    for task, ms in results["arms"]["local_only"]["client_spread"].items():
      s = ms[ms["_headline"]]
      lines.append(f"| {task} | {ms['_headline']} | {_cell({'mean': s['mean']})} | "
                   f"{_cell({'mean': s['std']})} | {_cell({'mean': s['min']})} | "
                   f"{_cell({'mean': s['max']})} | {s['n']} |")
    lines.append("")
  found = findings(results)
  if results.get("paired"):
    lines += ["## Paired differences on the same questions", "",
              paired_table(results), "",
              "Each cell: metric(a) - metric(b) on the questions both arms "
              "answered, [95% paired-bootstrap interval over questions], "
              "two-sided bootstrap p, Holm-adjusted p over every judged "
              "comparison of this table, number of questions. Each arm's "
              "per-question score is first averaged over its seeds (and "
              "local_only's over clients). A difference is called clear only "
              "when the interval excludes zero and the Holm-adjusted p is "
              "below 0.05, and none is judged on fewer "
              f"than {stats.MIN_QUESTIONS} questions.", "", *found, ""]
    vs_base = {p: r for p, r in results["paired"].items() if p.endswith(" - base")}
    lines += ["## Power of each question set", "",
              power_table(vs_base or results["paired"]), "",
              "MDE: the smallest true difference a two-sided test at alpha 0.05 "
              "detects with power 0.8, (z_0.975 + z_0.8) SD / sqrt(n).", ""]
  elif found:
    lines += ["## fedit_u2s against each arm", "",
              "Clear only when the seed ranges [min, max] do not overlap.", "",
              *found, ""]
  if png:
    lines += ["![results](results.png)", ""]
  md_path = os.path.join(workdir, "results.md")
  with open(md_path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  print("\n" + table + "\n" + "\n".join(found) + f"\n\nResults: {md_path}")
  logging.info("Wrote %s, %s", md_path, png)
  return md_path, png


# ----------------------------------------------------------------------------
# The extraction / membership-inference audit (evaluation/privacy_audit.py).


def _count_cell(count, n, rate, ci) -> str:
  if not n:
    return "-"
  return f"{count}/{n} = {rate:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def audit_table(results_by_model: Mapping[str, dict]) -> str:
  """Markdown: one row per model of :func:`privacy_audit.audit` results.

  Cells are ``count/n = rate [95% interval]``; the notes under the table say
  what was counted, under which settings (those of the first model; a
  model audited otherwise gets its own note) and how the intervals were made.
  """
  if not results_by_model:
    raise ValueError("audit_table needs at least one model.")
  header = ["model", "verbatim", "near-verbatim", "non-member verbatim",
            "non-member near-verbatim", "MIA AUC [95%]", "members / non-members"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  notes, first = [], None
  for model, res in results_by_model.items():
    base = res.get("baseline") or {}
    if res.get("mia_auc") is None:
      auc_cell = "-"
    else:
      lo, hi = res["mia_auc_ci"]
      auc_cell = f"{res['mia_auc']:.3f} [{lo:.3f}, {hi:.3f}]"
    row = [model,
           _count_cell(res["verbatim"], res["n"], res["verbatim_rate"], res["verbatim_ci"]),
           _count_cell(res["near_verbatim"], res["n"], res["near_verbatim_rate"],
                       res["near_verbatim_ci"]),
           _count_cell(base.get("verbatim"), base.get("n"), base.get("verbatim_rate"),
                       base.get("verbatim_ci")),
           _count_cell(base.get("near_verbatim"), base.get("n"),
                       base.get("near_verbatim_rate"), base.get("near_verbatim_ci")),
           auc_cell, f"{res['n_members']} / {res['n_non_members']}"]
    lines.append("| " + " | ".join(row) + " |")
    s = res["settings"]
    setting = (f"greedy decoding of {s['max_new_tokens']} tokens after the instruction"
               + (f" and the first {s['prefix_tokens']} response tokens"
                  if s["prefix_tokens"] else "")
               + f"; verbatim = the next {s['min_tokens']} reference tokens exactly "
               f"(the whole rest of the response and its end-of-turn token when "
               f"shorter); near-verbatim = ROUGE-L F1 >= {s['near_threshold']} over "
               f"the {s['max_new_tokens']}-token window")
    if first is None:
      first = setting
      notes.append(f"Extraction: {setting}.")
    elif setting != first:
      notes.append(f"{model}: {setting}.")
    skipped = {k: v for d in res.get("skipped", {}).values() for k, v in d.items() if v}
    if skipped:
      notes.append(f"{model}: not audited: " + ", ".join(
          f"{v} {k}" for k, v in skipped.items()) + ".")
  method = next(iter(results_by_model.values())).get("mia_auc_ci_method", "")
  notes += ["Rates are over the members audited (non-member columns: the same "
            "attack on held-out examples, the rate expected without "
            "memorization); intervals are Wilson 95% score intervals.",
            "MIA AUC: loss attack, lower mean response-token loss => member; "
            "the Mann-Whitney AUC with ties counted half (0.5 = chance); "
            f"interval: {method}."]
  return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


# ----------------------------------------------------------------------------
# FedPIT (pipelines/fedpit.py): task accuracy and privacy side by side.

FEDPIT_MODELS = {
    "base": "base (no adapter)",
    "global": "global adapter (what the server and every client see)",
    "personal": "personal models (base + global + own local adapter; stay local)",
}


def fedpit_table(summary: Mapping[str, Any]) -> str:
  """Markdown: per model, accuracy on each task set (paired difference with
  the base, 95% interval, Holm p) beside its extraction and membership
  numbers."""
  header = ["model", "task_unseen acc", "vs base", "task_own acc", "vs base",
            "verbatim", "near-verbatim", "MIA AUC"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  ext = summary["privacy"]["extraction"]
  for name, acc in summary["accuracy"].items():
    paired = summary["paired_vs_base"].get(name, {})
    cells = [name]
    for task in ("task_unseen", "task_own"):
      a = acc.get(task)
      cells.append(f"{a['accuracy']:.3f} (n={a['n']})" if a else "-")
      cells.append(stats.format_interval(paired[task]) if task in paired else "-")
    e = ext.get(name, {})
    for key, count in (("verbatim_rate", "verbatim"),
                       ("near_verbatim_rate", "near_verbatim")):
      cells.append("-" if e.get(key) is None else
                   f"{e[count]}/{e['n']} = {e[key]:.3f}")
    auc = e.get("mia_auc")
    cells.append("-" if auc is None else
                 f"{auc:.3f} [{e['mia_auc_ci'][0]:.3f}, {e['mia_auc_ci'][1]:.3f}]")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_fedpit_report(workdir: str, config, summary: Mapping[str, Any],
                        split: Mapping[str, Any]) -> str:
  """``workdir/report.md`` of a FedPIT run."""
  dp = summary["privacy"]["dp"]
  clients = split["clients"]
  setup = (f"Variant **{summary['variant']}**, {len(clients)} clients holding "
           f"{', '.join(str(c['examples']) for c in clients)} real examples "
           f"({config.federated.num_rounds} rounds of {config.federated.algorithm}, "
           f"{config.federated.clients_per_round} clients per round); "
           f"{len(split['non_member_titles'])} non-member articles. Final train loss "
           f"of the global adapter {_fmt(summary['final_train_loss'])}"
           + (f", of the local adapters {_fmt(summary['final_local_loss'])}"
              if summary.get("final_local_loss") is not None else "")
           + f"; held-out (non-member) loss of the global model "
           f"{_fmt(summary['final_eval_loss'])}.")
  synth = summary["synthetic"]
  if synth:
    total = sum(synth.values())
    setup += (f" Synthetic generations: {total}, kept {synth.get('kept', 0)}; "
              "rejected by reason: " + ", ".join(
                  f"{k} {v}" for k, v in sorted(synth.items()) if k != "kept") + ".")
  privacy_txt = ("No differential privacy." if dp is None else
                 f"Client-level DP: (epsilon = {_fmt(dp['epsilon'])}, delta = "
                 f"{dp['delta']:g}) after {dp['rounds']} rounds, noise multiplier "
                 f"{dp['noise_multiplier']}, clip norm {dp['clip_norm']}, sampling rate "
                 f"{dp['sampling_rate']:.3f} ({dp['sampling']}).")
  sections = [
      ("Setup", setup),
      ("Task accuracy and privacy", fedpit_table(summary) + "\n\n" + "\n".join(
          f"- **{n}**: {FEDPIT_MODELS[n]}" for n in summary["accuracy"])),
      ("Extraction audit", audit_table(summary["audits"])),
      ("Differential privacy", privacy_txt),
  ]
  return write_report(workdir, "FedPIT", sections)


def fedpit_summary(summary: Mapping[str, Any], report_path: str) -> str:
  """The closing lines of a FedPIT run on the console."""
  lines = [f"\nFedPIT ({summary['variant']}):"]
  ext = summary["privacy"]["extraction"]
  for name, acc in summary["accuracy"].items():
    a = acc["task_unseen"]
    e = ext.get(name, {})
    vr = e.get("verbatim_rate")
    lines.append(f"  {name:9s} task_unseen {a['accuracy']:.3f} (n={a['n']})"
                 + (f", verbatim {vr:.3f}" if vr is not None else "")
                 + (f", MIA AUC {e['mia_auc']:.3f}" if e.get("mia_auc") is not None
                    else ""))
  dp = summary["privacy"]["dp"]
  if dp:
    lines.append(f"  DP: epsilon {_fmt(dp['epsilon'])} at delta {dp['delta']:g}")
  lines.append(f"Report: {report_path}")
  return "\n".join(lines)


def fedpit_arms_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown: one row per FedPIT arm (its evaluate-stage summary), the model
  each arm ships to clients (personal where it has one, else global).

  Accuracy on ``task_unseen`` and ``task_own`` with the paired difference
  from the base model, the extraction and membership numbers of that model
  and of the global adapter (what the server sees), and epsilon.
  """
  header = ["arm", "model", "task_unseen acc", "vs base", "task_own acc", "vs base",
            "verbatim (shipped)", "MIA AUC (shipped)", "verbatim (global)",
            "MIA AUC (global)", "epsilon"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for arm, s in summaries.items():
    model = "personal" if "personal" in s["accuracy"] else "global"
    acc, paired = s["accuracy"][model], s["paired_vs_base"].get(model, {})
    ext = s["privacy"]["extraction"]
    cells = [arm, model]
    for task in ("task_unseen", "task_own"):
      cells.append(f"{acc[task]['accuracy']:.3f} (n={acc[task]['n']})")
      cells.append(stats.format_interval(paired[task]) if task in paired else "-")
    for name in (model, "global"):
      e = ext.get(name)
      if not e:
        cells += ["-", "-"]
        continue
      cells.append(f"{e['verbatim']}/{e['n']}")
      cells.append("-" if e.get("mia_auc") is None else f"{e['mia_auc']:.3f}")
    dp = s["privacy"]["dp"]
    cells.append("-" if dp is None else _fmt(dp["epsilon"]))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
