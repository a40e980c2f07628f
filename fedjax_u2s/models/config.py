"""Model configuration for the decoder-only transformers we implement.

One frozen dataclass covers Llama-2/3, SmolLM/SmolLM2, Qwen2/2.5, Qwen3 and
Gemma 3 (text): what differs between them is a handful of explicit fields
(norm placement and offset, q/k norms, the MLP's activation, embedding scale,
sliding-window layers and their RoPE base, logit soft-capping). It is built
from a Hugging Face ``config.json`` (:meth:`ModelConfig.from_hf_config`) or from
GGUF metadata (``fedjax_u2s.models.gguf_loader``), and anything the decoder does
not implement is refused here, with the field that asked for it, rather than
silently mis-modelled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

# HF `model_type` values this decoder implements, and what each implies.
_ARCHITECTURES = {
    # model_type: default for bias on q/k/v projections.
    "llama": False,
    "qwen2": True,
    "qwen3": False,
    "gemma3_text": False,
}
# Our architecture name for each HF model_type (what export writes back).
_ARCH_OF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                       "gemma3_text": "gemma3"}
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Gemma 3's local layers' RoPE base when a file does not say (HF's default,
# and llama.cpp's hard-coded value for gemma3 GGUF files).
GEMMA3_LOCAL_ROPE_THETA = 10000.0


class UnsupportedModelError(ValueError):
  """A checkpoint asks for something this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling of the full-attention layers.

  ``rope_type="llama3"``: Llama-3's frequency-dependent scaling (all fields).
  ``rope_type="linear"``: every frequency divided by ``factor`` (positions
  interpolated; Gemma 3 4B+ on its global layers); the other fields unused.
  """
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 1.0
  original_max_position_embeddings: int = 0
  rope_type: str = "llama3"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static hyper-parameters of a decoder (Llama, Qwen2/3, Gemma 3).

  Hashable, so it can be a static argument of jitted functions. The fields
  after ``name`` describe what Gemma 3 (and Qwen3's q/k norms) add to the
  Llama layer; their defaults are Llama's, so a Llama config never sets them.
  """
  vocab_size: int
  hidden_size: int            # D
  intermediate_size: int      # F, the SwiGLU width
  num_layers: int             # L
  num_heads: int              # H
  num_kv_heads: int           # K, grouped-query attention: H % K == 0
  head_dim: int               # hd
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False      # Qwen2: bias on q, k, v
  o_bias: bool = False        # Llama `attention_bias` puts one on o too
  mlp_bias: bool = False
  # Numerics: parameters are stored in `param_dtype`, matmuls run in `dtype`;
  # norms, softmax and logits are always fp32.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False         # Rematerialise each layer in the backward pass.
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  name: str = ""
  # Which HF architecture this is: what an export's config.json says.
  architecture: str = "llama"
  # The gated MLP's activation: "silu" (SwiGLU) or "gelu_pytorch_tanh"
  # (Gemma's GeGLU with tanh-approximated GELU).
  hidden_act: str = "silu"
  # RMSNorm scales by (norm_offset + w): Gemma stores w - 1 (offset 1.0).
  norm_offset: float = 0.0
  # RMSNorm over each head's q and k before RoPE (Gemma 3, Qwen3).
  qk_norm: bool = False
  # Norms on the attention's and the MLP's outputs too, before each residual
  # add (Gemma 2/3: four norms a layer).
  post_norms: bool = False
  # Embeddings multiplied by sqrt(hidden_size), in the compute dtype (Gemma).
  embed_scale: bool = False
  # Attention scores are scaled by query_pre_attn_scalar**-0.5 (Gemma);
  # None: head_dim**-0.5.
  query_pre_attn_scalar: float | None = None
  # Per layer "full_attention" or "sliding_attention"; () = all full. A
  # sliding layer's token sees only itself and the sliding_window - 1 tokens
  # before it, with RoPE base rope_local_theta and no rope_scaling.
  layer_types: tuple[str, ...] = ()
  sliding_window: int | None = None
  rope_local_theta: float | None = None
  # Logits -> tanh(logits / c) * c (Gemma 2; Gemma 3 has none).
  final_logit_softcapping: float | None = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise UnsupportedModelError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}.")
    if self.architecture not in ARCHITECTURES:
      raise UnsupportedModelError(
          f"architecture={self.architecture!r}; implemented: {ARCHITECTURES}.")
    if self.hidden_act not in HIDDEN_ACTS:
      raise UnsupportedModelError(
          f"hidden_act={self.hidden_act!r}; implemented: {HIDDEN_ACTS}.")
    if self.layer_types:
      if len(self.layer_types) != self.num_layers:
        raise UnsupportedModelError(
            f"layer_types has {len(self.layer_types)} entries for "
            f"num_layers={self.num_layers}.")
      bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
      if bad:
        raise UnsupportedModelError(
            f"layer_types holds {bad}; implemented: {LAYER_TYPES}.")
      if "sliding_attention" in self.layer_types and not (
          self.sliding_window and self.sliding_window > 0):
        raise UnsupportedModelError(
            f"layer_types has sliding_attention layers but sliding_window="
            f"{self.sliding_window}; give the window's length.")
    if self.rope_scaling is not None and self.rope_scaling.rope_type not in (
        "llama3", "linear"):
      raise UnsupportedModelError(
          f"rope_scaling.rope_type={self.rope_scaling.rope_type!r}; implemented: "
          "'llama3', 'linear'.")
    if self.final_logit_softcapping is not None and self.final_logit_softcapping <= 0:
      raise UnsupportedModelError(
          f"final_logit_softcapping={self.final_logit_softcapping} must be > 0.")

  @property
  def has_sliding_layers(self) -> bool:
    return "sliding_attention" in self.layer_types

  def is_sliding(self, layer: int) -> bool:
    return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @property
  def num_params(self) -> int:
    """Parameter count (embeddings counted once when tied)."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    q, kv = self.num_heads * hd, self.num_kv_heads * hd
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
    per_layer += 2 * d * self.post_norms + 2 * hd * self.qk_norm
    per_layer += (q + 2 * kv) * self.qkv_bias + d * self.o_bias
    per_layer += (2 * f + d) * self.mlp_bias
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * per_layer + emb + d

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json",
                     **overrides) -> "ModelConfig":
    """Builds a config from the dict of a Hugging Face ``config.json``.

    Args:
      hf: the parsed JSON.
      source: where it came from, for error messages.
      **overrides: fields to set on top (e.g. ``dtype="bfloat16"``).

    Raises:
      UnsupportedModelError: for an architecture or feature not implemented.
    """
    model_type = hf.get("model_type")
    if model_type not in _ARCHITECTURES:
      archs = hf.get("architectures")
      raise UnsupportedModelError(
          f"{source}: model_type={model_type!r} (architectures={archs}) is not "
          f"supported; this decoder implements {sorted(_ARCHITECTURES)} "
          "(Llama-2/3, SmolLM/SmolLM2, Qwen2/2.5, Qwen3, Gemma 3 text).")
    gemma = model_type == "gemma3_text"
    hf = _gemma3_rope_fields(hf, source) if gemma else _classic_rope_fields(hf, source)

    def need(key):
      if key not in hf:
        raise UnsupportedModelError(f"{source}: required field {key!r} is missing.")
      return hf[key]

    # Gemma's config.json names the activation hidden_activation.
    act = hf.get("hidden_activation") or hf.get("hidden_act") or (
        "gelu_pytorch_tanh" if gemma else "silu")
    want_act = "gelu_pytorch_tanh" if gemma else "silu"
    if act != want_act:
      raise UnsupportedModelError(
          f"{source}: hidden_act={act!r}; only {want_act!r} is implemented for "
          f"model_type={model_type!r}.")
    if hf.get("pretraining_tp", 1) not in (1, None):
      raise UnsupportedModelError(f"{source}: pretraining_tp != 1 is not implemented.")
    for key in ("attn_logit_softcapping",):
      if hf.get(key) is not None:
        raise UnsupportedModelError(
            f"{source}: {key}={hf[key]} (Gemma 2's attention soft-capping) is not "
            "implemented.")
    if hf.get("use_bidirectional_attention"):
      raise UnsupportedModelError(
          f"{source}: use_bidirectional_attention=true (an encoder) is not "
          "implemented; this is a causal decoder.")

    num_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    num_layers = need("num_hidden_layers")
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (
        () if eos is None else (int(eos),))
    attention_bias = bool(hf.get("attention_bias", False))
    # transformers' per-model defaults for a field config.json may omit.
    default_head_dim = {"gemma3_text": 256, "qwen3": 128}.get(
        model_type, hidden // num_heads)
    kw = dict(
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or default_head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(hf.get("rope_theta", 1e6 if gemma else 10000.0)),
        rope_scaling=_rope_scaling(hf.get("rope_scaling"), source),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        qkv_bias=_ARCHITECTURES[model_type] or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        name=hf.get("_name_or_path", "") or model_type,
        architecture=_ARCH_OF_MODEL_TYPE[model_type],
        hidden_act=act,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
    )
    if gemma:
      window = int(hf.get("sliding_window", 4096))
      layer_types = hf.get("layer_types")
      if layer_types is None:  # transformers' default: every 6th layer global.
        pattern = int(hf.get("sliding_window_pattern",
                             hf.get("_sliding_window_pattern", 6)))
        layer_types = ["sliding_attention" if (i + 1) % pattern else
                       "full_attention" for i in range(num_layers)]
      kw.update(norm_offset=1.0, post_norms=True, embed_scale=True,
                query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                layer_types=tuple(layer_types), sliding_window=window,
                rope_local_theta=float(hf.get("rope_local_base_freq",
                                              GEMMA3_LOCAL_ROPE_THETA)),
                final_logit_softcapping=hf.get("final_logit_softcapping"),
                max_position_embeddings=int(hf.get("max_position_embeddings",
                                                   131072)))
    else:
      if hf.get("use_sliding_window", False):
        raise UnsupportedModelError(
            f"{source}: use_sliding_window=true is not implemented for "
            f"model_type={model_type!r}; set it to false for contexts shorter "
            "than sliding_window.")
      types = hf.get("layer_types")
      if types is not None and any(t != "full_attention" for t in types):
        raise UnsupportedModelError(
            f"{source}: layer_types={types} with use_sliding_window=false; only "
            "full_attention layers are implemented for this model_type.")
      if hf.get("final_logit_softcapping") is not None:
        kw["final_logit_softcapping"] = float(hf["final_logit_softcapping"])
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_json_file(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{path} not found: a Hugging Face model directory needs a config.json "
          "(the model's hyper-parameters) beside its model.safetensors or "
          "sharded model-*-of-*.safetensors files.")
    try:
      with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e
    if not isinstance(hf, dict):
      raise ValueError(f"{path}: expected a JSON object, got {type(hf).__name__}.")
    return cls.from_hf_config(hf, source=path, **overrides)


def _classic_rope_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
  """Maps transformers>=5 ``rope_parameters`` to ``rope_theta``/``rope_scaling``.

  transformers 5 writes ``"rope_parameters": {"rope_type": ..., "rope_theta":
  ..., <scaling fields>}`` in place of the top-level ``rope_theta`` and
  ``rope_scaling`` that :meth:`ModelConfig.from_hf_config` reads; without this
  a freshly saved checkpoint would silently get the default rope_theta.
  """
  hf = dict(hf)
  rp = hf.get("rope_parameters")
  if rp is None:
    return hf
  if not isinstance(rp, Mapping) or any(isinstance(v, Mapping) for v in rp.values()):
    raise UnsupportedModelError(
        f"{source}: rope_parameters={rp!r} is not one flat dict; per-layer-type "
        "RoPE parameters are not implemented.")
  if "rope_theta" in rp:
    if "rope_theta" in hf and float(hf["rope_theta"]) != float(rp["rope_theta"]):
      raise UnsupportedModelError(
          f"{source}: rope_theta={hf['rope_theta']} disagrees with "
          f"rope_parameters.rope_theta={rp['rope_theta']}.")
    hf["rope_theta"] = rp["rope_theta"]
  scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
  if hf.get("rope_scaling") is None and scaling.get(
      "rope_type", scaling.get("type", "default")) != "default":
    hf["rope_scaling"] = scaling
  return hf


def _gemma3_rope_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
  """Gemma 3's RoPE fields as ``rope_theta`` / ``rope_local_base_freq`` /
  ``rope_scaling`` (the full-attention layers' scaling).

  transformers 5 writes ``rope_parameters`` per layer type
  (``{"full_attention": {...}, "sliding_attention": {...}}``); older files
  have the three fields at the top level. Scaling of the sliding layers is
  refused: no Gemma 3 release has it and the decoder does not implement it.
  """
  hf = dict(hf)
  rp = hf.get("rope_parameters")
  if rp is None:
    return hf
  if not isinstance(rp, Mapping) or not set(rp) <= set(LAYER_TYPES):
    raise UnsupportedModelError(
        f"{source}: rope_parameters={rp!r}; expected one dict per layer type "
        f"({', '.join(LAYER_TYPES)}).")
  full = dict(rp.get("full_attention") or {})
  local = dict(rp.get("sliding_attention") or {})
  if "rope_theta" in full:
    hf["rope_theta"] = full.pop("rope_theta")
  if "rope_theta" in local:
    hf["rope_local_base_freq"] = local.pop("rope_theta")
  if local.get("rope_type", "default") != "default":
    raise UnsupportedModelError(
        f"{source}: rope_parameters.sliding_attention={rp['sliding_attention']!r}: "
        "RoPE scaling on the sliding-window layers is not implemented.")
  if full.get("rope_type", full.get("type", "default")) != "default":
    hf["rope_scaling"] = full
  return hf


def _rope_scaling(rs: Mapping[str, Any] | None, source: str) -> RopeScaling | None:
  if not rs:
    return None
  kind = rs.get("rope_type", rs.get("type"))
  if kind in (None, "default"):
    return None
  if kind == "linear":
    try:
      return RopeScaling(factor=float(rs["factor"]), rope_type="linear")
    except KeyError as e:
      raise UnsupportedModelError(f"{source}: rope_scaling lacks {e.args[0]!r}.") from e
  if kind != "llama3":
    raise UnsupportedModelError(
        f"{source}: rope_scaling type {kind!r} is not implemented (only 'llama3' "
        "and 'linear').")
  try:
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
  except KeyError as e:
    raise UnsupportedModelError(f"{source}: rope_scaling lacks {e.args[0]!r}.") from e
