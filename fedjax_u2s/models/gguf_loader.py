"""Loads Llama-family GGUF checkpoints (llama.cpp's format) into the decoder.

A GGUF file is a header (key/value metadata, then a table of tensors: name,
dims, ggml type, offset) followed by the aligned tensor data. This module reads
the header itself (:func:`read_gguf`, a few tens of milliseconds even for a
50k-token vocabulary, where ``gguf.GGUFReader`` takes seconds), memory-maps the
data, dequantizes each tensor with ``gguf.quants.dequantize`` on a thread pool,
and writes it straight into the stacked-layer layout of
:mod:`fedjax_u2s.models.llama`.

Three conventions of llama.cpp have to be undone on the way:

* GGUF lists dims fastest-varying first (``ne``), so a tensor whose ``ne`` is
  ``[in, out]`` is the row-major numpy matrix ``[out, in]`` -- HF's
  ``nn.Linear`` layout. The decoder wants ``[in, out]``, so kernels are
  transposed; the embedding ``[V, D]`` is not.
* ``convert_hf_to_gguf.py`` permutes the rows of Q and K of the ``llama``
  architecture (weights and, where present, biases) so that llama.cpp can
  rotate adjacent pairs:
  ``w.reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2).reshape(w.shape)``, with
  ``n_head`` the KV-head count for K. :func:`unpermute_qk_rows` inverts it,
  giving back the Hugging Face half-split layout that ``llama.apply_rope``
  uses. ``qwen2`` files are written unpermuted (llama.cpp runs Qwen2 with
  NEOX-style rotation), so nothing is undone there.
* Llama-3 RoPE scaling is stored as a ``rope_freqs.weight`` tensor of
  per-frequency divisors rather than as metadata; it is matched back to the
  ``llama3`` parameters here.
* ``gemma3`` files store every RMSNorm weight plus one (llama.cpp's converter
  adds Gemma's ``1 + w`` offset so that its kernels can use a plain RMSNorm);
  the loader subtracts it again, giving the Hugging Face values that
  ``ModelConfig.norm_offset = 1`` expects. Gemma 3 facts the file does not
  record are llama.cpp's fixed rules for ``gemma3``: every 6th layer is global
  (the others slide over ``attention.sliding_window``), the local layers'
  RoPE base is 10,000, and the attention scale is ``head_dim**-0.5`` except
  for the 62-layer 27B (``(hidden / heads)**-0.5``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import mmap
import os
import struct
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from fedjax_u2s.models import llama
from fedjax_u2s.models import config as config_lib
from fedjax_u2s.models.config import ModelConfig, RopeScaling, UnsupportedModelError
from fedjax_u2s.models.formats import reject_pickle

PyTree = Any

# Checkpoint suffixes that are Python pickles: loading one can run arbitrary code.

# GGUF architectures this decoder implements -> whether q/k/v carry a bias.
_ARCHITECTURES = {"llama": False, "qwen2": True, "qwen3": False, "gemma3": False}
# llama.cpp's fixed sliding-window pattern for gemma3: layer i is global when
# (i + 1) % 6 == 0 (it calls hparams.set_swa_pattern(6)).
_GEMMA3_SWA_PATTERN = 6

# Tensor types load_gguf accepts. Integer types are not weights; anything not
# listed (e.g. the IQ* codebook types) is refused by name before any work.
SUPPORTED_TYPES = frozenset(GGMLQuantizationType[n] for n in (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))

# Dequantize at most this many elements per job, so big tensors (the
# embedding) spread over the thread pool; numpy releases the GIL in the bulk
# array operations that gguf.quants is made of.
_CHUNK_ELEMENTS = 1 << 20


# ----------------------------------------------------------------------------
# Reading the file.


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
  """One entry of the tensor table.

  Attributes:
    name: e.g. ``"blk.0.attn_q.weight"``.
    ggml_type: storage type (F32, Q8_0, ...).
    shape: numpy (row-major) shape, i.e. GGUF's ``ne`` reversed.
    offset: absolute byte offset of the data in the file.
    nbytes: size of the data in bytes.
  """
  name: str
  ggml_type: GGMLQuantizationType
  shape: tuple[int, ...]
  offset: int
  nbytes: int


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFFile:
  """A parsed GGUF header plus a read-only view of the whole file.

  Attributes:
    path: the file, for error messages.
    version: GGUF format version (2 or 3).
    metadata: key -> Python value (str, int, float, bool, or lists thereof).
    tensors: name -> :class:`GGUFTensorInfo`, in file order.
    buffer: [file_size] uint8, memory-mapped; tensor data is read lazily.
  """
  path: str
  version: int
  metadata: Mapping[str, Any]
  tensors: Mapping[str, GGUFTensorInfo]
  buffer: np.ndarray

  @property
  def architecture(self) -> str:
    return str(self.metadata.get("general.architecture", ""))

  def raw(self, name: str) -> np.ndarray:
    """The stored bytes of a tensor as ``[*shape[:-1], bytes_per_row]`` uint8."""
    info = self.tensors[name]
    flat = self.buffer[info.offset:info.offset + info.nbytes]
    return flat.reshape(*info.shape[:-1], -1) if info.shape else flat

  def dequantize(self, name: str) -> np.ndarray:
    """A tensor as a float32 array of its numpy shape."""
    info = self.tensors[name]
    _check_type(self, info)
    return _dequantize(self.raw(name), info.ggml_type).reshape(info.shape)


class _Truncated(Exception):
  pass


class _Cursor:
  """Bounds-checked little-endian reads from a buffer."""

  def __init__(self, buf, size: int):
    self.buf, self.size, self.pos = buf, size, 0

  def need(self, n: int, what: str) -> int:
    if n < 0 or self.pos + n > self.size:
      raise _Truncated(f"{what} needs {n} bytes at offset {self.pos}, but the file "
                       f"ends at {self.size}")
    start = self.pos
    self.pos += n
    return start

  def unpack(self, fmt: str, what: str):
    start = self.need(struct.calcsize(fmt), what)
    return struct.unpack_from(fmt, self.buf, start)

  def u32(self, what: str) -> int:
    return self.unpack("<I", what)[0]

  def u64(self, what: str) -> int:
    return self.unpack("<Q", what)[0]

  def string(self, what: str) -> str:
    n = self.u64(what)
    start = self.need(n, what)
    raw = self.buf[start:start + n]
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      # Keep the bytes (a vocabulary may hold a broken piece); surrogateescape
      # round-trips them through .encode("utf-8", "surrogateescape").
      return raw.decode("utf-8", "surrogateescape")


# GGUF metadata value types.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
            7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4",
               6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


def _read_value(cur: _Cursor, vtype: int, key: str):
  if vtype in _SCALARS:
    return cur.unpack(_SCALARS[vtype], key)[0]
  if vtype == _STRING:
    return cur.string(key)
  if vtype == _ARRAY:
    etype = cur.u32(key)
    count = cur.u64(key)
    if etype in _NP_SCALARS:
      dt = np.dtype(_NP_SCALARS[etype])
      start = cur.need(count * dt.itemsize, key)
      return np.frombuffer(cur.buf, dt, count, start).tolist()
    if etype not in (_STRING, _ARRAY):
      raise ValueError(f"metadata {key!r} is an array of unknown type {etype}")
    if count > cur.size - cur.pos:  # every element takes at least one byte
      raise _Truncated(f"metadata {key!r} claims {count} elements, more than the "
                       "bytes left in the file")
    return [_read_value(cur, etype, key) for _ in range(count)]
  raise ValueError(f"metadata {key!r} has unknown value type {vtype}")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
  """Parses a GGUF file's header and memory-maps its tensor data.

  Args:
    path: a ``.gguf`` file.

  Returns:
    A :class:`GGUFFile`; no tensor data is read yet.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: naming the file, if it is a pickle checkpoint, is not a GGUF
      file, or is truncated or corrupt (including tensor data that runs past
      the end of the file).
  """
  path = os.fspath(path)
  reject_pickle(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such GGUF file.")
  size = os.path.getsize(path)
  if size < 24:
    raise ValueError(f"{path}: not a GGUF file: only {size} bytes long "
                     "(truncated or empty download?).")
  with open(path, "rb") as f:
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  magic = mm[:4]
  if magic != b"GGUF":
    raise ValueError(f"{path}: not a GGUF file: it starts with {magic!r}, not the "
                     "GGUF magic b'GGUF' (a corrupt file, or another format?).")
  try:
    return _parse(path, mm, size)
  except _Truncated as e:
    raise ValueError(f"{path}: truncated or corrupt GGUF file: {e}.") from None
  except (struct.error, ValueError, OverflowError, MemoryError) as e:
    raise ValueError(f"{path}: corrupt GGUF file: {e}.") from e


def _parse(path: str, mm, size: int) -> GGUFFile:
  cur = _Cursor(mm, size)
  cur.need(4, "magic")
  version = cur.u32("version")
  if version & 0xFFFF == 0:
    raise ValueError("big-endian GGUF files are not supported")
  if version not in (2, 3):
    raise ValueError(f"GGUF version {version} is not supported (only 2 and 3)")
  n_tensors = cur.u64("tensor count")
  n_kv = cur.u64("metadata count")
  if n_tensors > size or n_kv > size:
    raise _Truncated(f"header claims {n_tensors} tensors and {n_kv} metadata keys")

  metadata: dict[str, Any] = {}
  for _ in range(n_kv):
    key = cur.string("metadata key")
    vtype = cur.u32(f"type of metadata {key!r}")
    metadata[key] = _read_value(cur, vtype, key)

  entries = []
  for _ in range(n_tensors):
    name = cur.string("tensor name")
    n_dims = cur.u32(f"dims of tensor {name!r}")
    if n_dims > 8:
      raise ValueError(f"tensor {name!r} claims {n_dims} dims")
    ne = cur.unpack(f"<{n_dims}Q", f"shape of tensor {name!r}")
    type_id = cur.u32(f"type of tensor {name!r}")
    offset = cur.u64(f"offset of tensor {name!r}")
    entries.append((name, ne, type_id, offset))

  alignment = int(metadata.get("general.alignment", 32))
  if alignment <= 0 or alignment & (alignment - 1):
    raise ValueError(f"general.alignment={alignment} is not a power of two")
  data_start = -(-cur.pos // alignment) * alignment

  tensors: dict[str, GGUFTensorInfo] = {}
  for name, ne, type_id, offset in entries:
    if name in tensors:
      raise ValueError(f"tensor {name!r} appears twice")
    try:
      ggml_type = GGMLQuantizationType(type_id)
    except ValueError:
      raise ValueError(f"tensor {name!r} has unknown ggml type id {type_id}") from None
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if ne and ne[0] % block:
      raise ValueError(f"tensor {name!r}: row length {ne[0]} is not a multiple of "
                       f"the {ggml_type.name} block size {block}")
    nbytes = math.prod(ne) // block * type_size
    start = data_start + offset
    if start + nbytes > size:
      raise _Truncated(f"tensor {name!r} ({ggml_type.name}, {nbytes} bytes at "
                       f"offset {start}) runs past the end of the file at {size} "
                       "bytes (an incomplete download?)")
    tensors[name] = GGUFTensorInfo(name, ggml_type, tuple(int(d) for d in ne[::-1]),
                                   start, nbytes)
  buffer = np.frombuffer(mm, np.uint8)
  return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors,
                  buffer=buffer)


def _from_reader(reader) -> GGUFFile:
  """Adapts a ``gguf.GGUFReader`` (already parsed) to :class:`GGUFFile`."""
  path = os.fspath(getattr(reader.data, "filename", None) or "<GGUFReader>")
  metadata = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    value = field.contents()
    metadata[key] = value
  tensors = {}
  for t in reader.tensors:
    tensors[t.name] = GGUFTensorInfo(
        t.name, GGMLQuantizationType(t.tensor_type),
        tuple(int(d) for d in reversed(t.shape.tolist())), int(t.data_offset),
        int(t.n_bytes))
  version = int(reader.fields["GGUF.version"].parts[-1][0])
  return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors,
                  buffer=np.asarray(reader.data).view(np.uint8))


def as_gguf_file(source) -> GGUFFile:
  """A :class:`GGUFFile` from a path, a ``GGUFFile`` or a ``gguf.GGUFReader``."""
  if isinstance(source, GGUFFile):
    return source
  if isinstance(source, (str, os.PathLike)):
    return read_gguf(source)
  if hasattr(source, "fields") and hasattr(source, "tensors"):
    return _from_reader(source)
  raise TypeError(f"expected a GGUF path, GGUFFile or gguf.GGUFReader, got "
                  f"{type(source).__name__}")


# ----------------------------------------------------------------------------
# Configuration.


def config_from_gguf(reader_or_path, **overrides) -> ModelConfig:
  """Builds a :class:`ModelConfig` from GGUF metadata.

  Args:
    reader_or_path: a ``.gguf`` path, a :class:`GGUFFile` or a
      ``gguf.GGUFReader``.
    **overrides: fields to set on top (e.g. ``dtype="bfloat16"``).

  Returns:
    The config. Biases (``qkv_bias``, ``o_bias``, ``mlp_bias``) follow the
    tensors present; ``tie_word_embeddings`` is true when there is no
    ``output.weight``.

  Raises:
    UnsupportedModelError: naming the file, for an architecture other than
      ``llama``/``qwen2`` or a feature the decoder does not implement (MoE,
      partial rotary, non-llama3 RoPE scaling, ...).
  """
  gf = as_gguf_file(reader_or_path)
  md, path = gf.metadata, gf.path
  arch = gf.architecture
  if arch not in _ARCHITECTURES:
    raise UnsupportedModelError(
        f"{path}: general.architecture={arch!r} is not supported; this decoder "
        f"implements {sorted(_ARCHITECTURES)} GGUF files (Llama-2/3, SmolLM/SmolLM2, "
        "Qwen2/2.5, Qwen3, Gemma 3).")

  def get(key, default=None, required=False):
    full = f"{arch}.{key}"
    if full not in md:
      if required:
        raise UnsupportedModelError(f"{path}: required metadata {full!r} is missing.")
      return default
    return md[full]

  if get("expert_count", 0):
    raise UnsupportedModelError(
        f"{path}: {arch}.expert_count={get('expert_count')}: mixture-of-experts "
        "models are not implemented.")
  hidden = int(get("embedding_length", required=True))
  num_heads = int(get("attention.head_count", required=True))
  num_kv = get("attention.head_count_kv", num_heads)
  if isinstance(num_kv, list):
    raise UnsupportedModelError(f"{path}: per-layer head_count_kv is not implemented.")
  head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0)
                 or hidden // num_heads)
  value_len = get("attention.value_length")
  if value_len is not None and int(value_len) != head_dim:
    raise UnsupportedModelError(
        f"{path}: attention.value_length={value_len} differs from key_length="
        f"{head_dim}; not implemented.")
  rope_dim = get("rope.dimension_count")
  if rope_dim is not None and int(rope_dim) != head_dim:
    raise UnsupportedModelError(
        f"{path}: rope.dimension_count={rope_dim} < head_dim={head_dim} (partial "
        "rotary) is not implemented.")

  rope_theta = _f32(get("rope.freq_base", 10000.0))
  rope_scaling = _rope_scaling(gf, arch, head_dim, rope_theta)
  for key in ("attn_logit_softcapping", "final_logit_softcapping"):
    if get(key) is not None:
      raise UnsupportedModelError(
          f"{path}: {arch}.{key}={get(key)}: logit soft-capping from GGUF "
          "metadata is not implemented (Gemma 3 has none).")

  vocab = get("vocab_size")
  if vocab is None:
    tokens = md.get("tokenizer.ggml.tokens")
    if "token_embd.weight" in gf.tensors:
      vocab = gf.tensors["token_embd.weight"].shape[0]
    elif tokens is not None:
      vocab = len(tokens)
    else:
      raise UnsupportedModelError(f"{path}: cannot tell the vocabulary size.")

  tok = lambda k: md.get(f"tokenizer.ggml.{k}")
  eos_ids = []
  for k in ("eos_token_id", "eot_token_id", "eom_token_id"):
    if tok(k) is not None and int(tok(k)) not in eos_ids:
      eos_ids.append(int(tok(k)))

  names = gf.tensors
  kw = dict(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length", required=True)),
      num_layers=int(get("block_count", required=True)),
      num_heads=num_heads,
      num_kv_heads=int(num_kv),
      head_dim=head_dim,
      rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
      rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      max_position_embeddings=int(get("context_length", 2048)),
      tie_word_embeddings="output.weight" not in names,
      qkv_bias=_ARCHITECTURES[arch] or "blk.0.attn_q.bias" in names,
      o_bias="blk.0.attn_output.bias" in names,
      mlp_bias="blk.0.ffn_gate.bias" in names,
      bos_token_id=None if tok("bos_token_id") is None else int(tok("bos_token_id")),
      eos_token_ids=tuple(eos_ids),
      pad_token_id=None if tok("padding_token_id") is None else int(tok("padding_token_id")),
      name=str(md.get("general.name") or md.get("general.basename") or arch),
      architecture=arch,
      qk_norm="blk.0.attn_q_norm.weight" in names,
  )
  if arch == "gemma3":
    kw.update(_gemma3_fields(get, path, kw))
  kw.update(overrides)
  return ModelConfig(**kw)


def _gemma3_fields(get, path: str, kw: Mapping[str, Any]) -> dict[str, Any]:
  """The Gemma 3 fields of a ``gemma3`` GGUF file's config (see the module
  docstring for the rules llama.cpp fixes rather than records)."""
  n = kw["num_layers"]
  window = get("attention.sliding_window")
  if window is None:
    raise UnsupportedModelError(
        f"{path}: gemma3.attention.sliding_window is missing; Gemma 3's local "
        "layers need their window.")
  pattern = get("attention.sliding_window_pattern", _GEMMA3_SWA_PATTERN)
  if isinstance(pattern, list):  # Per-layer flags: True = sliding.
    if len(pattern) != n:
      raise UnsupportedModelError(
          f"{path}: gemma3.attention.sliding_window_pattern has {len(pattern)} "
          f"entries for {n} layers.")
    types = ["sliding_attention" if p else "full_attention" for p in pattern]
  else:
    types = ["sliding_attention" if (i + 1) % int(pattern) else "full_attention"
             for i in range(n)]
  scalar = (kw["hidden_size"] // kw["num_heads"] if n == 62 else kw["head_dim"])
  return dict(hidden_act="gelu_pytorch_tanh", norm_offset=1.0, post_norms=True,
              embed_scale=True, qk_norm=True, query_pre_attn_scalar=float(scalar),
              layer_types=tuple(types), sliding_window=int(window),
              rope_local_theta=config_lib.GEMMA3_LOCAL_ROPE_THETA)


def _llama3_factors(inv_freq: np.ndarray, rs: RopeScaling) -> np.ndarray:
  """The per-frequency divisors llama.cpp's converter writes as rope_freqs."""
  low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
  high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
  out = []
  for f in inv_freq:
    wl = 2 * math.pi / f
    if wl < high_wl:
      out.append(1.0)
    elif wl > low_wl:
      out.append(rs.factor)
    else:
      s = ((rs.original_max_position_embeddings / wl - rs.low_freq_factor)
           / (rs.high_freq_factor - rs.low_freq_factor))
      out.append(1 / ((1 - s) / rs.factor + s))
  return np.asarray(out, np.float64)


def _rope_scaling(gf: GGUFFile, arch: str, head_dim: int,
                  theta: float) -> RopeScaling | None:
  md, path = gf.metadata, gf.path
  kind = md.get(f"{arch}.rope.scaling.type", "none")
  linear = md.get(f"{arch}.rope.scale_linear")
  factor = md.get(f"{arch}.rope.scaling.factor")
  if arch == "gemma3" and kind == "linear" and factor is not None:
    # Gemma 3 4B+: linear scaling of the global layers (the local ones never).
    return None if float(factor) == 1.0 else RopeScaling(
        factor=_f32(factor), rope_type="linear")
  if kind not in ("none", "") or (linear is not None and float(linear) != 1.0):
    raise UnsupportedModelError(
        f"{path}: RoPE scaling type {kind!r} (scale_linear={linear}) is not "
        "implemented; only Llama-3 scaling (rope_freqs.weight) is.")
  if "rope_freqs.weight" not in gf.tensors:
    return None
  factors = gf.dequantize("rope_freqs.weight").astype(np.float64).reshape(-1)
  if factors.shape != (head_dim // 2,):
    raise UnsupportedModelError(
        f"{path}: tensor 'rope_freqs.weight' has shape {factors.shape}, expected "
        f"({head_dim // 2},).")
  if np.allclose(factors, 1.0):
    return None
  # The tensor keeps only the divisors; recover the llama3 parameters by
  # matching the values every Llama-3.x release uses.
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  origs = [md.get(f"{arch}.rope.scaling.original_context_length"), 8192, 4096,
           md.get(f"{arch}.context_length")]
  factor = float(factors.max())
  for orig in dict.fromkeys(o for o in origs if o):
    for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
      rs = RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high,
                       original_max_position_embeddings=int(orig))
      if np.allclose(_llama3_factors(inv, rs), factors, rtol=1e-5, atol=1e-6):
        return rs
  raise UnsupportedModelError(
      f"{path}: tensor 'rope_freqs.weight' does not match Llama-3 RoPE scaling "
      "with any standard parameters; this frequency scaling is not implemented.")


# ----------------------------------------------------------------------------
# Loading weights.


def unpermute_qk_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverts llama.cpp's Q/K row permutation (interleaved -> half-split RoPE).

  Args:
    w: [n_heads * hd, ...] rows as stored in a llama GGUF (a weight in
      ``[out, in]`` layout, or a bias).
    n_heads: query heads for Q, KV heads for K.

  Returns:
    The rows in Hugging Face order, same shape.
  """
  rest = w.shape[1:]
  return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest)
          .swapaxes(1, 2).reshape(w.shape))


def _check_type(gf: GGUFFile, info: GGUFTensorInfo) -> None:
  if info.ggml_type not in SUPPORTED_TYPES:
    raise UnsupportedModelError(
        f"{gf.path}: tensor {info.name!r} is stored as {info.ggml_type.name}, which "
        "this loader does not dequantize (supported: "
        f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))}). Re-quantize the "
        "model to one of those.")


def _dequantize(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
  """[..., row_bytes] uint8 -> [..., row] float32 (a view for F32)."""
  if ggml_type == GGMLQuantizationType.F32:
    return raw.view(np.float32)
  # gguf.quants works through rows 16 at a time, which costs more in Python
  # overhead than in arithmetic for short rows; blocks never straddle rows, so
  # the bytes can be handed over as one long row and reshaped back.
  flat = np.ascontiguousarray(raw).reshape(1, -1)
  out = gguf_quants.dequantize(flat, ggml_type)
  out = out if out.dtype == np.float32 else out.astype(np.float32)
  return out.reshape(*raw.shape[:-1], -1)


@dataclasses.dataclass(frozen=True)
class _Target:
  """Where one GGUF tensor goes in the parameter pytree."""
  path: tuple[str, ...]        # keys into the params dict
  layer: int | None            # index on the stacked L axis, or None
  np_shape: tuple[int, ...]    # expected numpy shape in the file
  transpose: bool              # [out, in] -> [in, out]
  unpermute_heads: int = 0     # undo llama.cpp's Q/K row order with this many heads
  shift: float = 0.0           # subtracted from the values (gemma3 norms: 1)


def _targets(cfg: ModelConfig, arch: str) -> dict[str, _Target]:
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  # llama.cpp permutes Q/K rows only for the llama architecture.
  hq, hk = (cfg.num_heads, cfg.num_kv_heads) if arch == "llama" else (0, 0)
  t = {"token_embd.weight": _Target(("embed",), None, (v, d), False),
       "output_norm.weight": _Target(("final_norm",), None, (d,), False)}
  if not cfg.tie_word_embeddings:
    t["output.weight"] = _Target(("lm_head",), None, (v, d), True)
  shift = cfg.norm_offset  # gemma3 files store norms as offset + w.
  t["output_norm.weight"] = _Target(("final_norm",), None, (d,), False, 0, shift)
  hd = cfg.head_dim
  for i in range(cfg.num_layers):
    def add(name, path, shape, transpose=False, heads=0, _i=i):
      norm = name.endswith("norm.weight")
      t[f"blk.{_i}.{name}"] = _Target(("layers",) + path, _i, shape, transpose, heads,
                                      shift if norm else 0.0)
    add("attn_norm.weight", ("attn_norm",), (d,))
    add("ffn_norm.weight", ("mlp_norm",), (d,))
    if cfg.qk_norm:
      add("attn_q_norm.weight", ("q_norm",), (hd,))
      add("attn_k_norm.weight", ("k_norm",), (hd,))
    if cfg.post_norms:
      add("post_attention_norm.weight", ("post_attn_norm",), (d,))
      add("post_ffw_norm.weight", ("post_mlp_norm",), (d,))
    add("attn_q.weight", ("q", "w"), (q, d), True, hq)
    add("attn_k.weight", ("k", "w"), (kv, d), True, hk)
    add("attn_v.weight", ("v", "w"), (kv, d), True)
    add("attn_output.weight", ("o", "w"), (d, q), True)
    add("ffn_gate.weight", ("gate", "w"), (f, d), True)
    add("ffn_up.weight", ("up", "w"), (f, d), True)
    add("ffn_down.weight", ("down", "w"), (d, f), True)
    if cfg.qkv_bias:
      add("attn_q.bias", ("q", "b"), (q,), False, hq)
      add("attn_k.bias", ("k", "b"), (kv,), False, hk)
      add("attn_v.bias", ("v", "b"), (kv,))
    if cfg.o_bias:
      add("attn_output.bias", ("o", "b"), (d,))
    if cfg.mlp_bias:
      add("ffn_gate.bias", ("gate", "b"), (f,))
      add("ffn_up.bias", ("up", "b"), (f,))
      add("ffn_down.bias", ("down", "b"), (d,))
  return t


# Tensors a GGUF may carry that the parameters do not hold.
_CONSUMED_ELSEWHERE = ("rope_freqs.weight",)


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32",
              param_dtype: str = "float32",
              max_workers: int | None = None) -> tuple[ModelConfig, PyTree]:
  """Loads a Llama/Qwen2/Qwen3/Gemma 3 GGUF checkpoint.

  Args:
    path: the ``.gguf`` file (or a :class:`GGUFFile` already read, or a
      ``gguf.GGUFReader``).
    dtype: compute dtype recorded in the config.
    param_dtype: dtype of the returned parameters (and of the config's
      ``param_dtype``); quantized tensors are dequantized to float32 first.
    max_workers: dequantization threads (default: CPU count, at most 8).

  Returns:
    ``(config, params)``, params in the layout of
    :mod:`fedjax_u2s.models.llama`, as jax arrays of ``param_dtype``.

  Raises:
    ValueError: naming the file, for a pickle path, a non-GGUF, truncated or
      corrupt file, and naming the tensor too for a missing tensor, an
      unexpected one, or a wrong shape.
    UnsupportedModelError: for an unsupported architecture, feature or
      tensor type (naming file, tensor and type).
  """
  gf = as_gguf_file(path)
  cfg = config_from_gguf(gf, dtype=dtype, param_dtype=param_dtype)
  targets = _targets(cfg, gf.architecture)
  where = f"{gf.path} ({gf.architecture}, {cfg.num_layers} layers)"

  missing = [n for n in targets if n not in gf.tensors]
  if missing:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise ValueError(f"{where}: missing tensor(s) {missing[:5]}{more}.")
  extra = [n for n in gf.tensors if n not in targets and n not in _CONSUMED_ELSEWHERE]
  if extra:
    more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
    raise ValueError(
        f"{where}: unexpected tensor(s) {extra[:5]}{more} that this decoder has no "
        "place for (a different architecture variant?).")
  for name, tgt in targets.items():
    info = gf.tensors[name]
    if info.shape != tgt.np_shape:
      raise ValueError(
          f"{where}: tensor {name!r} has shape {list(info.shape)} (numpy order; "
          f"GGUF ne={list(info.shape[::-1])}), expected {list(tgt.np_shape)} from "
          "the metadata.")
    _check_type(gf, info)

  # Destination arrays in the final layout, filled in place by the workers.
  np_dtype = np.dtype(jnp.dtype(param_dtype))
  shapes = llama.param_shapes(cfg)
  dest = jax.tree.map(lambda s: np.empty(s.shape, np_dtype), shapes)

  def slot(tgt: _Target) -> np.ndarray:
    node = dest
    for k in tgt.path:
      node = node[k]
    return node if tgt.layer is None else node[tgt.layer]

  jobs: list[Callable[[], None]] = []
  for name, tgt in targets.items():
    info = gf.tensors[name]
    raw = gf.raw(name)
    out = slot(tgt)
    if out.shape != (tgt.np_shape[::-1] if tgt.transpose else tgt.np_shape):
      raise AssertionError(f"layout mismatch for {name}: {out.shape}")
    rows = tgt.np_shape[0]
    row_len = math.prod(tgt.np_shape[1:]) if len(tgt.np_shape) > 1 else 1
    if tgt.unpermute_heads or len(tgt.np_shape) == 1:
      step = rows  # whole tensor in one job
    else:
      step = max(1, _CHUNK_ELEMENTS // max(row_len, 1))
    for r0 in range(0, rows, step):
      jobs.append(_make_job(raw, info.ggml_type, out, tgt, r0, min(rows, r0 + step)))

  workers = max_workers or min(8, _cpu_count())
  if workers > 1 and len(jobs) > 1:
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
      for fut in [ex.submit(j) for j in jobs]:
        fut.result()
  else:
    for j in jobs:
      j()
  params = jax.tree.map(jnp.asarray, dest)
  return cfg, params


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _f32(x) -> float:
  """A float32 metadata value as the decimal it was written from (1e-05, not
  9.999999747378752e-06)."""
  return float(str(np.float32(x)))  # numpy prints the shortest round-trip form


def _make_job(raw: np.ndarray, ggml_type, out: np.ndarray, tgt: _Target,
              r0: int, r1: int) -> Callable[[], None]:
  def job():
    # raw is [rows, row_bytes] for matrices and flat bytes for vectors.
    w = _dequantize(raw if raw.ndim == 1 else raw[r0:r1], ggml_type)
    if tgt.unpermute_heads:
      w = unpermute_qk_rows(w, tgt.unpermute_heads)
    if tgt.shift:
      w = w - np.float32(tgt.shift)
    if tgt.transpose:
      out[:, r0:r1] = w.T
    else:
      out[r0:r1] = w
  return job
