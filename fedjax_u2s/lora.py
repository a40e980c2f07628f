"""LoRA as its own pytree beside the frozen base parameters.

The base parameters of :mod:`fedjax_u2s.models.llama` keep their layers stacked
on a leading axis ``L``; a LoRA pytree mirrors the targeted projections::

    {"q": {"a": [L, D_in, r], "b": [L, r, D_out]}, "v": {...}, ...}

``a`` is drawn at random and ``b`` starts at zero, so a fresh adapter is the
identity. The decoder applies ``x @ W + scale * (x @ a) @ b`` without ever
materialising ``W + scale * a @ b``; :func:`merge` builds that only for export
and fast inference. Because the adapter is a separate pytree, a stack of client
adapters with a leading client axis can be vmapped over while the base stays one
shared, unreplicated pytree::

    jax.vmap(lambda l: forward(params, tokens, config=cfg, lora=l,
                               lora_config=lcfg), in_axes=0)(stacked_lora)
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fedjax_u2s.models.config import ModelConfig

PyTree = Any

# Projections LoRA can target, as named in the base parameter pytree.
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Static LoRA hyper-parameters (hashable: usable as a jit static arg).

  Attributes:
    rank: r, the inner dimension.
    alpha: the update is scaled by ``alpha / rank``.
    targets: name patterns (fnmatch) over :data:`ALL_TARGETS`, e.g.
      ``("q", "v")`` or ``("*",)``.
    dropout: dropout rate on the adapter input during training.
  """
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "k", "v", "o")
  dropout: float = 0.0

  def __post_init__(self):
    if self.rank <= 0:
      raise ValueError(f"LoraConfig.rank must be positive, got {self.rank}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}.")
    if not self.target_names:
      raise ValueError(
          f"LoraConfig.targets={self.targets} matches none of {ALL_TARGETS}.")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def target_names(self) -> tuple[str, ...]:
    return tuple(n for n in ALL_TARGETS
                 if any(fnmatch.fnmatchcase(n, p) for p in self.targets))


def _projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
  d, f = config.hidden_size, config.intermediate_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d),
          "gate": (d, f), "up": (d, f), "down": (f, d)}


def init(rng: jax.Array, config: ModelConfig, lora_config: LoraConfig,
         dtype: Any = jnp.float32) -> PyTree:
  """A fresh adapter: ``a`` ~ Kaiming-uniform (as PEFT does), ``b`` = 0."""
  shapes = _projection_shapes(config)
  out = {}
  for i, name in enumerate(lora_config.target_names):
    d_in, d_out = shapes[name]
    bound = (1.0 / d_in) ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, d_in].
    a = jax.random.uniform(jax.random.fold_in(rng, i),
                           (config.num_layers, d_in, lora_config.rank),
                           jnp.float32, -bound, bound)
    out[name] = {"a": a.astype(dtype),
                 "b": jnp.zeros((config.num_layers, lora_config.rank, d_out), dtype)}
  return out


def init_stacked(rng: jax.Array, num_clients: int, config: ModelConfig,
                 lora_config: LoraConfig, dtype: Any = jnp.float32) -> PyTree:
  """``num_clients`` adapters stacked on a leading client axis."""
  rngs = jax.random.split(rng, num_clients)
  return jax.vmap(lambda r: init(r, config, lora_config, dtype))(rngs)


def apply(x: jax.Array, lora_ab: Mapping[str, jax.Array], scale: float, *,
          dropout: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
  """The low-rank update ``scale * dropout(x) @ a @ b`` for one layer.

  Args:
    x: [..., D_in] activations.
    lora_ab: ``{"a": [D_in, r], "b": [r, D_out]}``.
    scale: alpha / r.
    dropout: rate; applied only when ``rng`` is given.
    rng: dropout key, or None for deterministic application.
  Returns:
    [..., D_out] in ``x.dtype``.
  """
  if dropout and rng is not None:
    keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
  a = lora_ab["a"].astype(x.dtype)
  b = lora_ab["b"].astype(x.dtype)
  return (scale * ((x @ a) @ b)).astype(x.dtype)


def merge(params: PyTree, lora: PyTree, lora_config: LoraConfig) -> PyTree:
  """Base params with ``W + scale * a @ b`` folded in (for export / inference)."""
  layers = dict(params["layers"])
  for name, ab in lora.items():
    w = layers[name]["w"]
    delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32),
                       ab["b"].astype(jnp.float32)) * lora_config.scale
    layers[name] = {**layers[name], "w": (w.astype(jnp.float32) + delta).astype(w.dtype)}
  return {**params, "layers": layers}


def split(tree: PyTree, lora_config: LoraConfig) -> tuple[PyTree, PyTree]:
  """Inverse of :func:`combine`: moves adapter leaves out of a params pytree.

  Args:
    tree: base params whose targeted projections carry ``"a"`` and ``"b"``
      leaves beside ``"w"`` (the layout :func:`combine` produces).
    lora_config: says which projections to look at.

  Returns:
    ``(base, lora)``.
  """
  layers = dict(tree["layers"])
  lora = {}
  for name in lora_config.target_names:
    proj = dict(layers[name])
    if "a" in proj:
      lora[name] = {"a": proj.pop("a"), "b": proj.pop("b")}
    layers[name] = proj
  return {**tree, "layers": layers}, lora


def combine(params: PyTree, lora: PyTree) -> PyTree:
  """Inverse of :func:`split`: adapter leaves placed beside their base weight."""
  layers = dict(params["layers"])
  for name, ab in lora.items():
    layers[name] = {**layers[name], **ab}
  return {**params, "layers": layers}


def concat_rank(first: PyTree, second: PyTree) -> PyTree:
  """One adapter whose update is the sum of two adapters' updates.

  ``a`` matrices are joined on the rank axis and ``b`` matrices on theirs, so
  ``x @ [a1 a2] @ [b1; b2] = x @ a1 @ b1 + x @ a2 @ b2``: with the scale of
  one config (both adapters share it), the decoder applies base + first +
  second in one pass, and gradients reach each part separately. FedPIT's
  personal model (global + local adapter) is this.
  """
  if set(first) != set(second):
    raise ValueError(f"concat_rank: the adapters target {sorted(first)} and "
                     f"{sorted(second)}; they must target the same projections.")
  return {name: {"a": jnp.concatenate([first[name]["a"], second[name]["a"]], axis=-1),
                 "b": jnp.concatenate([first[name]["b"], second[name]["b"]], axis=-2)}
          for name in first}


def num_params(lora: PyTree) -> int:
  return sum(x.size for x in jax.tree.leaves(lora))
