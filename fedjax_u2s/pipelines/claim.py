"""The FedIT-U2S claim experiment: one set of clients, every arm, several seeds.

The ``claim`` job (``configs/experiments/u2s_claim.py``).
It asks whether federated tuning on U2S pairs with retrieval-selected
demonstrations (``fedit_u2s``) beats

* ``base``: the untuned model;
* ``local_only``: every client tuning alone on its own pairs;
* ``centralized``: all clients' pairs pooled in one place (an upper bound
  that federated learning is not allowed to reach by construction);
* ``fedit_random`` / ``fedit_fixed``: the same federated training on pairs
  generated with random / fixed demonstrations (the selection ablation);
* ``raw_text``: the same federated training directly on the clients' text,
  as plain causal-LM windows with loss on every token and no chat template
  (what a user would try without U2S; see "The raw-text arm" below),

on the same clients, the same held-out questions and a matched compute budget.

Compute per arm (``R`` = ``federated.num_rounds``, ``C`` =
``federated.clients_per_round``, ``L`` = ``train.local_steps``, ``N`` clients;
one step = one optimizer step on ``batch_size * grad_accum`` examples):

========================  ===========================================  ==============
arm                       schedule                                      client steps
========================  ===========================================  ==============
fedit_u2s/random/fixed    R rounds, C sampled clients, L local steps    R * C * L
raw_text                  as fedit_u2s, on raw-text windows             R * C * L
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

The raw-text arm: each client's pieces (the retrieval generation's
``pieces.jsonl``, the very spans U2S generated from, less the pieces whose
pair is held out for ``heldout_ppl``; rejected pieces included, since a user
without U2S has all of their text) are joined with blank lines and tokenized
as one stream without special tokens, then cut into windows of ``m_c + 1``
tokens that overlap by one token: every token of the stream but the first is
a loss target in exactly one window (the first token of a window is its
context only; the last window is the stream's last ``m_c + 1`` tokens, so it
repeats a few targets rather than being short). ``m_c`` matches loss tokens
per client step: it is client ``c``'s mean loss tokens per U2S training
example (response and end-of-turn tokens, as ``fedit_u2s`` trains on them),
times ``min(n_c, k) / k`` where ``k = batch_size * grad_accum`` rows make a
step and ``n_c`` is the client's number of pairs (a client with fewer pairs
than a step puts each in every step). So a raw-text step of client ``c``
holds, in expectation, the loss tokens of one of its ``fedit_u2s`` steps;
the loss tokens per client step each run actually took are read back from
its ``metrics.jsonl`` and reported per arm (``tokens`` in ``results.json``),
with the raw-text / fedit_u2s ratio against :data:`TOKEN_TOLERANCE`. A
raw-text step costs less compute than a U2S step (no prompt tokens): the
budget matched is optimizer steps and loss tokens, not FLOPs.

Seeds: ``experiment.seeds`` vary training (adapter init, client sampling,
data order, dropout); ``experiment.ablation_seeds`` (empty: the same)
those of the demonstration ablation ``fedit_random`` / ``fedit_fixed``, which
a tight budget may run with one seed. Generation runs once per demonstration selection with
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
    arms/raw_text/seed_<s>/raw_windows.json how the raw-text windows were cut
    jax_cache/                              persistent XLA cache (see
                                            experiment.compilation_cache)
    results.json  results.md  results.png
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from fedjax_u2s import metrics as metrics_lib
from fedjax_u2s.data import instructions
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
RAW_ARM = "raw_text"
ARMS = ("base", "fedit_u2s", "local_only", "centralized", RAW_ARM,
        "fedit_random", "fedit_fixed")
ABLATION_ARMS = ("fedit_random", "fedit_fixed")
# Measured loss tokens per client step of raw_text within this fraction of
# fedit_u2s's: the windows match the expectation to a rounding (<= 0.5 token
# a row); the rest is which pairs each U2S step happened to draw.
TOKEN_TOLERANCE = 0.1
RAW_JOIN = "\n\n"  # Between a client's pieces in its raw-text stream.
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
  if arm in FEDERATED_ARMS or arm == RAW_ARM:
    out = dict(rounds=r, clients_per_round=c, local_steps=l)
  elif arm == "centralized":
    out = dict(rounds=r, clients_per_round=1, local_steps=c * l)
  elif arm == "local_only":
    out = dict(rounds=r, clients_per_round=1, local_steps=l)
  else:
    raise ValueError(f"Arm {arm!r} does not train; trained arms: "
                     f"{sorted([*FEDERATED_ARMS, 'centralized', 'local_only', RAW_ARM])}.")
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
# The raw-text arm.


def load_pieces(workdir: str) -> dict[int, list[dict]]:
  """The retrieval generation's pieces by client id, in file order."""
  path = os.path.join(writer.generated_dir(generation_dir(workdir, "retrieval")),
                      stage.PIECES_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} is missing: the raw_text arm trains on the pieces the retrieval "
        "generation chunked; rerun the experiment to (re)generate them.")
  out: dict[int, list[dict]] = {}
  for row in writer.read_records(path):
    out.setdefault(int(row["client_id"]), []).append(row)
  return out


def loss_tokens_per_row(ts: instructions.TokenizedSet) -> float:
  """Mean loss targets per row, counted as the objective counts them.

  The objective predicts ``tokens[t]`` from ``tokens[:t]`` where
  ``loss_mask[t]`` is True for ``t >= 1`` (position 0 has no prefix).
  """
  return float(ts.loss_mask[:, 1:].sum()) / max(len(ts), 1)


def raw_targets_per_row(u2s_sets: Sequence[instructions.TokenizedSet],
                        batch_rows: int) -> list[int]:
  """Per client, the loss targets of one raw-text window (module docstring).

  ``round(mean U2S loss tokens per row * min(n_c, k) / k)``, at least 1, with
  ``k = batch_rows``: a raw-text step (``k`` full windows) then holds as many
  loss tokens as one U2S step of the same client, in expectation.
  """
  out = []
  for cid, ts in enumerate(u2s_sets):
    if not len(ts):
      raise ValueError(f"Client {cid} has no tokenized U2S pair to match the "
                       "raw_text arm's token budget to.")
    out.append(max(1, int(round(loss_tokens_per_row(ts) * min(len(ts), batch_rows)
                                / batch_rows))))
  return out


def raw_windows(num_tokens: int, targets: int) -> list[tuple[int, int]]:
  """``[start, end)`` windows of ``targets + 1`` tokens over a token stream.

  Consecutive windows overlap by one token (a window's first token is the
  context of its first target), so every token but the stream's first is a
  target of some window; the last window ends at the stream's end (repeating
  a few targets rather than being short). A stream of at most ``targets + 1``
  tokens is one window (none under 2 tokens: nothing to predict).
  """
  if targets < 1:
    raise ValueError(f"raw_windows: targets must be >= 1, got {targets}.")
  w = targets + 1
  if num_tokens <= w:
    return [(0, num_tokens)] if num_tokens >= 2 else []
  starts = list(range(0, num_tokens - w + 1, targets))
  if starts[-1] + w < num_tokens:
    starts.append(num_tokens - w)
  return [(s, s + w) for s in starts]


def raw_text_set(texts: Sequence[str], tokenizer, targets: int, max_length: int
                 ) -> tuple[instructions.TokenizedSet, dict]:
  """One client's text as causal-LM windows with loss on every token.

  The texts are joined with :data:`RAW_JOIN` and tokenized as one stream with
  no special token and no chat template; see :func:`raw_windows`. Rows are
  padded to ``max_length`` (the shapes of the other arms' rows).

  Returns:
    ``(set, info)``: ``info`` holds the stream's tokens, the windows and the
    targets per window.
  """
  ids = list(tokenizer.encode(RAW_JOIN.join(texts), add_bos=False))
  windows = raw_windows(len(ids), targets)
  if targets + 1 > max_length:
    raise ValueError(f"raw_text windows of {targets + 1} tokens do not fit "
                     f"config.train.max_length={max_length}.")
  pad_id = int(tokenizer.pad_id)
  n = len(windows)
  tokens = np.full((n, max_length), pad_id, np.int32)
  input_mask = np.zeros((n, max_length), bool)
  loss_mask = np.zeros((n, max_length), bool)
  for i, (a, b) in enumerate(windows):
    tokens[i, :b - a] = ids[a:b]
    input_mask[i, :b - a] = True
    loss_mask[i, 1:b - a] = True  # Every token with a prefix in the row.
  ts = instructions.TokenizedSet(tokens, input_mask, loss_mask, pad_id,
                                 np.arange(n, dtype=np.int64),
                                 num_response_tokens=int(loss_mask.sum()))
  info = {"pieces": len(texts), "stream_tokens": len(ids), "windows": n,
          "targets_per_window": targets,
          "loss_tokens": int(loss_mask.sum()),
          "repeated_targets": int(loss_mask.sum()) - max(len(ids) - 1, 0)}
  return ts, info


def raw_text_sets(config, workdir: str, tokenizer, u2s_examples: Sequence[list],
                  exclude: set) -> tuple[list[instructions.TokenizedSet], dict]:
  """Every client's raw-text set, matched to its U2S pairs' loss tokens.

  Args:
    config: reads ``train.max_length``, ``train.batch_size``,
      ``train.grad_accum``, ``data.system_prompt``.
    workdir: the experiment workdir (its retrieval generation's pieces).
    tokenizer: the tuned model's tokenizer.
    u2s_examples: per client, the retrieval pairs ``fedit_u2s`` trains on.
    exclude: piece ids left out (those of the held-out pairs).

  Returns:
    ``(sets, info)``: ``info`` is ``raw_windows.json``'s content (per client
    the pieces, stream tokens, windows, targets per window and the U2S loss
    tokens per row matched).
  """
  pieces = load_pieces(workdir)
  system = config.data.system_prompt or None
  u2s_sets = [instructions.tokenize(exs, tokenizer, config.train.max_length,
                                    system_prompt=system, log=False)
              for exs in u2s_examples]
  k = config.train.batch_size * config.train.grad_accum
  targets = raw_targets_per_row(u2s_sets, k)
  sets, clients = [], []
  for cid, (m, u2s) in enumerate(zip(targets, u2s_sets)):
    texts = [p["text"] for p in pieces.get(cid, []) if p["piece_id"] not in exclude]
    ts, info = raw_text_set(texts, tokenizer, m, config.train.max_length)
    if not len(ts):
      raise ValueError(f"Client {cid} has no raw text left for the raw_text arm "
                       "(every piece held out or empty).")
    sets.append(ts)
    clients.append({"client": cid, **info, "u2s_pairs": len(u2s),
                    "u2s_loss_tokens_per_row": loss_tokens_per_row(u2s)})
  return sets, {"batch_rows": k, "join": RAW_JOIN, "clients": clients,
                "excluded_pieces": len(exclude)}


def measured_tokens(directory: str) -> dict | None:
  """Loss tokens and client optimizer steps a finished run took.

  Read back from ``metrics.jsonl`` (one row per round: ``num_tokens``, the
  sampled ``clients``; the last row of a round wins after a resume) and
  ``config.json`` (``train.local_steps``). None when either is missing.
  """
  mpath, cpath = (os.path.join(directory, n) for n in ("metrics.jsonl", "config.json"))
  if not (os.path.exists(mpath) and os.path.exists(cpath)):
    return None
  with open(cpath, encoding="utf-8") as f:
    local = int(json.load(f)["train"]["local_steps"])
  rounds = {}
  for i, row in enumerate(metrics_lib.read_jsonl(mpath)):
    if "clients" in row and "num_tokens" in row:
      rounds[row.get("round", f"#{i}")] = row
  tokens = sum(int(r["num_tokens"]) for r in rounds.values())
  steps = sum(len(r["clients"]) * local for r in rounds.values())
  return {"loss_tokens": tokens, "client_steps": steps,
          "loss_tokens_per_step": tokens / steps if steps else None}


def token_summary(measured: Mapping[str, Sequence[dict]]) -> dict:
  """Per arm the measured loss tokens per client step (mean over its runs),
  and the raw_text / fedit_u2s ratio against :data:`TOKEN_TOLERANCE`."""
  out: dict[str, Any] = {"arms": {}}
  for arm, runs in measured.items():
    vals = [r["loss_tokens_per_step"] for r in runs
            if r and r.get("loss_tokens_per_step") is not None]
    out["arms"][arm] = {"loss_tokens_per_step": spread(vals),
                        "loss_tokens": sum(r["loss_tokens"] for r in runs if r),
                        "client_steps": sum(r["client_steps"] for r in runs if r)}
  ref = out["arms"].get("fedit_u2s", {}).get("loss_tokens_per_step", {}).get("mean")
  raw = out["arms"].get(RAW_ARM, {}).get("loss_tokens_per_step", {}).get("mean")
  if ref and raw is not None:
    ratio = raw / ref
    out["raw_vs_u2s"] = {"ratio": ratio, "tolerance": TOKEN_TOLERANCE,
                         "within": abs(ratio - 1) <= TOKEN_TOLERANCE}
  return out


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
                     heldout, seed: int, schedule: dict, client_sets=None
                     ) -> dict | None:
  """One training run and its evaluation; skipped when its scores exist.

  ``client_sets``: already tokenized client data (the raw-text arm), else
  ``client_examples`` are tokenized as chat pairs.
  """
  path = scores_path(directory)
  if os.path.exists(path):
    return _evaluate(config, directory, model, suites)
  cfg = _arm_config(config, seed, schedule)
  if common.is_lead():
    workdir_lib.write_config(cfg, directory)
  result, _ = common.tune_and_export(cfg, directory, model, client_examples, heldout,
                                     client_sets=client_sets)
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
  ablation = arm_seeds(ecfg, "fedit_random")
  if len(set(ablation)) != len(ablation):
    raise ValueError(f"config.experiment.ablation_seeds={tuple(ablation)} must be "
                     "distinct (empty: experiment.seeds).")
  # Every arm and seed builds its own jitted round, but their shapes repeat
  # (three distinct ones), so a persistent cache turns most compiles into lookups.
  cache = (os.path.join(workdir, "jax_cache") if ecfg.compilation_cache
           and not jax.config.jax_compilation_cache_dir else None)
  with common.persistent_compilation_cache(cache):
    _run_arms(config, workdir, arms, seeds)


def arm_seeds(ecfg, arm: str) -> list[int]:
  """The training seeds of ``arm``: ``experiment.ablation_seeds`` for the
  demonstration ablation when set, else ``experiment.seeds``."""
  if arm in ABLATION_ARMS and tuple(ecfg.get("ablation_seeds", ()) or ()):
    return [int(s) for s in ecfg.ablation_seeds]
  return [int(s) for s in ecfg.seeds]


def _run_arms(config, workdir: str, arms: list[str], seeds: list[int]) -> None:
  """The body of :func:`run` (``seeds``: ``experiment.seeds``)."""
  del seeds  # Per arm: arm_seeds.
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
  compute, measured, raw_info = {}, {}, None
  for arm in arms:
    if arm == "base":
      continue
    schedule = arm_schedule(arm, config.federated, config.train, num_clients)
    compute[arm] = schedule
    runs, clients, questions, measured[arm] = {}, {}, [], []
    tokenized = None
    if arm in FEDERATED_ARMS:
      sets = train_sets[FEDERATED_ARMS[arm]]
    elif arm == "centralized":  # Every retrieval pair pooled as one client.
      sets = [[e for c in train_sets["retrieval"] for e in c]]
    elif arm == RAW_ARM:  # The clients' text itself, token-matched windows.
      tokenized, raw_info = raw_text_sets(
          config, workdir, model.tokenizer, train_sets["retrieval"],
          {e.meta.get("piece_id") for e in heldout})
      sets = [list(range(len(s))) for s in tokenized]  # Window indices.
    for seed in arm_seeds(ecfg, arm):
      print(f"\n== {arm}, seed {seed} ==")
      if arm != "local_only":
        directory = arm_dir(workdir, arm, seed)
        if tokenized is not None and lead:
          os.makedirs(directory, exist_ok=True)
          writer.atomic_write_json(os.path.join(directory, "raw_windows.json"), raw_info)
        scores = _train_and_score(config, directory, model, suites,
                                  sets, heldout, seed, schedule, client_sets=tokenized)
        if scores is not None:
          runs[str(seed)] = task_metrics(scores)
          questions.append(stats.question_values(scores))
          measured[arm].append(measured_tokens(directory))
      else:  # local_only: each client alone.
        per_client = []
        for cid, exs in enumerate(train_sets["retrieval"]):
          directory = arm_dir(workdir, arm, seed, cid)
          scores = _train_and_score(config, directory, model,
                                    suites, [exs], heldout, seed, schedule)
          if scores is not None:
            per_client.append(task_metrics(scores))
            questions.append(stats.question_values(scores))
            measured[arm].append(measured_tokens(directory))
        if lead:
          clients[str(seed)] = per_client
          runs[str(seed)] = mean_over_clients(per_client)
    raw[arm] = {"runs": runs, "questions": stats.mean_question_values(questions),
                **({"clients": clients} if clients else {})}

  if not lead:
    return
  results = summarize(raw, compute, config=config, corpus=corpus,
                      num_heldout=len(heldout), train_sets=train_sets,
                      tokens=token_summary(measured), raw_text=raw_info)
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
              train_sets: Mapping[str, list] | None = None,
              tokens: dict | None = None, raw_text: dict | None = None) -> dict:
  """``results.json`` content: per arm its runs and their spread per metric.

  Args:
    raw: ``{arm: {"runs": {seed: {task: {metric: v}}}, "clients": {seed:
      [per-client {task: {metric: v}}]}, "questions": {task: {"kind",
      "values"}}}}`` (``clients`` for local_only only, where each run is
      already the mean over clients; ``questions``: per-question values
      averaged over the arm's runs, :func:`stats.mean_question_values`).
    compute: ``{arm: arm_schedule(...)}``.
    tokens: :func:`token_summary` of the runs (measured loss tokens per
      client step per arm), stored as ``tokens``.
    raw_text: how the raw-text windows were cut (:func:`raw_text_sets`).
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
  if tokens:
    out["tokens"] = tokens
  if raw_text:
    out["raw_text"] = raw_text
  if config is not None:
    out["setup"] = {
        "model": config.model.name, "seeds": list(config.experiment.seeds),
        "ablation_seeds": arm_seeds(config.experiment, "fedit_random"),
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
