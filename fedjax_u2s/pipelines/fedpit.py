"""The ``fedpit`` job: few-shot federated instruction tuning with privacy.

FedPIT's setting (Zhang et al., 2024, arXiv 2403.06131): each client holds
only a few real instruction-response pairs, and what a shared model learns
from them can be extracted from it. Each round a sampled client prompts the
*current global model* few-shot with its own examples to write synthetic
pairs (:mod:`fedjax_u2s.u2s.selfgen`; near copies of a real example are
rejected), trains the **global** adapter on the synthetic pairs alone
(aggregated by the server with any algorithm, with client-level DP if asked)
and a **local** adapter on real + synthetic pairs that never leaves it
(``algorithms.apply_isolated``). The global adapter is trained on base +
global only, so what the server receives depends on the real examples only
through the filtered synthetic text; the personal model is base + global +
local.

``config.fedpit.variant`` selects the arm, so the comparisons of
docs/RESULTS.md run through one job:

* ``fedpit``: the above;
* ``no_isolation``: synthetic pairs, one (global) adapter on real + synthetic;
* ``fedit``: no synthetic pairs, one global adapter on the real examples;
* ``local``: no synthetic pairs, no federation: each client's local adapter
  on its real examples (the global adapter stays the identity).

Data: the built-in Wikipedia rows (:mod:`fedjax_u2s.data.builtin`) of one
domain; articles are split over clients by a Dirichlet over sub-topics read
off the short descriptions (:func:`subtopic`), each article giving its
``summary`` and ``description`` examples; articles of the same pool that no
client holds are the non-members of the membership test and the held-out
loss. Evaluation: multiple-choice "what is {title}" questions about articles
nobody holds (the task, unseen) and about the clients' own articles, for the
base, the global model and every personal model; then the extraction and
membership audit (:mod:`fedjax_u2s.evaluation.privacy_audit`) of each.
Outputs: ``adapter/`` (global, PEFT), ``local_adapters/client_XXXX/``
(PEFT; applied on top of base + global), ``synthetic/``, ``privacy.json``,
``eval/`` and ``report.md``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from fedjax_u2s import export
from fedjax_u2s import lora as lora_lib
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s import train
from fedjax_u2s.data import builtin
from fedjax_u2s.data import instructions
from fedjax_u2s.data import partition
from fedjax_u2s.data import wiki
from fedjax_u2s.evaluation import privacy_audit
from fedjax_u2s.evaluation import report
from fedjax_u2s.evaluation import stats
from fedjax_u2s.evaluation import suites
from fedjax_u2s.federated import privacy
from fedjax_u2s.pipelines import common
from fedjax_u2s.pipelines.workdir import Stage
from fedjax_u2s.u2s import selfgen
from fedjax_u2s.u2s import writer

VARIANTS = ("fedpit", "no_isolation", "fedit", "local")
SYNTHETIC = ("fedpit", "no_isolation")
ISOLATED = ("fedpit", "local")

TRAIN_OUTPUTS = common.TRAIN_OUTPUTS + ("local_adapters", "synthetic", "clients.json")
STAGES = (
    Stage("train", fields=common.TRAIN_FIELDS + ("fedpit",),
          ignore=common.TRAIN_IGNORE, files=common.model_file, outputs=TRAIN_OUTPUTS),
    common.evaluate_stage(outputs=("eval", "privacy.json", "report.md"),
                          extra=("audit",)),
)

# Sub-topics of the medicine ("Biology and health sciences") articles, read
# off their short descriptions: the first group with a word of the
# description in it. Articles matching none are "other".
SUBTOPICS = (
    ("health", "disease disorder condition syndrome infection infectious body organ "
               "organs tissue tissues cell cells gland bone bones muscle blood medical "
               "medicine medication drug drugs treatment therapy vitamin hormone "
               "protein proteins enzyme human humans brain nerve skin"),
    ("animals", "bird birds mammal mammals fish fishes insect insects reptile reptiles "
                "amphibian amphibians animal animals snake snakes rodent rodents "
                "crustacean crustaceans arthropod arthropods vertebrate vertebrates "
                "spider spiders"),
    ("plants", "plant plants tree trees fruit fruits vegetable vegetables flower "
               "flowers flowering seed seeds algae fungi fungus grass grasses herb "
               "shrub shrubs"),
)


def subtopic(description: str) -> str:
  words = set(re.findall(r"[a-z]+", description.lower()))
  for name, vocab in SUBTOPICS:
    if words & set(vocab.split()):
      return name
  return "other"


# ----------------------------------------------------------------------------
# Data: a few real examples per client, and non-members of the same pool.


def split_articles(config: ml_collections.ConfigDict
                   ) -> tuple[list[list[instructions.Example]], list[instructions.Example], dict]:
  """The clients' real examples, the non-member examples, and who holds what.

  ``num_clients * articles_per_client + num_non_member_articles`` articles
  with a short description are drawn (seeded) from ``data.topics``; the
  non-members are a seeded sample of them, the rest are split over clients
  by a Dirichlet over :func:`subtopic` (``partition.alpha``, at least
  ``partition.min_size`` articles each). Every article gives one example per
  template of ``data.templates``.

  Returns:
    ``(examples per client, non-member examples, summary)``; the summary
    (written to ``clients.json``) lists each client's titles and sub-topics.
  """
  d, p = config.data, config.partition
  per_article = {}
  for ex in builtin.wiki_instructions(topics=tuple(d.topics)):
    if ex.meta["template"] in d.templates:
      per_article.setdefault(ex.meta["article_id"], []).append(ex)
  articles = {a.id: a for a in wiki.load_articles()}
  ids = sorted(i for i, exs in per_article.items()
               if len(exs) == len(d.templates))
  wanted = p.num_clients * d.articles_per_client + d.num_non_member_articles
  if wanted > len(ids):
    raise ValueError(
        f"config.partition.num_clients * config.data.articles_per_client + "
        f"config.data.num_non_member_articles = {wanted}, but topics "
        f"{tuple(d.topics)} have only {len(ids)} articles with every template "
        f"of {tuple(d.templates)}; lower them or add topics.")
  rng = np.random.default_rng(config.seed)
  chosen = sorted(rng.choice(ids, wanted, replace=False).tolist())
  order = rng.permutation(len(chosen))
  non_ids = sorted(chosen[i] for i in order[:d.num_non_member_articles])
  member_ids = sorted(chosen[i] for i in order[d.num_non_member_articles:])
  labels = [subtopic(articles[i].description) for i in member_ids]
  parts = partition.dirichlet(labels, p.num_clients, p.alpha, config.seed,
                              min_size=p.min_size)
  clients = [[ex for j in sorted(part) for ex in per_article[member_ids[j]]]
             for part in parts]
  non_members = [ex for i in non_ids for ex in per_article[i]]
  summary = {"clients": [
      {"client": c, "articles": len(part), "examples": len(clients[c]),
       "subtopics": {t: sum(labels[j] == t for j in part) for t in sorted(set(labels))},
       "titles": [articles[member_ids[j]].title for j in sorted(part)]}
      for c, part in enumerate(parts)],
      "non_member_titles": [articles[i].title for i in non_ids]}
  return clients, non_members, summary


def as_pairs(examples: Sequence[instructions.Example]) -> list[tuple[str, str]]:
  return [(ex.messages[-2]["content"], ex.response) for ex in examples]


def synthetic_example(record: dict) -> instructions.Example:
  return instructions.Example(
      messages=({"role": "user", "content": record["instruction"]},
                {"role": "assistant", "content": record["response"]}),
      meta={"client": record["client"], "round": record["round"], "synthetic": True})


# ----------------------------------------------------------------------------
# Per-round data: synthetic pairs from the current global model.


class SelfGeneration:
  """Each client's synthetic pairs, generated at the start of a round.

  A sampled client regenerates when it has no pairs yet or its newest ones
  are ``selfgen.every`` rounds old; pairs of a round are kept in
  ``WORKDIR/synthetic`` (:class:`selfgen.SyntheticStore`), so a resumed run
  reads them back. Only the lead process generates; the others wait and
  read the files.

  ``real`` is every client's real examples by client id: a list, or a
  mapping holding only some clients (a Flower node holds its own client's:
  :mod:`fedjax_u2s.flower.node_fedpit`, with its own ``workdir``).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, model,
               real: (Sequence[Sequence[instructions.Example]] |
                      Mapping[int, Sequence[instructions.Example]]),
               lora_config):
    self.cfg = config.fedpit.selfgen
    self.seed = config.seed
    self.model = model
    self.real = {c: as_pairs(exs) for c, exs in (
        real.items() if isinstance(real, Mapping) else enumerate(real))}
    self.lora_config = lora_config
    self.store = selfgen.SyntheticStore(os.path.join(workdir, "synthetic"))
    self.sampler = sampler_lib.Sampler(model.config, model.tokenizer,
                                       pad_multiple=self.cfg.sampling.pad_multiple,
                                       decode=self.cfg.sampling.decode)
    self.made: dict[int, dict[int, dict]] = {}  # round -> client -> counts
    self._merged: tuple[int, Any] | None = None
    self._read: dict[tuple[int, int], tuple[list[dict], dict]] = {}

  def merged(self, round_: int, params) -> Any:
    """Base + this round's global adapter as one set of weights.

    Every client of a round samples from the same model, so it is merged
    once per round; without an adapter argument the sampler takes its
    fastest decode path (e.g. the packed CPU kernel), which a separate
    adapter would rule out.
    """
    if self._merged is None or self._merged[0] != round_:
      self._merged = None  # Free the old copy first.
      self._merged = (round_, jax.jit(lora_lib.merge, static_argnums=2)(
          self.model.params, params, self.lora_config))
    return self._merged[1]

  def active_round(self, round_: int, client: int) -> int | None:
    """The round whose pairs ``client`` trains on in ``round_`` (None: make them)."""
    done = [g for g in self.store.rounds(client) if g <= round_]
    if done and round_ - done[-1] < self.cfg.every:
      return done[-1]
    return None

  def records(self, round_: int, client: int, params) -> list[dict]:
    g = self.active_round(round_, client)
    if g is None:
      g = round_
      def make():
        if self.store.get(round_, client) is None:
          recs, counts = selfgen.generate(
              self.sampler, self.merged(round_, params), self.real[client],
              client_id=client, round_=round_, seed=self.seed, cfg=self.cfg)
          self.store.put(round_, client, recs, counts)
      common.lead_then_sync(make, f"selfgen_{round_}_{client}")
    if (g, client) not in self._read:  # Both phases of a round ask.
      self._read[(g, client)] = self.store.get(g, client)
    records, counts = self._read[(g, client)]
    if g == round_:  # Made for this round (now, or before a restart).
      self.made.setdefault(round_, {})[client] = counts
    return records

  def round_metrics(self, round_: int) -> dict[str, Any]:
    made = self.made.pop(round_, {})
    if not made:
      return {}
    return {"synthetic": {str(c): counts for c, counts in sorted(made.items())},
            "synthetic_kept": sum(c.get("kept", 0) for c in made.values())}


class PhaseData:
  """:class:`fedjax_u2s.train.RoundData` of one training phase.

  ``use_real`` / ``use_synthetic`` say what the phase trains on; tokenized
  sets are cached per (client, synthetic round). ``real`` is indexed by
  client id (a list, or a mapping of some clients, as in
  :class:`SelfGeneration`).
  """

  def __init__(self, tokenize,
               real: (Sequence[Sequence[instructions.Example]] |
                      Mapping[int, Sequence[instructions.Example]]),
               gen: SelfGeneration | None, *, use_real: bool, use_synthetic: bool,
               report_metrics: bool = False):
    self.tokenize = tokenize
    self.real = real
    self.gen = gen
    self.use_real = use_real
    self.use_synthetic = use_synthetic and gen is not None
    self.report_metrics = report_metrics
    self.num_clients = len(real)
    self._cache: dict[tuple[int, int | None], Any] = {}

  def sets(self, round_, client_ids, params):
    out = []
    for c in client_ids:
      c = int(c)
      synth, key = [], None
      if self.use_synthetic:
        recs = self.gen.records(round_, c, params)
        key = recs[0]["round"] if recs else -1
        synth = [synthetic_example(r) for r in recs]
      if (c, key) not in self._cache:
        exs = (list(self.real[c]) if self.use_real else []) + synth
        self._cache[(c, key)] = (self.tokenize(exs, f"client {c}") if exs else None)
      out.append(self._cache[(c, key)])
    return out

  def round_metrics(self, round_):
    if self.report_metrics and self.gen is not None:
      return self.gen.round_metrics(round_)
    return {}


# ----------------------------------------------------------------------------
# The job.


def _phases(variant: str, tokenize, clients, gen):
  """``(global data, local data or None)`` of a variant (see the module doc)."""
  def real():
    return [tokenize(exs, f"client {i}") for i, exs in enumerate(clients)]

  if variant == "fedpit":
    return (PhaseData(tokenize, clients, gen, use_real=False, use_synthetic=True,
                      report_metrics=True),
            PhaseData(tokenize, clients, gen, use_real=True, use_synthetic=True))
  if variant == "no_isolation":
    return PhaseData(tokenize, clients, gen, use_real=True, use_synthetic=True,
                     report_metrics=True), None
  if variant == "fedit":
    return real(), None
  if variant == "local":
    return PhaseData(tokenize, clients, None, use_real=False,
                     use_synthetic=False), real()
  raise ValueError(f"config.fedpit.variant={variant!r} is not one of {VARIANTS}.")


def node_phases(variant: str, tokenize,
                clients: Mapping[int, Sequence[instructions.Example]],
                gen: SelfGeneration | None) -> tuple[PhaseData, PhaseData | None]:
  """:func:`_phases` for some clients only (a Flower node holds one).

  Both phases as :class:`PhaseData` over ``clients`` (by client id): the
  same examples :func:`_phases` gives each of them; the phase a variant does
  not train gives no set (weight 0, nothing uploaded). None: no local phase.
  """
  if variant not in VARIANTS:
    raise ValueError(f"config.fedpit.variant={variant!r} is not one of {VARIANTS}.")
  synthetic = variant in SYNTHETIC
  global_data = PhaseData(tokenize, clients, gen if synthetic else None,
                          use_real=variant in ("no_isolation", "fedit"),
                          use_synthetic=synthetic, report_metrics=True)
  local_data = None
  if variant in ISOLATED:
    local_data = PhaseData(tokenize, clients, gen if synthetic else None,
                           use_real=True, use_synthetic=variant == "fedpit")
  return global_data, local_data


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Splits the data, trains (with self-generation), exports, evaluates, audits."""
  model = common.load_model(config)
  result, clients, non_members, split = train_and_export(config, workdir, model)
  with common.stage("evaluate", "task accuracy, extraction and membership audit"):
    summary = common.run_stage(workdir, "evaluate", lambda: evaluate(
        config, workdir, model, result, clients, non_members, split))
  if common.is_lead():
    print(report.fedpit_summary(summary, os.path.join(workdir, "report.md")))


def train_and_export(config: ml_collections.ConfigDict, workdir: str, model):
  """The train stage of :func:`run`: split, train with self-generation, export.

  Returns:
    ``(train.TrainResult, clients' real examples, non-member examples,
    split summary)``. The Flower test compares a FedPIT federation with it.
  """
  variant = config.fedpit.variant
  clients, non_members, split = split_articles(config)
  if common.is_lead():
    writer.atomic_write_json(os.path.join(workdir, "clients.json"), split)
  system = config.data.system_prompt or None

  def tokenize(exs, name):
    return instructions.tokenize(exs, model.tokenizer, config.train.max_length,
                                 system_prompt=system, name=name, log=False)

  lora_config = train.lora_config_from(config.lora)
  gen = (SelfGeneration(config, workdir, model, clients, lora_config)
         if variant in SYNTHETIC else None)
  global_data, local_data = _phases(variant, tokenize, clients, gen)
  with common.stage("train", f"{variant}: {config.federated.num_rounds} rounds of "
                    f"{config.federated.algorithm} over {len(clients)} clients "
                    f"({sum(map(len, clients))} real examples)"):
    result = train.train(config, workdir, model_config=model.config,
                         base_params=model.params, client_sets=global_data,
                         local_sets=local_data,
                         eval_set=tokenize(non_members, "non-members"))
    if common.is_lead():
      _export(config, workdir, result)
  return result, clients, non_members, split


def _export(config, workdir: str, result: train.TrainResult) -> None:
  """The global adapter to ``adapter/``, each local one to ``local_adapters/``."""
  if not config.export.peft:
    return
  export.save_peft(os.path.join(workdir, "adapter"), result.lora,
                   result.lora_config, base_model=config.model.name)
  if result.local is not None:
    n = jax.tree.leaves(result.local)[0].shape[0]
    for c in range(n):
      export.save_peft(
          os.path.join(workdir, "local_adapters", f"client_{c:04d}"),
          jax.tree.map(lambda x: x[c], result.local), result.lora_config,
          base_model=config.model.name)


def models_under_test(variant: str, result: train.TrainResult
                      ) -> dict[str, tuple[Any, Any]]:
  """``{name: (adapter or None, the client it belongs to or None)}``.

  ``global`` is what the server and every client see; ``personal_c`` (base
  + global + client c's local adapter) is what stays with client c.
  """
  out = {"base": (None, None)}
  if variant != "local":
    out["global"] = (result.lora, None)
  if result.local is not None:
    n = jax.tree.leaves(result.local)[0].shape[0]
    for c in range(n):
      local = jax.tree.map(lambda x: x[c], result.local)
      out[f"personal_{c}"] = (lora_lib.concat_rank(result.lora, local), c)
  return out


def task_suites(config, split: dict, titles: Sequence[str] | None = None) -> list:
  """Multiple choice on the task's own question: unseen titles, and own ones.

  ``task_unseen`` asks about articles of the topics that no client holds
  (and that are not the non-members either, whose examples the held-out
  loss uses); ``task_own`` about ``titles`` (default: every client's).
  """
  e = config.evaluate
  held = [t for c in split["clients"] for t in c["titles"]]
  template = builtin.TEMPLATES["description"][0]
  topics = tuple(config.data.topics)
  return [
      suites.wiki_mc(topics, seed=e.seed, name="task_unseen", template=template,
                     num_questions=e.num_questions,
                     exclude_titles=set(held) | set(split["non_member_titles"])),
      suites.wiki_mc(topics, seed=e.seed, name="task_own", template=template,
                     num_questions=None, include_titles=set(titles or held)),
  ]


def evaluate(config, workdir: str, model, result: train.TrainResult,
             clients, non_members, split) -> dict:
  """Task accuracy and the privacy audit of every model; privacy.json, report.md.

  Every model's scores and audit are cached in ``eval/`` (a rerun after a
  crash continues with the next model).
  """
  variant, a = config.fedpit.variant, config.audit
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  scores, audits = {}, {}
  for name, (lora, client) in models_under_test(variant, result).items():
    own = None if client is None else split["clients"][client]["titles"]
    scores[name] = common.evaluate_cached(
        config, model, task_suites(config, split, own), out_dir, name,
        lora=lora, lora_config=result.lora_config if lora is not None else None)
    path = os.path.join(out_dir, f"audit_{name}.json")
    if not os.path.exists(path):
      members = ({c: list(exs) for c, exs in enumerate(clients)} if client is None
                 else {client: list(clients[client])})
      res = privacy_audit.audit(
          model.config, model.params, model.tokenizer, members, non_members,
          lora=lora, lora_config=result.lora_config if lora is not None else None,
          prefix_tokens=a.prefix_tokens, min_tokens=a.min_tokens,
          max_new_tokens=a.max_new_tokens or None, near_threshold=a.near_threshold,
          baseline=client is None, batch_size=config.evaluate.batch_size,
          max_length=config.train.max_length, decode=config.evaluate.decode,
          seed=config.seed)
      writer.atomic_write_json(path, res)
    with open(path, encoding="utf-8") as f:
      audits[name] = json.load(f)
  fed = config.federated
  dp = None
  if fed.dp.enabled:
    n = len(clients)
    q = privacy.sampling_rate(fed.clients_per_round, n)
    eps = privacy.epsilon(noise_multiplier=fed.dp.noise_multiplier,
                          sampling_rate=q, rounds=result.rounds, delta=fed.dp.delta)
    dp = {"epsilon": eps if np.isfinite(eps) else None, "delta": fed.dp.delta,
          "noise_multiplier": fed.dp.noise_multiplier, "clip_norm": fed.dp.clip_norm,
          "rounds": result.rounds, "sampling_rate": q,
          "sampling": "Poisson subsampling of clients assumed, q = clients_per_round / num_clients"}
  summary = summarize(variant, scores, audits, dp, result.metrics)
  writer.atomic_write_json(os.path.join(workdir, "privacy.json"), summary["privacy"])
  report.write_fedpit_report(workdir, config, summary, split)
  return summary


def summarize(variant: str, scores: dict, audits: dict, dp: dict | None,
              metrics: Sequence[dict]) -> dict:
  """Task accuracy, paired differences with the base, privacy; JSON-ready.

  The personal models enter as one model, ``personal``: on ``task_unseen``
  each question's score is the mean over the clients' personal models, on
  ``task_own`` each client's model answers its own articles' questions;
  their audits are pooled (:func:`privacy_audit.pool`).
  """
  values = {name: stats.question_values(s) for name, s in scores.items()}
  personal = sorted(n for n in values if n.startswith("personal_"))
  if personal:
    own = {}
    for n in personal:
      own.update(values[n]["task_own"]["values"])
    values["personal"] = {
        "task_unseen": stats.mean_question_values(
            [values[n] for n in personal])["task_unseen"],
        "task_own": {"kind": values[personal[0]]["task_own"]["kind"], "values": own}}
    audits = {**audits, "personal": privacy_audit.pool([audits[n] for n in personal])}
  shown = [n for n in ("base", "global", "personal") if n in values]
  accuracy = {n: {t: {"accuracy": float(np.mean(list(v["values"].values()))),
                      "n": len(v["values"])} for t, v in values[n].items()}
              for n in shown}
  paired = {n: {t: stats.paired_bootstrap(values[n][t], values["base"][t])
                for t in values[n]} for n in shown if n != "base"}
  for rows in paired.values():
    stats.adjust_family(list(rows.values()))
  extraction = {}
  for n, res in audits.items():
    extraction[n] = {k: res.get(k) for k in (
        "verbatim_rate", "verbatim", "verbatim_ci", "near_verbatim_rate",
        "near_verbatim", "near_verbatim_ci", "mia_auc", "mia_auc_ci", "n",
        "n_members", "n_non_members", "member_loss", "non_member_loss")}
    if res.get("baseline"):
      extraction[n]["non_member_verbatim_rate"] = res["baseline"]["verbatim_rate"]
  counts: dict[str, int] = {}
  for row in metrics:
    for c in row.get("synthetic", {}).values():
      for reason, k in c.items():
        counts[reason] = counts.get(reason, 0) + k
  return {"variant": variant, "accuracy": accuracy, "paired_vs_base": paired,
          "privacy": {"extraction": extraction, "dp": dp},
          "audits": {n: {k: v for k, v in a.items() if k != "records"}
                     for n, a in audits.items()},
          "synthetic": counts,
          # The global adapter's loss (None where it trained on nothing,
          # as in the local variant) and the local adapters'.
          "final_train_loss": next((r["train_loss"] for r in reversed(metrics)
                                    if r.get("num_tokens")), None),
          "final_local_loss": next((r["local_loss"] for r in reversed(metrics)
                                    if "local_loss" in r), None),
          "final_eval_loss": next((r["eval_loss"] for r in reversed(metrics)
                                   if "eval_loss" in r), None)}
