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
