"""Paired comparisons of two models on the same questions.

Two arms scored on the same questions differ by far less than two independent
samples would suggest: most questions are answered the same way by both. A
difference is judged here by a paired bootstrap over questions (resample the
question ids, recompute the headline metric of each arm on the resample, take
the difference), so its confidence interval carries the question-sampling
noise that a spread over a handful of training seeds cannot show.

Each arm's per-question value is first averaged over its runs (training seeds,
and for local-only tuning also over clients), so seed noise is averaged in,
not resampled: with two or three seeds there is nothing to resample.

Per-question values by task kind (the headline metric of
:mod:`fedjax_u2s.evaluation.runner`):

* ``multiple_choice``: ``correct_norm`` (acc_norm), 0 or 1;
* ``generation``: ``correct`` (accuracy), 0 or 1;
* ``perplexity``: ``(nll, num_tokens)``; the metric of a resample is the
  token-weighted ``exp(sum nll / sum tokens)``, as for the whole task.
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

import numpy as np

# Fewer shared questions than this get no verdict: a bootstrap over a handful
# of questions (e.g. 2 held-out pairs) gives intervals that look tight and
# mean nothing.
MIN_QUESTIONS = 10

# Record field holding each kind's headline per question.
_FIELD = {"multiple_choice": "correct_norm", "generation": "correct"}


def question_values(scores: Mapping[str, dict]) -> dict[str, dict]:
  """``{task: {"kind", "values": {question id: value}}}`` of one scored run.

  ``value`` is a float for accuracy-like kinds and ``[nll, num_tokens]`` for
  perplexity. Tasks without per-question ``records`` are skipped. Where
  several questions come from one article (``meta["article_id"]``, e.g. the
  cloze questions of :func:`fedjax_u2s.evaluation.suites.wiki_cloze`), the
  task also gets ``"clusters": {question id: article}``, so the bootstrap
  resamples articles, not questions (their answers are not independent).
  """
  out = {}
  for task, res in scores.items():
    records = res.get("records")
    if not records:
      continue
    kind = res["kind"]
    if kind == "perplexity":
      values = {str(r["id"]): [float(r["nll"]), float(r["num_tokens"])] for r in records}
    elif kind in _FIELD:
      values = {str(r["id"]): float(bool(r[_FIELD[kind]])) for r in records}
    else:
      raise ValueError(f"Task {task!r}: unknown kind {kind!r}.")
    out[task] = {"kind": kind, "values": values}
    articles = {str(r["id"]): (r.get("meta") or {}).get("article_id") for r in records}
    if None not in articles.values() and len(set(articles.values())) < len(articles):
      out[task]["clusters"] = {q: f"article:{a}" for q, a in articles.items()}
  return out


def mean_question_values(runs: Sequence[Mapping[str, dict]]) -> dict[str, dict]:
  """Per task and question, the mean of :func:`question_values` over runs.

  Only questions present in every run are kept (runs of one arm are scored on
  the same suites, so normally all of them).
  """
  out: dict[str, dict] = {}
  if not runs:
    return out
  tasks = set(runs[0])
  for run in runs[1:]:
    tasks &= set(run)
  for task in sorted(tasks):
    kind = runs[0][task]["kind"]
    ids = set(runs[0][task]["values"])
    for run in runs[1:]:
      ids &= set(run[task]["values"])
    values = {}
    for qid in sorted(ids):
      vals = [run[task]["values"][qid] for run in runs]
      values[qid] = (np.mean(np.asarray(vals, np.float64), axis=0).tolist()
                     if kind == "perplexity" else float(np.mean(vals)))
    out[task] = {"kind": kind, "values": values}
    clusters = runs[0][task].get("clusters")
    if clusters:
      out[task]["clusters"] = {q: clusters[q] for q in values}
  return out


def _metric(kind: str, values: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """The headline metric of each resample; ``idx`` is [B, n] question indices."""
  if kind == "perplexity":
    nll = values[:, 0][idx].sum(axis=-1)
    tokens = values[:, 1][idx].sum(axis=-1)
    return np.exp(nll / np.maximum(tokens, 1.0))
  return values[idx].mean(axis=-1)


def paired_bootstrap(a: Mapping[str, dict], b: Mapping[str, dict], *,
                     num_samples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict:
  """Metric of ``a`` minus metric of ``b`` on their shared questions.

  Args:
    a, b: one task's ``{"kind", "values"}`` (from :func:`question_values` or
      :func:`mean_question_values`).
    num_samples: bootstrap resamples.
    seed: resampling seed (the result is deterministic given it).
    level: confidence level of the percentile interval.

  Returns:
    ``{"n", "diff", "ci_low", "ci_high", "p_value", "level", "sd"}``:
    ``diff`` on all shared questions; ``p_value`` is the two-sided bootstrap
    estimate ``2 * min(P(d <= 0), P(d >= 0))`` (capped at 1); ``sd`` the
    standard deviation of the per-question differences (None for
    perplexity). ``n`` = 0 (and the rest None) when no question is shared.
    When ``a`` (or ``b``) carries ``clusters`` (:func:`question_values`),
    whole clusters are resampled and the result also has ``clusters`` (how
    many) and ``sd_effective``: ``sqrt(n)`` times the cluster-robust
    standard error of the mean difference, the SD that independent
    questions would need to be as noisy (what :func:`power_analysis` uses).
  """
  if a["kind"] != b["kind"]:
    raise ValueError(f"Cannot pair a {a['kind']} task with a {b['kind']} task.")
  kind = a["kind"]
  ids = sorted(set(a["values"]) & set(b["values"]))
  n = len(ids)
  if not n:
    return {"n": 0, "diff": None, "ci_low": None, "ci_high": None,
            "p_value": None, "level": level}
  va = np.asarray([a["values"][i] for i in ids], np.float64)
  vb = np.asarray([b["values"][i] for i in ids], np.float64)
  full = np.arange(n)[None]
  diff = float(_metric(kind, va, full)[0] - _metric(kind, vb, full)[0])
  clusters = a.get("clusters") or b.get("clusters")
  extra = {}
  if clusters:
    # Per cluster: [sum, count] of the accuracy values (or [nll, tokens]),
    # so a resample of clusters is one sum over their rows.
    names = sorted({clusters[i] for i in ids})
    pos = {c: k for k, c in enumerate(names)}
    member = np.asarray([pos[clusters[i]] for i in ids])
    def aggregate(v):
      agg = np.zeros((len(names), 2))
      np.add.at(agg, member, v if v.ndim == 2 else np.stack([v, np.ones(n)], -1))
      return agg
    va, vb, size = aggregate(va), aggregate(vb), len(names)
    metric = lambda v, idx: (np.exp if kind == "perplexity" else (lambda x: x))(
        v[:, 0][idx].sum(-1) / np.maximum(v[:, 1][idx].sum(-1), 1e-12))
    extra["clusters"] = size
  else:
    metric, size = (lambda v, idx: _metric(kind, v, idx)), n
  rng = np.random.default_rng(seed)
  d = np.empty(num_samples)
  for start in range(0, num_samples, 1000):  # Bounded memory for large n.
    idx = rng.integers(0, size, size=(min(1000, num_samples - start), size))
    d[start:start + len(idx)] = metric(va, idx) - metric(vb, idx)
  lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
  p = min(1.0, 2.0 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
  # SD of the per-question differences (accuracy-like kinds only: a
  # perplexity is not a mean of per-question values), for power_analysis.
  sd = None
  if kind != "perplexity" and n > 1:
    diffs = np.asarray([a["values"][i] - b["values"][i] for i in ids], np.float64)
    sd = float(np.std(diffs, ddof=1))
    if clusters and extra["clusters"] > 1:
      k = extra["clusters"]
      t = np.zeros(k)
      np.add.at(t, member, diffs - diffs.mean())
      extra["sd_effective"] = float(np.sqrt(k / (k - 1) * np.sum(t ** 2) / n))
  return {"n": n, "diff": diff, "ci_low": float(lo), "ci_high": float(hi),
          "p_value": p, "level": level, "num_samples": num_samples, "sd": sd, **extra}


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values, in the order given.

  The i-th smallest of m p-values is multiplied by m - i (0-based i), the
  results are made non-decreasing in that order and capped at 1; rejecting
  where the adjusted p < alpha controls the family-wise error rate at alpha.
  """
  m = len(p_values)
  order = sorted(range(m), key=lambda i: p_values[i])
  adjusted, running = [0.0] * m, 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p_values[i]))
    adjusted[i] = running
  return adjusted


def adjust_family(results: Sequence[dict]) -> None:
  """Adds ``p_holm`` and ``family`` to each judged result (n >= MIN_QUESTIONS).

  The family is every comparison of one report: judging 27 differences at 5%
  each would call about one of them clear by chance alone.
  """
  judged = [r for r in results
            if (r.get("n") or 0) >= MIN_QUESTIONS and r.get("p_value") is not None]
  for r, p in zip(judged, holm([r["p_value"] for r in judged])):
    r["p_holm"] = p
    r["family"] = len(judged)


def verdict(result: Mapping, lower_is_better: bool) -> str:
  """``"better"``, ``"worse"``, ``"no clear difference"`` or ``"too few questions"``.

  Clear only when the interval excludes zero and, where the result carries a
  family-wise adjusted p (:func:`adjust_family`), that p is below
  ``1 - level`` too; judged at all only on at least :data:`MIN_QUESTIONS`
  shared questions.
  """
  if (result.get("n") or 0) < MIN_QUESTIONS or result["ci_low"] is None:
    return "too few questions"
  if result.get("p_holm") is not None and result["p_holm"] >= 1 - result["level"]:
    return "no clear difference"
  lo, hi = result["ci_low"], result["ci_high"]
  if lo > 0 or hi < 0:
    a_higher = lo > 0
    return "better" if a_higher != lower_is_better else "worse"
  return "no clear difference"


def format_interval(result: Mapping, digits: int = 3) -> str:
  """``"+0.050 [−0.010, +0.110], p=0.12, n=80"`` (or ``"-"``)."""
  if not result.get("n") or result["diff"] is None:
    return "-"
  floor = 2.0 / result.get("num_samples", 10_000)  # Resolution of the estimate.
  # Below the resolution a p-value (and so its Holm adjustment) says only
  # "smaller than this", never 0.
  p_text = lambda name, p: f"{name}<{floor:.0e}" if p < floor else f"{name}={p:.2g}"
  p_txt = p_text("p", result["p_value"])
  holm_txt = (", " + p_text("Holm p", result["p_holm"])
              if result.get("p_holm") is not None else "")
  return (f"{result['diff']:+.{digits}f} [{result['ci_low']:+.{digits}f}, "
          f"{result['ci_high']:+.{digits}f}], {p_txt}{holm_txt}, n={result['n']}")


# ----------------------------------------------------------------------------
# Power: how small a difference a question set can show.


def _z(q: float) -> float:
  return statistics.NormalDist().inv_cdf(q)


def minimum_detectable_effect(sd: float, n: int, *, alpha: float = 0.05,
                              power: float = 0.8) -> float:
  """Smallest true paired difference a two-sided test detects with ``power``.

  With per-question differences of standard deviation ``sd`` over ``n``
  questions, the mean difference has standard error ``sd / sqrt(n)``; a
  two-sided level-``alpha`` test rejects with probability ``power`` when the
  true difference is ``(z_{1-alpha/2} + z_{power}) * sd / sqrt(n)`` (normal
  approximation; 2.80 standard errors at alpha 0.05, power 0.8).
  """
  if n < 1:
    raise ValueError(f"minimum_detectable_effect: n must be >= 1, got {n}.")
  return (_z(1 - alpha / 2) + _z(power)) * sd / math.sqrt(n)


def questions_for_half_width(sd: float, half_width: float, *, level: float = 0.95) -> int:
  """Questions needed for a ``level`` interval of ``+/- half_width`` (normal approx)."""
  if half_width <= 0:
    raise ValueError(f"questions_for_half_width: half_width must be > 0, got {half_width}.")
  return int(math.ceil((_z((1 + level) / 2) * sd / half_width) ** 2))


def sd_from_discordance(gained: float, lost: float) -> float:
  """SD of paired 0/1 differences when a share ``gained`` of the questions goes
  0 -> 1 and ``lost`` goes 1 -> 0 (planning before the tuned arm exists).

  The difference is +1, -1 or 0, so its variance is
  ``gained + lost - (gained - lost)**2`` (population form).
  """
  if gained < 0 or lost < 0 or gained + lost > 1:
    raise ValueError(f"sd_from_discordance: shares {gained}, {lost} must be >= 0 and "
                     "sum to <= 1.")
  return math.sqrt(gained + lost - (gained - lost) ** 2)


def power_analysis(result: Mapping, *, alpha: float = 0.05, power: float = 0.8,
                   target_half_width: float = 0.05) -> dict:
  """Power figures of one :func:`paired_bootstrap` result.

  Returns:
    ``{"n", "sd", "half_width" (achieved: half the bootstrap interval),
    "half_width_normal" (z * sd / sqrt(n)), "mde" (see
    :func:`minimum_detectable_effect`), "n_for_target" (questions for a
    ``+/- target_half_width`` interval at the result's level),
    ``sd`` being ``sd_effective`` where the result has one (clustered
    questions),
    "target_half_width", "alpha", "power"}``; the SD-based fields are None
    where the result has no ``sd`` (perplexity, or under 2 questions).
  """
  n = result.get("n") or 0
  sd = result.get("sd_effective", result.get("sd"))  # Clustered: the effective SD.
  level = result.get("level", 0.95)
  out = {"n": n, "sd": sd, "alpha": alpha, "power": power,
         "target_half_width": target_half_width, "half_width": None,
         "half_width_normal": None, "mde": None, "n_for_target": None}
  if n and result.get("ci_low") is not None:
    out["half_width"] = (result["ci_high"] - result["ci_low"]) / 2
  if sd is not None and n > 1:
    out["half_width_normal"] = _z((1 + level) / 2) * sd / math.sqrt(n)
    out["mde"] = minimum_detectable_effect(sd, n, alpha=alpha, power=power)
    out["n_for_target"] = questions_for_half_width(sd, target_half_width, level=level)
  return out
