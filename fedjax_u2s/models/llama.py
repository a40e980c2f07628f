"""Llama-family decoder as pure functions over a parameter pytree.

Covers Llama-2/3, SmolLM/SmolLM2, Qwen2/2.5, Qwen3 and Gemma 3 (text): RMSNorm,
RoPE (with Llama-3 or linear scaling), grouped-query attention, SwiGLU or
GeGLU, tied or untied embeddings. What Gemma 3 adds is switched on by explicit
:class:`~fedjax_u2s.models.config.ModelConfig` fields, each a few lines here:
RMSNorm with ``(1 + w)`` (``norm_offset``), norms after attention and after the
MLP too (``post_norms``: four a layer), RMSNorm on each head's q and k
(``qk_norm``, also Qwen3), embeddings times sqrt(D) (``embed_scale``), the
attention scale ``query_pre_attn_scalar**-0.5``, tanh-GELU (``hidden_act``),
final logit soft-capping, and sliding-window local layers beside global ones
(``layer_types``, ``sliding_window``, ``rope_local_theta``).

Local and global layers differ only in two numbers: the window a query sees
(``sliding_window`` or unbounded) and which RoPE frequency table rotates its q
and k (``rope_local_theta``, unscaled, or ``rope_theta`` with
``rope_scaling``). Their weights have the same shapes, so the layers stay one
stacked pytree and one ``lax.scan``; each layer reads its window and table
from per-layer arrays indexed by the layer number (a Python constant when the
layers are unrolled). Two code paths (two scans, or a scan per run of local
layers) would compile twice and break the one-pytree layout that LoRA,
federated aggregation and the loaders share, for no gain: the window is one
more mask term, the table a select between two [hd/2] vectors.

The KV cache keeps every slot for every layer and a local layer masks the
keys older than its window (``slot_q - slot_k >= sliding_window``), rather
than a ring buffer of ``sliding_window`` slots for local layers: one cache
shape for all layers keeps the stacked cache, the scan and the sampler's
single write index as they are, and at our lengths (prompts of ~1k tokens)
the masked slots cost little. A ring buffer would pay off only for contexts
far beyond the window.

Parameters are a plain pytree with the layers stacked on a leading axis ``L`` so
the forward pass is one ``lax.scan`` (compile time independent of depth); for
decoding, :func:`unstack_layers` turns them into a tuple of per-layer pytrees
that the passes unroll::

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

Inference may fuse products: a layer may hold ``qkv`` (q, k and v weights
side by side, biases too) instead of ``q``/``k``/``v``, and ``gate_up`` (for
the gated MLP in one op) instead of ``gate``/``up``; an ``lm_head`` beside a
tied embedding is used for the logits. ``fedjax_u2s.decoding`` builds that
layout, with weights in whatever form the :class:`~fedjax_u2s.ops.Ops` it
decodes with multiply by: this module only multiplies, through the ``ops``
each pass is given (:data:`~fedjax_u2s.ops.XLA`, plain jnp, by default).

Three passes, each read top to bottom, share one layer's pieces (:func:`_qkv`,
:func:`_attention`, :func:`_out_and_mlp`): :func:`sequence_hidden` (training,
scoring: no cache), :func:`prefill_hidden` (the same, writing a KV cache) and
:func:`decode_hidden` (new tokens against a filled cache). :func:`forward`
picks one and adds the logits.

Decoding state is the explicit :class:`KVCache` pytree. All rows of a batch
share one write index (prompts are left-padded), so each step writes the cache
with a single ``dynamic_update_slice`` (per layer, for a per-layer cache);
``valid`` masks the padding slots.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import ops as ops_lib
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

  def norm(*shape):  # Scales of 1 whatever the offset.
    return jnp.full(shape, 1.0 - config.norm_offset, dt)

  layers = {
      "attn_norm": norm(n, d),
      "q": proj(d, q, config.qkv_bias),
      "k": proj(d, kv, config.qkv_bias),
      "v": proj(d, kv, config.qkv_bias),
      "o": proj(q, d, config.o_bias),
      "mlp_norm": norm(n, d),
      "gate": proj(d, f, config.mlp_bias),
      "up": proj(d, f, config.mlp_bias),
      "down": proj(f, d, config.mlp_bias),
  }
  if config.qk_norm:
    layers["q_norm"] = norm(n, hd)
    layers["k_norm"] = norm(n, hd)
  if config.post_norms:
    layers["post_attn_norm"] = norm(n, d)
    layers["post_mlp_norm"] = norm(n, d)
  params = {"embed": normal(config.vocab_size, d), "layers": layers,
            "final_norm": norm(d)}
  if not config.tie_word_embeddings:
    params["lm_head"] = normal(d, config.vocab_size)
  return params


def unstack_layers(params: PyTree) -> PyTree:
  """Params with ``layers`` as a tuple of per-layer pytrees (no L axis).

  The passes then unroll the layers over separate buffers instead of
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


def param_shapes(config: ModelConfig) -> PyTree:
  """The parameter pytree as ``jax.ShapeDtypeStruct`` leaves, nothing allocated."""
  return jax.eval_shape(lambda: init_params(jax.random.key(0), config))


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
  """RMSNorm over the last axis, scaled by ``offset + w`` (Gemma: offset 1)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  w32 = w.astype(jnp.float32)
  if offset:
    w32 = offset + w32
  return (x32 * w32).astype(x.dtype)


def rope_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
  """[hd/2] inverse frequencies: the full-attention layers' (with Llama-3 or
  linear scaling when configured), or with ``local`` the sliding-window
  layers' (base ``rope_local_theta``, never scaled)."""
  hd = config.head_dim
  theta = config.rope_local_theta if local else config.rope_theta
  inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  rs = None if local else config.rope_scaling
  if rs is not None and rs.rope_type == "linear":
    inv = inv / rs.factor
  elif rs is not None:
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
              / (rs.high_freq_factor - rs.low_freq_factor))
    scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
    mid = (wavelen <= low_wl) & (wavelen >= high_wl)
    inv = np.where(mid, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
  return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
  """Rotates [B, T, N, hd] by [B, T] positions (HF half-split layout)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _attention(q, k, v, mask, config: ModelConfig, ops: ops_lib.Ops = ops_lib.XLA,
               k_old=None, v_old=None, mask_old=None):
  """Grouped-query attention, optionally also over a cache of older keys.

  Keys and values are head-major ([B, K, S, hd], the cache layout) so both
  products are plain batched matmuls over (B, K). One softmax runs over the
  old and the new keys together, so the cache is read in place, never
  concatenated.

  Args:
    q: [B, T, H, hd]; k, v: [B, K, T, hd]; mask: [B, T, T] bool.
    config: the model's config; ops: how the two products run.
    k_old, v_old: [B, K, S, hd] cached keys/values, or None.
    mask_old: [B, T, S] bool, which cached slots each query may see.
  Returns:
    [B, T, H*hd].
  """
  b, t, h, hd = q.shape
  kh = config.num_kv_heads
  g = h // kh
  q = q.reshape(b, t, kh, g, hd).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, hd]

  def scores(keys, m):  # -> [B, K, G, T, S]
    return jnp.where(m[:, None, None], ops.scores(q, keys) / math.sqrt(hd), _NEG_INF)

  def mix(probs, values):  # -> [B, K, G, T, hd]
    return ops.mix(probs.astype(values.dtype), values)

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


# ----------------------------------------------------------------------------
# One layer's pieces, shared by the three passes.


class _Call(NamedTuple):
  """What every layer of one pass shares."""
  config: ModelConfig
  ops: ops_lib.Ops
  positions: jax.Array  # [B, T] RoPE positions of the new tokens.
  inv_freq: np.ndarray  # [hd/2] RoPE frequencies (of the full-attention layers).
  lora_config: lora_lib.LoraConfig | None
  dropout_rng: jax.Array | None  # LoRA dropout (training only).
  # [hd/2] frequencies of the sliding-window layers; None without such layers.
  local_inv_freq: np.ndarray | None = None


def _new_call(config, ops, positions, lora_config, dropout_rng) -> _Call:
  local = rope_frequencies(config, local=True) if config.has_sliding_layers else None
  return _Call(config, ops, positions, rope_frequencies(config), lora_config,
               dropout_rng, local)


# Per-layer arrays of the one layer scan: a layer's attention window
# (_NO_WINDOW for global layers) and whether it rotates with the local table.
_NO_WINDOW = np.iinfo(np.int32).max


def _layer_windows(config: ModelConfig) -> np.ndarray:
  return np.asarray([config.sliding_window if config.is_sliding(i) else _NO_WINDOW
                     for i in range(config.num_layers)], np.int32)


def _layer_is_sliding(config: ModelConfig) -> np.ndarray:
  return np.asarray([config.is_sliding(i) for i in range(config.num_layers)], bool)


def _layer_inv_freq(call: _Call, i):
  """Layer ``i``'s RoPE table: static when ``i`` is a Python int (unrolled
  layers), else a select on the scanned layer index."""
  if call.local_inv_freq is None:
    return call.inv_freq
  if isinstance(i, int):
    return call.local_inv_freq if call.config.is_sliding(i) else call.inv_freq
  return jnp.where(jnp.asarray(_layer_is_sliding(call.config))[i],
                   call.local_inv_freq, call.inv_freq)


def _window(config: ModelConfig, i, mask, dist):
  """``mask`` of layer ``i`` with keys at ``dist`` >= its window hidden.

  dist: query slot - key slot, broadcastable to ``mask``'s last two axes. A
  sliding layer's query sees itself and the ``sliding_window - 1`` slots
  before it (transformers' and llama.cpp's rule); a global layer everything.
  """
  if not config.has_sliding_layers:
    return mask
  if isinstance(i, int):
    return mask & (dist < config.sliding_window) if config.is_sliding(i) else mask
  return mask & (dist < jnp.asarray(_layer_windows(config))[i])


def _inputs(tokens, input_mask, positions, cache):
  """Defaults: every token real; positions count the real tokens before each
  one (in the cache too), which handles left padding."""
  b, t = tokens.shape
  if input_mask is None:
    input_mask = jnp.ones((b, t), bool)
  input_mask = input_mask.astype(bool)
  if positions is None:
    positions = jnp.maximum(jnp.cumsum(input_mask, axis=1, dtype=jnp.int32) - 1, 0)
    if cache is not None:  # Continue after the real tokens already cached.
      positions += jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]
  return input_mask, positions


def _causal_mask(input_mask, segment_ids=None):
  """[B, T, T]: each new token sees the real new tokens up to itself, and,
  given ``segment_ids`` [B, T] (packed rows), only those of its own segment."""
  slot = jnp.arange(input_mask.shape[1])
  mask = input_mask[:, None, :] & (slot[None, :, None] >= slot[None, None, :])
  if segment_ids is not None:
    mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
  return mask


def _embed(params, tokens, config):
  x = jnp.take(params["embed"], tokens, axis=0).astype(config.compute_dtype)
  if config.embed_scale:  # Gemma: scaled in the compute dtype, as transformers does.
    x = x * jnp.asarray(math.sqrt(config.hidden_size), config.compute_dtype)
  return x


def _layer_rng(call: _Call, i):
  return None if call.dropout_rng is None else jax.random.fold_in(call.dropout_rng, i)


def _linear(call: _Call, lp, ll, name: str, x, rng, j: int):
  """``x @ w (+ b)`` of projection ``name``, plus its LoRA update if any.

  j: the projection's index, so each gets its own dropout key.
  """
  dt = call.config.compute_dtype
  p = lp[name]
  y = call.ops.matmul(x, p["w"].astype(dt))
  if "b" in p:
    y = y + p["b"].astype(dt)
  if ll is not None and name in ll:
    r = None if rng is None else jax.random.fold_in(rng, j)
    y = y + lora_lib.apply(x, ll[name], call.lora_config.scale,
                           dropout=call.lora_config.dropout, rng=r)
  return y


def _qkv(call: _Call, lp, ll, x, rng, i):
  """Layer ``i``'s input -> q [B, T, H, hd] and k, v [B, K, T, hd], RoPE applied.

  q comes pre-multiplied so that the attention's ``1/sqrt(hd)`` gives
  ``query_pre_attn_scalar**-0.5`` (one scale for the XLA and kernel paths).
  """
  cfg = call.config
  b, t, _ = x.shape
  hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  if "qkv" in lp:  # Fused for inference: one product for q, k and v.
    if ll is not None and any(n in ll for n in ("q", "k", "v", "gate", "up")):
      raise ValueError("Fused q/k/v and gate/up weights leave no place for their "
                       "LoRA terms: merge the adapter into the params "
                       "(lora.merge) before fusing.")
    q, k, v = jnp.split(_linear(call, lp, ll, "qkv", h, rng, 0),
                        [nh * hd, (nh + nkv) * hd], axis=-1)
  else:
    q, k, v = (_linear(call, lp, ll, n, h, rng, j) for j, n in enumerate("qkv"))
  q, k = q.reshape(b, t, nh, hd), k.reshape(b, t, nkv, hd)
  if cfg.qk_norm:  # Per head, before RoPE (Gemma 3, Qwen3).
    q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  inv_freq = _layer_inv_freq(call, i)
  q = apply_rope(q, call.positions, inv_freq)
  k = apply_rope(k, call.positions, inv_freq)
  if cfg.query_pre_attn_scalar is not None and cfg.query_pre_attn_scalar != hd:
    q = q * jnp.asarray(math.sqrt(hd / cfg.query_pre_attn_scalar), q.dtype)
  return q, k.transpose(0, 2, 1, 3), v.reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)


def _out_and_mlp(call: _Call, lp, ll, x, attn, rng):
  """The attention's output projection, then the gated MLP, each a residual
  (with ``post_norms``, each normed before it is added)."""
  cfg = call.config
  eps, off = cfg.rms_norm_eps, cfg.norm_offset
  out = _linear(call, lp, ll, "o", attn, rng, 3)
  if cfg.post_norms:
    out = rms_norm(out, lp["post_attn_norm"], eps, off)
  x = x + out
  h = rms_norm(x, lp["mlp_norm"], eps, off)
  if "gate_up" in lp:  # Fused for inference: both products and SiLU in one op.
    if cfg.hidden_act != "silu":
      raise ValueError(f"A fused gate_up weight computes SwiGLU; this model's "
                       f"hidden_act is {cfg.hidden_act!r}: keep gate and up apart.")
    mlp = call.ops.swiglu(h, lp["gate_up"]["w"].astype(cfg.compute_dtype))
  else:
    gate = _linear(call, lp, ll, "gate", h, rng, 4)
    if cfg.hidden_act == "silu":
      gate = jax.nn.silu(gate)
    else:  # gelu_pytorch_tanh: GeGLU with the tanh approximation.
      gate = jax.nn.gelu(gate, approximate=True)
    mlp = gate * _linear(call, lp, ll, "up", h, rng, 5)
  out = _linear(call, lp, ll, "down", mlp, rng, 6)
  if cfg.post_norms:
    out = rms_norm(out, lp["post_mlp_norm"], eps, off)
  return x + out


def _over_layers(layer, x, layers, lora, per_layer, num_layers: int):
  """Runs ``layer(x, lp, ll, i, per_layer_i) -> (x, out)`` over every layer.

  Stacked layers: one ``lax.scan``, so compile time does not grow with
  depth; the weights (and ``per_layer``) are scanned over, not closed over
  and indexed, so autodiff forwards each layer's slice to the backward pass
  instead of saving a stacked copy of every weight; outs come back stacked
  on L. A tuple of layers (:func:`unstack_layers`): unrolled, so no layer's
  weights are sliced (= copied by XLA:CPU) inside a decode loop; outs come
  back as a list. ``per_layer``: a tuple of arrays or of per-layer tuples,
  indexed by layer, or None.
  """
  if isinstance(layers, (list, tuple)):
    outs = []
    for i, lp in enumerate(layers):
      ll = None if lora is None else jax.tree.map(lambda w, i=i: w[i], lora)
      mine = None if per_layer is None else tuple(a[i] for a in per_layer)
      x, out = layer(x, lp, ll, i, mine)
      outs.append(out)
    return x, outs

  def body(x, xs):
    lp, ll, i, mine = xs
    return layer(x, lp, ll, i, mine)

  return jax.lax.scan(body, x, (layers, lora, jnp.arange(num_layers), per_layer))


def _stacked(outs):
  """Per-layer (k, v) outs -> ([L, ...] keys, [L, ...] values)."""
  if isinstance(outs, list):
    return jnp.stack([k for k, _ in outs]), jnp.stack([v for _, v in outs])
  return outs


def _check_lora(lora, lora_config):
  if lora is not None and lora_config is None:
    raise ValueError("forward(lora=...) needs lora_config.")


# ----------------------------------------------------------------------------
# The passes.


def _self_attention_layers(params, tokens, *, config, input_mask, positions, lora,
                           lora_config, dropout_rng, ops, cache=None,
                           segment_ids=None):
  """The new tokens attend only to each other: the layers of a full-sequence
  pass or a prefill. Returns the final hidden states (normed), the input
  mask, and every layer's keys and values ([L, B, K, T, hd] each, or a list
  of per-layer pairs)."""
  _check_lora(lora, lora_config)
  if segment_ids is not None and positions is None:
    raise ValueError("segment_ids (packed rows) need per-segment positions.")
  input_mask, positions = _inputs(tokens, input_mask, positions, cache)
  call = _new_call(config, ops, positions, lora_config, dropout_rng)
  mask = _causal_mask(input_mask, segment_ids)
  slot = jnp.arange(tokens.shape[1])
  dist = slot[:, None] - slot[None, :]  # [T, T] query slot - key slot

  def layer(x, lp, ll, i, _):
    rng = _layer_rng(call, i)
    q, k, v = _qkv(call, lp, ll, x, rng, i)
    attn = _attention(q, k, v, _window(config, i, mask, dist), config, ops)
    return _out_and_mlp(call, lp, ll, x, attn, rng), (k, v)

  if config.remat:
    layer = jax.checkpoint(layer, prevent_cse=False)
  x, kv = _over_layers(layer, _embed(params, tokens, config), params["layers"],
                       lora, None, config.num_layers)
  x = rms_norm(x, params["final_norm"], config.rms_norm_eps, config.norm_offset)
  return x, input_mask, kv


def sequence_hidden(params: PyTree, tokens: jax.Array, *, config: ModelConfig,
                    input_mask: jax.Array | None = None,
                    positions: jax.Array | None = None,
                    lora: PyTree | None = None,
                    lora_config: lora_lib.LoraConfig | None = None,
                    dropout_rng: jax.Array | None = None,
                    ops: ops_lib.Ops = ops_lib.XLA,
                    segment_ids: jax.Array | None = None) -> jax.Array:
  """The full-sequence pass (training, scoring): [B, T] -> [B, T, D] final
  normed hidden states. Arguments as for :func:`forward`.

  ``segment_ids`` [B, T] int (packed rows, ``data/batching.py``): a token
  attends only to earlier tokens of its own segment, so each of several
  examples in a row is computed as if it were alone; give ``positions``
  that restart at 0 in every segment with it. None: one segment per row.
  """
  x, _, _ = _self_attention_layers(
      params, tokens, config=config, input_mask=input_mask, positions=positions,
      lora=lora, lora_config=lora_config, dropout_rng=dropout_rng, ops=ops,
      segment_ids=segment_ids)
  return x


def prefill_hidden(params: PyTree, tokens: jax.Array, cache: KVCache, *,
                   config: ModelConfig, input_mask: jax.Array | None = None,
                   positions: jax.Array | None = None,
                   lora: PyTree | None = None,
                   lora_config: lora_lib.LoraConfig | None = None,
                   ops: ops_lib.Ops = ops_lib.XLA) -> tuple[jax.Array, KVCache]:
  """The first tokens into an empty ``cache``: ``(hidden [B, T, D], cache)``.

  The tokens attend only to each other (no S x T masked work over the
  empty slots), as in :func:`sequence_hidden`; their keys and values are
  then written at ``cache.index``.
  """
  x, input_mask, kv = _self_attention_layers(
      params, tokens, config=config, input_mask=input_mask, positions=positions,
      lora=lora, lora_config=lora_config, dropout_rng=None, ops=ops, cache=cache)
  valid = jax.lax.dynamic_update_slice(cache.valid, input_mask, (0, cache.index))
  t = tokens.shape[1]
  if cache.per_layer:  # One write per layer's buffers.
    at = (0, 0, cache.index, 0)
    if not isinstance(kv, list):  # Scanned: [L, ...] keys and values.
      kv = [(kv[0][i], kv[1][i]) for i in range(config.num_layers)]
    k = tuple(jax.lax.dynamic_update_slice(buf, k_new.astype(buf.dtype), at)
              for buf, (k_new, _) in zip(cache.k, kv))
    v = tuple(jax.lax.dynamic_update_slice(buf, v_new.astype(buf.dtype), at)
              for buf, (_, v_new) in zip(cache.v, kv))
    return x, KVCache(k=k, v=v, valid=valid, index=cache.index + t)
  return x, _write_stacked(cache, *_stacked(kv), valid, t)


def _write_stacked(cache, k_new, v_new, valid, t):
  """One in-place write of the T new slots of every layer ([L, B, K, T, hd])."""
  at = (0, 0, 0, cache.index, 0)
  return KVCache(
      k=jax.lax.dynamic_update_slice(cache.k, k_new.astype(cache.k.dtype), at),
      v=jax.lax.dynamic_update_slice(cache.v, v_new.astype(cache.v.dtype), at),
      valid=valid, index=cache.index + t)


def decode_hidden(params: PyTree, tokens: jax.Array, cache: KVCache, *,
                  config: ModelConfig, input_mask: jax.Array | None = None,
                  positions: jax.Array | None = None,
                  lora: PyTree | None = None,
                  lora_config: lora_lib.LoraConfig | None = None,
                  ops: ops_lib.Ops = ops_lib.XLA) -> tuple[jax.Array, KVCache]:
  """New tokens against a filled ``cache``: ``(hidden [B, T, D], cache)``.

  The T tokens go to slots ``cache.index..index+T-1`` and attend to every
  valid slot before them and to each other. A per-layer cache (with
  unstacked layers) is written first and read in place by ``ops.attention``
  (one fused kernel call per layer where enabled); a stacked one is read as
  it was, with the new keys beside it, and written after all layers.
  """
  _check_lora(lora, lora_config)
  input_mask, positions = _inputs(tokens, input_mask, positions, cache)
  call = _new_call(config, ops, positions, lora_config, None)
  dt = config.compute_dtype
  b, t = tokens.shape
  slot, k_slot = jnp.arange(t), jnp.arange(cache.max_length)
  # [T, S] query slot - cache slot, for the sliding-window layers.
  dist_cache = (cache.index + slot)[:, None] - k_slot[None, :]
  valid = jax.lax.dynamic_update_slice(cache.valid, input_mask, (0, cache.index))
  x = _embed(params, tokens, config)

  if cache.per_layer:
    if not isinstance(params["layers"], (list, tuple)):
      raise ValueError("A per-layer KV cache needs unstacked layers: pass "
                       "unstack_layers(params), or use init_cache(per_layer=False).")
    # Each new token sees the real tokens up to and including its own slot.
    mask = valid[:, None, :] & (k_slot[None, None, :] <= cache.index + slot[None, :, None])
    reference = functools.partial(_attention, config=config, ops=ops)

    def layer(x, lp, ll, i, bufs):
      k_buf, v_buf = bufs
      q, k, v = _qkv(call, lp, ll, x, None, i)
      at = (0, 0, cache.index, 0)
      k_buf = jax.lax.dynamic_update_slice(k_buf, k.astype(k_buf.dtype), at)
      v_buf = jax.lax.dynamic_update_slice(v_buf, v.astype(v_buf.dtype), at)
      attn = ops.attention(q, k_buf.astype(dt), v_buf.astype(dt),
                           _window(config, i, mask, dist_cache), reference=reference)
      return _out_and_mlp(call, lp, ll, x, attn, None), (k_buf, v_buf)

    x, bufs = _over_layers(layer, x, params["layers"], lora, (cache.k, cache.v),
                           config.num_layers)
    new_cache = KVCache(k=tuple(k for k, _ in bufs), v=tuple(v for _, v in bufs),
                        valid=valid, index=cache.index + t)
  else:
    mask = _causal_mask(input_mask)
    # The real slots before the write index.
    seen = cache.valid & (k_slot[None, :] < cache.index)  # [B, S]
    mask_old = jnp.broadcast_to(seen[:, None, :], (b, t, cache.max_length))
    dist_new = slot[:, None] - slot[None, :]

    def layer(x, lp, ll, i, old):
      k_old, v_old = old
      q, k, v = _qkv(call, lp, ll, x, None, i)
      attn = _attention(q, k, v, _window(config, i, mask, dist_new), config, ops,
                        k_old.astype(dt), v_old.astype(dt),
                        _window(config, i, mask_old, dist_cache))
      return _out_and_mlp(call, lp, ll, x, attn, None), (k, v)

    x, kv = _over_layers(layer, x, params["layers"], lora, (cache.k, cache.v),
                         config.num_layers)
    new_cache = _write_stacked(cache, *_stacked(kv), valid, t)
  x = rms_norm(x, params["final_norm"], config.rms_norm_eps, config.norm_offset)
  return x, new_cache


def forward(params: PyTree, tokens: jax.Array, *, config: ModelConfig,
            input_mask: jax.Array | None = None,
            positions: jax.Array | None = None,
            cache: KVCache | None = None,
            lora: PyTree | None = None,
            lora_config: lora_lib.LoraConfig | None = None,
            dropout_rng: jax.Array | None = None,
            return_hidden: bool = False,
            prefill: bool = False,
            ops: ops_lib.Ops = ops_lib.XLA,
            segment_ids: jax.Array | None = None):
  """Runs the decoder: one of the three passes, then the LM head.

  Args:
    params: base parameters (layout in the module docstring).
    tokens: [B, T] int token ids.
    config: the model's static config.
    input_mask: [B, T] bool, False at padding. Defaults to all True.
    positions: [B, T] RoPE positions. Defaults to the count of real tokens
      before each one (in the cache too), which handles left padding.
    cache: if given, the T tokens are written at ``cache.index`` and attend to
      everything valid in the cache (:func:`decode_hidden`); the updated cache
      is returned. A per-layer cache (``init_cache(per_layer=True)``) needs
      unstacked layers.
    lora: optional adapter pytree (see :mod:`fedjax_u2s.lora`).
    lora_config: required with ``lora``.
    dropout_rng: enables LoRA dropout (training only; no cache).
    return_hidden: return the final normed hidden states [B, T, D] instead of
      logits (for chunked losses).
    prefill: promise that ``cache`` holds nothing yet, so the tokens attend
      only to each other (:func:`prefill_hidden`); the cache is still filled.
    ops: how the products run (static): :data:`fedjax_u2s.ops.XLA`, or
      :data:`fedjax_u2s.ops.CPU_KERNEL` for decoding on the CPU.
    segment_ids: [B, T] int, packed rows (no cache): see
      :func:`sequence_hidden`.

  Returns:
    ``(logits [B, T, V] float32, cache)``; ``cache`` is None if none was given.
  """
  kw = dict(config=config, input_mask=input_mask, positions=positions, lora=lora,
            lora_config=lora_config, ops=ops)
  if cache is not None and dropout_rng is not None:
    raise ValueError("forward(dropout_rng=...) is for training: not with a cache.")
  if cache is not None and segment_ids is not None:
    raise ValueError("forward(segment_ids=...) is for packed training rows: "
                     "not with a cache.")
  if cache is None:
    x, new_cache = sequence_hidden(params, tokens, dropout_rng=dropout_rng,
                                   segment_ids=segment_ids, **kw), None
  elif prefill:
    x, new_cache = prefill_hidden(params, tokens, cache, **kw)
  else:
    x, new_cache = decode_hidden(params, tokens, cache, **kw)
  if return_hidden:
    return x, new_cache
  return logits_from_hidden(params, x, config=config, ops=ops), new_cache


def logits_from_hidden(params: PyTree, x: jax.Array, *, config: ModelConfig,
                       ops: ops_lib.Ops = ops_lib.XLA) -> jax.Array:
  """[..., D] final hidden states -> [..., V] float32 logits."""
  dt = config.compute_dtype
  if "lm_head" in params:  # Untied, or laid out for decoding beside a tied embedding.
    w, transpose_w = params["lm_head"], False
  else:  # Tied: the embedding, transposed.
    w, transpose_w = params["embed"], True
  logits = ops.logits(x.astype(dt), w.astype(dt), transpose_w=transpose_w)
  cap = config.final_logit_softcapping
  if cap is not None:  # Gemma 2's soft-capping (float32, as the logits are).
    logits = jnp.tanh(logits / cap) * cap
  return logits
