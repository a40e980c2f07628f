"""configs/experiments/u2s_decisive.py: it validates, fits its budget, has the
question sets it is sized for, and its ``:smoke`` runs the claim job end to end.

The end-to-end run pre-populates the generation (as tests/test_claim.py does:
a tiny random model writes no parseable pair) and runs everything else with
a tiny random Llama carrying SmolLM2's tokenizer.
"""

import importlib.util
import json
import os
import re

import pytest

from fedjax_u2s import pipelines
from fedjax_u2s import testing
from fedjax_u2s.pipelines import claim
from fedjax_u2s.pipelines import validate

from test_claim import generated_workdir  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "experiments", "u2s_decisive.py")


def _module():
  spec = importlib.util.spec_from_file_location("u2s_decisive", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("arg", ["", "smoke"])
def test_config_validates_and_builds(arg):
  config = testing.load_config(CONFIG, arg)
  validate.validate(config)
  assert config.pipeline == "claim" and config.pipeline in pipelines.PIPELINES
  e = config.experiment
  assert set(e.arms) == set(claim.ARMS)  # raw_text included.
  assert len(e.seeds) >= 2 and len(e.ablation_seeds) == 1
  assert claim.arm_seeds(e, "fedit_fixed") == list(e.ablation_seeds)
  assert claim.arm_seeds(e, "raw_text") == list(e.seeds)
  assert config.evaluate.cloze_merge and config.evaluate.num_math_questions == 0


def test_budget_fits_three_hours_and_matches_the_docstring():
  module = _module()
  b = module.budget(testing.load_config(CONFIG, ""))
  assert b["total"] <= module.BUDGET_MINUTES * 0.85  # With margin.
  doc = module.__doc__
  assert f"= {b['total']:.0f} min" in doc
  for stage in ("generation", "training", "evaluation"):
    assert re.search(rf"= +{b[stage]:.1f} min", doc), stage
  # By hand: 10 run-equivalents of 8 x 3 x 2 steps at 6 s; 15 models.
  assert b["training"] == pytest.approx(10 * 48 * 6.0 / 60)
  assert b["evaluation"] == pytest.approx(15 * (200 * 0.26 + 400 * 0.52 + 5) / 60)


def test_question_sets_have_power():
  """>= 300 questions in each headline set, from the config's own corpus."""
  from fedjax_u2s.data import wiki
  from fedjax_u2s.evaluation import suites
  from fedjax_u2s.u2s import corpus
  try:
    wiki.resolve_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  config = testing.load_config(CONFIG, "")
  clients, holdout = corpus.load_corpora_and_holdout(config.corpus)
  held = [d.doc_id for c in clients for d in c.documents]
  assert len(held) == 180
  sets = {t.name: len(t.questions) for t in suites.from_config(
      config.evaluate, held, [d.doc_id for d in holdout])}
  assert sets == {"wiki_known": 300, "wiki_unseen": 300}


def test_smoke_runs_end_to_end(tmp_path, smollm2_path):
  del smollm2_path  # The tiny model needs the real tokenizer.
  workdir = str(tmp_path / "decisive")
  generated_workdir(workdir)
  model = testing.write_tiny_chat_model(str(tmp_path / "tiny"))
  config = testing.load_config(
      CONFIG, "smoke", **{
          "model.name": model, "corpus.topics": ("medicine",),
          "train.max_length": 96, "data.eval_fraction": 0.25,
          "lora.rank": 2, "lora.alpha": 4.0, "checkpoint.every": 100,
          "model.remat": False, "train.logits_chunk_size": 0})
  pipelines.run(config, workdir)
  res = json.load(open(os.path.join(workdir, "results.json")))
  arms = res["arms"]
  assert sorted(arms) == sorted(config.experiment.arms)
  for arm in ("fedit_u2s", "local_only", "centralized", "raw_text"):
    assert arms[arm]["num_runs"] == 2, arm
  for arm in ("fedit_random", "fedit_fixed"):
    assert list(arms[arm]["runs"]) == ["0"], arm
  # Cloze questions merged into the headline sets.
  scores = json.load(open(claim.scores_path(claim.arm_dir(workdir, "base"))))
  assert set(scores) == {"wiki_known", "wiki_unseen", "heldout_ppl"}
  assert scores["wiki_unseen"]["n"] > config.evaluate.num_wiki_questions
  assert res["tokens"]["raw_vs_u2s"]["within"] is True
  md = open(os.path.join(workdir, "results.md")).read()
  assert "| raw_text |" in md and "| fedit_u2s - raw_text |" in md
