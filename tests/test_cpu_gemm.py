"""The MKL sgemm custom call against jnp.einsum: values, grads, vmap, lowering."""

import functools
import platform
import re
import sys

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_u2s import decoding
from fedjax_u2s import ops as ops_lib
from fedjax_u2s import sampler
from fedjax_u2s.kernels import cpu_gemm
from fedjax_u2s.models import llama
from fedjax_u2s.models.config import ModelConfig

_HIGHEST = jax.lax.Precision.HIGHEST
_ON_MKL_PLATFORM = sys.platform == "linux" and platform.machine() == "x86_64"


def _ref(x, w, transpose_w):
  return jnp.einsum("...k,nk->...n" if transpose_w else "...k,kn->...n", x, w,
                    precision=_HIGHEST)


def _rand(key, *shape):
  return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


def _custom_calls(f, *args) -> list[str]:
  """Lines of f's StableHLO that call the sgemm target."""
  text = jax.jit(f).lower(*args).as_text()
  return [l for l in text.splitlines() if "fedjax_u2s_cpu_gemm" in l]


def test_available_where_mkl_is_a_dependency():
  # setup.cfg installs `mkl` on x86-64 Linux and CI has g++: there the kernel
  # must load, not fall back to XLA unnoticed.
  if not _ON_MKL_PLATFORM:
    pytest.skip("mkl is a dependency on x86-64 Linux only")
  assert cpu_gemm.available(), cpu_gemm.unavailable_reason()


needs_kernel = pytest.mark.skipif(
    not cpu_gemm.available(), reason=f"no sgemm kernel: {cpu_gemm.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("x_shape", [(7,), (5, 7), (2, 3, 7), (0, 7)])
def test_matches_einsum(transpose_w, x_shape):
  x = _rand(0, *x_shape)
  w = _rand(1, 4, 7) if transpose_w else _rand(1, 7, 4)
  f = jax.jit(lambda x, w: cpu_gemm.matmul(x, w, transpose_w=transpose_w))
  assert len(_custom_calls(f, x, w)) == 1
  y = f(x, w)
  assert y.shape == (*x_shape[:-1], 4)
  np.testing.assert_allclose(y, _ref(x, w, transpose_w), rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("m,k,n", [
    (1, 576, 1536),   # decoding, one row: the streaming loops
    (16, 576, 192),   # 192 columns: thread blocks rounded to whole tiles
    (13, 1100, 200),  # rows past a 6- and 4-row tile, K past one K block,
                      # columns past a whole tile, K not a vector multiple
    (32, 64, 64),     # the most rows streamed
    (33, 96, 130),    # one more: MKL's sgemm
])
def test_matches_float64_at_kernel_edges(transpose_w, m, k, n):
  """Both paths (few rows streamed, more rows through sgemm) at tile edges."""
  rng = np.random.default_rng(m * k + n)
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((n, k) if transpose_w else (k, n)).astype(np.float32)
  y = jax.jit(lambda x, w: cpu_gemm.matmul(x, w, transpose_w=transpose_w))(x, w)
  want = x.astype(np.float64) @ (w.T if transpose_w else w).astype(np.float64)
  # float32 sums of k terms of size ~1: error well under 1e-6 * k.
  np.testing.assert_allclose(y, want, rtol=0, atol=1e-6 * k)


@needs_kernel
@pytest.mark.parametrize("transpose_b", [False, True])
def test_batched_matmul_values_and_grads(transpose_b):
  """Attention's products: one custom call over the batch; grads match."""
  a = _rand(0, 2, 3, 5, 7)
  b = _rand(1, 2, 3, 4, 7) if transpose_b else _rand(1, 2, 3, 7, 4)
  spec = "...mk,...nk->...mn" if transpose_b else "...mk,...kn->...mn"
  ours = lambda a, b: cpu_gemm.batched_matmul(a, b, transpose_b=transpose_b)
  ref = lambda a, b: jnp.einsum(spec, a, b, precision=_HIGHEST)
  assert len(_custom_calls(ours, a, b)) == 1
  np.testing.assert_allclose(jax.jit(ours)(a, b), ref(a, b), rtol=1e-6, atol=1e-6)
  loss = lambda mm: lambda a, b: jnp.sum(jnp.sin(mm(a, b)))
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(a, b)
  want = jax.grad(loss(ref), argnums=(0, 1))(a, b)
  for u, v in zip(got, want):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
  assert not _custom_calls(functools.partial(cpu_gemm.batched_matmul, sgemm=False,
                                             transpose_b=transpose_b),
                           a, b)
  with pytest.raises(ValueError, match="equal leading dims"):
    cpu_gemm.batched_matmul(a, b[:1], transpose_b=transpose_b)


@needs_kernel
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("lead,k,n", [
    ((1,), 576, 1536),   # one row
    ((12,), 64, 96),     # one whole 12-row pass (AVX-512)
    ((13,), 33, 70),     # a pass and one row; N not a panel multiple; odd K
    ((2, 3, 11), 40, 32),  # leading dims flattened: 66 rows, one panel
])
def test_packed_matches_float64(transpose, lead, k, n):
  """Packed panels: the kernel and the einsum fallback against float64."""
  rng = np.random.default_rng(k * n)
  x = rng.standard_normal((*lead, k)).astype(np.float32)
  w = rng.standard_normal((n, k) if transpose else (k, n)).astype(np.float32)
  packed = cpu_gemm.pack(w, transpose=transpose)
  assert packed.shape == (k, n)
  assert packed.panels.shape == (-(-n // cpu_gemm.PANEL), k, cpu_gemm.PANEL)
  np.testing.assert_array_equal(packed.unpack(), w.T if transpose else w)
  want = x.astype(np.float64) @ (w.T if transpose else w).astype(np.float64)
  f = lambda x, p: cpu_gemm.matmul(x, p)
  text = jax.jit(f).lower(x, packed).as_text()
  assert text.count("@fedjax_u2s_cpu_packed_gemm(") == 1
  for sgemm in (True, False):
    y = jax.jit(functools.partial(cpu_gemm.matmul, sgemm=sgemm))(x, packed)
    assert y.shape == (*lead, n)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-6 * k)


@needs_kernel
@pytest.mark.parametrize("lead,k,f", [((16,), 576, 1536), ((3,), 40, 70)])
def test_swiglu_matches_float64(lead, k, f):
  """Both products and SiLU in one call (and the einsum fallback)."""
  rng = np.random.default_rng(k + f)
  x = rng.standard_normal((*lead, k)).astype(np.float32) / np.sqrt(k) * 4
  gate, up = (rng.standard_normal((k, f)).astype(np.float32) for _ in range(2))
  packed = cpu_gemm.pack_swiglu(gate, up)
  np.testing.assert_array_equal(packed.unpack(), np.concatenate([gate, up], 1))
  g = x.astype(np.float64) @ gate.astype(np.float64)
  want = g / (1 + np.exp(-g)) * (x.astype(np.float64) @ up.astype(np.float64))
  f_ = jax.jit(cpu_gemm.swiglu)
  assert f_.lower(x, packed).as_text().count("@fedjax_u2s_cpu_packed_gemm(") == 1
  for sgemm in (True, False):
    y = jax.jit(functools.partial(cpu_gemm.swiglu, sgemm=sgemm))(x, packed)
    # Products of float32 sums of k terms (gate and up ~4 in size).
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=2e-7 * k)
  with pytest.raises(ValueError, match="swiglu"):
    cpu_gemm.matmul(x, packed)
  with pytest.raises(ValueError, match="pack_swiglu"):
    cpu_gemm.swiglu(x, cpu_gemm.pack(gate))


def _gguf_weight(rng, k, n, fmt):
  """A float32 [K, N] weight as a GGUF in ``fmt`` holds it (blocks along K),
  quantized and dequantized by the gguf package."""
  import gguf
  from gguf import quants
  kind = {"q4_1": gguf.GGMLQuantizationType.Q4_1,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}[fmt]
  w = rng.standard_normal((n, k)).astype(np.float32)
  return np.ascontiguousarray(quants.dequantize(quants.quantize(w, kind), kind).T)


@needs_kernel
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("lead,k,n", [
    ((1,), 64, 96),      # one row, two blocks
    ((12,), 160, 40),    # a 128-row chunk and a partial one; N not a panel multiple
    ((17,), 256, 70),    # a 12-row pass and 5 rows; two whole chunks
    ((2, 3), 32, 32),    # one block, one panel
])
def test_block_formats_hold_gguf_weights_exactly(fmt, transpose, lead, k, n):
  """A weight dequantized from a GGUF block format is stored in it: unpacked
  bit for bit, and its products are the float32 panels' products, bit for
  bit (same sums in the same order), and within float32 of float64."""
  rng = np.random.default_rng(k + n)
  w = _gguf_weight(rng, k, n, fmt)
  packed = cpu_gemm.pack(np.ascontiguousarray(w.T) if transpose else w,
                         transpose=transpose, formats=("q4_1", "q8_0"))
  assert packed.fmt == fmt and packed.shape == (k, n) and packed.dtype == jnp.float32
  assert packed.panels.dtype == jnp.uint8
  assert packed.panels.shape == (-(-n // cpu_gemm.PANEL), k // cpu_gemm.QROWS,
                                 cpu_gemm.FORMATS[fmt][1])
  np.testing.assert_array_equal(packed.unpack(), w)
  x = rng.standard_normal((*lead, k)).astype(np.float32)
  text = jax.jit(cpu_gemm.matmul).lower(x, packed).as_text()
  assert text.count("@fedjax_u2s_cpu_quant_gemm(") == 1
  y = jax.jit(cpu_gemm.matmul)(x, packed)
  np.testing.assert_array_equal(y, jax.jit(cpu_gemm.matmul)(x, cpu_gemm.pack(w)))
  want = x.astype(np.float64) @ w.astype(np.float64)
  np.testing.assert_allclose(y, want, rtol=0, atol=1e-6 * k)
  fallback = jax.jit(functools.partial(cpu_gemm.matmul, sgemm=False))(x, packed)
  np.testing.assert_allclose(fallback, want, rtol=0, atol=1e-6 * k)


@needs_kernel
def test_block_formats_refuse_weights_they_do_not_hold():
  rng = np.random.default_rng(0)
  w = _gguf_weight(rng, 64, 48, "q4_1")
  assert cpu_gemm.pack(w, formats=("q4_1",)).fmt == "q4_1"
  plain = rng.standard_normal((64, 48)).astype(np.float32)
  assert cpu_gemm.pack(plain, formats=("q4_1", "q8_0")).fmt == "f32"
  bumped = w.copy()
  bumped[40, 7] = np.nextafter(bumped[40, 7], np.float32(np.inf))  # 2nd block
  assert cpu_gemm.pack(bumped, formats=("q4_1",)).fmt == "f32"
  packed = cpu_gemm.pack(w[:48], formats=("q4_1",))  # K not a block multiple
  assert packed.fmt == "f32"
  np.testing.assert_array_equal(packed.unpack(), w[:48])
  assert cpu_gemm.pack(w.astype(jnp.bfloat16), formats=("q4_1",)).fmt == "f32"
  with pytest.raises(ValueError, match="outside jit"):
    jax.jit(lambda w: cpu_gemm.pack(w, formats=("q4_1",)).panels)(w)
  # Another dtype unpacks to float panels first.
  as_bf16 = cpu_gemm.pack(w, formats=("q4_1",)).astype(jnp.bfloat16)
  assert as_bf16.fmt == "f32" and as_bf16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(as_bf16.unpack(), w.astype(jnp.bfloat16))


@needs_kernel
def test_swiglu_with_block_formats():
  rng = np.random.default_rng(1)
  gate, up = (_gguf_weight(rng, 96, 70, "q4_1") for _ in range(2))
  packed = cpu_gemm.pack_swiglu(gate, up, formats=("q4_1",))
  assert packed.glu and packed.fmt == "q4_1"
  np.testing.assert_array_equal(packed.unpack(), np.concatenate([gate, up], 1))
  x = rng.standard_normal((16, 96)).astype(np.float32) / 4
  y = jax.jit(cpu_gemm.swiglu)(x, packed)
  np.testing.assert_array_equal(y, jax.jit(cpu_gemm.swiglu)(x, cpu_gemm.pack_swiglu(gate, up)))
  g = x.astype(np.float64) @ gate.astype(np.float64)
  want = g / (1 + np.exp(-g)) * (x.astype(np.float64) @ up.astype(np.float64))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=2e-5)
  fallback = jax.jit(functools.partial(cpu_gemm.swiglu, sgemm=False))(x, packed)
  np.testing.assert_allclose(fallback, want, rtol=1e-5, atol=2e-5)
  # Halves in different formats: both float32.
  mixed = cpu_gemm.pack_swiglu(gate, rng.standard_normal((96, 70)).astype(np.float32),
                               formats=("q4_1",))
  assert mixed.fmt == "f32" and mixed.panels.dtype == jnp.float32


def test_packed_rejects_transpose_w():
  packed = cpu_gemm.pack(jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="pack\\(w, transpose=True\\)"):
    cpu_gemm.matmul(jnp.ones((2, 4)), packed, transpose_w=True)


def _attention_ref(q, keys, values, mask):
  """Grouped-query softmax attention in float64 numpy; masked-out rows see
  every slot equally (a softmax over equal masked scores)."""
  q, keys, values = (np.asarray(a, np.float64) for a in (q, keys, values))
  b, t, h, hd = q.shape
  kh = keys.shape[1]
  g = h // kh
  out = np.zeros((b, t, h, hd))
  for bi, ti, hi in np.ndindex(b, t, h):
    k, v = keys[bi, hi // g], values[bi, hi // g]
    m = np.asarray(mask[bi, ti])
    s = k @ q[bi, ti, hi] / np.sqrt(hd)
    s = np.where(m, s, -np.inf) if m.any() else np.zeros_like(s)
    p = np.exp(s - s.max())
    out[bi, ti, hi] = p @ v / p.sum()
  return out.reshape(b, t, h * hd)


@needs_kernel
@pytest.mark.parametrize("b,t,h,kh,hd,s", [
    (2, 1, 9, 3, 64, 37),   # SmolLM2's heads, one new token
    (3, 2, 4, 2, 32, 20),   # two new tokens per row
    (1, 3, 2, 2, 128, 50),  # no grouping, wide heads
    (2, 1, 6, 2, 24, 9),    # a head size that is no vector multiple
    (1, 1, 2, 1, 16, 1),    # one slot
])
def test_fused_attention_matches_float64(b, t, h, kh, hd, s):
  keys = jax.random.split(jax.random.PRNGKey(b * 1000 + t * 100 + hd + s), 4)
  q = jax.random.normal(keys[0], (b, t, h, hd))
  k = jax.random.normal(keys[1], (b, kh, s, hd))
  v = jax.random.normal(keys[2], (b, kh, s, hd))
  mask = jax.random.bernoulli(keys[3], 0.6, (b, t, s)).at[0, 0, 0].set(True)
  if s > 1:
    mask = mask.at[-1, -1].set(False)  # A row that sees no slot at all.
  # Zeros where the kernel does not run (lowering traces both branches).
  reference = lambda q, k, v, m: jnp.zeros((b, t, h * hd))
  f = jax.jit(functools.partial(cpu_gemm.attention, reference=reference))
  assert f.lower(q, k, v, mask).as_text().count("@fedjax_u2s_cpu_attention(") == 1
  y = f(q, k, v, mask)
  assert y.shape == (b, t, h * hd)
  np.testing.assert_allclose(y, _attention_ref(q, k, v, mask), rtol=0, atol=2e-6)
  # The model's own attention is the fallback, and agrees.
  ours = functools.partial(llama._attention, config=_TINY.replace(
      num_heads=h, num_kv_heads=kh, head_dim=hd))
  np.testing.assert_allclose(ours(q, k, v, mask), y, rtol=0, atol=2e-6)
  off = functools.partial(cpu_gemm.attention, reference=ours, enabled=False)
  assert "fedjax_u2s_cpu_attention" not in jax.jit(off).lower(q, k, v, mask).as_text()


@needs_kernel
def test_zero_contraction_gives_zeros():
  y = jax.jit(cpu_gemm.matmul)(jnp.ones((3, 0)), jnp.ones((0, 5)))
  np.testing.assert_array_equal(y, np.zeros((3, 5)))


@needs_kernel
@pytest.mark.parametrize("transpose_w", [False, True])
def test_grads_match_einsum(transpose_w):
  x = _rand(0, 2, 5, 7)
  w = _rand(1, 4, 7) if transpose_w else _rand(1, 7, 4)
  g = _rand(2, 2, 5, 4)

  def loss(mm):
    return lambda x, w: jnp.sum(mm(x, w) * g)

  ours = jax.jit(jax.grad(loss(lambda x, w: cpu_gemm.matmul(
      x, w, transpose_w=transpose_w)), argnums=(0, 1)))(x, w)
  ref = jax.grad(loss(lambda x, w: _ref(x, w, transpose_w)), argnums=(0, 1))(x, w)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_vmap_shares_the_unbatched_weight():
  """Clients vmapped over x with one w: w is not broadcast to every client."""
  xs, w = _rand(0, 6, 3, 5, 7), _rand(1, 7, 4)
  f = jax.vmap(lambda x: cpu_gemm.matmul(x, w))
  calls = _custom_calls(f, xs)
  assert len(calls) == 1
  # The weight operand keeps a size-1 batch dim: (tensor<6x15x7xf32>, tensor<1x7x4xf32>).
  assert re.search(r"tensor<1x7x4xf32>\)", calls[0]), calls[0]
  np.testing.assert_allclose(jax.jit(f)(xs), _ref(xs, w, False), rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("transpose_w", [False, True])
def test_vmap_of_grad_with_batched_and_shared_weights(transpose_w):
  xs = _rand(0, 6, 5, 7)
  w = _rand(1, 4, 7) if transpose_w else _rand(1, 7, 4)
  ws = _rand(2, 6, *w.shape)

  def loss(mm):
    return lambda x, w: jnp.sum(jnp.sin(mm(x, w)))

  ours = loss(lambda x, w: cpu_gemm.matmul(x, w, transpose_w=transpose_w))
  ref = loss(lambda x, w: _ref(x, w, transpose_w))
  for in_axes, wv in (((0, None), w), ((0, 0), ws)):
    a = jax.jit(jax.vmap(jax.grad(ours, argnums=(0, 1)), in_axes=in_axes))(xs, wv)
    b = jax.vmap(jax.grad(ref, argnums=(0, 1)), in_axes=in_axes)(xs, wv)
    for u, v in zip(a, b):
      np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_deterministic():
  x, w = _rand(0, 64, 300), _rand(1, 300, 200)
  f = jax.jit(cpu_gemm.matmul)
  np.testing.assert_array_equal(f(x, w), f(x + 0.0, w))


def test_other_dtypes_and_platforms_use_einsum():
  x, w = _rand(0, 5, 7), _rand(1, 7, 4)
  assert not _custom_calls(cpu_gemm.matmul, x.astype(jnp.bfloat16),
                           w.astype(jnp.bfloat16))
  # Lowered for a GPU (no GPU needed to lower), the CPU branch is dropped.
  exported = export.export(jax.jit(cpu_gemm.matmul), platforms=["cuda"])(x, w)
  assert "fedjax_u2s_cpu_gemm" not in exported.mlir_module()


_TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    tie_word_embeddings=True)


def test_bf16_logits_accumulate_and_return_float32():
  """As before the kernel: no rounding of the logits to bf16 on the way out."""
  cfg = _TINY.replace(dtype="bfloat16")
  params = llama.init_params(jax.random.PRNGKey(0), _TINY)
  x = _rand(1, 2, 3, 32)
  want = jnp.einsum("...d,vd->...v", x.astype(jnp.bfloat16),
                    params["embed"].astype(jnp.bfloat16),
                    preferred_element_type=jnp.float32)
  for ops in (ops_lib.CPU_KERNEL, ops_lib.XLA):
    got = jax.jit(lambda p, x: llama.logits_from_hidden(p, x, config=cfg, ops=ops))(
        params, x)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)


@needs_kernel
def test_decoder_logits_and_grads_match_the_einsum_path():
  """A tiny Llama: the sgemm and XLA paths agree on logits and grads."""
  params = llama.init_params(jax.random.PRNGKey(0), _TINY)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, 64)

  def run(kernel):
    ops = ops_lib.CPU_KERNEL if kernel else ops_lib.XLA

    def loss(p):
      logits, _ = llama.forward(p, tokens, config=_TINY, ops=ops)
      return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

    text = jax.jit(loss).lower(params).as_text()
    assert ("fedjax_u2s_cpu_gemm" in text) == kernel
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (l1, logits1), g1 = run(True)
  (l2, logits2), g2 = run(False)
  np.testing.assert_allclose(logits1, logits2, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               g1, g2)


# The kernel with row-major weights in the unrolled decode (no name covers it).
_ROW_MAJOR = decoding.DecodePlan(unroll=True, ops=ops_lib.CPU_KERNEL, packed=False)


@needs_kernel
def test_sampler_decodes_the_same_tokens_through_sgemm():
  params = llama.init_params(jax.random.PRNGKey(0), _TINY, std=0.5)
  prompts = jax.random.randint(jax.random.PRNGKey(1), (3, 5), 0, 64)
  mask = jnp.ones((3, 5), bool).at[0, :2].set(False)
  rngs = jax.random.split(jax.random.PRNGKey(2), 3)
  no_stops = (jnp.zeros((0, 1, 64), jnp.int32), jnp.zeros((0,), jnp.int32))
  out = [sampler.sample_tokens(params, prompts, mask, rngs, *no_stops,
                               config=_TINY, strategy=sampler.Greedy(),
                               max_new_tokens=8, eos_ids=(), pad_id=0,
                               decode=decode).tokens
         for decode in ("auto", _ROW_MAJOR, "scan", "unrolled", "scan_xla")]
  for tokens in out[:-1]:
    np.testing.assert_array_equal(tokens, out[-1])


@needs_kernel
@pytest.mark.parametrize("decode", [None, "cpu_kernel", _ROW_MAJOR, "unrolled",
                                    "scan", "scan_xla"])
def test_sampler_uses_the_kernels_by_default(decode):
  params = llama.init_params(jax.random.PRNGKey(0), _TINY)
  prompts = jnp.zeros((3, 5), jnp.int32)
  no_stops = (jnp.zeros((0, 1, 64), jnp.int32), jnp.zeros((0,), jnp.int32))
  kw = {} if decode is None else {"decode": decode}
  text = sampler.sample_tokens.lower(
      params, prompts, jnp.ones((3, 5), bool),
      jax.random.split(jax.random.PRNGKey(0), 3), *no_stops,
      config=_TINY, strategy=sampler.Greedy(), max_new_tokens=2, eos_ids=(),
      pad_id=0, **kw).as_text()
  calls = {name: text.count(f"@fedjax_u2s_cpu_{name}(")
           for name in ("gemm", "packed_gemm", "attention")}
  layers = _TINY.num_layers
  if decode in ("unrolled", "scan_xla"):
    assert calls == dict(gemm=0, packed_gemm=0, attention=0)
  elif decode is _ROW_MAJOR:  # Row-major weights in the decode layers too.
    assert calls == dict(gemm=9 + 1 + 7 * layers + 1, packed_gemm=0,
                         attention=layers), calls
  elif decode == "scan":  # Prefill as below; the decode's scan body: 7
    # projections + scores and mix over the cache and over the new token.
    assert calls == dict(gemm=9 + 1 + 11 + 1, packed_gemm=0, attention=0), calls
  else:  # Prefill: 7 projections + 2 attention products in the layer scan's
    # body, and the LM head; each decode layer: packed q/k/v, o, gate/up
    # (with SiLU) and down, and the fused attention; the packed LM head.
    assert calls == dict(gemm=9 + 1, packed_gemm=4 * layers + 1,
                         attention=layers), calls


def test_decode_settings_resolve_by_the_measured_rule():
  """"auto": the packed kernel decode where the kernel runs here in float32,
  plain XLA over unrolled layers elsewhere; "scan" takes the kernel by the
  same rule."""
  here = ops_lib.kernel_runs_here()
  auto = decoding.resolve("auto", _TINY)
  assert auto == (decoding.resolve("cpu_kernel", _TINY) if here
                  else decoding.DecodePlan(unroll=True))
  assert decoding.resolve("scan", _TINY) == decoding.DecodePlan(
      unroll=False, ops=ops_lib.CPU_KERNEL if here else ops_lib.XLA)
  bf16 = _TINY.replace(dtype="bfloat16")
  assert decoding.resolve("auto", bf16) == decoding.DecodePlan(unroll=True)
  assert decoding.resolve("scan", bf16) == decoding.resolve("scan_xla", bf16)
  assert decoding.resolve("cpu_kernel", bf16).packed  # Asked for: as asked.
  assert decoding.resolve(_ROW_MAJOR, _TINY) is _ROW_MAJOR
  with pytest.raises(ValueError, match="Unknown decode setting"):
    decoding.resolve("fast", _TINY)
  with pytest.raises(ValueError, match="needs unroll"):
    decoding.DecodePlan(unroll=False, packed=True)


def test_packed_params_give_the_same_logits():
  """decoding.pack_weights: a decode step over packed weights (kernel or, where
  it is unavailable, the einsum fallback) equals one over the originals."""
  cfg = _TINY
  params = llama.init_params(jax.random.PRNGKey(0), cfg, std=0.5)
  with pytest.raises(ValueError, match="unstack_layers"):
    decoding.pack_weights(params, cfg)
  flat = llama.unstack_layers(params)
  packed = decoding.pack_weights(flat, cfg)
  assert isinstance(packed["lm_head"], cpu_gemm.Packed)
  assert set(packed["layers"][0]) == {"attn_norm", "mlp_norm", "qkv", "o",
                                      "gate_up", "down"}
  assert packed["layers"][0]["gate_up"]["w"].glu
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, cfg.vocab_size)
  cache = llama.init_cache(cfg, 2, 8, per_layer=True)
  step = jax.jit(functools.partial(llama.forward, config=cfg, ops=ops_lib.CPU_KERNEL))
  outs = [step(p, tokens, cache=cache)[0] for p in (flat, packed)]
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def _as_gguf(params, cfg):
  """Tiny params as if loaded from a GGUF: layers Q4_1, the embedding Q8_0
  (blocks along the input dim, as llama.cpp stores them)."""
  rng = np.random.default_rng(0)
  layers = dict(params["layers"])
  for name in ("q", "k", "v", "o", "gate", "up", "down"):
    l, k, n = layers[name]["w"].shape
    layers[name] = {"w": jnp.asarray(np.stack(
        [_gguf_weight(rng, k, n, "q4_1") / 4 for _ in range(l)]))}
  embed = _gguf_weight(rng, cfg.hidden_size, cfg.vocab_size, "q8_0").T
  return {**params, "layers": layers, "embed": jnp.asarray(np.ascontiguousarray(embed))}


@needs_kernel
def test_decode_weights_keep_gguf_blocks_and_decode_the_same_tokens():
  cfg = _TINY.replace(hidden_size=64, intermediate_size=96, num_heads=4,
                      num_kv_heads=2, head_dim=16)
  params = _as_gguf(llama.init_params(jax.random.PRNGKey(0), cfg), cfg)
  dec = decoding.decode_weights(params, cfg)
  for lp in dec["layers"]:
    assert {lp[n]["w"].fmt for n in ("qkv", "o", "gate_up", "down")} == {"q4_1"}
  assert dec["lm_head"].fmt == "q8_0"
  np.testing.assert_array_equal(dec["lm_head"].unpack(), params["embed"].T)
  np.testing.assert_array_equal(dec["layers"][1]["down"]["w"].unpack(),
                                params["layers"]["down"]["w"][1])
  prompts = jax.random.randint(jax.random.PRNGKey(1), (3, 5), 0, cfg.vocab_size)
  mask = jnp.ones((3, 5), bool).at[0, :2].set(False)
  rngs = jax.random.split(jax.random.PRNGKey(2), 3)
  no_stops = (jnp.zeros((0, 1, cfg.vocab_size), jnp.int32), jnp.zeros((0,), jnp.int32))
  run = functools.partial(sampler.sample_tokens, config=cfg,
                          strategy=sampler.Greedy(), max_new_tokens=8,
                          eos_ids=(), pad_id=0)
  with_blocks = run(params, prompts, mask, rngs, *no_stops, None, dec)
  text = jax.jit(lambda *a: run(*a)).lower(
      params, prompts, mask, rngs, *no_stops, None, dec).as_text()
  assert text.count("@fedjax_u2s_cpu_quant_gemm(") == 4 * cfg.num_layers + 1
  for kw in (dict(), dict(decode=_ROW_MAJOR), dict(decode="unrolled")):
    np.testing.assert_array_equal(
        with_blocks.tokens, run(params, prompts, mask, rngs, *no_stops, **kw).tokens)
  lora = {"q": {"a": jnp.zeros((cfg.num_layers, 64, 2)),
                "b": jnp.zeros((cfg.num_layers, 2, 64))}}
  with pytest.raises(ValueError, match="decode_params need"):
    run(params, prompts, mask, rngs, *no_stops, lora, dec)


@needs_kernel
def test_sampler_makes_decode_weights_once_per_params():
  from fedjax_u2s import testing
  tok = testing.ByteTokenizer()
  cfg = _TINY.replace(vocab_size=tok.vocab_size, hidden_size=64,
                      intermediate_size=96, head_dim=16)
  params = _as_gguf(llama.init_params(jax.random.PRNGKey(0), cfg), cfg)
  smp = sampler.Sampler(cfg, tok)
  assert smp.keeps_decode_weights  # The unrolled decode through the kernel.
  out = smp(params, ["ab", "xyz"], max_new_tokens=6)
  dec = smp.decode_params(params)
  assert dec["lm_head"].fmt == "q8_0"
  assert smp(params, ["ab", "xyz"], max_new_tokens=6).tokens == out.tokens
  assert smp.decode_params(params) is dec  # Same leaves: kept.
  other = jax.tree.map(lambda x: x + 0, params)
  assert smp.decode_params(other) is not dec  # New leaves: remade.
  for decode in (_ROW_MAJOR, "unrolled", "scan"):  # Nothing kept.
    plain = sampler.Sampler(cfg, tok, decode=decode)
    assert not plain.keeps_decode_weights
    assert plain(params, ["ab", "xyz"], max_new_tokens=6).tokens == out.tokens
  with pytest.raises(ValueError, match="Unknown decode setting"):
    sampler.Sampler(cfg, tok, decode="unroll")
