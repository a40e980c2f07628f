"""The decoder's products, dispatched: jnp by default, the CPU kernel where enabled.

``models/`` does its math through an :class:`Ops` it is handed and never
imports ``kernels/``; this package is the one place that does. See
:mod:`fedjax_u2s.ops.products`.
"""

from fedjax_u2s.ops.products import CPU_KERNEL
from fedjax_u2s.ops.products import kernel_available
from fedjax_u2s.ops.products import kernel_runs_here
from fedjax_u2s.ops.products import kernel_unavailable_reason
from fedjax_u2s.ops.products import Ops
from fedjax_u2s.ops.products import pack
from fedjax_u2s.ops.products import pack_swiglu
from fedjax_u2s.ops.products import Packed
from fedjax_u2s.ops.products import XLA

__all__ = ["CPU_KERNEL", "Ops", "Packed", "XLA", "kernel_available",
           "kernel_runs_here", "kernel_unavailable_reason", "pack", "pack_swiglu"]
