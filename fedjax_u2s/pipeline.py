"""Pipelines named by configs: each a function ``(config, workdir) -> None``.

A config's ``pipeline`` field picks one from :data:`PIPELINES`; stages write
everything they produce under ``workdir`` so a rerun can pick up from there.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from absl import logging
import ml_collections

PIPELINES: dict[str, Callable[[ml_collections.ConfigDict, str], None]] = {}


def register(name: str):
  def wrap(fn):
    PIPELINES[name] = fn
    return fn
  return wrap


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs the pipeline named by ``config.pipeline`` in ``workdir``."""
  name = config.get("pipeline")
  if name not in PIPELINES:
    raise ValueError(f"config.pipeline={name!r} is not one of {sorted(PIPELINES)}.")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  PIPELINES[name](config, workdir)


def sampling_strategy(cfg: ml_collections.ConfigDict):
  """The sampler strategy described by a ``sampling`` config block."""
  from fedjax_u2s import sampler
  kw = {"greedy": {}, "temperature": dict(temperature=cfg.temperature),
        "top_k": dict(k=cfg.top_k, temperature=cfg.temperature),
        "top_p": dict(p=cfg.top_p, temperature=cfg.temperature)}
  if cfg.strategy not in kw:
    raise ValueError(f"config.sampling.strategy={cfg.strategy!r} is not one of "
                     f"{sorted(kw)}.")
  return sampler.make_strategy(cfg.strategy, **kw[cfg.strategy])


@register("generate")
def generate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Answers ``config.prompts`` with the model, through its chat template.

  Writes ``generations.jsonl`` (prompt, text, tokens, stop reason) to workdir.
  """
  from fedjax_u2s import sampler
  from fedjax_u2s.models import registry

  model = registry.load(config.model.name, dtype=config.model.dtype,
                        param_dtype=config.model.param_dtype)
  tok = model.tokenizer
  prompts = list(config.prompts)
  if config.use_chat_template:
    texts = [tok.apply_chat_template([{"role": "user", "content": p}],
                                     add_generation_prompt=True) for p in prompts]
  else:
    texts = prompts
  ids = [tok.encode(t) for t in texts]
  smp = sampler.Sampler(model.config, tok,
                        unroll_layers=config.sampling.unroll_layers)
  start = time.perf_counter()
  out = smp(model.params, ids, max_new_tokens=config.sampling.max_new_tokens,
            strategy=sampling_strategy(config.sampling),
            stop_strings=tuple(config.sampling.stop_strings), seed=config.seed)
  seconds = time.perf_counter() - start
  path = os.path.join(workdir, "generations.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for prompt, text, toks, reason in zip(prompts, out.texts, out.tokens,
                                          out.stop_reasons):
      f.write(json.dumps({"prompt": prompt, "response": text, "num_tokens": len(toks),
                          "stop_reason": reason, "model": config.model.name,
                          "seed": config.seed}, ensure_ascii=False) + "\n")
      print(f"\n### {prompt}\n{text.strip()}")
  n_tokens = sum(len(t) for t in out.tokens)
  logging.info("Generated %d tokens for %d prompts in %.1fs (compile included); "
               "wrote %s", n_tokens, len(prompts), seconds, path)
  print(f"\nLoaded {model.source} in {model.load_seconds:.1f}s; generated "
        f"{n_tokens} tokens in {seconds:.1f}s (compile included). Wrote {path}")


def load_instruction_data(cfg: ml_collections.ConfigDict, seed: int) -> list:
  """Examples from ``cfg.path``: ``builtin:wiki`` or a local data file."""
  import numpy as np
  from fedjax_u2s.data import builtin
  from fedjax_u2s.data import instructions

  if cfg.path == "builtin:wiki":
    examples = builtin.wiki_instructions(topics=tuple(cfg.topics) or None, seed=seed)
  elif cfg.path.startswith("builtin:"):
    raise ValueError(f"config.data.path={cfg.path!r}: the only built-in "
                     "instruction set is 'builtin:wiki'.")
  else:
    examples = instructions.load_examples(cfg.path, format=cfg.format)
  if cfg.max_examples and len(examples) > cfg.max_examples:
    keep = np.sort(np.random.default_rng(seed).choice(
        len(examples), cfg.max_examples, replace=False))
    examples = [examples[i] for i in keep]
  return examples


def split_clients(examples: list, cfg: ml_collections.ConfigDict, seed: int
                  ) -> list[list]:
  """Partitions examples over clients as ``config.partition`` says."""
  from fedjax_u2s.data import partition

  def labels():
    missing = [i for i, e in enumerate(examples) if cfg.label_field not in e.meta]
    if missing:
      raise ValueError(
          f"config.partition.method={cfg.method!r} needs the field "
          f"{cfg.label_field!r} in every example; example {missing[0]} has only "
          f"{sorted(examples[missing[0]].meta)}. Set config.partition.label_field "
          "or use method=iid.")
    return [e.meta[cfg.label_field] for e in examples]

  if cfg.method == "iid":
    parts = partition.iid(len(examples), cfg.num_clients, seed, min_size=cfg.min_size)
  elif cfg.method == "dirichlet":
    parts = partition.dirichlet(labels(), cfg.num_clients, cfg.alpha, seed,
                                min_size=cfg.min_size)
  elif cfg.method == "natural":
    parts, _ = partition.natural(labels())
  else:
    raise ValueError(f"config.partition.method={cfg.method!r} is not one of "
                     "['dirichlet', 'iid', 'natural'].")
  return [[examples[i] for i in idx] for idx in parts]


def tune_and_export(config: ml_collections.ConfigDict, workdir: str, model,
                    client_examples: list[list], eval_examples: list):
  """Tokenizes client data, runs federated training, exports the adapter."""
  from fedjax_u2s import export
  from fedjax_u2s import train
  from fedjax_u2s.data import instructions

  system = config.data.system_prompt or None
  tok = lambda exs: instructions.tokenize(exs, model.tokenizer, config.train.max_length,
                                          system_prompt=system)
  client_sets = [tok(exs) for exs in client_examples]
  eval_set = tok(eval_examples) if eval_examples else None
  stats = {"clients": [dict(client=i, examples=len(exs), **_tokenize_stats(s))
                       for i, (exs, s) in enumerate(zip(client_examples, client_sets))]}
  if eval_set is not None:
    stats["eval"] = _tokenize_stats(eval_set)
  with open(os.path.join(workdir, "data_stats.json"), "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=2)
  result = train.train(config, workdir, model_config=model.config,
                       base_params=model.params, client_sets=client_sets,
                       eval_set=eval_set)
  import jax
  if jax.process_index() == 0:
    if config.export.peft:
      export.save_peft(os.path.join(workdir, "adapter"), result.lora,
                       result.lora_config, base_model=config.model.name)
    if config.export.merged:
      export.save_merged(os.path.join(workdir, "merged"), model.config, model.params,
                         result.lora, result.lora_config, model.tokenizer)
  return result, stats


def _tokenize_stats(s) -> dict:
  return {k: int(v) for k, v in s.stats.items()} if hasattr(s, "stats") else {}


@register("fedit")
def fedit(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Federated LoRA tuning on ready-made instruction data (FedIT / Shepherd)."""
  import numpy as np
  from fedjax_u2s import train
  from fedjax_u2s.models import registry

  train.maybe_initialize_distributed(config.multihost)
  model = registry.load(config.model.name, dtype=config.model.dtype,
                        param_dtype=config.model.param_dtype, remat=config.model.remat)
  examples = load_instruction_data(config.data, config.seed)
  order = np.random.default_rng(config.seed + 1).permutation(len(examples))
  n_eval = int(round(config.data.eval_fraction * len(examples)))
  eval_examples = [examples[i] for i in order[:n_eval]]
  train_examples = [examples[i] for i in np.sort(order[n_eval:])]
  client_examples = split_clients(train_examples, config.partition, config.seed)
  result, stats = tune_and_export(config, workdir, model, client_examples,
                                  eval_examples)
  rows = result.metrics
  if rows:
    last = [r for r in rows if "train_loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    print(f"\nTrained {result.rounds} rounds over {len(client_examples)} clients "
          f"({sum(len(c) for c in client_examples)} examples); final train loss "
          f"{last[-1]['train_loss']:.4f}" + (
              f", eval loss {evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f}"
              if evals else "") + f". Outputs in {workdir}")


def _stage_done(workdir: str, stage: str) -> dict | None:
  path = os.path.join(workdir, "stages", f"{stage}.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  return None


def _mark_done(workdir: str, stage: str, summary: dict) -> None:
  from fedjax_u2s.u2s import writer
  os.makedirs(os.path.join(workdir, "stages"), exist_ok=True)
  writer.atomic_write_json(os.path.join(workdir, "stages", f"{stage}.json"), summary)


def evaluation_suites(cfg: ml_collections.ConfigDict, held_titles, unheld_titles):
  """The offline suites of an ``evaluate`` config block.

  ``wiki_known`` asks about articles some client's text covers (knowledge the
  tuning could add), ``wiki_unseen`` about held-out articles of the same topics
  that no client holds (ability kept), ``math`` arithmetic with checkable
  answers. Every question comes from data no model generated.
  """
  from fedjax_u2s.evaluation import suites as suites_lib
  out = []
  topics = tuple(cfg.topics)
  if cfg.num_wiki_questions:
    out.append(suites_lib.wiki_mc(topics, seed=cfg.seed, name="wiki_known",
                                  num_questions=cfg.num_wiki_questions,
                                  include_titles=set(held_titles)))
    out.append(suites_lib.wiki_mc(topics, seed=cfg.seed, name="wiki_unseen",
                                  num_questions=cfg.num_wiki_questions,
                                  include_titles=set(unheld_titles)))
  if cfg.num_math_questions:
    out.append(suites_lib.math("arithmetic", num_questions=cfg.num_math_questions,
                               seed=cfg.seed, max_new_tokens=cfg.math_max_new_tokens))
  return out


def evaluate_models(config: ml_collections.ConfigDict, workdir: str, model,
                    suites: list, adapters: dict) -> dict[str, dict]:
  """Scores the base model and each adapter; cached per model in workdir/eval."""
  from fedjax_u2s.evaluation import runner

  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  results = {}
  for name, (lora, lcfg) in {"base": (None, None), **adapters}.items():
    path = os.path.join(out_dir, f"{name}.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        results[name] = json.load(f)
      continue
    res = runner.evaluate(model.config, model.params, model.tokenizer, suites,
                          lora=lora, lora_config=lcfg,
                          batch_size=config.evaluate.batch_size, seed=config.seed,
                          unroll_layers=config.evaluate.unroll_layers)
    runner.write_results(res, out_dir, name)
    with open(path, encoding="utf-8") as f:
      results[name] = json.load(f)
  return results


def write_report(workdir: str, title: str, sections: list[tuple[str, str]]) -> str:
  path = os.path.join(workdir, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"# {title}\n\n")
    for heading, body in sections:
      f.write(f"## {heading}\n\n{body.rstrip()}\n\n")
  return path


def _generation_table(stats: dict, corpus: dict) -> str:
  lines = ["| client | name | pieces | kept | rejected | yield | top rejection reasons |",
           "|---|---|---|---|---|---|---|"]
  for c in corpus["clients"]:
    s = stats["clients"].get(f"{c['client_id']:04d}", {})
    kept, rej = s.get("kept", 0), s.get("rejected", 0)
    reasons = sorted(s.get("rejected_by_reason", {}).items(), key=lambda kv: -kv[1])[:3]
    lines.append(f"| {c['client_id']} | {c['name']} | {c['pieces']} | {kept} | {rej} | "
                 f"{kept / max(kept + rej, 1):.0%} | "
                 f"{', '.join(f'{k} {v}' for k, v in reasons) or '-'} |")
  return "\n".join(lines)


@register("u2s")
def u2s(config: ml_collections.ConfigDict, workdir: str) -> None:
  """FedIT-U2S end to end: generate -> federated tuning -> evaluate -> report.

  Each stage is resumable: generation skips pieces already in the client
  files, training resumes from its last checkpoint, evaluation reuses the
  score files it wrote.
  """
  import jax
  from fedjax_u2s import export
  from fedjax_u2s import train
  from fedjax_u2s.data import instructions
  from fedjax_u2s.evaluation import runner
  from fedjax_u2s.models import bert
  from fedjax_u2s.models import registry
  from fedjax_u2s.u2s import stage

  train.maybe_initialize_distributed(config.multihost)
  model = registry.load(config.model.name, dtype=config.model.dtype,
                        param_dtype=config.model.param_dtype, remat=config.model.remat)

  # 1. Generate (each client from its own text; lead process only).
  gen = _stage_done(workdir, "generate")
  if gen is None:
    if jax.process_index() == 0:
      embedder = bert.Embedder.load(config.embedder.name)
      gen = stage.run_generation(config, workdir, model=model, embedder=embedder)
      _mark_done(workdir, "generate", gen)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("u2s_generate")
      gen = _stage_done(workdir, "generate")
  corpus = gen["corpus"]
  num_clients = len(corpus["clients"])

  # 2. Federated tuning on the generated pairs.
  records = stage.load_pairs(workdir, num_clients)
  to_example = lambda r, cid: instructions.Example(
      messages=({"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["response"]}),
      meta={"client": cid, "piece_id": r.get("piece_id")})
  client_examples, eval_examples = [], []
  for cid, recs in enumerate(records):
    if not recs:
      raise ValueError(
          f"U2S client {cid} ({corpus['clients'][cid]['name']}) kept no pairs "
          f"(see {os.path.join(workdir, 'generated', 'stats.json')}): give it "
          "more text, relax config.u2s.filters, or drop the client.")
    tr, ev = stage.split_eval(recs, config.data.eval_fraction, config.seed, cid)
    client_examples.append([to_example(r, cid) for r in tr])
    eval_examples.extend(to_example(r, cid) for r in ev)
  result, _ = tune_and_export(config, workdir, model, client_examples, eval_examples)

  if jax.process_index() != 0:
    return
  # 3. Evaluate base vs tuned, offline.
  held = [t for c in corpus["clients"] for t in c["doc_ids"]]
  suites = evaluation_suites(config.evaluate, held, corpus["holdout"])
  adapter_dir = os.path.join(workdir, "adapter")
  lora, lcfg = export.load_peft(adapter_dir, model.config) if os.path.exists(
      adapter_dir) else (result.lora, result.lora_config)
  scores = evaluate_models(config, workdir, model, suites, {"fedit_u2s": (lora, lcfg)})
  comparison = runner.compare_table(scores)

  # 4. Report.
  rows = result.metrics
  train_rows = [r for r in rows if "train_loss" in r]
  eval_rows = [r for r in rows if "eval_loss" in r]
  tr_lines = [f"- rounds: {result.rounds}, clients: {num_clients}, "
              f"algorithm: {config.federated.algorithm}"]
  if train_rows:
    tr_lines.append(f"- train loss: {train_rows[0]['train_loss']:.4f} (round 1) -> "
                    f"{train_rows[-1]['train_loss']:.4f} (round {train_rows[-1]['round']})")
  if eval_rows:
    tr_lines.append(f"- held-out generated pairs, loss: {eval_rows[0]['eval_loss']:.4f} "
                    f"(round {eval_rows[0]['round']}) -> {eval_rows[-1]['eval_loss']:.4f} "
                    f"(round {eval_rows[-1]['round']})")
  tr_lines.append("\n![training curves](curves.png)")
  totals = gen["stats"]["totals"]
  path = write_report(workdir, "FedIT-U2S run", [
      ("Setup", f"- generator and tuned model: `{config.model.name}`\n"
                f"- corpus: `{config.corpus.kind}` topics {tuple(config.corpus.topics)}, "
                f"{num_clients} clients; {len(corpus['holdout'])} documents held by no client\n"
                f"- demonstrations: {config.u2s.selection}, k={config.u2s.num_demonstrations}\n"
                f"- config: `config.json`"),
      ("Generated data", f"{totals.get('kept', 0)} pairs kept of "
                         f"{totals.get('kept', 0) + totals.get('rejected', 0)} pieces.\n\n"
                         + _generation_table(gen["stats"], corpus)),
      ("Federated tuning", "\n".join(tr_lines)),
      ("Evaluation: base vs tuned", comparison + "\n\nwiki_known: questions about "
       "articles whose text some client holds; wiki_unseen: articles of the same "
       "topics that no client holds; math: arithmetic with exact answers. Headline "
       "metric starred (acc_norm for multiple choice)."),
  ])
  print(f"\n{comparison}\n\nReport: {path}")
