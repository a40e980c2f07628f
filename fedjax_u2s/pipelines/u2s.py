"""The ``u2s`` job, FedIT-U2S end to end: generate -> federated tuning -> evaluate.

1. generate: every client turns its own text into instruction-response pairs
   (:func:`fedjax_u2s.u2s.stage.run_generation`, on the lead process);
2. train: federated LoRA tuning on those pairs, a share of each client's
   pairs held out for the eval loss;
3. evaluate: base vs tuned on questions about articles the clients hold,
   articles nobody holds, and arithmetic; then ``report.md``.

Each stage resumes from the workdir: generation skips pieces already in the
client files, training resumes from its last checkpoint, evaluation reuses
the score files it wrote. ``configs/u2s_wiki.py`` is its config.
"""

from __future__ import annotations

import os
import time

import ml_collections

from fedjax_u2s import export
from fedjax_u2s.evaluation import report
from fedjax_u2s.evaluation import stats
from fedjax_u2s.evaluation import suites as suites_lib
from fedjax_u2s.models import bert
from fedjax_u2s.pipelines import common
from fedjax_u2s.u2s import stage

STAGES = (
    common.generation_stage(("generated", "stages/generate.json")),
    common.train_stage(),
    common.evaluate_stage(("eval", "report.md")),
)


def generate(config: ml_collections.ConfigDict, workdir: str, model) -> dict:
  """The ``generate`` stage: ``{"stats", "corpus"}``, run once per workdir."""
  def run():
    embedder = bert.Embedder.load(config.embedder.name)
    return stage.run_generation(config, workdir, model=common.load_generator(config, model),
                                embedder=embedder)
  return common.run_stage(workdir, "generate", run)


def split_pairs(config: ml_collections.ConfigDict, cid: int, records: list[dict],
                who: str, stats_path: str) -> tuple[list, list]:
  """One client's kept pairs as (training, held-out) examples.

  The held-out share is ``data.eval_fraction``, drawn per client with the
  run's seed, wherever the client's pairs were made (here, or on its own
  Flower node). ``who`` and ``stats_path`` name the client and its counts in
  the error when it kept no pairs.
  """
  if not records:
    raise ValueError(
        f"U2S client {cid} ({who}) kept no pairs (see {stats_path}): give it "
        "more text, relax config.u2s.filters, or drop the client.")
  tr, ev = stage.split_eval(records, config.data.eval_fraction, config.seed, cid)
  return ([common.record_to_example(r, cid) for r in tr],
          [common.record_to_example(r, cid) for r in ev])


def client_examples(config: ml_collections.ConfigDict, workdir: str, corpus: dict
                    ) -> tuple[list[list], list]:
  """Each client's training examples and the held-out ones, from its pairs."""
  train_sets, heldout = [], []
  stats_path = os.path.join(workdir, "generated", "stats.json")
  for cid, recs in enumerate(stage.load_pairs(workdir, len(corpus["clients"]))):
    tr, ev = split_pairs(config, cid, recs, corpus["clients"][cid]["name"], stats_path)
    train_sets.append(tr)
    heldout.extend(ev)
  return train_sets, heldout


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Generates, tunes, evaluates base vs tuned and writes ``report.md``."""
  start = time.perf_counter()
  model = common.load_model(config)
  done = common.stage_done(workdir, "generate") is not None
  with common.stage("1/3 generate", "done earlier, read back" if done else
                    "each client turns its text into instruction-response pairs"):
    gen = generate(config, workdir, model)
  corpus = gen["corpus"]

  train_sets, heldout = client_examples(config, workdir, corpus)
  with common.stage("2/3 train", f"{config.federated.num_rounds} rounds of "
                    f"{config.federated.algorithm} over {len(train_sets)} clients"):
    result, _ = common.tune_and_export(config, workdir, model, train_sets, heldout)
  if not common.is_lead():
    return

  with common.stage("3/3 evaluate", "base vs tuned, offline"):
    held = [t for c in corpus["clients"] for t in c["doc_ids"]]
    suites = suites_lib.from_config(config.evaluate, held, corpus["holdout"])
    adapter_dir = os.path.join(workdir, "adapter")
    lora, lcfg = export.load_peft(adapter_dir, model.config) if os.path.exists(
        adapter_dir) else (result.lora, result.lora_config)
    eval_dir = os.path.join(workdir, "eval")
    scores = {"base": common.evaluate_cached(config, model, suites, eval_dir, "base"),
              "fedit_u2s": common.evaluate_cached(config, model, suites, eval_dir,
                                                  "fedit_u2s", lora, lcfg)}
  comparison = report.compare_table(scores)
  paired = report.paired_rows(scores["fedit_u2s"], scores["base"])
  path = report.u2s_report(workdir, config, gen, result, comparison,
                           report.paired_models_table(paired, "fedit_u2s", "base"),
                           report.power_table({"fedit_u2s - base": paired}))
  print(_summary(gen, result, paired, time.perf_counter() - start, path))


def _summary(gen: dict, result, paired: dict, seconds: float, path: str) -> str:
  """The run's headline numbers, for the terminal."""
  totals = gen["stats"]["totals"]
  kept, rejected = totals.get("kept", 0), totals.get("rejected", 0)
  lines = [f"\nFedIT-U2S done in {common.format_seconds(seconds)} (this run).",
           f"  pairs kept: {kept} of {kept + rejected} pieces"]
  train_rows = [r for r in result.metrics if "train_loss" in r]
  eval_rows = [r for r in result.metrics if "eval_loss" in r]
  if train_rows:
    lines.append(f"  train loss: {train_rows[0]['train_loss']:.4f} (round 1) -> "
                 f"{train_rows[-1]['train_loss']:.4f} (round {train_rows[-1]['round']})")
  if eval_rows:
    lines.append(f"  held-out pairs loss: {eval_rows[0]['eval_loss']:.4f} -> "
                 f"{eval_rows[-1]['eval_loss']:.4f}")
  for task, r in paired.items():
    value = lambda v: "-" if v is None else f"{v:.3f}"
    lines.append(f"  {task} {r['metric']}: base {value(r['b'])}, tuned {value(r['a'])}, "
                 f"difference {stats.format_interval(r)} ({r['verdict']})")
  lines.append(f"Report: {path}")
  return "\n".join(lines)
