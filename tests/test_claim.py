"""The claim experiment: every arm and seed, matched compute, aggregation, resume.

Generation is not run: the workdir is pre-populated with generated pairs for
each demonstration selection, laid out exactly as ``stage.run_generation``
and the pipeline's stage marker leave them. A tiny random Llama with
SmolLM2's real tokenizer stands in for the 135M model.
"""

import json
import os
import time

import numpy as np
import pytest

from fedjax_u2s.evaluation import report
from fedjax_u2s.pipelines import claim
from fedjax_u2s.pipelines import common
from fedjax_u2s import metrics as metrics_lib
from fedjax_u2s import pipelines
from fedjax_u2s import testing
from fedjax_u2s.u2s import writer as writer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "experiments", "u2s_claim.py")
SEEDS = (0, 1)
PAIRS_PER_CLIENT = 8
EVAL_FRACTION = 0.25  # 2 of 8 pairs per client held out.
TRAINED = ("fedit_u2s", "local_only", "centralized", "fedit_random", "fedit_fixed")


def _config(model, **overrides):
  settings = {"model.name": model, "corpus.topics": ("medicine",),
              "experiment.seeds": SEEDS, "federated.num_rounds": 2,
              "federated.clients_per_round": 2, "train.local_steps": 1,
              "train.batch_size": 2, "train.max_length": 96,
              "data.eval_fraction": EVAL_FRACTION,
              "evaluate.num_wiki_questions": 2, "evaluate.batch_size": 8,
              # No math: its sampler compiles cost more than the rest of the
              # evaluation (the math suite runs in test_u2s_pipeline.py).
              "evaluate.num_math_questions": 0,
              "lora.rank": 2, "lora.alpha": 4.0, "checkpoint.every": 100,
              # Less to compile: no remat, full logits, no eval loss in training.
              "model.remat": False, "train.logits_chunk_size": 0, "train_eval.every": 0,
              **overrides}
  return testing.load_config(CONFIG, "smoke", **settings)


def write_generated(workdir, selection, titles, holdout, num_clients=2,
                    pairs=PAIRS_PER_CLIENT):
  """Kept pairs + corpus.json + stats.json + the stage marker of one selection."""
  gdir = claim.generation_dir(workdir, selection)
  out = writer_lib.generated_dir(gdir)
  corpus = {"clients": [], "holdout": list(holdout)}
  for cid in range(num_clients):
    w = writer_lib.ClientWriter(out, cid)
    kept = [{"piece_id": f"c{cid}-p{i}", "client_id": cid,
             "instruction": f"[{selection}] Client {cid} question {i}: what is "
                            f"{titles[cid]}?",
             "response": f"{titles[cid]} is topic {i} of client {cid}.",
             "demo_ids": [0, 1, 2]} for i in range(pairs)]
    w.append(kept, [{"piece_id": f"c{cid}-r0", "client_id": cid, "reason": "format"}])
    writer_lib.update_stats(out, cid, w.counts())
    corpus["clients"].append({"client_id": cid, "name": f"medicine_{cid}",
                              "documents": 1, "pieces": pairs + 1,
                              "doc_ids": [titles[cid]], "chunking": {}})
  writer_lib.atomic_write_json(os.path.join(out, "corpus.json"), corpus)
  stats = writer_lib.rebuild_stats(out)
  common.mark_done(gdir, "generate", {"stats": stats, "corpus": corpus})


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm2_path):
  """One full experiment run and a second identical one (resume)."""
  del smollm2_path  # The tiny model needs the real tokenizer.
  from fedjax_u2s.data import wiki
  try:
    wiki.resolve_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  arts = [a for a in wiki.load_articles() if a.topic == wiki.topic_name("medicine")
          and a.description.strip()]
  titles = [arts[0].title, arts[1].title]
  holdout = [a.title for a in arts[2:12]]
  model = testing.write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny")))
  workdir = str(tmp_path_factory.mktemp("claim"))
  for sel in ("retrieval", "random", "fixed"):
    write_generated(workdir, sel, titles, holdout)
  config = _config(model)
  start = time.time()
  pipelines.run(config, workdir)
  first = time.time() - start
  watched = [claim.scores_path(claim.arm_dir(workdir, "base")),
             claim.scores_path(claim.arm_dir(workdir, "fedit_u2s", 0)),
             claim.scores_path(claim.arm_dir(workdir, "local_only", 1, 1))]
  mtimes = {p: os.path.getmtime(p) for p in watched}
  results = json.load(open(os.path.join(workdir, "results.json")))
  start = time.time()
  pipelines.run(config, workdir)
  second = time.time() - start
  return dict(workdir=workdir, config=config, results=results, mtimes=mtimes,
              first=first, second=second)


def _scores(directory):
  return json.load(open(claim.scores_path(directory)))


def test_every_arm_has_results_for_every_seed(run):
  wd, arms = run["workdir"], run["results"]["arms"]
  assert sorted(arms) == sorted(claim.ARMS)
  tasks = {"wiki_known", "wiki_unseen", "heldout_ppl"}
  for arm in TRAINED:
    assert sorted(arms[arm]["runs"]) == [str(s) for s in SEEDS], arm
    assert arms[arm]["num_runs"] == len(SEEDS)
    for seed in SEEDS:
      assert set(arms[arm]["runs"][str(seed)]) == tasks, (arm, seed)
      if arm != "local_only":
        assert os.path.exists(claim.scores_path(
            claim.arm_dir(wd, arm, seed))), (arm, seed)
    # Spread over seeds: n, mean, std, min, max of the headline metric.
    s = arms[arm]["summary"]["wiki_known"]["acc_norm"]
    vals = [arms[arm]["runs"][str(x)]["wiki_known"]["acc_norm"] for x in SEEDS]
    assert s["n"] == 2 and s["mean"] == pytest.approx(np.mean(vals))
    assert s["std"] == pytest.approx(np.std(vals, ddof=1))
    assert (s["min"], s["max"]) == (min(vals), max(vals))
  # The same questions for every arm.
  n = {arm: _scores(claim.arm_dir(wd, arm, 0))["wiki_known"]["n"]
       for arm in ("fedit_u2s", "centralized", "fedit_fixed")}
  assert set(n.values()) == {2}
  ppl = _scores(claim.arm_dir(wd, "fedit_random", 1))["heldout_ppl"]
  assert ppl["n"] == 2 * round(EVAL_FRACTION * PAIRS_PER_CLIENT)


def test_base_is_scored_once(run):
  wd, base = run["workdir"], run["results"]["arms"]["base"]
  assert base["num_runs"] == 1 and list(base["runs"]) == ["-"]
  assert sorted(os.listdir(claim.arm_dir(wd, "base"))) == ["eval"]
  assert base["summary"]["wiki_known"]["acc_norm"]["std"] is None
  assert "compute" not in base


def test_local_only_averages_over_clients(run):
  wd, local = run["workdir"], run["results"]["arms"]["local_only"]
  assert local["num_clients"] == 2
  for seed in SEEDS:
    per_client = [_scores(claim.arm_dir(wd, "local_only", seed, c))
                  for c in range(2)]
    for task, metric in (("wiki_unseen", "acc_norm"), ("heldout_ppl", "perplexity")):
      want = np.mean([p[task][metric] for p in per_client])
      assert local["runs"][str(seed)][task][metric] == pytest.approx(want)
    # Each client trained alone on its own pairs only.
    for c in range(2):
      stats = json.load(open(os.path.join(
          claim.arm_dir(wd, "local_only", seed, c), "data_stats.json")))
      assert [x["examples"] for x in stats["clients"]] == [6]
  spread = local["client_spread"]["wiki_unseen"]["acc_norm"]
  assert spread["n"] == 2 * len(SEEDS)


def test_compute_is_matched(run):
  wd, cfg = run["workdir"], run["config"]
  arms = run["results"]["arms"]
  r, c, l = cfg.federated.num_rounds, cfg.federated.clients_per_round, cfg.train.local_steps

  def steps_taken(directory):
    """Optimizer steps of a run, read back from its metrics and config."""
    rows = metrics_lib.read_jsonl(os.path.join(directory, "metrics.jsonl"))
    local = json.load(open(os.path.join(directory, "config.json")))["train"]["local_steps"]
    return sum(len(row["clients"]) * local for row in rows if "clients" in row)

  fed_total = r * c * l
  for seed in SEEDS:
    for arm in ("fedit_u2s", "fedit_random", "fedit_fixed"):
      assert steps_taken(claim.arm_dir(wd, arm, seed)) == fed_total
    central = claim.arm_dir(wd, "centralized", seed)
    assert steps_taken(central) == fed_total
    ccfg = json.load(open(os.path.join(central, "config.json")))
    assert ccfg["federated"]["clients_per_round"] == 1
    assert ccfg["federated"]["num_rounds"] == r
    stats = json.load(open(os.path.join(central, "data_stats.json")))
    assert [x["examples"] for x in stats["clients"]] == [12]  # Pooled: 2 x 6.
    for client in range(2):
      assert steps_taken(claim.arm_dir(wd, "local_only", seed, client)) == r * l
  assert arms["centralized"]["compute"]["client_steps"] == fed_total
  assert arms["fedit_u2s"]["compute"]["client_steps"] == fed_total
  assert arms["local_only"]["compute"]["client_steps"] == r * l


def test_heldout_pieces_are_never_trained_on(run):
  setup = run["results"]["setup"]
  assert setup["train_pairs"] == {"retrieval": [6, 6], "random": [6, 6],
                                  "fixed": [6, 6]}
  assert setup["num_heldout_pairs"] == 4
  assert setup["seeds"] == list(SEEDS)


def test_results_files(run):
  wd = run["workdir"]
  md = open(os.path.join(wd, "results.md")).read()
  for arm in claim.ARMS:
    assert f"| {arm} |" in md
  assert "wiki_known acc_norm ↑" in md and "heldout_ppl perplexity ↓" in md
  assert " ± " in md
  # Two questions per suite here: reported, but too few to judge.
  assert "fedit_u2s against base: too few questions to judge (n=2 < 10)" in md
  with open(os.path.join(wd, "results.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_arms(run):
  assert all(os.path.getmtime(p) == t for p, t in run["mtimes"].items())
  again = json.load(open(os.path.join(run["workdir"], "results.json")))
  assert again == run["results"]
  assert run["second"] < run["first"] / 2, (run["first"], run["second"])


def test_spread_and_aggregate_by_hand():
  s = claim.spread([0.5, 0.7, 0.9])
  assert s["n"] == 3 and s["mean"] == pytest.approx(0.7)
  assert s["std"] == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / 2).
  assert (s["min"], s["max"]) == (0.5, 0.9)
  assert claim.spread([2.0]) == {"mean": 2.0, "std": None, "min": 2.0,
                                       "max": 2.0, "n": 1}
  assert claim.spread([float("nan")])["n"] == 0
  runs = [{"t": {"acc": 1.0, "_headline": "acc"}}, {"t": {"acc": 0.0, "_headline": "acc"}},
          {"t": {"acc": 0.5, "_headline": "acc"}}]
  agg = claim.aggregate(runs)
  assert agg["t"]["_headline"] == "acc"
  assert agg["t"]["acc"]["mean"] == pytest.approx(0.5)
  assert agg["t"]["acc"]["std"] == pytest.approx(0.5)
  assert claim.mean_over_clients(runs) == {"t": {"acc": pytest.approx(0.5),
                                                       "_headline": "acc"}}
  results = claim.summarize(
      {"base": {"runs": {"-": {"t": {"acc": 0.25, "_headline": "acc"}}}},
       "fedit_u2s": {"runs": {"0": runs[0], "1": runs[2]}}},
      {"fedit_u2s": {"client_steps": 8}})
  table = report.arms_table(results)
  assert "| base | 1 | 0 | 0.250 |" in table
  assert "| fedit_u2s | 2 | 8 | 0.750 ± 0.354 |" in table
  assert report.findings(results) == [
      "- t (acc): fedit_u2s is better than base (mean +0.500)."]


def test_arm_schedule_and_bad_inputs():
  import ml_collections
  fed = ml_collections.ConfigDict({"num_rounds": 5, "clients_per_round": 3})
  tr = ml_collections.ConfigDict({"local_steps": 2})
  assert claim.arm_schedule("centralized", fed, tr, 4) == dict(
      rounds=5, clients_per_round=1, local_steps=6, client_steps=30)
  assert claim.arm_schedule("fedit_fixed", fed, tr, 4)["client_steps"] == 30
  assert claim.arm_schedule("local_only", fed, tr, 4)["client_steps"] == 10
  with pytest.raises(ValueError, match="only 2 clients|corpus has 2 clients"):
    claim.arm_schedule("fedit_u2s", fed, tr, 2)
  with pytest.raises(ValueError, match="local_steps > 0"):
    claim.arm_schedule("fedit_u2s", fed, ml_collections.ConfigDict(
        {"local_steps": 0}), 4)
  with pytest.raises(ValueError, match="does not train"):
    claim.arm_schedule("base", fed, tr, 4)


def test_generate_all_runs_each_selection_once_on_the_same_pieces(tmp_path, monkeypatch):
  """Generation itself is faked; checked: selection per call, shared pieces, skip."""
  import ml_collections
  from fedjax_u2s.models import bert
  from fedjax_u2s.u2s import stage

  calls, loads = [], []

  def fake_run_generation(config, workdir, *, model, embedder):
    del model, embedder
    out = writer_lib.generated_dir(workdir)
    if config.u2s.selection == "retrieval":  # Chunking happens here only.
      os.makedirs(out, exist_ok=True)
      open(os.path.join(out, stage.PIECES_FILE), "w").write('{"piece_id": "p0"}\n')
      writer_lib.atomic_write_json(os.path.join(out, stage.CORPUS_FILE), {"clients": []})
    calls.append((config.u2s.selection, workdir,
                  open(os.path.join(out, stage.PIECES_FILE)).read()))
    return {"stats": {}, "corpus": {"clients": [], "holdout": []}}

  monkeypatch.setattr(stage, "run_generation", fake_run_generation)
  monkeypatch.setattr(bert.Embedder, "load", lambda name: loads.append(name) or object())
  config = ml_collections.ConfigDict({
      "u2s": {"selection": "retrieval"}, "embedder": {"name": "minilm"},
      "generator": {"name": ""}})
  wd = str(tmp_path)
  claim.generate_all(config, wd, None, ["retrieval", "random", "fixed"])
  assert [c[0] for c in calls] == ["retrieval", "random", "fixed"]
  assert [c[1] for c in calls] == [claim.generation_dir(wd, s)
                                   for s in ("retrieval", "random", "fixed")]
  assert {c[2] for c in calls} == {'{"piece_id": "p0"}\n'}  # The same pieces.
  assert loads == ["minilm"] and config.u2s.selection == "retrieval"
  for sel in ("retrieval", "random", "fixed"):
    assert claim.load_generated(wd, sel)["corpus"]["holdout"] == []
  claim.generate_all(config, wd, None, ["retrieval", "random", "fixed"])
  assert len(calls) == 3 and loads == ["minilm"]  # All done: nothing rerun.
  with pytest.raises(FileNotFoundError, match="generation/nothing/stages"):
    claim.load_generated(wd, "nothing")


def test_paired_differences_cover_every_comparison(run):
  paired = run["results"]["paired"]
  expected = ([f"fedit_u2s - {a}" for a in claim.ARMS if a != "fedit_u2s"]
              + [f"{a} - base" for a in TRAINED if a != "fedit_u2s"])
  assert sorted(paired) == sorted(expected)
  base = _scores(claim.arm_dir(run["workdir"], "base"))
  for by_task in paired.values():
    for task, res in by_task.items():
      assert res["n"] == base[task]["n"], task  # Every question is paired.
      assert res["ci_low"] <= res["diff"] <= res["ci_high"] or res["n"] == 0
  md = open(os.path.join(run["workdir"], "results.md")).read()
  assert "## Paired differences on the same questions" in md
  assert "| fedit_u2s - base | " in md
