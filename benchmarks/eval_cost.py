r"""CPU seconds per multiple-choice question: short-description vs sentence cloze.

Scores ``--num`` questions of each kind of a config's ``wiki_unseen`` set
(short-description and cloze questions merged, as ``cloze_merge`` builds it)
with the base model, twice each on different questions (the first pass
includes compiles), and prints wall and process CPU seconds. On a shared,
loaded machine the wall time says little; CPU seconds divided by the cores a
quiet run would use estimate a quiet wall time (how the decisive config's
per-question costs were sized).

  nice -n 10 .venv/bin/python benchmarks/eval_cost.py \
    --config=configs/experiments/u2s_decisive.py --num=32
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time

from absl import app
from absl import flags

from fedjax_u2s import config_blocks
from fedjax_u2s.evaluation import runner
from fedjax_u2s.evaluation import suites
from fedjax_u2s.pipelines import common
from fedjax_u2s.u2s import corpus

_CONFIG = flags.DEFINE_string("config", "configs/experiments/u2s_decisive.py",
                              "Config file[:arg] whose corpus / evaluate blocks to use.")
_NUM = flags.DEFINE_integer("num", 32, "Questions per kind and pass.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per forward pass.")


def _cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main(argv):
  del argv
  path, _, arg = _CONFIG.value.partition(":")
  config = config_blocks.load(path, arg)
  clients, holdout = corpus.load_corpora_and_holdout(config.corpus)
  held = [d.doc_id for c in clients for d in c.documents]
  sets = {t.name: t for t in suites.from_config(config.evaluate, held,
                                                [d.doc_id for d in holdout])}
  task = sets["wiki_unseen"]
  kinds = {"cloze": [q for q in task.questions if str(q.id).startswith("cloze")]}
  kinds["short"] = [q for q in task.questions if not str(q.id).startswith("cloze")]
  model = common.load_model(config)
  n, out = _NUM.value, {}
  for kind, questions in kinds.items():
    for rep in range(2):
      sub = dataclasses.replace(task, name=f"{kind}{rep}",
                                questions=tuple(questions[rep * n:(rep + 1) * n]))
      c0, w0 = _cpu(), time.perf_counter()
      runner.evaluate(model.config, model.params, model.tokenizer, [sub],
                      batch_size=_BATCH.value, seed=0, decode="auto")
      out[f"{kind}{rep}"] = {"questions": len(sub.questions), "wall_s": time.perf_counter() - w0,
                             "cpu_s": _cpu() - c0}
      print(kind, rep, out[f"{kind}{rep}"], flush=True)
  out["load_average"] = os.getloadavg()
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
