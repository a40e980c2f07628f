"""Llama-family decoder as pure functions over a parameter pytree.

Covers Llama-2/3, SmolLM/SmolLM2 and Qwen2/2.5: RMSNorm, RoPE (with Llama-3
scaling), grouped-query attention, SwiGLU, tied or untied embeddings.

Parameters are a plain pytree with the layers stacked on a leading axis ``L`` so
the forward pass is one ``lax.scan`` (compile time independent of depth); for
decoding, :func:`unstack_layers` turns them into a tuple of per-layer pytrees
that :func:`forward` unrolls::

    {"embed": [V, D],
     "layers": {"attn_norm": [L, D],
                "q": {"w": [L, D, H*hd], "b": [L, H*hd]},   # b only with qkv_bias
                "k": {"w": [L, D, K*hd], "b": ...}, "v": {...},
                "o": {"w": [L, H*hd, D]},                  # "b" with o_bias
                "mlp_norm": [L, D],
                "gate": {"w": [L, D, F]}, "up": {"w": [L, D, F]},
                "down": {"w": [L, F, D]}},
     "final_norm": [D],
     "lm_head": [D, V]}                                     # absent when tied

Kernels are ``[in, out]`` (``y = x @ w``); loaders transpose HF's ``[out, in]``.
RoPE uses the Hugging Face half-split layout; loaders undo llama.cpp's
interleaving of Q/K rows.

Decoding state is the explicit :class:`KVCache` pytree. All rows of a batch
share one write index (prompts are left-padded), so each step writes the cache
with a single ``dynamic_update_slice`` (per layer, for a per-layer cache);
``valid`` masks the padding slots.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_u2s import lora as lora_lib
from fedjax_u2s.kernels import cpu_gemm
from fedjax_u2s.models.config import ModelConfig

PyTree = Any
_NEG_INF = -1e30  # Finite, so a fully masked (padding) row gives no NaN.


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for a batch of sequences.

  Attributes:
    k: [L, B, K, S, hd] keys (after RoPE), head-major so attention over a
      layer's slice is a plain batched matmul; or, for a per-layer cache, a
      tuple of L [B, K, S, hd] arrays.
    v: values, laid out like ``k``.
    valid: [B, S] bool, True where a slot holds a real (non-padding) token.
    index: [] int32, the next slot to write; shared by all rows.

  The stacked layout suits the layer scan; the per-layer one suits unrolled
  layers (:func:`unstack_layers`), which then read and update each layer's
  buffer in place. Slicing a layer out of a stacked cache inside a decode
  loop makes XLA:CPU copy that slice every step.
  """
  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, (list, tuple))

  @property
  def max_length(self) -> int:
    return self.valid.shape[1]


def init_cache(config: ModelConfig, batch_size: int, max_length: int,
               dtype: Any = None, per_layer: bool = False) -> KVCache:
  """An empty cache of ``max_length`` slots per row (see :class:`KVCache`)."""
  dtype = dtype or config.compute_dtype
  shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
  if per_layer:
    k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  else:
    k = jnp.zeros((config.num_layers,) + shape, dtype)
    v = jnp.zeros((config.num_layers,) + shape, dtype)
  return KVCache(k=k, v=v, valid=jnp.zeros((batch_size, max_length), bool),
                 index=jnp.zeros((), jnp.int32))


def grow_cache(cache: KVCache, max_length: int, per_layer: bool) -> KVCache:
  """``cache`` with empty slots appended up to ``max_length``, re-laid out.

  For a prefill run over exactly the prompt's slots (e.g. with the layer
  scan) before decoding with another layout (e.g. per-layer buffers).
  """
  extra = max_length - cache.max_length
  if extra < 0:
    raise ValueError(f"grow_cache: {max_length} < the cache's {cache.max_length} slots")
  k, v = cache.k, cache.v
  if per_layer and not cache.per_layer:
    k, v = tuple(k), tuple(v)
  elif not per_layer and cache.per_layer:
    k, v = jnp.stack(k), jnp.stack(v)

  def grow(x):  # Slots are the second-to-last axis in both layouts.
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)])

  return KVCache(k=jax.tree.map(grow, k), v=jax.tree.map(grow, v),
                 valid=jnp.pad(cache.valid, ((0, 0), (0, extra))), index=cache.index)


def init_params(rng: jax.Array, config: ModelConfig, std: float = 0.02) -> PyTree:
  """Random parameters (for tests and shape inference; real runs load weights)."""
  d, f, hd, n = (config.hidden_size, config.intermediate_size, config.head_dim,
                 config.num_layers)
  q, kv = config.num_heads * hd, config.num_kv_heads * hd
  dt = config.weight_dtype
  keys = iter(jax.random.split(rng, 16))

  def normal(*shape):
    return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dt)

  def proj(d_in, d_out, bias):
    p = {"w": normal(n, d_in, d_out)}
    if bias:
      p["b"] = normal(n, d_out)
    return p

  layers = {
      "attn_norm": jnp.ones((n, d), dt),
      "q": proj(d, q, config.qkv_bias),
      "k": proj(d, kv, config.qkv_bias),
      "v": proj(d, kv, config.qkv_bias),
      "o": proj(q, d, config.o_bias),
      "mlp_norm": jnp.ones((n, d), dt),
      "gate": proj(d, f, config.mlp_bias),
      "up": proj(d, f, config.mlp_bias),
      "down": proj(f, d, config.mlp_bias),
  }
  params = {"embed": normal(config.vocab_size, d), "layers": layers,
            "final_norm": jnp.ones((d,), dt)}
  if not config.tie_word_embeddings:
    params["lm_head"] = normal(d, config.vocab_size)
  return params


def unstack_layers(params: PyTree) -> PyTree:
  """Params with ``layers`` as a tuple of per-layer pytrees (no L axis).

  :func:`forward` then unrolls the layers over separate buffers instead of
  scanning. Decoding wants this: inside a loop, XLA:CPU copies each layer's
  slice of the stacked weights before every matmul, every step (the weights
  once over per token). Training keeps the stacked layout (one scan: compile
  time independent of depth, remat per layer).
  """
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  return {**params,
          "layers": tuple(jax.tree.map(lambda w, i=i: w[i], layers) for i in range(n))}


def pack_weights(params: PyTree, config: ModelConfig, *,
                 formats: tuple[str, ...] = ()) -> PyTree:
  """Unstacked params laid out for the CPU decode kernel (inference only).

  Each layer's q/k/v weights become one :class:`cpu_gemm.Packed` ``qkv``
  (biases concatenated too), gate/up one ``gate_up`` for
  :func:`cpu_gemm.swiglu` (where neither has a bias), o and down packed
  alone, and the LM head a packed ``lm_head`` (the tied embedding stays
  for the lookup): fewer, larger calls over contiguous panels (see
  cpu_gemm.cc). A copy of the weights; :func:`forward` and
  :func:`logits_from_hidden` take it like the original, but a LoRA
  adapter must be merged in first (``lora.merge``): the fused products
  leave no place to add its q/k/v, gate and up terms.

  ``formats``: GGUF block formats each weight is stored in where it holds
  that weight exactly (:func:`cpu_gemm.pack`); not under ``jit``. See
  :func:`decode_weights`.
  """
  layers = params["layers"]
  if not isinstance(layers, (list, tuple)):
    raise ValueError("pack_weights takes unstacked layers: pass "
                     "unstack_layers(params) first.")
  pack = functools.partial(cpu_gemm.pack, formats=formats)

  def pack_layer(lp):
    lp = dict(lp)
    q, k, v = (lp.pop(name) for name in ("q", "k", "v"))
    qkv = {"w": pack(jnp.concatenate([q["w"], k["w"], v["w"]], axis=1))}
    if "b" in q:
      qkv["b"] = jnp.concatenate([q["b"], k["b"], v["b"]])
    lp["qkv"] = qkv
    if "b" not in lp["gate"] and "b" not in lp["up"]:
      gate, up = lp.pop("gate"), lp.pop("up")
      lp["gate_up"] = {"w": cpu_gemm.pack_swiglu(gate["w"], up["w"], formats=formats)}
    return {name: ({**p, "w": pack(p["w"])}
                   if isinstance(p, dict) and not isinstance(p["w"], cpu_gemm.Packed)
                   else p)
            for name, p in lp.items()}

  head = (pack(params["embed"], transpose=True)
          if config.tie_word_embeddings else pack(params["lm_head"]))
  return {**params, "layers": tuple(pack_layer(lp) for lp in layers),
          "lm_head": head}


# GGUF block formats the decode weights may be stored in (cpu_gemm.FORMATS),
# tried in this order.
DECODE_FORMATS = ("q4_1", "q8_0")


def decode_weights(params: PyTree, config: ModelConfig) -> PyTree:
  """:func:`pack_weights` of ``params`` for decoding, made once per model.

  Each weight whose float32 values are exactly a GGUF block format's
  dequantisation (a model loaded from such a GGUF) is kept in that format
  (:data:`DECODE_FORMATS`): the decode steps' products are the same float32
  products of the same weights, reading 6.4x (Q4_1) or 3.8x (Q8_0) fewer
  bytes, and the copy is that much smaller. Others (safetensors models,
  merged adapters) get float32 panels. Reads the weights back to check
  (host syncs): call it outside ``jit``; :class:`fedjax_u2s.sampler.Sampler`
  does, once per params, and passes the result to ``sample_tokens``.
  """
  # Layers as host views (np.asarray of a CPU array does not copy), so
  # unstacking slices views of the stacked weights rather than copying them.
  host = {**params, "layers": jax.tree.map(np.asarray, params["layers"])}
  packed = pack_weights(unstack_layers(host), config, formats=DECODE_FORMATS)
  # Norms and biases onto the device once, not at every call.
  return jax.tree.map(jnp.asarray, packed)


def param_shapes(config: ModelConfig) -> PyTree:
  """The parameter pytree as ``jax.ShapeDtypeStruct`` leaves, nothing allocated."""
  return jax.eval_shape(lambda: init_params(jax.random.key(0), config))


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * w.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
  """[hd/2] inverse frequencies, with Llama-3 scaling when configured."""
  hd = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  rs = config.rope_scaling
  if rs is not None:
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
              / (rs.high_freq_factor - rs.low_freq_factor))
    scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
    mid = (wavelen <= low_wl) & (wavelen >= high_wl)
    inv = np.where(mid, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
  return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates [B, T, N, hd] by [B, T] positions (HF half-split layout)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _attention(q, k, v, mask, config: ModelConfig, k_old=None, v_old=None,
               mask_old=None):
  """Grouped-query attention, optionally also over a cache of older keys.

  Keys and values are head-major ([B, K, S, hd], the cache layout) so both
  products are plain batched matmuls over (B, K). One softmax runs over the
  old and the new keys together, so the cache is read in place, never
  concatenated.

  Args:
    q: [B, T, H, hd]; k, v: [B, K, T, hd]; mask: [B, T, T] bool.
    k_old, v_old: [B, K, S, hd] cached keys/values, or None.
    mask_old: [B, T, S] bool, which cached slots each query may see.
  Returns:
    [B, T, H*hd].
  """
  b, t, h, hd = q.shape
  kh = config.num_kv_heads
  g = h // kh
  q = q.reshape(b, t, kh, g, hd).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, hd]

  # With cfg.cpu_sgemm (decoding), both products go through the sgemm kernel
  # as one batch of [G*T, hd] x [S, hd]^T and [G*T, S] x [S, hd] products
  # per (row, KV head): 2-3x faster than XLA's dot on these small shapes.
  def scores(keys, m):
    if config.cpu_sgemm:
      s = cpu_gemm.batched_matmul(q.reshape(b, kh, g * t, hd), keys,
                                  transpose_b=True, out_dtype=jnp.float32)
      s = s.reshape(b, kh, g, t, keys.shape[2])
    else:
      s = jnp.einsum("bkgtd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32)
    return jnp.where(m[:, None, None], s / math.sqrt(hd), _NEG_INF)

  def mix(probs, values):  # [B, K, G, T, S] x [B, K, S, hd] -> [B, K, G, T, hd]
    probs = probs.astype(values.dtype)
    if config.cpu_sgemm:
      out = cpu_gemm.batched_matmul(probs.reshape(b, kh, g * t, probs.shape[-1]),
                                    values)
      return out.reshape(b, kh, g, t, hd)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, values)

  s_new = scores(k, mask)
  if k_old is None:
    out = mix(jax.nn.softmax(s_new, axis=-1), v)
  else:
    s_old = scores(k_old, mask_old)
    m = jnp.maximum(jnp.max(s_old, -1, keepdims=True), jnp.max(s_new, -1, keepdims=True))
    p_old, p_new = jnp.exp(s_old - m), jnp.exp(s_new - m)
    denom = jnp.sum(p_old, -1, keepdims=True) + jnp.sum(p_new, -1, keepdims=True)
    out = mix(p_old / denom, v_old) + mix(p_new / denom, v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)


def forward(params: PyTree, tokens: jax.Array, *, config: ModelConfig,
            input_mask: jax.Array | None = None,
            positions: jax.Array | None = None,
            cache: KVCache | None = None,
            lora: PyTree | None = None,
            lora_config: lora_lib.LoraConfig | None = None,
            dropout_rng: jax.Array | None = None,
            return_hidden: bool = False,
            prefill: bool = False):
  """Runs the decoder.

  Args:
    params: base parameters (layout in the module docstring).
    tokens: [B, T] int token ids.
    config: the model's static config.
    input_mask: [B, T] bool, False at padding. Defaults to all True.
    positions: [B, T] RoPE positions. Defaults to the count of real tokens
      before each one (in the cache too), which handles left padding.
    cache: if given, the T tokens are written at ``cache.index`` and attend to
      everything valid in the cache; the updated cache is returned. A
      per-layer cache (``init_cache(per_layer=True)``) needs unstacked layers.
    lora: optional adapter pytree (see :mod:`fedjax_u2s.lora`).
    lora_config: required with ``lora``.
    dropout_rng: enables LoRA dropout (training only).
    return_hidden: return the final normed hidden states [B, T, D] instead of
      logits (for chunked losses).
    prefill: promise that ``cache`` holds nothing yet, so the tokens attend
      only to each other (skips S x T masked work); the cache is still filled.

  Returns:
    ``(logits [B, T, V] float32, cache)``; ``cache`` is None if none was given.
  """
  cfg = config
  b, t = tokens.shape
  dt = cfg.compute_dtype
  if input_mask is None:
    input_mask = jnp.ones((b, t), bool)
  input_mask = input_mask.astype(bool)
  if positions is None:
    positions = jnp.maximum(jnp.cumsum(input_mask, axis=1, dtype=jnp.int32) - 1, 0)
    if cache is not None:  # Continue after the real tokens already cached.
      positions += jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]

  attend_cache = cache is not None and not prefill
  per_layer_cache = cache is not None and cache.per_layer
  slot = jnp.arange(t)
  mask = input_mask[:, None, :] & (slot[None, :, None] >= slot[None, None, :])
  mask_old = mask_all = None
  if cache is not None:
    k_slot = jnp.arange(cache.max_length)
    valid = jax.lax.dynamic_update_slice(cache.valid, input_mask, (0, cache.index))
  if attend_cache and per_layer_cache:
    # The T new tokens are written first (slots index..index+T-1); each then
    # attends to the real tokens up to and including its own slot.
    mask_all = valid[:, None, :] & (k_slot[None, None, :]
                                    <= cache.index + slot[None, :, None])
  elif attend_cache:
    # Slots before the write index that hold real tokens; the T new tokens
    # go to slots index..index+T-1 after the layer scan.
    seen = cache.valid & (k_slot[None, :] < cache.index)  # [B, S]
    mask_old = jnp.broadcast_to(seen[:, None, :], (b, t, cache.max_length))

  if lora is not None and lora_config is None:
    raise ValueError("forward(lora=...) needs lora_config.")
  inv_freq = rope_frequencies(cfg)
  lora_scale = lora_config.scale if lora is not None else 0.0
  lora_dropout = lora_config.dropout if lora is not None else 0.0
  hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads

  layers = params["layers"]

  def layer(x, lp, ll, i, k_old, v_old, k_buf=None, v_buf=None):
    """One block. lp, ll: this layer's base / LoRA params; i: its index.

    k_old, v_old: a stacked cache's slice for this layer (read only; the new
    keys and values are returned and written after all layers); k_buf, v_buf:
    instead, this layer's own cache buffers, updated and returned.
    """
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)

    def proj(name, h, j):
      p = lp[name]
      y = cpu_gemm.matmul(h, p["w"].astype(dt), sgemm=cfg.cpu_sgemm)
      if "b" in p:
        y = y + p["b"].astype(dt)
      if ll is not None and name in ll:
        r = None if rng is None else jax.random.fold_in(rng, j)
        y = y + lora_lib.apply(h, ll[name], lora_scale, dropout=lora_dropout, rng=r)
      return y

    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    if "qkv" in lp:  # pack_weights: one product for q, k and v.
      if ll is not None and any(n in ll for n in ("q", "k", "v", "gate", "up")):
        raise ValueError("pack_weights fused q/k/v and gate/up: merge the LoRA "
                         "adapter into the params (lora.merge) before packing.")
      q, k, v = jnp.split(proj("qkv", h, 0), [nh * hd, (nh + nkv) * hd], axis=-1)
    else:
      q, k, v = proj("q", h, 0), proj("k", h, 1), proj("v", h, 2)
    q = q.reshape(b, t, nh, hd)
    k = k.reshape(b, t, nkv, hd)
    v = v.reshape(b, t, nkv, hd)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq).transpose(0, 2, 1, 3)  # [B, K, T, hd]
    v = v.transpose(0, 2, 1, 3)
    if k_buf is not None:
      at = (0, 0, cache.index, 0)
      k_buf = jax.lax.dynamic_update_slice(k_buf, k.astype(k_buf.dtype), at)
      v_buf = jax.lax.dynamic_update_slice(v_buf, v.astype(v_buf.dtype), at)
    if k_buf is not None and attend_cache:  # Decoding: the fused kernel.
      attn = cpu_gemm.attention(q, k_buf.astype(dt), v_buf.astype(dt), mask_all,
                                reference=functools.partial(_attention, config=cfg),
                                enabled=cfg.cpu_sgemm)
    elif k_old is not None:
      attn = _attention(q, k, v, mask, cfg, k_old.astype(dt), v_old.astype(dt),
                        mask_old)
    else:  # No cache, or a prefill: the new tokens attend to each other.
      attn = _attention(q, k, v, mask, cfg)
    if k_buf is not None:
      k, v = k_buf, v_buf  # Returned: the updated buffers.
    x = x + proj("o", attn, 3)
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    if "gate_up" in lp:  # pack_weights: both products and SiLU in one call.
      mlp = cpu_gemm.swiglu(h, lp["gate_up"]["w"].astype(dt), sgemm=cfg.cpu_sgemm)
    else:
      mlp = jax.nn.silu(proj("gate", h, 4)) * proj("up", h, 5)
    x = x + proj("down", mlp, 6)
    return x, (k, v)

  if cfg.remat:
    layer = jax.checkpoint(layer, prevent_cse=False)

  x = jnp.take(params["embed"], tokens, axis=0).astype(dt)
  if isinstance(layers, (list, tuple)):
    # Unstacked (see unstack_layers): unrolled over separate buffers, so no
    # layer's weights are sliced (= copied by XLA:CPU) inside a decode loop.
    k_new, v_new = [], []
    for i, lp in enumerate(layers):
      ll = None if lora is None else jax.tree.map(lambda w, i=i: w[i], lora)
      if per_layer_cache:
        x, (k, v) = layer(x, lp, ll, i, None, None, cache.k[i], cache.v[i])
      else:
        kv_old = (cache.k[i], cache.v[i]) if attend_cache else (None, None)
        x, (k, v) = layer(x, lp, ll, i, *kv_old)
      k_new.append(k)
      v_new.append(v)
    if not per_layer_cache:
      k_new, v_new = jnp.stack(k_new), jnp.stack(v_new)
  elif per_layer_cache:
    raise ValueError("A per-layer KV cache needs unstacked layers: pass "
                     "unstack_layers(params), or use init_cache(per_layer=False).")
  else:
    # Stacked: one scan, so compile time does not grow with depth. The
    # weights are scanned over (xs), not closed over and indexed: autodiff
    # then forwards each layer's slice to the backward pass instead of
    # saving a stacked copy of every weight as a residual.
    def body(x, xs):
      lp, ll, i, kv_old = xs
      return layer(x, lp, ll, i, *kv_old)

    kv_old = (cache.k, cache.v) if attend_cache else (None, None)
    x, (k_new, v_new) = jax.lax.scan(
        body, x, (layers, lora, jnp.arange(cfg.num_layers), kv_old))
  # k_new, v_new: [L, B, K, T, hd]
  x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)

  new_cache = None
  if per_layer_cache:  # Each layer has written its own buffers.
    new_cache = KVCache(k=tuple(k_new), v=tuple(v_new), valid=valid,
                        index=cache.index + t)
  elif cache is not None:
    # One in-place write of the T new slots of every layer.
    at = (0, 0, 0, cache.index, 0)
    new_cache = KVCache(
        k=jax.lax.dynamic_update_slice(cache.k, k_new.astype(cache.k.dtype), at),
        v=jax.lax.dynamic_update_slice(cache.v, v_new.astype(cache.v.dtype), at),
        valid=valid, index=cache.index + t)
  if return_hidden:
    return x, new_cache
  return logits_from_hidden(params, x, config=cfg), new_cache


def logits_from_hidden(params: PyTree, x: jax.Array, *, config: ModelConfig) -> jax.Array:
  """[..., D] final hidden states -> [..., V] float32 logits."""
  dt = config.compute_dtype
  if config.tie_word_embeddings and not isinstance(params.get("lm_head"),
                                                   cpu_gemm.Packed):
    w, transpose_w = params["embed"], True
  else:
    w, transpose_w = params["lm_head"], False
  return cpu_gemm.matmul(x.astype(dt), w.astype(dt), transpose_w=transpose_w,
                         sgemm=config.cpu_sgemm, out_dtype=jnp.float32)
