"""Paired per-question comparisons: extraction, averaging, bootstrap, verdicts."""

import math

import numpy as np
import pytest

from fedjax_u2s.evaluation import report
from fedjax_u2s.pipelines import claim
from fedjax_u2s.evaluation import stats


def _mc(correct_norm, name_prefix="q"):
  return {"kind": "multiple_choice", "headline": "acc_norm",
          "records": [{"id": f"{name_prefix}{i}", "correct": not c, "correct_norm": c}
                      for i, c in enumerate(correct_norm)]}


def _acc(values):
  return {"kind": "multiple_choice", "values": {f"q{i}": float(v) for i, v in enumerate(values)}}


def test_question_values_by_kind():
  scores = {
      "mc": _mc([True, False]),
      "math": {"kind": "generation", "records": [{"id": 7, "correct": True},
                                                 {"id": 8, "correct": False}]},
      "ppl": {"kind": "perplexity", "records": [{"id": "a", "nll": 3.0, "num_tokens": 2}]},
      "no_records": {"kind": "generation", "records": []},
  }
  qv = stats.question_values(scores)
  assert qv["mc"] == {"kind": "multiple_choice", "values": {"q0": 1.0, "q1": 0.0}}
  assert qv["math"]["values"] == {"7": 1.0, "8": 0.0}  # Ids become strings (JSON keys).
  assert qv["ppl"]["values"] == {"a": [3.0, 2.0]}
  assert "no_records" not in qv


def test_mean_question_values_averages_runs_on_shared_questions():
  r1 = {"t": _acc([1, 0, 1]), "p": {"kind": "perplexity", "values": {"x": [2.0, 4.0]}}}
  r2 = {"t": {"kind": "multiple_choice", "values": {"q0": 0.0, "q1": 0.0}},
        "p": {"kind": "perplexity", "values": {"x": [4.0, 4.0]}}}
  m = stats.mean_question_values([r1, r2])
  assert m["t"]["values"] == {"q0": 0.5, "q1": 0.0}  # q2 is not in every run.
  assert m["p"]["values"] == {"x": [3.0, 4.0]}
  assert stats.mean_question_values([]) == {}


def test_identical_arms_differ_by_nothing():
  a = _acc([1, 0, 1, 1, 0] * 3)
  r = stats.paired_bootstrap(a, a, num_samples=500)
  assert (r["n"], r["diff"], r["ci_low"], r["ci_high"], r["p_value"]) == (15, 0.0, 0.0, 0.0, 1.0)
  assert stats.verdict(r, lower_is_better=False) == "no clear difference"


def test_a_always_right_b_always_wrong_is_clear():
  r = stats.paired_bootstrap(_acc([1] * 30), _acc([0] * 30), num_samples=1000)
  assert (r["diff"], r["ci_low"], r["ci_high"], r["p_value"]) == (1.0, 1.0, 1.0, 0.0)
  assert stats.verdict(r, lower_is_better=False) == "better"
  assert stats.verdict(r, lower_is_better=True) == "worse"
  assert stats.format_interval(r) == "+1.000 [+1.000, +1.000], p<2e-03, n=30"
  # Its Holm adjustment (k * 0) is below the resolution too, not "p=0".
  assert stats.format_interval({**r, "p_holm": 0.0}).endswith(
      ", p<2e-03, Holm p<2e-03, n=30")


def test_one_flip_in_a_hundred_is_not_clear():
  a = [1] * 50 + [0] * 50
  b = list(a)
  b[0] = 0  # a wins exactly one question.
  r = stats.paired_bootstrap(_acc(a), _acc(b), num_samples=2000, seed=3)
  assert r["diff"] == pytest.approx(0.01)
  # The resampled difference is (copies of q0) / 100: never negative, zero
  # whenever q0 is left out, (1 - 1/100)^100 ~ 37% of the time.
  assert r["ci_low"] == 0.0 and r["ci_high"] > 0
  assert 0.5 < r["p_value"] < 0.95
  assert stats.verdict(r, lower_is_better=False) == "no clear difference"


def test_paired_beats_unpaired_noise():
  """Same 20-point gain on 200 questions, strongly correlated arms: clear."""
  rng = np.random.default_rng(0)
  b = (rng.random(200) < 0.5).astype(float)
  a = b.copy()
  a[np.flatnonzero(b == 0)[:40]] = 1.0  # a also gets 40 of b's misses right.
  r = stats.paired_bootstrap(_acc(a), _acc(b), num_samples=2000)
  assert r["diff"] == pytest.approx(0.2)
  assert 0.13 < r["ci_low"] < 0.2 < r["ci_high"] < 0.27
  assert stats.verdict(r, lower_is_better=False) == "better"


def test_perplexity_is_token_weighted_by_hand():
  a = {"kind": "perplexity", "values": {"x": [2.0, 1.0], "y": [4.0, 1.0]}}
  b = {"kind": "perplexity", "values": {"x": [1.0, 1.0], "y": [1.0, 1.0]}}
  r = stats.paired_bootstrap(a, b, num_samples=200)
  assert r["diff"] == pytest.approx(math.exp(3.0) - math.exp(1.0))
  assert r["ci_low"] > 0
  # Two pairs: the interval excludes zero, but no verdict on so few.
  assert stats.verdict(r, lower_is_better=True) == "too few questions"
  many_a = {"kind": "perplexity", "values": {f"q{i}": [2.0 + i % 3, 1.0] for i in range(12)}}
  many_b = {"kind": "perplexity", "values": {f"q{i}": [1.0, 1.0] for i in range(12)}}
  r = stats.paired_bootstrap(many_a, many_b, num_samples=200)
  assert r["diff"] == pytest.approx(math.exp(3.0) - math.exp(1.0))  # Mean nll 3 vs 1.
  assert stats.verdict(r, lower_is_better=True) == "worse"


def test_deterministic_and_bad_inputs():
  a, b = _acc([1, 0, 1, 0, 1, 1]), _acc([0, 0, 1, 1, 0, 1])
  assert stats.paired_bootstrap(a, b, seed=5) == stats.paired_bootstrap(a, b, seed=5)
  with pytest.raises(ValueError, match="perplexity"):
    stats.paired_bootstrap(a, {"kind": "perplexity", "values": {}})
  empty = stats.paired_bootstrap(a, {"kind": "multiple_choice", "values": {"z": 1.0}})
  assert empty["n"] == 0 and stats.format_interval(empty) == "-"
  assert stats.verdict(empty, lower_is_better=False) == "too few questions"


def test_experiment_summary_reports_paired_differences():
  def run(acc):
    return {"t": {"acc_norm": acc, "_headline": "acc_norm"}}
  q_base = stats.question_values({"t": _mc([False] * 40)})
  q_tuned = stats.question_values({"t": _mc([True] * 10 + [False] * 30)})
  q_local = stats.question_values({"t": _mc([False] * 39 + [True])})
  raw = {"base": {"runs": {"-": run(0.0)}, "questions": q_base},
         "fedit_u2s": {"runs": {"0": run(0.25)}, "questions": q_tuned},
         "local_only": {"runs": {"0": run(0.025)}, "questions": q_local}}
  results = claim.summarize(raw, {"fedit_u2s": {"client_steps": 4},
                                        "local_only": {"client_steps": 2}})
  assert list(results["paired"]) == ["fedit_u2s - base", "fedit_u2s - local_only",
                                     "local_only - base"]
  assert results["paired"]["fedit_u2s - base"]["t"]["diff"] == pytest.approx(0.25)
  found = report.findings(results)
  assert found[0].startswith("- t (acc_norm): fedit_u2s is better than base: +0.250 [")
  assert found[2].startswith("- t (acc_norm): local_only is not clearly different from base")
  table = report.paired_table(results)
  assert "| fedit_u2s - local_only | +0.225 [" in table


def test_holm_by_hand():
  # Sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06.
  assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
  assert stats.holm([]) == []


def test_family_adjustment_can_withdraw_a_verdict():
  a = [1] * 50 + [0] * 50
  b = list(a)
  for i in range(5):  # a wins 5 questions outright: clear on its own.
    b[i] = 0
  one = stats.paired_bootstrap(_acc(a), _acc(b), num_samples=2000)
  assert stats.verdict(one, lower_is_better=False) == "better"
  # The same comparison among 40 others with no signal: not clear any more.
  family = [dict(one)] + [stats.paired_bootstrap(_acc(a), _acc(a)) for _ in range(40)]
  few = dict(stats.paired_bootstrap(_acc([1, 0]), _acc([0, 0])))
  stats.adjust_family(family + [few])
  assert family[0]["family"] == 41 and "p_holm" not in few  # n=2 is not judged.
  assert family[0]["p_holm"] == pytest.approx(min(1.0, 41 * one["p_value"]))
  assert stats.verdict(family[0], lower_is_better=False) == "no clear difference"
  assert ", Holm p=" in stats.format_interval(family[0])
