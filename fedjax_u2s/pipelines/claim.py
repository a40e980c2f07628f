"""The FedIT-U2S claim experiment: one set of clients, every arm, several seeds.

The ``claim`` job (``configs/experiments/u2s_claim.py``).
It asks whether federated tuning on U2S pairs with retrieval-selected
demonstrations (``fedit_u2s``) beats

* ``base``: the untuned model;
* ``local_only``: every client tuning alone on its own pairs;
* ``centralized``: all clients' pairs pooled in one place (an upper bound
  that federated learning is not allowed to reach by construction);
* ``fedit_random`` / ``fedit_fixed``: the same federated training on pairs
  generated with random / fixed demonstrations (the selection ablation),

on the same clients, the same held-out questions and a matched compute budget.

Compute per arm (``R`` = ``federated.num_rounds``, ``C`` =
``federated.clients_per_round``, ``L`` = ``train.local_steps``, ``N`` clients;
one step = one optimizer step on ``batch_size * grad_accum`` examples):

========================  ===========================================  ==============
arm                       schedule                                      client steps
========================  ===========================================  ==============
fedit_u2s/random/fixed    R rounds, C sampled clients, L local steps    R * C * L
centralized               R rounds, 1 client (pooled), C * L steps      R * C * L
local_only (per client)   R rounds, 1 client (itself), L local steps    R * L
========================  ===========================================  ==============

The centralized arm takes exactly as many optimizer steps as all federated
clients together, over the same round-wise learning-rate schedule (its
optimizer state restarts every round, as a federated client's does). Each
local-only client gets the sequential depth of the federated model (``R * L``
steps); summed over the ``N`` clients that is ``N / C`` times the federated
total, so local-only gets *at least* the federated compute: a win of
``fedit_u2s`` over it is not a compute artefact. Local-only scores are the
mean over clients of each client's own adapter (the spread over clients is
reported too).

Seeds: ``experiment.seeds`` vary training (adapter init, client sampling,
data order, dropout). Generation runs once per demonstration selection with
``config.seed`` (it is the costly stage), so the spread over seeds does not
include generation randomness. The base model is scored once: it has no
training seed and evaluation is greedy on fixed questions.

Evaluation is identical for every arm: the suites of
:func:`fedjax_u2s.evaluation.suites.from_config` (questions about articles the
clients hold, articles no client holds, arithmetic) built from the retrieval
generation's ``corpus.json``, plus ``heldout_ppl``: response perplexity on
the retrieval generation's held-out pairs (``data.eval_fraction`` of each
client's pairs). No arm trains on a piece whose pair is in that set. Being
retrieval-generated, those pairs are in-distribution for ``fedit_u2s``
(and ``centralized``/``local_only``), not for the ablation arms: read its
perplexity column for those with that in mind.

Workdir layout (each piece resumable; a rerun skips what is done)::

    generation/<selection>/generated/...   U2S pairs (see u2s/stage.py)
    generation/<selection>/stages/generate.json
    arms/base/eval/scores.json
    arms/<arm>/seed_<s>/                    train workdir (checkpoints, metrics)
    arms/<arm>/seed_<s>/eval/scores.json
    arms/local_only/seed_<s>/client_<i>/... one train workdir per client
    jax_cache/                              persistent XLA cache (see
                                            experiment.compilation_cache)
    results.json  results.md  results.png
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from fedjax_u2s.evaluation import report
from fedjax_u2s.evaluation import stats
from fedjax_u2s.evaluation import suites as suites_lib
from fedjax_u2s.models import bert
from fedjax_u2s.pipelines import common
from fedjax_u2s.pipelines import workdir as workdir_lib
from fedjax_u2s.u2s import stage
from fedjax_u2s.u2s import writer

FEDERATED_ARMS = {"fedit_u2s": "retrieval", "fedit_random": "random",
                  "fedit_fixed": "fixed"}
ARMS = ("base", "fedit_u2s", "local_only", "centralized", "fedit_random",
        "fedit_fixed")
SCORES = "scores"
# experiment.seeds and experiment.arms are left out: adding a seed or an arm
# extends a finished experiment instead of invalidating it.
STAGES = (
    common.generation_stage(("generation",)),
    common.train_stage(outputs=("arms/*/seed_*",)),
    common.evaluate_stage(("arms/base", "arms/*/seed_*/eval", "arms/*/seed_*/client_*/eval",
                           "results.json", "results.md", "results.png"),
                          extra=("experiment.heldout_ppl",)),
)


# ----------------------------------------------------------------------------
# Paths.


def generation_dir(workdir: str, selection: str) -> str:
  """``WORKDIR/generation/<selection>``: a u2s workdir holding ``generated/``."""
  return os.path.join(workdir, "generation", selection)


def arm_dir(workdir: str, arm: str, seed: int | None = None,
            client: int | None = None) -> str:
  """The train/eval directory of one arm (and seed, and local client)."""
  parts = [workdir, "arms", arm]
  if seed is not None:
    parts.append(f"seed_{seed}")
  if client is not None:
    parts.append(f"client_{client:04d}")
  return os.path.join(*parts)


def scores_path(directory: str) -> str:
  """Where the scores of the model trained in ``directory`` are cached."""
  return os.path.join(directory, "eval", f"{SCORES}.json")


# ----------------------------------------------------------------------------
# Compute matching.


def arm_schedule(arm: str, federated_cfg, train_cfg, num_clients: int) -> dict:
  """Rounds, clients per round and local steps of one training run of ``arm``.

  Returns:
    ``{rounds, clients_per_round, local_steps, client_steps}`` where
    ``client_steps = rounds * clients_per_round * local_steps`` is the
    number of optimizer steps the run takes over all its clients.
  """
  if not train_cfg.local_steps:
    raise ValueError("The experiment matches compute in optimizer steps: set "
                     "config.train.local_steps > 0 (local_epochs would give "
                     "clients with more data more steps).")
  r, c, l = federated_cfg.num_rounds, federated_cfg.clients_per_round, train_cfg.local_steps
  if arm in FEDERATED_ARMS:
    out = dict(rounds=r, clients_per_round=c, local_steps=l)
  elif arm == "centralized":
    out = dict(rounds=r, clients_per_round=1, local_steps=c * l)
  elif arm == "local_only":
    out = dict(rounds=r, clients_per_round=1, local_steps=l)
  else:
    raise ValueError(f"Arm {arm!r} does not train; trained arms: "
                     f"{sorted([*FEDERATED_ARMS, 'centralized', 'local_only'])}.")
  if c > num_clients:
    raise ValueError(f"config.federated.clients_per_round={c} but the corpus has "
                     f"{num_clients} clients.")
  out["client_steps"] = out["rounds"] * out["clients_per_round"] * out["local_steps"]
  return out


def _arm_config(config: ml_collections.ConfigDict, seed: int, schedule: dict
                ) -> ml_collections.ConfigDict:
  cfg = config.copy_and_resolve_references()
  cfg.seed = seed
  cfg.federated.num_rounds = schedule["rounds"]
  cfg.federated.clients_per_round = schedule["clients_per_round"]
  cfg.train.local_steps = schedule["local_steps"]
  cfg.lock()
  return cfg


# ----------------------------------------------------------------------------
# Aggregation.


def spread(values: Sequence[float]) -> dict:
  """``{mean, std, min, max, n}`` of finite values (std: sample, ddof=1).

  ``std`` is None for a single value (no spread can be estimated); all
  fields but ``n`` are None for no values.
  """
  vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  n = len(vals)
  if not n:
    return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
  arr = np.asarray(vals, np.float64)
  return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if n > 1 else None,
          "min": float(arr.min()), "max": float(arr.max()), "n": n}


def task_metrics(scores: Mapping[str, dict]) -> dict[str, dict[str, float]]:
  """``{task: {metric: value}}`` for the metrics of each task's kind."""
  out = {}
  for task, res in scores.items():
    out[task] = {m: res.get(m) for m in report.METRICS[res["kind"]]
                 if isinstance(res.get(m), (int, float))}
    out[task]["_headline"] = res["headline"]
  return out


def aggregate(runs: Sequence[Mapping[str, Mapping[str, float]]]) -> dict:
  """Per task and metric, :func:`spread` over runs of ``{task: {metric: v}}``."""
  out: dict[str, dict] = {}
  for run in runs:
    for task, metrics in run.items():
      for metric, value in metrics.items():
        if metric.startswith("_"):
          out.setdefault(task, {})[metric] = value
          continue
        out.setdefault(task, {}).setdefault(metric, []).append(value)
  return {task: {m: (v if m.startswith("_") else spread(v)) for m, v in ms.items()}
          for task, ms in out.items()}


def mean_over_clients(client_runs: Sequence[Mapping[str, Mapping[str, float]]]
                      ) -> dict:
  """One run's ``{task: {metric: mean over clients}}``."""
  agg = aggregate(client_runs)
  return {task: {m: (v if m.startswith("_") else v["mean"]) for m, v in ms.items()}
          for task, ms in agg.items()}


# ----------------------------------------------------------------------------
# Data.


def load_generated(workdir: str, selection: str) -> dict:
  """The ``generate`` stage summary of one selection (stats and corpus)."""
  gdir = generation_dir(workdir, selection)
  done = common.stage_done(gdir, "generate")
  if done is None:
    raise FileNotFoundError(
        f"{gdir}/stages/generate.json is missing: the {selection!r} generation "
        "has not finished; rerun the experiment to (re)generate it.")
  return done


def split_pairs(workdir: str, config, selections: Sequence[str]
                ) -> tuple[dict[str, list[list]], list, dict]:
  """Train examples per selection and client, and the common held-out pairs.

  The held-out pairs are ``data.eval_fraction`` of every client's
  retrieval-generated pairs (split with ``config.seed``); the pieces they come
  from are removed from every selection's training data.

  Returns:
    ``(train, heldout, corpus)``: ``train[selection][client]`` is a list of
    examples, ``heldout`` a list of examples, ``corpus`` the retrieval
    generation's ``corpus.json`` content.
  """
  corpus = load_generated(workdir, "retrieval")["corpus"]
  num_clients = len(corpus["clients"])
  ret = stage.load_pairs(generation_dir(workdir, "retrieval"), num_clients)
  heldout, held_pieces, train = [], set(), {}
  for cid, recs in enumerate(ret):
    _, ev = stage.split_eval(recs, config.data.eval_fraction, config.seed, cid)
    heldout.extend(common.record_to_example(r, cid) for r in ev)
    held_pieces |= {r.get("piece_id") for r in ev}
  for sel in selections:
    recs_by_client = ret if sel == "retrieval" else stage.load_pairs(
        generation_dir(workdir, sel), num_clients)
    train[sel] = []
    for cid, recs in enumerate(recs_by_client):
      exs = [common.record_to_example(r, cid) for r in recs if r.get("piece_id") not in held_pieces]
      if not exs:
        raise ValueError(
            f"U2S client {cid} ({corpus['clients'][cid]['name']}) has no training "
            f"pairs from the {sel!r} generation (see "
            f"{generation_dir(workdir, sel)}/generated/stats.json): give it more "
            "text or relax config.u2s.filters.")
      train[sel].append(exs)
  return train, heldout, corpus


# ----------------------------------------------------------------------------
# Stages.


def _selections(arms: Sequence[str]) -> list[str]:
  sels = ["retrieval"]  # Always: it defines the corpus and the held-out pairs.
  for arm in arms:
    sel = FEDERATED_ARMS.get(arm)
    if sel and sel not in sels:
      sels.append(sel)
  return sels


def generate_all(config, workdir: str, model, selections: Sequence[str]) -> None:
  """Runs (or resumes) U2S generation once per demonstration selection.

  Every selection chunks nothing itself: it starts from the retrieval
  generation's ``pieces.jsonl`` and ``corpus.json``, so all selections see
  exactly the same pieces.
  """
  embedder = generator = None
  for sel in selections:
    gdir = generation_dir(workdir, sel)

    def run(sel=sel, gdir=gdir):
      nonlocal embedder, generator
      if sel != "retrieval":
        src, dst = (writer.generated_dir(generation_dir(workdir, "retrieval")),
                    writer.generated_dir(gdir))
        os.makedirs(dst, exist_ok=True)
        for name in (stage.PIECES_FILE, stage.CORPUS_FILE):
          if not os.path.exists(os.path.join(dst, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
      if embedder is None:
        embedder = bert.Embedder.load(config.embedder.name)
        generator = common.load_generator(config, model)
      cfg = config.copy_and_resolve_references()
      cfg.u2s.selection = sel
      print(f"\n== U2S generation, selection={sel} ==")
      return stage.run_generation(cfg, gdir, model=generator, embedder=embedder)

    common.run_stage(gdir, "generate", run)


def _evaluate(config, directory: str, model, suites, lora=None, lcfg=None) -> dict:
  """Scores one model (cached in ``directory/eval/scores.json``)."""
  return common.evaluate_cached(config, model, suites, os.path.dirname(
      scores_path(directory)), SCORES, lora, lcfg)


def _train_and_score(config, directory: str, model, suites, client_examples,
                     heldout, seed: int, schedule: dict) -> dict | None:
  """One training run and its evaluation; skipped when its scores exist."""
  path = scores_path(directory)
  if os.path.exists(path):
    return _evaluate(config, directory, model, suites)
  cfg = _arm_config(config, seed, schedule)
  if common.is_lead():
    workdir_lib.write_config(cfg, directory)
  result, _ = common.tune_and_export(cfg, directory, model, client_examples, heldout)
  if not common.is_lead():
    return None
  writer.atomic_write_json(os.path.join(directory, "compute.json"), {
      **schedule, "rounds_done": result.rounds,
      "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
      "examples": [len(c) for c in client_examples]})
  return _evaluate(config, directory, model, suites, result.lora, result.lora_config)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Generates, trains and scores every arm for every seed; writes results.

  Resumable: generation per selection, training per arm and seed (from its
  checkpoints) and evaluation (its ``scores.json``) are each skipped when done.
  """
  ecfg = config.experiment
  arms = list(ecfg.arms)
  unknown = [a for a in arms if a not in ARMS]
  if unknown or not arms:
    raise ValueError(f"config.experiment.arms has {unknown or 'nothing'}; choose from "
                     f"{list(ARMS)}.")
  seeds = [int(s) for s in ecfg.seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.experiment.seeds={tuple(ecfg.seeds)} must be distinct "
                     "and non-empty.")
  # Every arm and seed builds its own jitted round, but their shapes repeat
  # (three distinct ones), so a persistent cache turns most compiles into lookups.
  cache = (os.path.join(workdir, "jax_cache") if ecfg.compilation_cache
           and not jax.config.jax_compilation_cache_dir else None)
  with common.persistent_compilation_cache(cache):
    _run_arms(config, workdir, arms, seeds)


def _run_arms(config, workdir: str, arms: list[str], seeds: list[int]) -> None:
  """The body of :func:`run`."""
  ecfg = config.experiment
  model = common.load_model(config)
  generate_all(config, workdir, model, _selections(arms))
  train_sets, heldout, corpus = split_pairs(workdir, config, _selections(arms))
  num_clients = len(corpus["clients"])
  held = [t for c in corpus["clients"] for t in c["doc_ids"]]
  suites = suites_lib.from_config(config.evaluate, held, corpus["holdout"])
  if ecfg.heldout_ppl and heldout:
    suites.append(suites_lib.heldout_ppl(
        pairs=[(e.messages[0]["content"], e.messages[1]["content"]) for e in heldout],
        name="heldout_ppl"))
  lead = common.is_lead()

  raw: dict[str, Any] = {}
  if "base" in arms and lead:
    scores = _evaluate(config, arm_dir(workdir, "base"), model, suites)
    raw["base"] = {"runs": {"-": task_metrics(scores)},
                   "questions": stats.question_values(scores)}
  compute = {}
  for arm in arms:
    if arm == "base":
      continue
    schedule = arm_schedule(arm, config.federated, config.train, num_clients)
    compute[arm] = schedule
    runs, clients, questions = {}, {}, []
    if arm in FEDERATED_ARMS:
      sets = train_sets[FEDERATED_ARMS[arm]]
    elif arm == "centralized":  # Every retrieval pair pooled as one client.
      sets = [[e for c in train_sets["retrieval"] for e in c]]
    for seed in seeds:
      print(f"\n== {arm}, seed {seed} ==")
      if arm != "local_only":
        scores = _train_and_score(config, arm_dir(workdir, arm, seed), model, suites,
                                  sets, heldout, seed, schedule)
        if scores is not None:
          runs[str(seed)] = task_metrics(scores)
          questions.append(stats.question_values(scores))
      else:  # local_only: each client alone.
        per_client = []
        for cid, exs in enumerate(train_sets["retrieval"]):
          scores = _train_and_score(config, arm_dir(workdir, arm, seed, cid), model,
                                    suites, [exs], heldout, seed, schedule)
          if scores is not None:
            per_client.append(task_metrics(scores))
            questions.append(stats.question_values(scores))
        if lead:
          clients[str(seed)] = per_client
          runs[str(seed)] = mean_over_clients(per_client)
    raw[arm] = {"runs": runs, "questions": stats.mean_question_values(questions),
                **({"clients": clients} if clients else {})}

  if not lead:
    return
  results = summarize(raw, compute, config=config, corpus=corpus,
                      num_heldout=len(heldout), train_sets=train_sets)
  write_results(workdir, results)


def write_results(workdir: str, results: dict) -> tuple[str, str, str | None]:
  """Writes ``results.json``, ``results.md`` and ``results.png``."""
  json_path = os.path.join(workdir, "results.json")
  writer.atomic_write_json(json_path, results)
  md_path, png = report.write_claim_results(workdir, results)
  return json_path, md_path, png


# ----------------------------------------------------------------------------
# Results.


def summarize(raw: Mapping[str, dict], compute: Mapping[str, dict], *, config=None,
              corpus: dict | None = None, num_heldout: int = 0,
              train_sets: Mapping[str, list] | None = None) -> dict:
  """``results.json`` content: per arm its runs and their spread per metric.

  Args:
    raw: ``{arm: {"runs": {seed: {task: {metric: v}}}, "clients": {seed:
      [per-client {task: {metric: v}}]}, "questions": {task: {"kind",
      "values"}}}}`` (``clients`` for local_only only, where each run is
      already the mean over clients; ``questions``: per-question values
      averaged over the arm's runs, :func:`stats.mean_question_values`).
    compute: ``{arm: arm_schedule(...)}``.
  """
  arms = {}
  paired = paired_comparisons(
      {arm: r["questions"] for arm, r in raw.items() if r.get("questions")})
  for arm, r in raw.items():
    entry = {"runs": r["runs"], "summary": aggregate(list(r["runs"].values())),
             "num_runs": len(r["runs"])}
    if "clients" in r:
      entry["clients"] = r["clients"]
      entry["client_spread"] = aggregate(
          [c for per in r["clients"].values() for c in per])
      entry["num_clients"] = max((len(v) for v in r["clients"].values()), default=0)
    if arm in compute:
      entry["compute"] = dict(compute[arm])
    arms[arm] = entry
  out = {"arms": arms}
  if paired:
    out["paired"] = paired
  if config is not None:
    out["setup"] = {
        "model": config.model.name, "seeds": list(config.experiment.seeds),
        "generation_seed": config.seed, "algorithm": config.federated.algorithm,
        "num_clients": len(corpus["clients"]) if corpus else None,
        "clients": [c["name"] for c in corpus["clients"]] if corpus else None,
        "num_heldout_pairs": num_heldout,
        "train_pairs": {sel: [len(c) for c in sets]
                        for sel, sets in (train_sets or {}).items()},
        "batch_size": config.train.batch_size, "grad_accum": config.train.grad_accum}
  return out


def comparison_pairs(arms: Sequence[str]) -> list[tuple[str, str]]:
  """Which arms are compared question by question: ``(a, b)`` reads a - b.

  fedit_u2s against every other arm (the claim), then every other trained arm
  against base (does any tuning help at all).
  """
  pairs = [("fedit_u2s", b) for b in arms if b != "fedit_u2s"] if "fedit_u2s" in arms else []
  if "base" in arms:
    pairs += [(a, "base") for a in arms if a not in ("base", "fedit_u2s")]
  return pairs


def paired_comparisons(questions: Mapping[str, Mapping[str, dict]]) -> dict:
  """``{"a - b": {task: stats.paired_bootstrap(a, b)}}`` for :func:`comparison_pairs`.

  All judged comparisons form one family for the Holm adjustment
  (:func:`stats.adjust_family`).
  """
  out = {}
  for a, b in comparison_pairs(list(questions)):
    tasks = [t for t in questions[a] if t in questions[b]]
    out[f"{a} - {b}"] = {t: stats.paired_bootstrap(questions[a][t], questions[b][t])
                         for t in tasks}
  stats.adjust_family([r for by_task in out.values() for r in by_task.values()])
  return out
