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
ABLATION_SEEDS = (1,)  # fedit_random / fedit_fixed: one seed (not the first).
PAIRS_PER_CLIENT = 8
EVAL_FRACTION = 0.25  # 2 of 8 pairs per client held out.
TRAINED = ("fedit_u2s", "local_only", "centralized", "raw_text", "fedit_random",
           "fedit_fixed")


def seeds_of(arm):
  return ABLATION_SEEDS if arm in claim.ABLATION_ARMS else SEEDS


def _config(model, **overrides):
  settings = {"model.name": model, "corpus.topics": ("medicine",),
              "experiment.seeds": SEEDS, "experiment.ablation_seeds": ABLATION_SEEDS,
              "federated.num_rounds": 2,
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


def piece_text(cid, pid, title):
  """A client's piece: the raw_text arm trains on exactly this text."""
  return (f"{title} ({pid}) is described in this paragraph of client {cid}, "
          f"which was written in {1900 + cid} and revised {len(pid)} times.")


def write_generated(workdir, selection, titles, holdout, num_clients=2,
                    pairs=PAIRS_PER_CLIENT):
  """Kept pairs + corpus.json + stats.json + the stage marker of one selection."""
  gdir = claim.generation_dir(workdir, selection)
  out = writer_lib.generated_dir(gdir)
  corpus = {"clients": [], "holdout": list(holdout)}
  pieces = []
  for cid in range(num_clients):
    w = writer_lib.ClientWriter(out, cid)
    kept = [{"piece_id": f"c{cid}-p{i}", "client_id": cid,
             "instruction": f"[{selection}] Client {cid} question {i}: what is "
                            f"{titles[cid]}?",
             "response": f"{titles[cid]} is topic {i} of client {cid}.",
             "demo_ids": [0, 1, 2]} for i in range(pairs)]
    w.append(kept, [{"piece_id": f"c{cid}-r0", "client_id": cid, "reason": "format"}])
    pieces += [{"piece_id": pid, "client_id": cid, "doc_id": titles[cid],
                "text": piece_text(cid, pid, titles[cid]), "start": 0, "end": 0,
                "meta": {}} for pid in [r["piece_id"] for r in kept] + [f"c{cid}-r0"]]
    writer_lib.update_stats(out, cid, w.counts())
    corpus["clients"].append({"client_id": cid, "name": f"medicine_{cid}",
                              "documents": 1, "pieces": pairs + 1,
                              "doc_ids": [titles[cid]], "chunking": {}})
  writer_lib.atomic_write_json(os.path.join(out, "corpus.json"), corpus)
  with open(os.path.join(out, "pieces.jsonl"), "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in pieces)
  stats = writer_lib.rebuild_stats(out)
  common.mark_done(gdir, "generate", {"stats": stats, "corpus": corpus})


def generated_workdir(workdir: str) -> None:
  """Every selection's generation stage done in ``workdir``: two medicine
  articles held by clients, ten held out (skips without the wiki package)."""
  from fedjax_u2s.data import wiki  # pylint: disable=g-import-not-at-top
  try:
    wiki.resolve_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  arts = [a for a in wiki.load_articles() if a.topic == wiki.topic_name("medicine")
          and a.description.strip()]
  titles = [arts[0].title, arts[1].title]
  holdout = [a.title for a in arts[2:12]]
  for sel in ("retrieval", "random", "fixed"):
    write_generated(workdir, sel, titles, holdout)


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm2_path):
  """One full experiment run and a second identical one (resume)."""
  del smollm2_path  # The tiny model needs the real tokenizer.
  workdir = str(tmp_path_factory.mktemp("claim"))
  generated_workdir(workdir)
  model = testing.write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny")))
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
    seeds = seeds_of(arm)
    assert sorted(arms[arm]["runs"]) == [str(s) for s in seeds], arm
    assert arms[arm]["num_runs"] == len(seeds)
    for seed in seeds:
      assert set(arms[arm]["runs"][str(seed)]) == tasks, (arm, seed)
      if arm != "local_only":
        assert os.path.exists(claim.scores_path(
            claim.arm_dir(wd, arm, seed))), (arm, seed)
    # Spread over seeds: n, mean, std, min, max of the headline metric.
    s = arms[arm]["summary"]["wiki_known"]["acc_norm"]
    vals = [arms[arm]["runs"][str(x)]["wiki_known"]["acc_norm"] for x in seeds]
    assert s["n"] == len(seeds) and s["mean"] == pytest.approx(np.mean(vals))
    assert s["std"] == (pytest.approx(np.std(vals, ddof=1)) if len(seeds) > 1 else None)
    assert (s["min"], s["max"]) == (min(vals), max(vals))
  # The ablation ran its one seed only.
  assert not os.path.exists(claim.arm_dir(wd, "fedit_fixed", 0))
  # The same questions for every arm.
  n = {arm: _scores(claim.arm_dir(wd, arm, seeds_of(arm)[0]))["wiki_known"]["n"]
       for arm in ("fedit_u2s", "centralized", "raw_text", "fedit_fixed")}
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
  for arm in ("fedit_u2s", "raw_text", "fedit_random", "fedit_fixed"):
    for seed in seeds_of(arm):
      assert steps_taken(claim.arm_dir(wd, arm, seed)) == fed_total
  for seed in SEEDS:
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
  assert arms["raw_text"]["compute"]["client_steps"] == fed_total
  assert arms["local_only"]["compute"]["client_steps"] == r * l


def test_heldout_pieces_are_never_trained_on(run):
  setup = run["results"]["setup"]
  assert setup["train_pairs"] == {"retrieval": [6, 6], "random": [6, 6],
                                  "fixed": [6, 6]}
  assert setup["num_heldout_pairs"] == 4
  assert setup["seeds"] == list(SEEDS)
  assert setup["ablation_seeds"] == list(ABLATION_SEEDS)
  # raw_text: every piece but the held-out pairs' (2 a client), the rejected
  # one included.
  raw = run["results"]["raw_text"]
  assert raw["excluded_pieces"] == 4
  assert [c["pieces"] for c in raw["clients"]] == [7, 7]


def test_raw_text_matches_u2s_loss_tokens_per_step(run):
  """Measured from each run's metrics: loss tokens / client steps."""
  wd, cfg, res = run["workdir"], run["config"], run["results"]
  k = cfg.train.batch_size * cfg.train.grad_accum

  def per_step(arm):
    tokens = steps = 0
    for seed in seeds_of(arm):
      d = claim.arm_dir(wd, arm, seed)
      rows = metrics_lib.read_jsonl(os.path.join(d, "metrics.jsonl"))
      tokens += sum(r["num_tokens"] for r in rows if "clients" in r)
      steps += sum(len(r["clients"]) * cfg.train.local_steps for r in rows if "clients" in r)
    return tokens / steps

  u2s, raw = per_step("fedit_u2s"), per_step("raw_text")
  assert abs(raw / u2s - 1) <= claim.TOKEN_TOLERANCE, (raw, u2s)
  tok = res["tokens"]
  assert tok["arms"]["fedit_u2s"]["loss_tokens_per_step"]["mean"] == pytest.approx(u2s)
  assert tok["arms"]["raw_text"]["loss_tokens_per_step"]["mean"] == pytest.approx(raw)
  assert tok["raw_vs_u2s"]["ratio"] == pytest.approx(raw / u2s)
  assert tok["raw_vs_u2s"]["within"] is True
  # Every raw step is k full windows of the planned targets each.
  for c in res["raw_text"]["clients"]:
    assert c["windows"] >= k
    assert c["targets_per_window"] == round(c["u2s_loss_tokens_per_row"])
  planned = np.mean([c["targets_per_window"] * k for c in res["raw_text"]["clients"]])
  assert raw == pytest.approx(planned)
  # The windows are trained on as cut: no chat template around them.
  stats = json.load(open(os.path.join(claim.arm_dir(wd, "raw_text", 0), "data_stats.json")))
  assert [x["num_response_tokens"] for x in stats["clients"]] == [
      c["loss_tokens"] for c in res["raw_text"]["clients"]]


def test_raw_text_windows_cover_every_token(smollm2_path):
  """Loss on every token with a prefix, exactly once but for the last window."""
  del smollm2_path
  from fedjax_u2s import tokenizer as tokenizer_lib
  from fedjax_u2s.models import registry
  tok = tokenizer_lib.Tokenizer.from_gguf(registry.resolve("smollm2-135m-instruct"))
  texts = ["Aloe is a genus of over 500 species of flowering succulent plants.",
           "The most widely known species is Aloe vera, or true aloe."]
  ids = tok.encode("\n\n".join(texts), add_bos=False)
  for targets in (1, 5, 7, len(ids) - 1, len(ids) + 3):
    ts, info = claim.raw_text_set(texts, tok, targets, max_length=64)
    assert info["stream_tokens"] == len(ids)
    covered = []
    for row, (a, b) in enumerate(claim.raw_windows(len(ids), targets)):
      assert list(ts.tokens[row, :b - a]) == ids[a:b]  # Plain text, no template.
      assert ts.input_mask[row].sum() == b - a
      # Every real token but the row's first (its context) is a target.
      assert list(np.flatnonzero(ts.loss_mask[row])) == list(range(1, b - a))
      assert not ts.loss_mask[row, b - a:].any()
      covered += range(a + 1, b)
      if b - a == targets + 1:
        assert ts.loss_mask[row, 1:].sum() == targets
    assert set(covered) == set(range(1, len(ids)))
    assert len(covered) - (len(ids) - 1) == info["repeated_targets"] < max(targets, 1)
    assert ts.num_response_tokens == len(covered) == info["loss_tokens"]
    assert tok.bos_id not in ts.tokens[ts.input_mask]
  with pytest.raises(ValueError, match="max_length=8"):
    claim.raw_text_set(texts, tok, 8, max_length=8)


def test_raw_targets_match_a_u2s_step():
  """Targets per window = U2S loss tokens per row x min(n, k) / k."""
  from fedjax_u2s.data import instructions

  def fake_set(loss_per_row):
    n, t = len(loss_per_row), 16
    loss = np.zeros((n, t), bool)
    for i, m in enumerate(loss_per_row):
      loss[i, 3:3 + m] = True
    return instructions.TokenizedSet(np.zeros((n, t), np.int32), loss.copy(), loss, 0,
                                     np.arange(n))
  sets = [fake_set([4, 6, 8, 10]), fake_set([9, 9]), fake_set([3])]
  # k=4: client 0 mean 7, full steps; client 1 mean 9 over 2 of 4 rows -> 4.5
  # rounds to 4 (banker's) ; client 2: 3 x 1/4 = 0.75 -> 1.
  assert claim.raw_targets_per_row(sets, 4) == [7, 4, 1]
  assert claim.raw_targets_per_row(sets, 1) == [7, 9, 3]
  assert claim.raw_windows(10, 3) == [(0, 4), (3, 7), (6, 10)]
  assert claim.raw_windows(5, 3) == [(0, 4), (1, 5)]
  assert claim.raw_windows(4, 3) == [(0, 4)] and claim.raw_windows(1, 3) == []


def test_results_files(run):
  wd = run["workdir"]
  md = open(os.path.join(wd, "results.md")).read()
  for arm in claim.ARMS:
    assert f"| {arm} |" in md
  assert "wiki_known acc_norm ↑" in md and "heldout_ppl perplexity ↓" in md
  assert " ± " in md
  assert "## Loss tokens per client step (measured)" in md
  assert "raw_text / fedit_u2s: " in md and "within the +/-10% tolerance" in md
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
