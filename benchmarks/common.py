"""What the benchmarks share: SmolLM2-135M's shapes, timing, the peak-dot reference."""

from __future__ import annotations

import statistics
import time

# SmolLM2-135M-Instruct's config.json (the fields the decoder reads): the exact
# shapes for random-weight runs.
SMOLLM2_135M = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152,
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2)


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
  """One untimed warm-up call of ``fn``, then the median of ``repeats`` timed calls."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def peak_flops(n: int, dtype) -> float:
  """FLOP/s of an n x n x n matmul: the MFU denominator of every benchmark.

  ``jnp.dot`` (XLA's kernel) and, where it applies (float32 on the CPU, kernel
  built), ``cpu_gemm.matmul`` (MKL's sgemm): the faster of the two, so a model
  that runs its matmuls through the faster kernel is not flattered by the
  slower one.
  """
  import jax
  import jax.numpy as jnp
  from fedjax_u2s.kernels import cpu_gemm
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  on_cpu = jax.default_backend() == "cpu"
  fns = [jnp.dot]
  if on_cpu and a.dtype == jnp.float32 and cpu_gemm.available():
    fns.append(cpu_gemm.matmul)
  reps = 5 if on_cpu else 50
  best = 0.0
  for fn in fns:
    mm = jax.jit(fn)
    seconds, _ = median_time(lambda: jax.block_until_ready(mm(a, b)), reps)
    best = max(best, 2.0 * n ** 3 / seconds)
  return best
