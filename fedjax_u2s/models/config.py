"""Model configuration for the Llama family of decoder-only transformers.

One frozen dataclass covers Llama-2/3, SmolLM/SmolLM2 and Qwen2/2.5. It is built
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
}


class UnsupportedModelError(ValueError):
  """A checkpoint asks for something this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3`)."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static hyper-parameters of a Llama-family decoder.

  Hashable, so it can be a static argument of jitted functions.
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

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise UnsupportedModelError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}.")

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
    hf = _classic_rope_fields(hf, source)
    model_type = hf.get("model_type")
    if model_type not in _ARCHITECTURES:
      archs = hf.get("architectures")
      raise UnsupportedModelError(
          f"{source}: model_type={model_type!r} (architectures={archs}) is not "
          f"supported; this decoder implements {sorted(_ARCHITECTURES)} "
          "(Llama-2/3, SmolLM/SmolLM2, Qwen2/2.5).")

    def need(key):
      if key not in hf:
        raise UnsupportedModelError(f"{source}: required field {key!r} is missing.")
      return hf[key]

    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise UnsupportedModelError(
          f"{source}: hidden_act={act!r}; only 'silu' (SwiGLU) is implemented.")
    if hf.get("use_sliding_window", False):
      raise UnsupportedModelError(
          f"{source}: use_sliding_window=true is not implemented; set it to false "
          "for contexts shorter than sliding_window.")
    if hf.get("pretraining_tp", 1) not in (1, None):
      raise UnsupportedModelError(f"{source}: pretraining_tp != 1 is not implemented.")

    num_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (
        () if eos is None else (int(eos),))
    attention_bias = bool(hf.get("attention_bias", False))
    kw = dict(
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hidden // num_heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling(hf.get("rope_scaling"), source),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=_ARCHITECTURES[model_type] or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        name=hf.get("_name_or_path", "") or model_type,
    )
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


def _rope_scaling(rs: Mapping[str, Any] | None, source: str) -> RopeScaling | None:
  if not rs:
    return None
  kind = rs.get("rope_type", rs.get("type"))
  if kind in (None, "default"):
    return None
  if kind != "llama3":
    raise UnsupportedModelError(
        f"{source}: rope_scaling type {kind!r} is not implemented (only 'llama3').")
  try:
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
  except KeyError as e:
    raise UnsupportedModelError(f"{source}: rope_scaling lacks {e.args[0]!r}.") from e
