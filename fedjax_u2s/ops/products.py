"""Matmuls, attention products, gated MLP and LM head: jnp, or the CPU kernel.

The decoder (``fedjax_u2s.models.llama``) is written once, against an
:class:`Ops`; which implementation runs is the caller's explicit, jit-static
choice, so the model's math carries no backend switch and never imports
``kernels/``:

* :data:`XLA` (the default everywhere, training included): plain ``jnp``
  einsums that XLA fuses with their neighbours and differentiates.
* :data:`CPU_KERNEL` (the sampler's decode path on the CPU): float32 products
  through ``kernels/cpu_gemm`` (an XLA FFI custom call), which beats XLA:CPU's
  dots on decoding's skinny products (numbers in docs/benchmarks.md,
  "Decoding kernels"). Each op still falls back to the same einsum where the
  kernel does not apply: operands that are not float32, a computation
  lowered for a GPU or TPU, or a kernel that is unavailable on this machine
  (:func:`kernel_available`).

Weights are ``[K, N]`` arrays or, for decoding only, :class:`Packed` panels
(made by :func:`pack` / :func:`pack_swiglu`, see ``fedjax_u2s.decoding``):
each op takes either, so the model never looks at a weight's type.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from fedjax_u2s.kernels import cpu_gemm

# The decode-weight layout lives with the kernel that streams it; re-exported
# so that nothing outside ops/ imports kernels/.
Packed = cpu_gemm.Packed
pack = cpu_gemm.pack
pack_swiglu = cpu_gemm.pack_swiglu


def kernel_available() -> bool:
  """Whether the CPU kernel is built and loaded (see kernels/cpu_gemm.py)."""
  return cpu_gemm.available()


def kernel_unavailable_reason() -> str:
  """Why :func:`kernel_available` is False ('' when it is True)."""
  return cpu_gemm.unavailable_reason()


def kernel_runs_here() -> bool:
  """Whether the kernel is available and JAX computes on the CPU by default:
  where :data:`CPU_KERNEL` actually runs the custom calls."""
  return cpu_gemm.runs_here()


@dataclasses.dataclass(frozen=True)
class Ops:
  """The decoder's products (hashable: a static argument under ``jit``).

  Attributes:
    cpu_kernel: route float32 products through the CPU kernel where it
      applies (see the module docstring); False: ``jnp`` only.
  """
  cpu_kernel: bool = False

  def matmul(self, x: jax.Array, w, *, transpose_w: bool = False,
             out_dtype=None) -> jax.Array:
    """``x @ w`` (or ``x @ w.T``) for x [..., K], w [K, N] or :class:`Packed`.

    Accumulates in and returns ``out_dtype`` (default: the operands' dtype).
    """
    if self.cpu_kernel or isinstance(w, Packed):
      return cpu_gemm.matmul(x, w, transpose_w=transpose_w, sgemm=self.cpu_kernel,
                             out_dtype=out_dtype)
    out_dtype = jnp.dtype(out_dtype or jnp.result_type(x, w))
    return jnp.einsum("...k,nk->...n" if transpose_w else "...k,kn->...n", x, w,
                      preferred_element_type=out_dtype)

  def logits(self, x: jax.Array, w, *, transpose_w: bool = False) -> jax.Array:
    """The LM head: [..., D] hidden states -> [..., V] float32 logits.

    float32 even from bfloat16 operands: no rounding of the logits on the
    way out. ``transpose_w`` for a tied [V, D] embedding.
    """
    return self.matmul(x, w, transpose_w=transpose_w, out_dtype=jnp.float32)

  def swiglu(self, x: jax.Array, w) -> jax.Array:
    """``silu(x @ gate) * (x @ up)`` for gate and up fused into one weight.

    w: a :func:`pack_swiglu` weight (one kernel call for both products and
    the activation), or a [K, 2F] array (gate columns, then up).
    """
    if isinstance(w, Packed):
      return cpu_gemm.swiglu(x, w, sgemm=self.cpu_kernel)
    gate, up = jnp.split(self.matmul(x, w), 2, axis=-1)
    return jax.nn.silu(gate) * up

  def scores(self, q: jax.Array, keys: jax.Array) -> jax.Array:
    """Attention logits before scaling, in float32.

    q [B, K, G, T, hd] (G query heads per KV head); keys [B, K, S, hd].
    Returns [B, K, G, T, S]. The kernel runs it as one batch of
    [G*T, hd] x [S, hd]^T products, one per (row, KV head).
    """
    if not self.cpu_kernel:
      return jnp.einsum("bkgtd,bksd->bkgts", q, keys,
                        preferred_element_type=jnp.float32)
    b, kh, g, t, hd = q.shape
    s = cpu_gemm.batched_matmul(q.reshape(b, kh, g * t, hd), keys,
                                transpose_b=True, out_dtype=jnp.float32)
    return s.reshape(b, kh, g, t, keys.shape[2])

  def mix(self, probs: jax.Array, values: jax.Array) -> jax.Array:
    """Attention's weighted sum: [B, K, G, T, S] x [B, K, S, hd] -> [B, K, G, T, hd]."""
    if not self.cpu_kernel:
      return jnp.einsum("bkgts,bksd->bkgtd", probs, values)
    b, kh, g, t, s = probs.shape
    out = cpu_gemm.batched_matmul(probs.reshape(b, kh, g * t, s), values)
    return out.reshape(b, kh, g, t, values.shape[-1])

  def attention(self, q: jax.Array, keys: jax.Array, values: jax.Array,
                mask: jax.Array, *, reference: Callable) -> jax.Array:
    """Grouped-query attention over a KV cache (inference).

    q [B, T, H, hd]; keys, values [B, K, S, hd]; mask [B, T, S] bool.
    Returns [B, T, H*hd], as ``reference(q, keys, values, mask)`` (the
    model's own attention) does; with the kernel, scores, masked softmax
    and weighted sum are one custom call that reads only the slots the
    mask allows.
    """
    if not self.cpu_kernel:
      return reference(q, keys, values, mask)
    return cpu_gemm.attention(q, keys, values, mask, reference=reference)


XLA = Ops()
CPU_KERNEL = Ops(cpu_kernel=True)
