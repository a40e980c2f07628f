r"""Where one LoRA training step spends its time on the CPU: ours vs PyTorch.

One micro-batch of the federated round (batch 4 x seq 256, SmolLM2-135M's exact
shapes with random weights, LoRA r=16 on q, k, v, o, fp32), forward + backward,
timed as a median over ``--reps`` after a warm-up. The sides, each meant to run
in its own process (pin them to the same cores, e.g. ``taskset -c 2,3``):

* ``ours``: ``jax.grad`` of ``objectives.causal_lm_loss``; with ``--trace``
  one more step runs under ``jax.profiler`` and the XLA:CPU ops are summed by
  category (YNNPACK fusions are the dots, plus whatever YNNPACK fused into
  them); ``--peak`` also times a 2048^3 ``jnp.dot`` for MFU.
* ``peer``: transformers ``LlamaForCausalLM`` + PEFT, one AdamW step; with
  ``--trace`` torch.profiler's table of self CPU time.
* ``matmul``: the step's and the sampler's matmul shapes alone, XLA's dot,
  the kernel (``fedjax_u2s/kernels/cpu_gemm.py``) and (if importable) torch,
  GFLOP/s per shape; the decode shapes also with cold weights.

  taskset -c 2,3 python benchmarks/train_step_profile.py --side=ours --trace
  OMP_NUM_THREADS=2 taskset -c 2,3 python benchmarks/train_step_profile.py --side=peer --trace
  taskset -c 2,3 python benchmarks/train_step_profile.py --side=matmul

Results and the runs behind them: docs/benchmarks.md ("Where the CPU step's
time goes").
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SMOLLM2_135M, median_time, peak_flops  # noqa: E402  (benchmarks/ is not a package)

_SIDE = flags.DEFINE_enum("side", "ours", ["ours", "peer", "matmul"], "What to time.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed steps (median reported).")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_REMAT = flags.DEFINE_bool("remat", False, "Ours: remat each layer.")
_CHUNK = flags.DEFINE_integer("logits_chunk_size", 0, "Ours: chunked logits (0: full).")
_UNSTACK = flags.DEFINE_bool("unstack", False, "Ours: unrolled per-layer weights "
                             "instead of the layer scan.")
_TRACE = flags.DEFINE_bool("trace", False, "Profile one more step and summarise it.")
_PEAK = flags.DEFINE_bool("peak", True, "Ours: time a 2048^3 jnp.dot for MFU.")
_TOP = flags.DEFINE_integer("top", 20, "Ops listed with --trace.")

# (M, K, N) of the step's dense products: projections of 1024 tokens and the tied head.
MATMUL_SHAPES = ((1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576),
                 (1024, 576, 192), (1020, 576, 49152), (2048, 2048, 2048),
                 # Decoding at batch 16 and 1 (the sampler's products).
                 (16, 576, 1536), (16, 1536, 576), (16, 576, 49152),
                 (1, 576, 1536), (1, 576, 49152))


def categorize(name: str) -> str | None:
  """The category of one XLA:CPU op in a trace; None for wrappers and waits."""
  if re.search(r"ThunkExecutor|SlinkyThreadPool|block_until_ready|^\$", name):
    return None
  if name.startswith("ynn_fusion") or name.startswith("xnn_fusion"):
    return "dot (YNNPACK fusion)"
  if name.startswith("wrapped_broadcast"):
    return "broadcast (buffer init)"
  if "dynamic" in name:
    return "dynamic slice / update"
  if name.startswith("copy"):
    return "copy"
  if "exponential" in name:
    return "exp"
  if name.startswith("while"):
    return "loop control"
  return "other fused loops"


def summarize_trace(trace_dir: str, top: int) -> dict:
  """Per category and per op, summed microseconds of a jax.profiler trace."""
  path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*",
                                       "*.trace.json.gz")))[-1]
  with gzip.open(path) as f:
    events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
  by_cat, by_op, calls = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    cat = categorize(e["name"])
    if cat is None:
      continue
    by_cat[cat] += e["dur"]
    by_op[e["name"]] += e["dur"]
    calls[e["name"]] += 1
  total = sum(by_cat.values())
  return {"total_ms": total / 1e3,
          "categories": {c: {"ms": v / 1e3, "share": v / total}
                         for c, v in by_cat.most_common()},
          "top_ops": [{"op": n, "ms": v / 1e3, "calls": calls[n]}
                      for n, v in by_op.most_common(top)]}


def run_ours() -> dict:
  import jax
  import jax.numpy as jnp

  from fedjax_u2s import lora as lora_lib
  from fedjax_u2s.federated import objectives
  from fedjax_u2s.models import llama
  from fedjax_u2s.models.config import ModelConfig

  config = ModelConfig.from_hf_config(SMOLLM2_135M, dtype="float32",
                                      param_dtype="float32", remat=_REMAT.value)
  base = llama.init_params(jax.random.key(0), config)
  if _UNSTACK.value:
    base = llama.unstack_layers(base)
  lcfg = lora_lib.LoraConfig(rank=16, alpha=32.0, targets=("q", "k", "v", "o"))
  lora = lora_lib.init(jax.random.key(1), config, lcfg)
  loss_fn = objectives.make_causal_lm_loss(config, lcfg,
                                           logits_chunk_size=_CHUNK.value)
  b, t = _BATCH.value, _SEQ.value
  tokens = jax.random.randint(jax.random.key(2), (b, t), 0, config.vocab_size)
  ones = jnp.ones((b, t), bool)
  batch = {"tokens": tokens, "input_mask": ones, "loss_mask": ones}
  grad = jax.jit(jax.grad(lambda l, p, x: loss_fn(l, p, x, None)[0]))
  start = time.perf_counter()
  compiled = grad.lower(lora, base, batch).compile()
  compile_s = time.perf_counter() - start
  step = lambda: jax.block_until_ready(compiled(lora, base, batch))
  seconds, times = median_time(step, _REPS.value)
  out = dict(side="ours", remat=_REMAT.value, logits_chunk_size=_CHUNK.value,
             unstack=_UNSTACK.value, jax=jax.__version__, compile_s=compile_s,
             step_s=seconds, step_times=times, tokens_per_s=b * t / seconds,
             xla_temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2**20,
             xla_flags=os.environ.get("XLA_FLAGS", ""))
  if _PEAK.value:
    out["peak_gflops"] = peak_flops(2048, jnp.float32) / 1e9
    out["mfu"] = 4 * config.num_params * b * t / seconds / (out["peak_gflops"] * 1e9)
  if _TRACE.value:
    with tempfile.TemporaryDirectory() as d:
      jax.profiler.start_trace(d)
      step()
      jax.profiler.stop_trace()
      out["profile"] = summarize_trace(d, _TOP.value)
  return out


def run_peer() -> dict:
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  hf = {k: v for k, v in SMOLLM2_135M.items() if k not in ("model_type", "architectures")}
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=16, lora_alpha=32, lora_dropout=0.0,
      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
  b, t = _BATCH.value, _SEQ.value
  tokens = torch.randint(0, SMOLLM2_135M["vocab_size"], (b, t))

  def step():
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    opt.zero_grad()

  seconds, times = median_time(step, _REPS.value)
  out = dict(side="peer", torch=torch.__version__, threads=torch.get_num_threads(),
             step_s=seconds, step_times=times, tokens_per_s=b * t / seconds)
  if _TRACE.value:
    with torch.profiler.profile() as prof:
      step()
    rows = sorted(prof.key_averages(), key=lambda r: r.self_cpu_time_total, reverse=True)
    total = sum(r.self_cpu_time_total for r in rows)
    out["profile"] = {"total_ms": total / 1e3, "top_ops": [
        {"op": r.key, "ms": r.self_cpu_time_total / 1e3, "calls": r.count,
         "share": r.self_cpu_time_total / total} for r in rows[:_TOP.value]]}
  return out


def run_matmul() -> dict:
  """GFLOP/s per shape: XLA's dot, the kernel (if built), torch (if importable).

  Each shape once with one weight (``jax``, ``kernel``: in cache after the
  first call) and, for the decode shapes (M <= 32), once over ~600 MB of
  distinct weights in one jitted call (``jax_cold``, ``kernel_cold``), as a
  decode step reads every weight of the model once from memory.
  """
  import jax
  import jax.numpy as jnp
  from fedjax_u2s.kernels import cpu_gemm
  out = {"jax": {}, "kernel": {}, "jax_cold": {}, "kernel_cold": {}, "torch": {}}
  fns = {"jax": lambda a, w: cpu_gemm.matmul(a, w, sgemm=False)}
  if cpu_gemm.available():
    fns["kernel"] = cpu_gemm.matmul
  for name, fn in fns.items():
    f = jax.jit(fn)
    for m, k, n in MATMUL_SHAPES:
      a, w = jnp.ones((m, k)), jnp.ones((k, n))
      s, _ = median_time(lambda: jax.block_until_ready(f(a, w)), _REPS.value)
      out[name][f"{m}x{k}x{n}"] = 2.0 * m * k * n / s / 1e9
      if m > 32:
        continue
      count = max(4, 600 * 2**20 // (4 * k * n))
      ws = [jax.random.normal(jax.random.key(i), (k, n)) for i in range(count)]
      many = jax.jit(lambda a, ws, fn=fn: [fn(a, w) for w in ws])
      s, _ = median_time(lambda: jax.block_until_ready(many(a, ws)), _REPS.value)
      out[name + "_cold"][f"{m}x{k}x{n}"] = 2.0 * m * k * n * count / s / 1e9
  try:
    import torch
  except ImportError:
    return out
  for m, k, n in MATMUL_SHAPES:
    a, w = torch.ones(m, k), torch.ones(k, n)
    s, _ = median_time(lambda: a @ w, _REPS.value)
    out["torch"][f"{m}x{k}x{n}"] = 2.0 * m * k * n / s / 1e9
  return out


def main(argv):
  del argv
  result = {"ours": run_ours, "peer": run_peer, "matmul": run_matmul}[_SIDE.value]()
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
