r"""Decode throughput of SmolLM2-135M-Instruct: our sampler vs transformers.

Both decode the same GGUF weights (dequantized to fp32) on the CPU, greedily,
exactly ``--new_tokens`` new tokens per row (EOS ignored), for the same chat
prompts, in the same process; we report new tokens per second (median of
``--repeats``), and our load and compile times separately.

Ours runs three ways: ``ours``, as ``Sampler`` decodes by default, from
``decoding.decode_weights`` (made once per model, timed as ``decode_weights_s``:
the GGUF's Q4_1/Q8_0 blocks kept where they hold the float32 weights
exactly, so the same float32 products read fewer bytes); ``ours_f32``, from
float32 panels packed in each call (the default before); ``ours_scan``, the
layer scan (``decode="scan"``: fast compile).

  pip install torch==2.13.0          # optional peer (CPU build)
  python benchmarks/generate.py --batch_sizes=1,16 --new_tokens=128

Without torch the peer is skipped.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_u2s import decoding
from fedjax_u2s import ops
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s.models import registry

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Model name or path.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
_PEER = flags.DEFINE_bool("peer", True, "Also time transformers + PyTorch.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch threads (0: all cores).")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_PAD = flags.DEFINE_integer(
    "pad_multiple", 0, "Left-pad our prompts to a multiple of this (0: the "
    "Sampler's default); the peer pads to the longest prompt.")

TOPICS = ["photosynthesis", "the French Revolution", "prime numbers", "insulin",
          "plate tectonics", "the immune system", "compound interest", "volcanoes",
          "the water cycle", "black holes", "vaccines", "the Pythagorean theorem",
          "antibiotics", "the printing press", "climate", "DNA replication"]


def prompts(tokenizer, n):
  return [tokenizer.apply_chat_template(
      [{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} in detail."}],
      add_generation_prompt=True) for i in range(n)]


def bench_ours(model, batch, new_tokens, repeats, variant, decode_params):
  tok = model.tokenizer
  smp = sampler_lib.Sampler(model.config, tok, **(
      {"pad_multiple": _PAD.value} if _PAD.value else {}))
  ids = [tok.encode(p) for p in prompts(tok, batch)]
  tokens, mask = sampler_lib.left_pad(ids, tok.pad_id, smp.pad_multiple)
  rngs = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(batch))
  tables, lengths = smp.stop_tables(())
  args = (model.params, jnp.asarray(tokens), jnp.asarray(mask), rngs, tables,
          lengths, None, decode_params if variant == "blocks" else None)
  static = dict(config=model.config, strategy=sampler_lib.Greedy(),
                max_new_tokens=new_tokens, eos_ids=(), pad_id=int(tok.pad_id),
                decode="scan" if variant == "scan" else "auto")
  start = time.perf_counter()
  compiled = sampler_lib.sample_tokens.lower(*args, **static).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = compiled(*args)
    jax.block_until_ready(state.tokens)
    times.append(time.perf_counter() - start)
  assert int(np.min(np.asarray(state.lengths))) == new_tokens
  med = statistics.median(times)
  return dict(tokens_per_s=batch * new_tokens / med, seconds=med, compile_s=compile_s,
              prompt_len=int(tokens.shape[1]),
              sample=tok.decode(np.asarray(state.tokens[0]).tolist())[:200])


def load_peer(path):
  import torch
  import transformers
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  d, f = os.path.split(path)
  start = time.perf_counter()
  tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      d, gguf_file=f, torch_dtype=torch.float32)
  model.eval()
  return tok, model, time.perf_counter() - start


def bench_peer(peer, our_tok, batch, new_tokens, repeats):
  import torch
  tok, model, _ = peer
  tok.padding_side = "left"
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  enc = tok(prompts(our_tok, batch), return_tensors="pt", padding=True,
            add_special_tokens=False)
  times = []
  with torch.inference_mode():
    for _ in range(repeats):
      start = time.perf_counter()
      out = model.generate(**enc, do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
      times.append(time.perf_counter() - start)
  new = out[:, enc["input_ids"].shape[1]:]
  assert new.shape[1] == new_tokens
  med = statistics.median(times)
  return dict(tokens_per_s=batch * new_tokens / med, seconds=med,
              sample=tok.decode(new[0])[:200])


def main(argv):
  del argv
  results = dict(machine=platform.machine(), cpus=os.cpu_count(),
                 jax=jax.__version__, backend=jax.default_backend(),
                 new_tokens=_NEW.value, runs=[])
  start = time.perf_counter()
  model = registry.load(_MODEL.value)
  jax.block_until_ready(model.params)
  results["load_s"] = time.perf_counter() - start
  print(f"ours: loaded {model.source} in {results['load_s']:.1f}s")
  peer = None
  if _PEER.value:
    try:
      import torch  # noqa: F401
      peer = load_peer(model.source)
      results["peer_load_s"] = peer[2]
      results["torch_threads"] = torch.get_num_threads()
      print(f"peer: loaded in {peer[2]:.1f}s")
    except ImportError:
      print("peer: torch not installed, skipped (pip install torch==2.13.0)")
  # After the peer: loading our kernel first (MKL set to its sequential
  # layer) left torch with one thread where it takes two.
  start = time.perf_counter()
  decode_params = decoding.decode_weights(model.params, model.config)
  jax.block_until_ready(decode_params)
  results["decode_weights_s"] = time.perf_counter() - start
  is_packed = lambda x: isinstance(x, ops.Packed)
  formats = sorted({w.fmt for w in jax.tree.leaves(decode_params, is_leaf=is_packed)
                    if is_packed(w)})
  results["decode_formats"] = formats
  print(f"ours: decode weights ({', '.join(formats)}) made in "
        f"{results['decode_weights_s']:.1f}s")
  for b in map(int, _BATCHES.value):
    row = dict(batch=b, **{
        name: bench_ours(model, b, _NEW.value, _REPEATS.value, variant, decode_params)
        for name, variant in (("ours", "blocks"), ("ours_f32", "f32"),
                              ("ours_scan", "scan"))})
    if peer is not None:
      row["peer"] = bench_peer(peer, model.tokenizer, b, _NEW.value, _REPEATS.value)
      row["ratio"] = row["ours"]["tokens_per_s"] / row["peer"]["tokens_per_s"]
    results["runs"].append(row)
    line = (f"batch {b:3d}: ours {row['ours']['tokens_per_s']:7.1f} tok/s "
            f"(compile {row['ours']['compile_s']:.1f}s; float32 panels "
            f"{row['ours_f32']['tokens_per_s']:.1f} tok/s; scanned layers "
            f"{row['ours_scan']['tokens_per_s']:.1f} tok/s, compile "
            f"{row['ours_scan']['compile_s']:.1f}s)")
    if peer is not None:
      line += (f" | transformers {row['peer']['tokens_per_s']:7.1f} tok/s"
               f" | ratio {row['ratio']:.2f}x")
    print(line, flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
