"""float32 matmuls on XLA:CPU through a custom kernel (an XLA FFI custom call).

Decoding is made of skinny products ([B, D] x [D, F] with B of 1 to 16, and
attention's few query rows against the cache), where XLA:CPU's dot kernels
do poorly. ``cpu_gemm.cc`` runs products of up to 32 rows through its own
loops, which stream each weight once from memory with the output tile in
registers, and larger ones through MKL's ``sgemm``. That made decode steps
and prefills faster (docs/benchmarks.md, "Decoding kernels", has the
numbers), so the sampler's decode paths use it. LoRA training does not:
there M = B*T is large, XLA's dots fuse their neighbours and the custom call
cannot, and it was no faster for more XLA temp memory. Only
``fedjax_u2s.ops`` calls this module: the model asks its ``Ops`` for a
product, and ``ops.CPU_KERNEL`` routes it here.

Two more calls serve decoding only (no gradient): :func:`matmul` on a
:class:`Packed` weight (made by :func:`pack`: the weight as contiguous
32-column panels, which the kernel streams faster than a row-major weight's
strided rows), and :func:`attention`, the scores, masked softmax and weighted
sum of values over a KV cache in one call that reads only the slots the
mask allows. A packed weight whose float32 values are exactly a GGUF Q4_1
or Q8_0 dequantisation (``pack(w, formats=...)``) keeps those blocks; the
kernel expands them to the same float32 values, so its products are the
float32 panels' products, bit for bit, from several times fewer bytes.

:func:`matmul` routes a product through ``cpu_gemm.cc`` when all of these
hold, and through ``jnp.einsum`` otherwise:

* the caller asks for it (``sgemm=True``);
* the computation is lowered for the CPU (``lax.platform_dependent``: the same
  jitted function compiled for a GPU or TPU never sees the custom call);
* both operands are float32;
* the kernel is available (:func:`available`): a C++ compiler built
  ``cpu_gemm.cc`` against the FFI headers that ship with jaxlib (once, cached
  under ``$FEDJAX_U2S_CACHE`` or ``~/.cache/fedjax_u2s``), and a CBLAS
  library was found: ``$FEDJAX_U2S_CBLAS`` if set, else ``libmkl_rt`` from
  the ``mkl`` wheel (a dependency on x86-64 Linux). ``FEDJAX_U2S_CPU_GEMM=0``
  declares it unavailable, as on a machine without it (for A/B runs across
  processes); the sampler's ``decode`` setting, not this variable, is the
  switch that chooses the kernel where it is available.

The kernel's loops and the sgemms are single-threaded (MKL's sequential
layer); each product is split into blocks run on XLA's own intra-op threads
(the C++ file is built with -march=native, per machine), so no second
thread pool competes for the cores (MKL's OpenMP threads beside XLA's made
the training step slower; docs/benchmarks.md). The custom call is differentiable (a
``custom_vjp`` whose backward is two more calls with a transposed operand,
so no transpose is materialised) and batches under ``jax.vmap`` without
copying a shared operand: an unbatched weight arrives as a size-1 batch dim,
and the kernel folds the batch into M.

Numerics: the kernel sums in a different order than XLA's dot (with FMAs),
so results differ in the last bits (~1e-6 relative); its loops have a fixed
order and MKL's conditional-reproducibility mode is on, so they are
identical run to run.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import flax.struct
import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np

_TARGET = "fedjax_u2s_cpu_gemm"
_PACKED_TARGET = "fedjax_u2s_cpu_packed_gemm"
_QUANT_TARGET = "fedjax_u2s_cpu_quant_gemm"
_ATTENTION_TARGET = "fedjax_u2s_cpu_attention"
PANEL = 32  # Columns per panel of a packed weight (kPanel in cpu_gemm.cc).
QROWS = 32  # Rows of K per block of a block format (kQRows in cpu_gemm.cc).
# Block formats of packed panels: name -> (cpu_gemm.cc's Format, bytes per
# block). Layouts in cpu_gemm.cc.
FORMATS = {"q4_1": (1, 2 * 2 * PANEL + QROWS * PANEL // 2),
           "q8_0": (2, 2 * PANEL + QROWS * PANEL)}
_SOURCE = pathlib.Path(__file__).with_name("cpu_gemm.cc")
_MKL_CBWR_AUTO = 2  # mkl.h: MKL_CBWR_AUTO
_MKL_THREADING_SEQUENTIAL = 1  # mkl.h: MKL_THREADING_SEQUENTIAL


_LIB = {}  # "lib": the loaded cpu_gemm.cc library, once _load succeeds.


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("FEDJAX_U2S_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "fedjax_u2s")
  return pathlib.Path(root) / "kernels"


def _find_cblas() -> str | None:
  """Path of the CBLAS library: $FEDJAX_U2S_CBLAS, else the mkl wheel's."""
  if os.environ.get("FEDJAX_U2S_CBLAS"):
    return os.environ["FEDJAX_U2S_CBLAS"]
  try:
    files = importlib.metadata.distribution("mkl").files or ()
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if f.name.startswith("libmkl_rt.so"):
      return str(f.locate())
  return None


def _cpu_id() -> str:
  """What -march=native depends on: the CPU's model and feature flags."""
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    info = ""
  lines = [l for l in info.splitlines()
           if l.split(":")[0].strip() in ("model name", "flags", "Features")]
  return "\n".join(sorted(set(lines))) or platform.processor() or platform.machine()


def _build(cxx: str) -> pathlib.Path:
  """Compiles cpu_gemm.cc once per (source, jaxlib, compiler); returns the .so."""
  include = jax.ffi.include_dir()
  src = _SOURCE.read_bytes()
  key = hashlib.sha256(src + jaxlib.version.__version__.encode() + include.encode()
                       + cxx.encode() + _cpu_id().encode()).hexdigest()[:16]
  out = _cache_dir() / f"cpu_gemm-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: concurrent processes never load a
  # half-written library.
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    tmp_out = pathlib.Path(tmp) / out.name
    cmd = [cxx, "-O3", "-march=native", "-ffp-contract=fast", "-std=c++17",
           "-shared", "-fPIC", "-isystem", include,
           str(_SOURCE), "-o", str(tmp_out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp_out, out)
  return out


@functools.cache
def _load() -> str:
  """Builds and registers the kernel once; '' on success, else the reason not."""
  if os.environ.get("FEDJAX_U2S_CPU_GEMM", "1") == "0":
    return "disabled by FEDJAX_U2S_CPU_GEMM=0"
  cblas_path = _find_cblas()
  if cblas_path is None:
    return ("no CBLAS library: install the `mkl` wheel or set "
            "FEDJAX_U2S_CBLAS to a libcblas/libmkl_rt path")
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if cxx is None:
    return "no C++ compiler (g++/c++ or $CXX) to build cpu_gemm.cc"
  try:
    so = _build(cxx)
    cblas = ctypes.CDLL(cblas_path, mode=ctypes.RTLD_GLOBAL)
    sgemm = cblas.cblas_sgemm
  except (OSError, AttributeError, RuntimeError) as e:
    return f"{type(e).__name__}: {e}"
  if hasattr(cblas, "MKL_Set_Threading_Layer"):
    # Single-threaded sgemms: cpu_gemm.cc splits each product over XLA's own
    # intra-op threads, so no OpenMP pool competes with XLA's for the cores.
    # (Must precede every other MKL call.)
    cblas.MKL_Set_Threading_Layer(ctypes.c_int(_MKL_THREADING_SEQUENTIAL))
  if hasattr(cblas, "MKL_CBWR_Set"):
    # Same bits run to run (exact resume needs it).
    cblas.MKL_CBWR_Set(ctypes.c_int(_MKL_CBWR_AUTO))
  lib = ctypes.CDLL(str(so))
  lib.fedjax_u2s_set_sgemm(ctypes.cast(sgemm, ctypes.c_void_p))
  lib.fedjax_u2s_encode_blocks.restype = ctypes.c_int
  _LIB["lib"] = lib
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.FedjaxU2sCpuGemm),
                              platform="cpu")
  jax.ffi.register_ffi_target(_ATTENTION_TARGET,
                              jax.ffi.pycapsule(lib.FedjaxU2sCpuAttention),
                              platform="cpu")
  jax.ffi.register_ffi_target(_PACKED_TARGET,
                              jax.ffi.pycapsule(lib.FedjaxU2sCpuPackedGemm),
                              platform="cpu")
  jax.ffi.register_ffi_target(_QUANT_TARGET,
                              jax.ffi.pycapsule(lib.FedjaxU2sCpuQuantGemm),
                              platform="cpu")
  logging.info("fedjax_u2s: float32 CPU matmuls use %s", cblas_path)
  return ""


def available() -> bool:
  """Whether the kernel is built and loaded here (False where
  ``FEDJAX_U2S_CPU_GEMM=0``: the override that makes it unavailable)."""
  return not _load()


def runs_here() -> bool:
  """Whether the kernel is available and JAX computes on the CPU by default
  (where the sampler's "auto" decode runs through it)."""
  return available() and jax.default_backend() == "cpu"


def unavailable_reason() -> str:
  """Why :func:`available` is False ('' when it is True)."""
  return _load()


def _gemm(a: jax.Array, b: jax.Array, transpose_a: bool = False,
          transpose_b: bool = False) -> jax.Array:
  """The custom call on equal-rank operands (leading dims broadcast)."""
  m = a.shape[-1] if transpose_a else a.shape[-2]
  n = b.shape[-2] if transpose_b else b.shape[-1]
  batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
  out = jax.ShapeDtypeStruct((*batch, m, n), jnp.float32)
  return jax.ffi.ffi_call(_TARGET, out, vmap_method="expand_dims")(
      a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def _flat(x: jax.Array) -> jax.Array:
  return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sgemm(a: jax.Array, b: jax.Array, transpose_b: bool) -> jax.Array:
  """[..., M, K] x ([..., K, N] or [..., N, K] transposed), differentiable."""
  return _gemm(a, b, transpose_b=transpose_b)


def _sgemm_fwd(a, b, transpose_b):
  return _sgemm(a, b, transpose_b), (a, b)


def _sgemm_bwd(transpose_b, res, g):
  a, b = res
  # da = g b^T; db = a^T g (or g^T a for a transposed b), with no transpose
  # materialised. The frozen base's db is never used, and XLA drops the
  # unused (side-effect free) call.
  da = _gemm(g, b, transpose_b=not transpose_b)
  db = _gemm(g, a, transpose_a=True) if transpose_b else _gemm(a, g, transpose_a=True)
  return da, db


_sgemm.defvjp(_sgemm_fwd, _sgemm_bwd)


def _dispatch(kernel, fallback, *operands, use: bool):
  """``kernel(*operands)`` where a custom call applies, else ``fallback``.

  It applies when the caller asks for it and its float32 conditions hold
  (``use``), the kernel is available, and the computation is lowered for
  the CPU (``lax.platform_dependent``: compiled for a GPU or TPU, the same
  function runs ``fallback``).
  """
  if not (use and available()):
    return fallback(*operands)
  return jax.lax.platform_dependent(*operands, cpu=kernel, default=fallback)


def _route(a: jax.Array, b: jax.Array, spec: str, kernel, *, sgemm: bool,
           out_dtype) -> jax.Array:
  """``kernel(a, b)`` where the custom call applies (see the module
  docstring), else ``einsum(spec)`` accumulating in ``out_dtype``."""
  out_dtype = jnp.dtype(out_dtype or jnp.result_type(a, b))
  einsum = lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=out_dtype)
  return _dispatch(kernel, einsum, a, b, use=sgemm and a.dtype == b.dtype
                   == out_dtype == jnp.float32)


def matmul(x: jax.Array, w: "jax.Array | Packed", *, transpose_w: bool = False,
           sgemm: bool = True, out_dtype=None) -> jax.Array:
  """``x @ w`` (or ``x @ w.T``) for x [..., K] and a 2-D or :class:`Packed` w.

  With ``sgemm``, on the CPU, in float32, with the kernel available, this is
  one custom call over all of x's leading dims (and all vmapped clients);
  otherwise an einsum accumulating in and returning ``out_dtype`` (default:
  the operands' dtype), e.g. float32 logits from bfloat16 operands. A
  :class:`Packed` w is for inference: its custom call has no gradient.
  """
  if isinstance(w, Packed):
    if transpose_w:
      raise ValueError("matmul: a Packed w is already laid out as [K, N]; "
                       "pack(w, transpose=True) instead of transpose_w")
    return _packed_matmul(x, w, sgemm=sgemm, out_dtype=out_dtype)
  if w.ndim != 2:
    raise ValueError(f"matmul takes a 2-D w, got shape {w.shape}")
  n = w.shape[0] if transpose_w else w.shape[1]
  return _route(
      x, w, "...k,nk->...n" if transpose_w else "...k,kn->...n",
      lambda x, w: _sgemm(_flat(x), w, transpose_w).reshape(*x.shape[:-1], n),
      sgemm=sgemm, out_dtype=out_dtype)


def batched_matmul(a: jax.Array, b: jax.Array, *, transpose_b: bool = False,
                   sgemm: bool = True, out_dtype=None) -> jax.Array:
  """``a @ b`` (or ``a @ swapaxes(b, -1, -2)``) over equal leading dims.

  a [..., M, K]; b [..., K, N], or [..., N, K] with ``transpose_b``. Routed
  like :func:`matmul`: one custom call over the whole batch where it applies
  (decoding's attention: [B*heads] products of a few query rows against the
  cache), else an einsum accumulating in ``out_dtype``.
  """
  if a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2]:
    raise ValueError(f"batched_matmul needs equal leading dims, got {a.shape} "
                     f"and {b.shape}")
  return _route(a, b, "...mk,...nk->...mn" if transpose_b else "...mk,...kn->...mn",
                lambda a, b: _sgemm(a, b, transpose_b), sgemm=sgemm,
                out_dtype=out_dtype)


@flax.struct.dataclass
class Packed:
  """A [K, N] weight as column panels, the layout the decode kernel streams.

  ``panels[p, k, c]`` is ``w[k, p * PANEL + c]`` (zero past N): each panel
  is one contiguous run of memory, where a tile of a row-major weight is K
  short pieces a row apart (see cpu_gemm.cc). Made by :func:`pack`; used by
  :func:`matmul` like the [K, N] float32 array it holds. With ``glu`` (made
  by :func:`pack_swiglu`), the panels of a gate weight and then of an up
  weight, both [K, N], for :func:`swiglu`. With a block ``fmt`` (made by
  :func:`pack` with ``formats``), each panel is stored in that GGUF block
  format instead, ``[P, K / QROWS, block bytes]`` uint8, holding exactly
  the same float32 values (see cpu_gemm.cc).
  """
  panels: jax.Array  # [ceil(N / PANEL), K, PANEL], twice as many with glu
  n: int = flax.struct.field(pytree_node=False)
  glu: bool = flax.struct.field(pytree_node=False, default=False)
  fmt: str = flax.struct.field(pytree_node=False, default="f32")

  @property
  def shape(self) -> tuple[int, int]:
    rows = self.panels.shape[1] * (1 if self.fmt == "f32" else QROWS)
    return (rows, self.n)

  @property
  def dtype(self):
    return self.panels.dtype if self.fmt == "f32" else jnp.dtype(jnp.float32)

  def float_panels(self) -> jax.Array:
    """The panels as an array of :attr:`dtype` ([P, K, PANEL])."""
    if self.fmt == "f32":
      return self.panels
    return _decode_blocks(self.panels, self.fmt)

  def as_float(self) -> "Packed":
    """The same weight as float panels (itself if it already is)."""
    if self.fmt == "f32":
      return self
    return self.replace(panels=self.float_panels(), fmt="f32")

  def astype(self, dtype) -> "Packed":
    if jnp.dtype(dtype) == self.dtype:
      return self
    w = self.as_float()
    return w.replace(panels=w.panels.astype(dtype))

  def unpack(self) -> jax.Array:
    """The [K, N] weight ([K, 2N]: gate then up, with ``glu``)."""
    panels = self.float_panels()
    parts = jnp.split(panels, 2) if self.glu else [panels]
    return jnp.concatenate([_unpanel(p, self.n) for p in parts], axis=1)


def _unpanel(panels: jax.Array, n: int) -> jax.Array:
  p, k, c = panels.shape
  return panels.transpose(1, 0, 2).reshape(k, p * c)[:, :n]


def _panels(w: jax.Array, transpose: bool) -> jax.Array:
  """[P, K, PANEL] panels of w ([K, N], or [N, K] with transpose)."""
  if transpose:  # [N, K] -> panels of w.T without materialising w.T.
    n, k = w.shape
    w = jnp.pad(w, ((0, -n % PANEL), (0, 0)))
    return w.reshape(-1, PANEL, k).transpose(0, 2, 1)
  k, n = w.shape
  w = jnp.pad(w, ((0, 0), (0, -n % PANEL)))
  return w.reshape(k, -1, PANEL).transpose(1, 0, 2)


def _bytes_f32(b: jax.Array) -> jax.Array:
  """[..., 2C] uint8 float16 bits (little-endian) -> [..., C] float32, exactly."""
  h = jax.lax.bitcast_convert_type(b.reshape(*b.shape[:-1], -1, 2), jnp.float16)
  return h.astype(jnp.float32)


def _encode_blocks(w: np.ndarray, transpose: bool, fmt: str) -> np.ndarray | None:
  """w ([K, N], or [N, K] transposed) as ``fmt`` blocks, if exactly; else None.

  uint8 [ceil(N / PANEL), K / QROWS, bytes], each block's scale (and
  minimum) chosen as GGUF's quantisers choose them; None unless every value
  is reproduced bit for bit (so w was a GGUF dequantisation in that format).
  Encoded by cpu_gemm.cc's ``fedjax_u2s_encode_blocks``, which gives up at
  the first block that does not fit.
  """
  if transpose:
    n, k = w.shape
    sk, sn = w.strides[1] // 4, w.strides[0] // 4
  else:
    k, n = w.shape
    sk, sn = w.strides[0] // 4, w.strides[1] // 4
  code, nbytes = FORMATS[fmt]
  out = np.empty((-(-n // PANEL), k // QROWS, nbytes), np.uint8)
  ok = _LIB["lib"].fedjax_u2s_encode_blocks(
      ctypes.c_void_p(w.ctypes.data), ctypes.c_int64(k), ctypes.c_int64(n),
      ctypes.c_int64(sk), ctypes.c_int64(sn), ctypes.c_int32(code),
      ctypes.c_void_p(out.ctypes.data))
  return out if ok else None


def _decode_blocks(blocks: jax.Array, fmt: str) -> jax.Array:
  """uint8 blocks [P, K / QROWS, bytes] -> float32 panels [P, K, PANEL]."""
  p, kb, _ = blocks.shape
  d = _bytes_f32(blocks[..., : 2 * PANEL])[:, :, None]
  if fmt == "q4_1":
    m = _bytes_f32(blocks[..., 2 * PANEL : 4 * PANEL])[:, :, None]
    nibbles = blocks[..., 4 * PANEL :].reshape(p, kb, QROWS, PANEL // 2)
    q = jnp.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(jnp.float32)
    w = d * q + m
  else:
    q = jax.lax.bitcast_convert_type(blocks[..., 2 * PANEL :], jnp.int8)
    w = d * q.reshape(p, kb, QROWS, PANEL).astype(jnp.float32)
  return w.reshape(p, kb * QROWS, PANEL)


def pack(w: jax.Array, *, transpose: bool = False,
         formats: tuple[str, ...] = ()) -> Packed:
  """Packs a 2-D w ([K, N], or [N, K] with ``transpose``) into panels.

  ``formats``: block formats (of :data:`FORMATS`) to try in order; the
  first that holds every value of w exactly is used, else float32 panels.
  This reads w on the host: call it outside ``jit``, once per model
  (``fedjax_u2s.decoding.decode_weights``). A float32 w dequantised from a
  GGUF in one of these formats fits; one trained or merged with an adapter does not (the
  check stops at its first block), and stays float32.
  """
  if w.ndim != 2:
    raise ValueError(f"pack takes a 2-D weight, got shape {w.shape}")
  n, k = w.shape if transpose else w.shape[::-1]
  if formats and w.dtype == np.float32 and k % QROWS == 0 and available():
    if isinstance(w, jax.core.Tracer):
      raise ValueError("pack(formats=...) reads the weight on the host: call "
                       "it outside jit (decoding.decode_weights)")
    host = np.asarray(w)
    for fmt in formats:
      blocks = _encode_blocks(host, transpose, fmt)
      if blocks is not None:
        return Packed(panels=jnp.asarray(blocks), n=n, fmt=fmt)
  return Packed(panels=_panels(w, transpose), n=n)


def pack_swiglu(gate: jax.Array, up: jax.Array, *,
                formats: tuple[str, ...] = ()) -> Packed:
  """Packs SwiGLU's [K, F] gate and up weights for :func:`swiglu`.

  ``formats`` as for :func:`pack`; both halves must fit the same one.
  """
  if gate.shape != up.shape:
    raise ValueError(f"pack_swiglu: gate {gate.shape} and up {up.shape} differ")
  g, u = pack(gate, formats=formats), pack(up, formats=formats)
  if g.fmt != u.fmt:
    g, u = g.as_float(), u.as_float()
  return Packed(panels=jnp.concatenate([g.panels, u.panels]), n=g.n, glu=True,
                fmt=g.fmt)


def _packed_call(x: jax.Array, w: Packed, *, sgemm: bool, out_dtype, reference):
  """The packed custom call on x [..., K] where it applies, else reference."""
  out_dtype = jnp.dtype(out_dtype or jnp.result_type(x, w.dtype))

  def kernel(x, panels):
    out = jax.ShapeDtypeStruct((*x.shape[:-1], w.n), jnp.float32)
    if w.fmt == "f32":
      return jax.ffi.ffi_call(_PACKED_TARGET, out, vmap_method="expand_dims")(
          x, panels, glu=w.glu)
    return jax.ffi.ffi_call(_QUANT_TARGET, out, vmap_method="expand_dims")(
        x, panels, glu=w.glu, format=np.int32(FORMATS[w.fmt][0]))

  fallback = lambda x, panels: reference(
      x, w.replace(panels=panels).float_panels(), out_dtype)
  return _dispatch(kernel, fallback, x, w.panels, use=sgemm and x.dtype == w.dtype
                   == out_dtype == jnp.float32)


def _panel_einsum(x, panels, n, out_dtype):
  y = jnp.einsum("...k,pkc->...pc", x, panels, preferred_element_type=out_dtype)
  return y.reshape(*x.shape[:-1], -1)[..., :n]


def _packed_matmul(x: jax.Array, w: Packed, *, sgemm: bool, out_dtype) -> jax.Array:
  """x [..., K] @ w for a packed w: the custom call, or an einsum."""
  if w.glu:
    raise ValueError("matmul: a pack_swiglu weight goes to swiglu, not matmul")
  return _packed_call(x, w, sgemm=sgemm, out_dtype=out_dtype,
                      reference=lambda x, p, dt: _panel_einsum(x, p, w.n, dt))


def swiglu(x: jax.Array, w: Packed, *, sgemm: bool = True) -> jax.Array:
  """``silu(x @ gate) * (x @ up)`` for w from :func:`pack_swiglu` (inference).

  One custom call (both products and the activation) where :func:`matmul`
  would use the kernel, else einsums and ``jax.nn.silu``.
  """
  if not w.glu:
    raise ValueError("swiglu takes a weight made by pack_swiglu")

  def reference(x, panels, out_dtype):
    gate, up = (_panel_einsum(x, p, w.n, out_dtype) for p in jnp.split(panels, 2))
    return jax.nn.silu(gate) * up

  return _packed_call(x, w, sgemm=sgemm, out_dtype=None, reference=reference)


def attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
              *, reference, enabled: bool = True) -> jax.Array:
  """Grouped-query softmax attention over a KV cache, fused (inference only).

  q [B, T, H, hd]; keys, values [B, K, S, hd] (K divides H); mask [B, T, S]
  bool, which slots each query sees. Returns [B, T, H * hd], as
  ``reference(q, keys, values, mask)`` does. With ``enabled``, on the CPU,
  in float32, with the kernel available, one custom call computes scores,
  masked softmax and the weighted sum per (row, KV head), reading only the
  slots the mask allows; otherwise ``reference`` runs. A row that sees no
  slot gets the mean of all values (a softmax over equal masked scores).
  The custom call has no gradient.
  """
  def kernel(q, keys, values, mask):
    b, t, h, hd = q.shape
    kh = keys.shape[1]
    g = h // kh
    qk = q.reshape(b, t, kh, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, hd)
    out = jax.ffi.ffi_call(
        _ATTENTION_TARGET, jax.ShapeDtypeStruct(qk.shape, jnp.float32),
        vmap_method="sequential")(qk, keys, values, mask.astype(bool),
                                  scale=np.float32(1.0 / math.sqrt(hd)))
    return out.reshape(b, kh, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)

  return _dispatch(kernel, reference, q, keys, values, mask, use=enabled and
                   q.dtype == keys.dtype == values.dtype == jnp.float32)
