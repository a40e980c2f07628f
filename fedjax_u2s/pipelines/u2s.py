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

import ml_collections

from fedjax_u2s import export
from fedjax_u2s.evaluation import report
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


def client_examples(config: ml_collections.ConfigDict, workdir: str, corpus: dict
                    ) -> tuple[list[list], list]:
  """Each client's training examples and the held-out ones, from its pairs."""
  train_sets, heldout = [], []
  for cid, recs in enumerate(stage.load_pairs(workdir, len(corpus["clients"]))):
    if not recs:
      raise ValueError(
          f"U2S client {cid} ({corpus['clients'][cid]['name']}) kept no pairs "
          f"(see {os.path.join(workdir, 'generated', 'stats.json')}): give it "
          "more text, relax config.u2s.filters, or drop the client.")
    tr, ev = stage.split_eval(recs, config.data.eval_fraction, config.seed, cid)
    train_sets.append([common.record_to_example(r, cid) for r in tr])
    heldout.extend(common.record_to_example(r, cid) for r in ev)
  return train_sets, heldout


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Generates, tunes, evaluates base vs tuned and writes ``report.md``."""
  model = common.load_model(config)
  gen = generate(config, workdir, model)
  corpus = gen["corpus"]

  train_sets, heldout = client_examples(config, workdir, corpus)
  result, _ = common.tune_and_export(config, workdir, model, train_sets, heldout)
  if not common.is_lead():
    return

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
  path = report.u2s_report(workdir, config, gen, result, comparison)
  print(f"\n{comparison}\n\nReport: {path}")
