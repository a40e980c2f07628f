r"""Same-process A/B of decode step time: unrolled vs scanned layers, kernel on/off.

Random weights with SmolLM2-135M's shapes (no model file needed), fp32 CPU,
greedy. Decode time per step is (time for N new tokens - time for 1) / (N - 1),
so prefill is excluded; the prefill is reported as the time for 1 token.
Variants alternate within each repeat, so machine drift hits all alike.
Each variant is a ``decoding.DecodePlan`` passed as ``sample_tokens(decode=...)``:
``unroll`` its layers, ``kernel`` its ops (``ops.CPU_KERNEL``, the CPU matmul
kernel in the prefill and the decode steps, or ``ops.XLA``), ``pack`` its
packed decode weights (with the kernel and unrolled layers only).

  python benchmarks/decode_ab.py --batch_sizes=1,16
  python benchmarks/decode_ab.py --batch_sizes=8 --prompt_len=896 --new_tokens=64
"""

import itertools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_u2s import decoding
from fedjax_u2s import ops
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s.models import llama
from fedjax_u2s.models.config import ModelConfig

_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 40, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating repeats (median).")
_UNROLL = flags.DEFINE_list("unroll", ["true", "false"], "DecodePlan.unroll values.")
_KERNEL = flags.DEFINE_list("kernel", ["true", "false"], "Kernel ops on/off.")
_PACK = flags.DEFINE_list("pack", ["true"], "DecodePlan.packed values (with the "
                          "kernel and unrolled layers only).")

SMOLLM2_SHAPES = ModelConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5, rms_norm_eps=1e-5,
    tie_word_embeddings=True, name="smollm2-135m-shapes")


def _bools(values):
  return [v.lower() in ("1", "true", "yes") for v in values]


def compiled_call(params, cfg, batch, new_tokens, unroll, kernel, pack):
  tokens = jnp.ones((batch, _PROMPT.value), jnp.int32)
  mask = jnp.ones((batch, _PROMPT.value), bool)
  rngs = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(batch))
  tables = jnp.zeros((0, 1, cfg.vocab_size), jnp.int32)
  lengths = jnp.zeros((0,), jnp.int32)
  args = (params, tokens, mask, rngs, tables, lengths)
  start = time.perf_counter()
  fn = sampler_lib.sample_tokens.lower(
      *args, config=cfg, strategy=sampler_lib.Greedy(), max_new_tokens=new_tokens,
      eos_ids=(), pad_id=0, decode=decoding.DecodePlan(
          unroll=unroll, ops=ops.CPU_KERNEL if kernel else ops.XLA,
          packed=pack)).compile()
  compile_s = time.perf_counter() - start
  return (lambda: fn(*args).tokens.block_until_ready()), compile_s


def main(argv):
  del argv
  cfg = SMOLLM2_SHAPES
  params = llama.init_params(jax.random.key(0), cfg)
  variants = [(u, k, p) for u, k, p in itertools.product(
      _bools(_UNROLL.value), _bools(_KERNEL.value), _bools(_PACK.value))
              if not p or (u and k)]
  for b in map(int, _BATCHES.value):
    calls, compile_s = {}, {}
    for v in variants:
      for n in (1, _NEW.value):
        calls[v + (n,)], compile_s[v + (n,)] = compiled_call(params, cfg, b, n, *v)
    times = {k: [] for k in calls}
    for _ in range(_REPEATS.value):
      for k, call in calls.items():
        start = time.perf_counter()
        call()
        times[k].append(time.perf_counter() - start)
    for v in variants:
      unroll, kernel, pack = v
      prefill = np.median(times[v + (1,)])
      whole = np.median(times[v + (_NEW.value,)])
      step = (whole - prefill) / (_NEW.value - 1)
      print(f"batch {b:3d} {'unrolled' if unroll else 'scanned ':8s} "
            f"kernel {'on ' if kernel else 'off'}{' packed' if pack else '       '}: prefill {prefill * 1e3:6.0f} ms, "
            f"decode {step * 1e3:6.1f} ms/step = {b / step:6.1f} tok/s "
            f"(compile {compile_s[v + (_NEW.value,)]:.1f} s)", flush=True)


if __name__ == "__main__":
  app.run(main)
