r"""Question sets with power: n, base accuracy, scoring time, paired SD.

Builds the question sets of a config's ``evaluate`` block split as the u2s job
splits them (titles some client holds / titles nobody holds; the clients'
articles from ``corpus``, every document counted as held), plus the CHAMP
held-out problems, scores the base model on each (wall time per set, compile
included) and, with ``--adapter``, the base + adapter model too, then prints
per set: n, base accuracy, seconds, and the paired SD / effective SD, 95%
half-width and minimum detectable effect of adapter - base
(:func:`fedjax_u2s.evaluation.stats.power_analysis`). Per-question values are
saved after every (model, set) under ``--out``, so a rerun skips what is done.

  python benchmarks/eval_power.py --out=/tmp/eval_power
  python benchmarks/eval_power.py --adapter=WORKDIR/adapter --out=/tmp/eval_power
  python benchmarks/eval_power.py --config=configs/u2s_wiki.py:power --sets=wiki_known,wiki_unseen
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags

from fedjax_u2s import config_blocks
from fedjax_u2s import export
from fedjax_u2s.evaluation import runner
from fedjax_u2s.evaluation import stats
from fedjax_u2s.evaluation import suites
from fedjax_u2s.pipelines import common
from fedjax_u2s.u2s import corpus

_CONFIG = flags.DEFINE_string("config", "configs/u2s_wiki.py",
                              "Config file[:arg] whose corpus / evaluate blocks to use.")
_SETS = flags.DEFINE_list(
    "sets", ["cloze_unseen", "cloze_known", "wiki_unseen", "wiki_known",
             "champ_heldout_mc"],
    "Which sets: cloze_known/cloze_unseen (wiki_cloze, --cloze_questions, "
    "--per_article), wiki_known/wiki_unseen (the config's from_config sets: "
    "merged with cloze under :power), champ_heldout_mc, champ_heldout_generation.")
_CLOZE = flags.DEFINE_integer("cloze_questions", 300, "cloze_* questions (0: all).")
_PER_ARTICLE = flags.DEFINE_integer("per_article", 3, "cloze_* questions per article.")
_ALL_WIKI = flags.DEFINE_bool("all_wiki", True, "wiki_* sets: every usable title "
                              "(else the config's num_wiki_questions).")
_ADAPTER = flags.DEFINE_string("adapter", "", "PEFT adapter dir: also score base + it.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per forward pass.")
_OUT = flags.DEFINE_string("out", "/tmp/eval_power", "Per-question values, per (model, set).")


def build_sets(config, names):
  """The requested sets, split by the config's corpus as the u2s job splits them."""
  clients, holdout = corpus.load_corpora_and_holdout(config.corpus)
  held = [d.doc_id for c in clients for d in c.documents]
  unheld = [d.doc_id for d in holdout]
  ev = config.evaluate
  topics = tuple(ev.topics)
  out = []
  wiki = {t.name: t for t in suites.from_config(ev, held, unheld)}
  for name in names:
    if name in ("cloze_known", "cloze_unseen"):
      titles = held if name == "cloze_known" else unheld
      out.append(suites.wiki_cloze(topics, seed=ev.seed, name=name,
                                   num_questions=_CLOZE.value or None,
                                   per_article=_PER_ARTICLE.value,
                                   include_titles=set(titles)))
    elif name in ("wiki_known", "wiki_unseen"):
      if _ALL_WIKI.value and not ev.get("cloze_merge", False):
        titles = held if name == "wiki_known" else unheld
        out.append(suites.wiki_mc(topics, seed=ev.seed, name=name, num_questions=None,
                                  include_titles=set(titles)))
      else:
        out.append(wiki[name])
    elif name in ("champ_heldout_mc", "champ_heldout_generation"):
      out.append(suites.champ_heldout(name.rsplit("_", 1)[1], seed=ev.seed))
    else:
      raise app.UsageError(f"--sets: unknown set {name!r}.")
  return out


def main(argv):
  del argv
  path, _, arg = _CONFIG.value.partition(":")
  config = config_blocks.load(path, arg)
  tasks = build_sets(config, _SETS.value)
  os.makedirs(_OUT.value, exist_ok=True)
  model = common.load_model(config)
  arms = [("base", None, None)]
  if _ADAPTER.value:
    arms.append(("adapter", *export.load_peft(_ADAPTER.value, model.config)))
  values = {}
  for arm, lora, lcfg in arms:
    for task in tasks:
      file = os.path.join(_OUT.value, f"{arm}.{task.name}.json")
      if not os.path.exists(file):
        start = time.perf_counter()
        res = runner.evaluate(model.config, model.params, model.tokenizer, [task],
                              lora=lora, lora_config=lcfg, batch_size=_BATCH.value,
                              progress=False, decode="scan")[task.name]
        head = res["headline"]
        summary = dict(arm=arm, task=task.name, n=res["n"], headline=head,
                       value=res[head], seconds=time.perf_counter() - start,
                       load=os.getloadavg()[0])
        with open(file, "w", encoding="utf-8") as f:
          json.dump(dict(summary=summary,
                         questions=stats.question_values({task.name: res})[task.name]), f)
        print(json.dumps(summary), flush=True)
      with open(file, encoding="utf-8") as f:
        values[arm, task.name] = json.load(f)
  print("\n| set | n | base | s (base) | SD | eff. SD | 95% half-width | MDE |")
  print("|---|---|---|---|---|---|---|---|")
  for task in tasks:
    base = values["base", task.name]
    cells = [task.name, base["summary"]["n"], f"{base['summary']['value']:.3f}",
             f"{base['summary']['seconds']:.0f}"]
    if ("adapter", task.name) in values:
      r = stats.paired_bootstrap(values["adapter", task.name]["questions"],
                                 base["questions"])
      p = stats.power_analysis(r)
      f3 = lambda x: "-" if x is None else f"{x:.3f}"
      cells += [f3(r["sd"]), f3(r.get("sd_effective")), f3(p["half_width"]), f3(p["mde"])]
    else:
      cells += ["-"] * 4
    print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
  app.run(main)
