"""How the sampler decodes: the one ``decode`` setting, and the decode weights.

Decoding is many small steps over the same weights, where the fastest way to
run them depends on the machine (docs/benchmarks.md, "Decoding kernels", has
the measurements behind these rules). The sampler takes one setting:

============  ==============================================================
``decode``    what runs
============  ==============================================================
"auto"        the measured default: "cpu_kernel" where the CPU kernel runs
              here (``ops.kernel_runs_here()``) and the model computes in
              float32; "unrolled" elsewhere (GPU, TPU, bfloat16, no kernel).
"cpu_kernel"  decode steps over unrolled layers, each with its own KV-cache
              buffers, and weights packed for the kernel (q/k/v and gate/up
              fused, column panels, kept in the GGUF block format they were
              dequantised from where that is exact: :func:`decode_weights`);
              every product, the prefill's too, through the CPU kernel.
"unrolled"    unrolled layers over the row-major weights; plain XLA.
"scan"        the layer scan over stacked weights and one stacked cache:
              compiles several times faster but decodes slower, so for a few
              calls; products through the kernel where it runs here in
              float32 (faster for prefill and decode steps alike), XLA
              elsewhere.
"scan_xla"    the layer scan; plain XLA.
============  ==============================================================

Each name resolves to a :class:`DecodePlan` (:func:`resolve`); a plan may
also be passed directly, for combinations no name covers (A/B runs).
``FEDJAX_U2S_CPU_GEMM=0`` makes the kernel unavailable (kernels/cpu_gemm.py),
which "auto" and "scan" then follow.

The prefill always runs over the params as given (the layer scan for stacked
layers: it compiles once per layer stack and measured as fast as unrolled).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import ops as ops_lib
from fedjax_u2s.models import llama
from fedjax_u2s.models.config import ModelConfig

PyTree = Any

DECODES = ("auto", "cpu_kernel", "unrolled", "scan", "scan_xla")

# GGUF block formats the decode weights may be stored in (ops.pack), tried in
# this order.
DECODE_FORMATS = ("q4_1", "q8_0")


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """How the decode steps run (hashable: static under ``jit``).

  Attributes:
    unroll: unrolled layers over per-layer cache buffers (inside a decode
      loop XLA:CPU copies each scanned layer's slice of the stacked weights
      every step); False: the layer scan (faster compile).
    ops: the products' implementation, in the prefill and the decode steps.
    packed: decode from weights laid out by :func:`pack_weights` (needs
      ``unroll``); the layout only the CPU kernel gains from.
  """
  unroll: bool
  ops: ops_lib.Ops = ops_lib.XLA
  packed: bool = False

  def __post_init__(self):
    if self.packed and not self.unroll:
      raise ValueError("DecodePlan(packed=True) needs unroll=True.")


def kernel_decodes(config: ModelConfig) -> bool:
  """Whether the CPU kernel runs here for this model's products (float32 on
  the CPU, kernel available): the rule "auto" and "scan" follow."""
  return ops_lib.kernel_runs_here() and config.compute_dtype == jnp.float32


def resolve(decode: str | DecodePlan, config: ModelConfig) -> DecodePlan:
  """The :class:`DecodePlan` a ``decode`` setting names (see the module
  docstring); a plan is returned as is."""
  if isinstance(decode, DecodePlan):
    return decode
  if decode == "auto":
    decode = "cpu_kernel" if kernel_decodes(config) else "unrolled"
  if decode == "cpu_kernel":
    return DecodePlan(unroll=True, ops=ops_lib.CPU_KERNEL, packed=True)
  if decode == "unrolled":
    return DecodePlan(unroll=True)
  if decode == "scan":
    return DecodePlan(unroll=False, ops=ops_lib.CPU_KERNEL if kernel_decodes(config)
                      else ops_lib.XLA)
  if decode == "scan_xla":
    return DecodePlan(unroll=False)
  raise ValueError(f"Unknown decode setting {decode!r}; choose from {DECODES} "
                   "or pass a decoding.DecodePlan.")


def pack_weights(params: PyTree, config: ModelConfig, *,
                 formats: tuple[str, ...] = ()) -> PyTree:
  """Unstacked params laid out for the CPU decode kernel (inference only).

  Each layer's q/k/v weights become one packed ``qkv`` (biases concatenated
  too), gate/up one ``gate_up`` for ``Ops.swiglu`` (where neither has a
  bias and the activation is SiLU; GeGLU keeps them apart), o and down
  packed alone, and the LM head a packed ``lm_head`` (the
  tied embedding stays for the lookup): fewer, larger calls, each streaming
  contiguous panels (see kernels/cpu_gemm.cc). A copy of the weights; the
  decoder takes it like the original (the fused layout in
  ``fedjax_u2s.models.llama``), but a LoRA adapter must be merged in first
  (``lora.merge``): the fused products leave no place to add its q/k/v,
  gate and up terms.

  ``formats``: GGUF block formats each weight is stored in where it holds
  that weight exactly (``ops.pack``); not under ``jit``. See
  :func:`decode_weights`.
  """
  layers = params["layers"]
  if not isinstance(layers, (list, tuple)):
    raise ValueError("pack_weights takes unstacked layers: pass "
                     "llama.unstack_layers(params) first.")
  pack = functools.partial(ops_lib.pack, formats=formats)

  def pack_layer(lp):
    lp = dict(lp)
    q, k, v = (lp.pop(name) for name in ("q", "k", "v"))
    qkv = {"w": pack(jnp.concatenate([q["w"], k["w"], v["w"]], axis=1))}
    if "b" in q:
      qkv["b"] = jnp.concatenate([q["b"], k["b"], v["b"]])
    lp["qkv"] = qkv
    # gate/up fuse with the SiLU only (ops.swiglu); GeGLU models keep them apart.
    if config.hidden_act == "silu" and "b" not in lp["gate"] and "b" not in lp["up"]:
      gate, up = lp.pop("gate"), lp.pop("up")
      lp["gate_up"] = {"w": ops_lib.pack_swiglu(gate["w"], up["w"], formats=formats)}
    return {name: ({**p, "w": pack(p["w"])}
                   if isinstance(p, dict) and not isinstance(p["w"], ops_lib.Packed)
                   else p)
            for name, p in lp.items()}

  head = (pack(params["embed"], transpose=True)
          if config.tie_word_embeddings else pack(params["lm_head"]))
  return {**params, "layers": tuple(pack_layer(lp) for lp in layers),
          "lm_head": head}


def decode_weights(params: PyTree, config: ModelConfig) -> PyTree:
  """:func:`pack_weights` of ``params`` for decoding, made once per model.

  Each weight whose float32 values are exactly a GGUF block format's
  dequantisation (a model loaded from such a GGUF) is kept in that format
  (:data:`DECODE_FORMATS`): the decode steps' products are the same float32
  products of the same weights from several times fewer bytes, and the copy
  is that much smaller. Others (safetensors models, merged adapters) get
  float32 panels. Reads the weights back to check (host syncs): call it
  outside ``jit``; :class:`fedjax_u2s.sampler.Sampler` does, once per
  params, and passes the result to ``sample_tokens``.
  """
  # Layers as host views (np.asarray of a CPU array does not copy), so
  # unstacking slices views of the stacked weights rather than copying them.
  host = {**params, "layers": jax.tree.map(np.asarray, params["layers"])}
  packed = pack_weights(llama.unstack_layers(host), config, formats=DECODE_FORMATS)
  # Norms and biases onto the device once, not at every call.
  return jax.tree.map(jnp.asarray, packed)


def decode_layout(params: PyTree, plan: DecodePlan, config: ModelConfig,
                  lora: PyTree | None = None,
                  lora_config: lora_lib.LoraConfig | None = None
                  ) -> tuple[PyTree, PyTree | None]:
  """The decode steps' ``(params, lora)`` under ``plan``, made inside ``jit``.

  Unrolled: layers unstacked once per call, outside the loop; packed: also
  packed (float32 panels: block formats need a host check, which
  :func:`decode_weights` makes once per model), with a LoRA adapter merged
  in first when the layers are stacked (the prefill applied it unmerged;
  the two agree to float32 rounding). An adapter over already unstacked
  layers stays unmerged, over row-major weights.
  """
  if not plan.unroll:
    return params, lora
  stacked = not isinstance(params["layers"], (list, tuple))
  packed = plan.packed and (lora is None or stacked)
  if packed and lora is not None:
    params = lora_lib.merge(params, lora, lora_config)
    lora = None
  params = llama.unstack_layers(params)
  if packed:
    params = pack_weights(params, config)
  return params, lora
