"""The FedIT-U2S claim experiment: one set of clients, every arm, several seeds.

Registered as the ``experiment`` pipeline (``configs/experiments/u2s_claim.py``).
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
:func:`fedjax_u2s.pipeline.evaluation_suites` (questions about articles the
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

import contextlib
import json
import math
import os
import shutil
from typing import Any, Mapping, Sequence

from absl import logging
import ml_collections
import numpy as np

from fedjax_u2s import pipeline
from fedjax_u2s.evaluation import stats

FEDERATED_ARMS = {"fedit_u2s": "retrieval", "fedit_random": "random",
                  "fedit_fixed": "fixed"}
ARMS = ("base", "fedit_u2s", "local_only", "centralized", "fedit_random",
        "fedit_fixed")
HEADLINE_TASKS = ("wiki_known", "wiki_unseen", "math_arithmetic", "heldout_ppl")
SCORES = "scores"


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
  from fedjax_u2s.evaluation import runner
  out = {}
  for task, res in scores.items():
    out[task] = {m: res.get(m) for m in runner.METRICS[res["kind"]]
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


def _example(record: dict, cid: int):
  from fedjax_u2s.data import instructions
  return instructions.Example(
      messages=({"role": "user", "content": record["instruction"]},
                {"role": "assistant", "content": record["response"]}),
      meta={"client": cid, "piece_id": record.get("piece_id")})


def load_generated(workdir: str, selection: str) -> dict:
  """The ``generate`` stage summary of one selection (stats and corpus)."""
  gdir = generation_dir(workdir, selection)
  done = pipeline._stage_done(gdir, "generate")  # pylint: disable=protected-access
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
  from fedjax_u2s.u2s import stage
  corpus = load_generated(workdir, "retrieval")["corpus"]
  num_clients = len(corpus["clients"])
  ret = stage.load_pairs(generation_dir(workdir, "retrieval"), num_clients)
  heldout, held_pieces, train = [], set(), {}
  for cid, recs in enumerate(ret):
    _, ev = stage.split_eval(recs, config.data.eval_fraction, config.seed, cid)
    heldout.extend(_example(r, cid) for r in ev)
    held_pieces |= {r.get("piece_id") for r in ev}
  for sel in selections:
    recs_by_client = ret if sel == "retrieval" else stage.load_pairs(
        generation_dir(workdir, sel), num_clients)
    train[sel] = []
    for cid, recs in enumerate(recs_by_client):
      exs = [_example(r, cid) for r in recs if r.get("piece_id") not in held_pieces]
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
  import jax
  from fedjax_u2s.u2s import stage
  from fedjax_u2s.u2s import writer

  embedder = None
  for sel in selections:
    gdir = generation_dir(workdir, sel)
    if pipeline._stage_done(gdir, "generate") is not None:  # pylint: disable=protected-access
      continue
    if jax.process_index() == 0:
      if sel != "retrieval":
        src, dst = (writer.generated_dir(generation_dir(workdir, "retrieval")),
                    writer.generated_dir(gdir))
        os.makedirs(dst, exist_ok=True)
        for name in (stage.PIECES_FILE, stage.CORPUS_FILE):
          if not os.path.exists(os.path.join(dst, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
      if embedder is None:
        from fedjax_u2s.models import bert
        embedder = bert.Embedder.load(config.embedder.name)
      cfg = config.copy_and_resolve_references()
      cfg.u2s.selection = sel
      print(f"\n== U2S generation, selection={sel} ==")
      gen = stage.run_generation(cfg, gdir, model=model, embedder=embedder)
      pipeline._mark_done(gdir, "generate", gen)  # pylint: disable=protected-access
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"experiment_generate_{sel}")


def _evaluate(config, directory: str, model, suites, lora=None, lcfg=None) -> dict:
  """Scores one model (cached in ``directory/eval/scores.json``)."""
  from fedjax_u2s.evaluation import runner
  path = scores_path(directory)
  if not os.path.exists(path):
    res = runner.evaluate(model.config, model.params, model.tokenizer, suites,
                          lora=lora, lora_config=lcfg,
                          batch_size=config.evaluate.batch_size, seed=config.seed,
                          unroll_layers=config.evaluate.unroll_layers)
    runner.write_results(res, os.path.dirname(path), SCORES)
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _train_and_score(config, directory: str, model, suites, client_examples,
                     heldout, seed: int, schedule: dict) -> dict | None:
  """One training run and its evaluation; skipped when its scores exist."""
  import jax
  path = scores_path(directory)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  os.makedirs(directory, exist_ok=True)
  cfg = _arm_config(config, seed, schedule)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  result, _ = pipeline.tune_and_export(cfg, directory, model, client_examples, heldout)
  if jax.process_index() != 0:
    return None
  with open(os.path.join(directory, "compute.json"), "w", encoding="utf-8") as f:
    json.dump({**schedule, "rounds_done": result.rounds,
               "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
               "examples": [len(c) for c in client_examples]}, f, indent=2)
  return _evaluate(config, directory, model, suites, result.lora, result.lora_config)


@pipeline.register("experiment")
def experiment(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Generates, trains and scores every arm for every seed; writes results.

  Resumable: generation per selection, training per arm and seed (from its
  checkpoints) and evaluation (its ``scores.json``) are each skipped when done.
  """
  import jax
  from fedjax_u2s import train

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

  train.maybe_initialize_distributed(config.multihost)
  cache = (os.path.join(workdir, "jax_cache") if ecfg.compilation_cache
           and not jax.config.jax_compilation_cache_dir else None)
  with persistent_compilation_cache(cache):
    _run_arms(config, workdir, arms, seeds)


@contextlib.contextmanager
def persistent_compilation_cache(path: str | None):
  """JAX's persistent compilation cache in ``path`` for the block (None: as is).

  Every arm and seed builds its own jitted round; their shapes repeat (three
  distinct ones), so the cache turns most compiles into lookups (on the tiny
  test model a repeated training run drops from ~16 s to ~4.5 s). The
  previous settings are restored afterwards.
  """
  if path is None:
    yield
    return
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  for n, v in zip(names, (path, 0.0, -1)):
    jax.config.update(n, v)
  cc.reset_cache()  # Re-initialized from the new settings at the next compile.
  try:
    yield
  finally:
    for n, v in old.items():
      jax.config.update(n, v)
    cc.reset_cache()


def _run_arms(config, workdir: str, arms: list[str], seeds: list[int]) -> None:
  """The body of :func:`experiment`."""
  import jax
  from fedjax_u2s.evaluation import suites as suites_lib
  from fedjax_u2s.models import registry

  ecfg = config.experiment
  model = registry.load(config.model.name, dtype=config.model.dtype,
                        param_dtype=config.model.param_dtype, remat=config.model.remat)
  generate_all(config, workdir, model, _selections(arms))
  train_sets, heldout, corpus = split_pairs(workdir, config, _selections(arms))
  num_clients = len(corpus["clients"])
  held = [t for c in corpus["clients"] for t in c["doc_ids"]]
  suites = pipeline.evaluation_suites(config.evaluate, held, corpus["holdout"])
  if ecfg.heldout_ppl and heldout:
    suites.append(suites_lib.heldout_ppl(
        pairs=[(e.messages[0]["content"], e.messages[1]["content"]) for e in heldout],
        name="heldout_ppl"))
  lead = jax.process_index() == 0

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


def results_table(results: dict) -> str:
  """Markdown: arm x task (headline metric), ``mean ± std (n)`` over seeds."""
  from fedjax_u2s.evaluation import runner
  tasks = _tasks(results)
  heads = []
  for t in tasks:
    h = _headline(results, t)
    heads.append(f"{t} {h}" + (" ↓" if h in runner.LOWER_IS_BETTER else " ↑"))
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
  from fedjax_u2s.evaluation import runner
  arms = results["arms"]
  if results.get("paired"):
    out = []
    for pair, by_task in results["paired"].items():
      a, b = pair.split(" - ")
      for task in _tasks(results):
        if task not in by_task:
          continue
        head = _headline(results, task)
        verdict = stats.verdict(by_task[task], head in runner.LOWER_IS_BETTER)
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
    lower = head in runner.LOWER_IS_BETTER
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


def plot(results: dict, path: str) -> str | None:
  """Bar chart per task (headline metric): mean over seeds, error bar = std."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = _tasks(results)
  arms = list(results["arms"])
  if not tasks:
    return None
  width = max(4.0, 0.5 * len(arms) + 1.5)
  fig, axes = plt.subplots(1, len(tasks), figsize=(width * len(tasks), 3.8),
                           squeeze=False)
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
  plt.close(fig)
  return path


def write_results(workdir: str, results: dict) -> tuple[str, str, str | None]:
  """Writes ``results.json``, ``results.md`` and ``results.png``."""
  from fedjax_u2s.u2s import writer
  json_path = os.path.join(workdir, "results.json")
  writer.atomic_write_json(json_path, results)
  table = results_table(results)
  png = plot(results, os.path.join(workdir, "results.png"))
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
  logging.info("Wrote %s, %s, %s", json_path, md_path, png)
  return json_path, md_path, png
