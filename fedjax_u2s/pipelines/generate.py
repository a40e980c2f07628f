"""The ``generate`` job: answer a few prompts with the jitted sampler.

Writes ``generations.jsonl`` (prompt, response, token count, stop reason) to
the workdir; ``configs/generate.py`` is its config.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import ml_collections

from fedjax_u2s import sampler
from fedjax_u2s.pipelines import common

# Nothing to resume: every run answers the prompts anew and rewrites its file.
STAGES = ()

def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Answers ``config.prompts`` with the model, through its chat template."""
  model = common.load_model(config)
  tok = model.tokenizer
  prompts = list(config.prompts)
  if config.use_chat_template:
    texts = [tok.apply_chat_template([{"role": "user", "content": p}],
                                     add_generation_prompt=True) for p in prompts]
  else:
    texts = prompts
  ids = [tok.encode(t) for t in texts]
  smp = sampler.Sampler(model.config, tok, decode=config.sampling.decode)
  start = time.perf_counter()
  out = smp(model.params, ids, max_new_tokens=config.sampling.max_new_tokens,
            strategy=sampler.strategy_from_config(config.sampling),
            stop_strings=tuple(config.sampling.stop_strings), seed=config.seed)
  seconds = time.perf_counter() - start
  if not common.is_lead():  # Every process sampled the same; one writes.
    return
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
