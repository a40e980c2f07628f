"""Loads and saves Hugging Face model directories (config.json + safetensors).

A directory holds ``config.json`` and either one ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json``.
Tensors are mapped into the :mod:`fedjax_u2s.models.llama` layout::

    model.embed_tokens.weight [V, D]                 -> embed [V, D]
    model.layers.{i}.input_layernorm.weight [D]      -> layers.attn_norm [L, D]
    model.layers.{i}.self_attn.q_proj.weight [Hhd, D]-> layers.q.w [L, D, Hhd]
    model.layers.{i}.self_attn.q_proj.bias [Hhd]     -> layers.q.b [L, Hhd]
    ... k, v, o, post_attention_layernorm (mlp_norm), mlp.{gate,up,down}_proj
    model.norm.weight [D]                            -> final_norm [D]
    lm_head.weight [V, D]                            -> lm_head [D, V]

Gemma 3 and Qwen3 add ``self_attn.{q,k}_norm.weight [hd]`` (q_norm, k_norm);
Gemma 3's four norms a layer are named differently from Llama's two:
``post_attention_layernorm`` is the norm *on the attention's output*
(post_attn_norm) and ``pre_feedforward_layernorm`` the MLP's input norm
(mlp_norm), with ``post_feedforward_layernorm`` (post_mlp_norm) after the MLP.
Gemma's norm weights are stored as HF stores them (``w``, applied as ``1 + w``).

i.e. layers are stacked on a leading axis and PyTorch ``Linear`` weights
(``[out, in]``) are transposed to ``[in, out]`` kernels. Nothing is dropped
silently: a missing, extra or mis-shaped tensor is an error naming the tensor
and the file it came from.

Only safetensors are read. Pickled PyTorch checkpoints (``*.bin``, ``*.pt``)
can run arbitrary code when loaded, so they are refused with a note on how to
convert them.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from fedjax_u2s.models import formats
from fedjax_u2s.models import llama
from fedjax_u2s.models.config import ModelConfig, UnsupportedModelError

PyTree = Any

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Buffers some older checkpoints persisted; recomputed from the config here.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# Per-layer tensors: (HF suffix after "model.layers.{i}.", pytree path under
# params["layers"], whether HF stores it as a PyTorch [out, in] Linear weight).
# Llama/Qwen2's; _layer_tensors gives each architecture's.
_LAYER_TENSORS = (
    ("input_layernorm.weight", ("attn_norm",), False),
    ("self_attn.q_proj.weight", ("q", "w"), True),
    ("self_attn.q_proj.bias", ("q", "b"), False),
    ("self_attn.k_proj.weight", ("k", "w"), True),
    ("self_attn.k_proj.bias", ("k", "b"), False),
    ("self_attn.v_proj.weight", ("v", "w"), True),
    ("self_attn.v_proj.bias", ("v", "b"), False),
    ("self_attn.o_proj.weight", ("o", "w"), True),
    ("self_attn.o_proj.bias", ("o", "b"), False),
    ("post_attention_layernorm.weight", ("mlp_norm",), False),
    ("mlp.gate_proj.weight", ("gate", "w"), True),
    ("mlp.gate_proj.bias", ("gate", "b"), False),
    ("mlp.up_proj.weight", ("up", "w"), True),
    ("mlp.up_proj.bias", ("up", "b"), False),
    ("mlp.down_proj.weight", ("down", "w"), True),
    ("mlp.down_proj.bias", ("down", "b"), False),
)
_QK_NORM_TENSORS = (
    ("self_attn.q_norm.weight", ("q_norm",), False),
    ("self_attn.k_norm.weight", ("k_norm",), False),
)
_GEMMA_NORMS = {
    "post_attention_layernorm.weight": [
        ("post_attention_layernorm.weight", ("post_attn_norm",), False),
        ("pre_feedforward_layernorm.weight", ("mlp_norm",), False),
        ("post_feedforward_layernorm.weight", ("post_mlp_norm",), False)],
}


def _layer_tensors(config: ModelConfig) -> tuple[tuple[str, tuple[str, ...], bool], ...]:
  """The per-layer (HF suffix, pytree path, transposed) table of ``config``."""
  out = []
  for entry in _LAYER_TENSORS:
    if config.post_norms and entry[0] in _GEMMA_NORMS:
      out += _GEMMA_NORMS[entry[0]]
    else:
      out.append(entry)
  if config.qk_norm:
    out += _QK_NORM_TENSORS
  return tuple(out)
# Unstacked tensors: (HF name, top-level params key, transposed).
_TOP_TENSORS = (
    ("model.embed_tokens.weight", "embed", False),
    ("model.norm.weight", "final_norm", False),
    ("lm_head.weight", "lm_head", True),
)


class CheckpointError(ValueError):
  """A checkpoint file is unreadable or its tensors do not fit the config."""


# ----------------------------------------------------------------------------
# Loading.


def load_hf_dir(path: str | os.PathLike, **config_overrides
                ) -> tuple[ModelConfig, PyTree]:
  """Loads a Hugging Face Llama/Qwen2 model directory.

  Args:
    path: a directory with ``config.json`` and ``model.safetensors`` (or
      sharded ``model-*-of-*.safetensors`` with ``model.safetensors.index.json``).
    **config_overrides: :class:`ModelConfig` fields to set on top of
      ``config.json``, e.g. ``param_dtype="bfloat16"``, ``dtype="bfloat16"``.

  Returns:
    ``(config, params)``, params in the llama.py layout as jax arrays of
    ``config.param_dtype``.

  Raises:
    FileNotFoundError: no directory, no ``config.json``, no safetensors file,
      or a shard the index names is missing.
    CheckpointError: a corrupt file, a pickled checkpoint instead of
      safetensors, or a missing / extra / mis-shaped tensor (a ValueError).
    UnsupportedModelError: ``config.json`` asks for an unsupported model.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"{path}: not a directory; load_hf_dir expects a Hugging Face model "
        f"directory holding {CONFIG_NAME} and {SINGLE_FILE} (or sharded "
        f"model-*-of-*.safetensors with {INDEX_NAME}).")
  config_path = os.path.join(path, CONFIG_NAME)
  config = ModelConfig.from_json_file(config_path, **config_overrides)
  files = _checkpoint_files(path)                    # {hf name: file path}

  expected = _expected_hf_tensors(config)            # {hf name: hf shape}
  _check_names(expected, files, config, config_path)
  dtype = np.dtype(config.weight_dtype)

  with _Readers() as readers:
    def read(name):
      return _read_tensor(readers, files[name], name, expected[name], dtype)

    params = {}
    for hf_name, key, transpose in _TOP_TENSORS:
      if hf_name not in expected:
        continue
      x = read(hf_name)
      params[key] = jnp.asarray(x.T if transpose else x)
    layers = {}
    for suffix, tree_path, transpose in _layer_tensors(config):
      names = [f"model.layers.{i}.{suffix}" for i in range(config.num_layers)]
      if names[0] not in expected:
        continue
      stacked = np.stack([read(n).T if transpose else read(n) for n in names])
      _set(layers, tree_path, jnp.asarray(stacked))
    params["layers"] = layers

    if config.tie_word_embeddings and "lm_head.weight" in files:
      # Tied checkpoints normally omit lm_head; accept a redundant identical copy.
      lm_head = _read_tensor(readers, files["lm_head.weight"], "lm_head.weight",
                             expected["model.embed_tokens.weight"], dtype)
      if not np.array_equal(lm_head, np.asarray(params["embed"])):
        raise CheckpointError(
            f"{files['lm_head.weight']}: tensor 'lm_head.weight' differs from "
            f"'model.embed_tokens.weight' but {config_path} sets "
            "tie_word_embeddings=true; fix tie_word_embeddings in config.json.")

  # The layout must be exactly what the decoder builds for this config.
  want = jax.tree.map(lambda s: (s.shape, s.dtype), llama.param_shapes(config))
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if want != got:  # A bug here, not in the checkpoint.
    raise AssertionError(f"hf_loader built {got}, llama.py expects {want}.")
  return config, params


def _checkpoint_files(path: str) -> dict[str, str]:
  """{tensor name: file holding it} for the safetensors checkpoint in ``path``."""
  entries = sorted(os.listdir(path))
  index_path = os.path.join(path, INDEX_NAME)
  if os.path.exists(index_path):
    return _read_index(index_path)
  single = os.path.join(path, SINGLE_FILE)
  shards = [e for e in entries
            if re.fullmatch(r"model-\d+-of-\d+\.safetensors", e)]
  if os.path.exists(single):
    candidates = [single]
  elif shards:
    # Shards without their index: read every shard's header instead.
    candidates = [os.path.join(path, e) for e in shards]
  else:
    _reject_pickle_checkpoint(path, entries)
    others = [e for e in entries if e.endswith(".safetensors")]
    hint = (f" (found {others}; rename the model weights to {SINGLE_FILE})"
            if others else "")
    raise FileNotFoundError(
        f"{path}: no {SINGLE_FILE}, {INDEX_NAME} or model-*-of-*.safetensors "
        f"shards{hint}. The directory holds: {entries}.")
  files = {}
  with _Readers() as readers:
    for file in candidates:
      for name in readers.get(file).keys():
        if name in files:
          raise CheckpointError(
              f"tensor {name!r} is stored twice: in {files[name]} and {file}.")
        files[name] = file
  return files


def _read_index(index_path: str) -> dict[str, str]:
  try:
    with open(index_path, encoding="utf-8") as f:
      index = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(
        f"{index_path}: not valid JSON (line {e.lineno}): {e.msg}") from e
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise CheckpointError(f"{index_path}: has no 'weight_map' of tensor -> shard.")
  directory = os.path.dirname(index_path)
  files = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
  by_shard: dict[str, list[str]] = {}
  for name, file in files.items():
    by_shard.setdefault(file, []).append(name)
  for file, names in sorted(by_shard.items()):
    if not os.path.exists(file):
      raise FileNotFoundError(
          f"{index_path} names shard {os.path.basename(file)!r} (holding "
          f"{_preview(names)}), but {file} does not exist; the download may be "
          "incomplete.")
  # Every tensor must be where the index says.
  with _Readers() as readers:
    for file, names in sorted(by_shard.items()):
      present = set(readers.get(file).keys())
      absent = [n for n in names if n not in present]
      if absent:
        raise CheckpointError(
            f"{index_path} places tensor {absent[0]!r} in {file}, which does not "
            f"hold it (missing there: {_preview(absent)}).")
  return files


def _reject_pickle_checkpoint(path: str, entries: Iterable[str]) -> None:
  pickles = [e for e in entries if formats.is_pickle(e)]
  if pickles:
    raise CheckpointError(
        f"{path}: holds only a pickled checkpoint ({', '.join(pickles)}) and no "
        f"safetensors. {formats.CONVERT_ADVICE}")


def _expected_hf_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{HF name: HF shape} the decoder needs, derived from llama.param_shapes."""
  shapes = llama.param_shapes(config)
  out = {}
  for hf_name, key, transpose in _TOP_TENSORS:
    if key in shapes:
      s = tuple(shapes[key].shape)
      out[hf_name] = s[::-1] if transpose else s
  for suffix, tree_path, transpose in _layer_tensors(config):
    leaf = _get(shapes["layers"], tree_path)
    if leaf is None:
      continue
    s = tuple(leaf.shape[1:])  # drop the stacked layer axis
    for i in range(config.num_layers):
      out[f"model.layers.{i}.{suffix}"] = s[::-1] if transpose else s
  return out


def _check_names(expected: Mapping[str, Any], files: Mapping[str, str],
                 config: ModelConfig, config_path: str) -> None:
  missing = [n for n in expected if n not in files]
  if missing:
    where = sorted(set(files.values()))
    raise CheckpointError(
        f"missing tensor {missing[0]!r}{_more(missing)} in {', '.join(where)}; "
        f"{config_path} describes {_describe(config)}.")
  extra = [n for n in files if n not in expected and not _IGNORED.fullmatch(n)
           and not (n == "lm_head.weight" and config.tie_word_embeddings)]
  if extra:
    raise CheckpointError(
        f"unexpected tensor {extra[0]!r} in {files[extra[0]]}{_more(extra)}: "
        "the decoder has no "
        f"place for it given {config_path} ({_describe(config)}); refusing to "
        "drop weights silently.")


def _describe(config: ModelConfig) -> str:
  return (f"{config.architecture}, {config.num_layers} layers, qkv_bias={config.qkv_bias}, "
          f"o_bias={config.o_bias}, mlp_bias={config.mlp_bias}, "
          f"tie_word_embeddings={config.tie_word_embeddings}")


def _more(names) -> str:
  return f" (and {len(names) - 1} more: {_preview(names[1:])})" if len(names) > 1 else ""


def _preview(names, n: int = 3) -> str:
  names = list(names)
  return ", ".join(repr(x) for x in names[:n]) + (" ..." if len(names) > n else "")


class _Readers:
  """Open ``safe_open`` handles by file, closed on exit; errors name the file."""

  def __init__(self):
    self._open: dict[str, Any] = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for h in self._open.values():
      h.__exit__(None, None, None)
    self._open.clear()

  def get(self, file: str):
    if file not in self._open:
      try:
        handle = safetensors.safe_open(file, framework="numpy")
        self._open[file] = handle.__enter__()
      except FileNotFoundError:
        raise
      except Exception as e:  # SafetensorError derives from Exception only.
        raise CheckpointError(
            f"{file}: not a valid safetensors file ({e}); it may be truncated "
            "or corrupt: download or save it again.") from e
    return self._open[file]


def _read_tensor(readers: _Readers, file: str, name: str,
                 shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """Reads one tensor, checks its HF shape and casts it to ``dtype``."""
  f = readers.get(file)
  try:
    sl = f.get_slice(name)
    got_shape, got_dtype = tuple(sl.get_shape()), sl.get_dtype()
  except Exception as e:
    raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from e
  if got_shape != tuple(shape):
    raise CheckpointError(
        f"{file}: tensor {name!r} has shape {list(got_shape)}, expected "
        f"{list(shape)} for this config.json.")
  if got_dtype not in ("F64", "F32", "F16", "BF16"):
    raise CheckpointError(
        f"{file}: tensor {name!r} has dtype {got_dtype}; expected a float "
        "(F32, F16 or BF16). Quantized checkpoints are not supported here.")
  try:
    x = f.get_tensor(name)
  except TypeError:  # safetensors without ml_dtypes support for BF16.
    x = _read_raw(file, name)
  except Exception as e:
    raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from e
  return np.asarray(x).astype(dtype, copy=False)


def _read_raw(file: str, name: str) -> np.ndarray:
  """Reads a tensor from the raw safetensors layout (for BF16 on old versions)."""
  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
            "BF16": jnp.bfloat16}
  with open(file, "rb") as fh:
    n = int.from_bytes(fh.read(8), "little")
    header = json.loads(fh.read(n))
    info = header[name]
    start, end = info["data_offsets"]
    fh.seek(8 + n + start)
    buf = fh.read(end - start)
  dt = np.dtype(dtypes[info["dtype"]]).newbyteorder("<")
  return np.frombuffer(buf, dtype=dt).reshape(info["shape"])


def _get(tree: Mapping[str, Any], path: tuple[str, ...]):
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# ----------------------------------------------------------------------------
# Saving.


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
  """A ``config.json`` dict (classic field names) describing ``config``.

  Raises:
    UnsupportedModelError: for a combination no HF architecture expresses
      (bias on q/k/v and MLP but not on o).
  """
  if config.architecture == "gemma3":
    return _to_gemma3_config(config)
  if config.architecture == "qwen3":
    if config.qkv_bias != config.o_bias or config.mlp_bias:
      raise UnsupportedModelError(
          "Qwen3 has attention_bias (q, k, v and o together) and no mlp_bias; "
          f"this ModelConfig has qkv_bias={config.qkv_bias}, o_bias="
          f"{config.o_bias}, mlp_bias={config.mlp_bias}.")
    model_type, arch = "qwen3", "Qwen3ForCausalLM"
  elif config.qkv_bias and not config.o_bias:
    if config.mlp_bias:
      raise UnsupportedModelError(
          "qkv_bias without o_bias is Qwen2, which has no mlp_bias; no HF "
          "architecture matches this ModelConfig.")
    model_type, arch = "qwen2", "Qwen2ForCausalLM"
  elif config.o_bias and not config.qkv_bias:
    raise UnsupportedModelError(
        "o_bias without qkv_bias matches no HF architecture (Llama's "
        "attention_bias sets both).")
  else:
    model_type, arch = "llama", "LlamaForCausalLM"
  hf = {**_common_hf_fields(config, model_type, arch), "hidden_act": "silu"}
  if model_type == "llama":
    hf["attention_bias"] = config.o_bias
    hf["mlp_bias"] = config.mlp_bias
  elif model_type == "qwen3":
    hf["attention_bias"] = config.o_bias
    hf["use_sliding_window"] = False
  else:
    hf["use_sliding_window"] = False
  if config.rope_scaling is not None and config.rope_scaling.rope_type == "linear":
    hf["rope_scaling"] = {"rope_type": "linear", "factor": config.rope_scaling.factor}
  elif config.rope_scaling is not None:
    rs = config.rope_scaling
    hf["rope_scaling"] = {
        "rope_type": "llama3", "factor": rs.factor,
        "low_freq_factor": rs.low_freq_factor,
        "high_freq_factor": rs.high_freq_factor,
        "original_max_position_embeddings": rs.original_max_position_embeddings}
  return {**hf, **_token_id_fields(config)}


def _common_hf_fields(config: ModelConfig, model_type: str, arch: str) -> dict[str, Any]:
  """The ``config.json`` fields every written architecture shares: shapes,
  norm epsilon, RoPE base, context length, tying and dtype."""
  return {
      "model_type": model_type,
      "architectures": [arch],
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_word_embeddings,
      "torch_dtype": config.param_dtype,
  }


def _token_id_fields(config: ModelConfig) -> dict[str, Any]:
  """bos/eos/pad ids as transformers reads them (one eos id as an int)."""
  out: dict[str, Any] = {}
  if config.bos_token_id is not None:
    out["bos_token_id"] = config.bos_token_id
  if config.eos_token_ids:
    eos = list(config.eos_token_ids)
    out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
  if config.pad_token_id is not None:
    out["pad_token_id"] = config.pad_token_id
  return out


def _to_gemma3_config(config: ModelConfig) -> dict[str, Any]:
  """``config.json`` of a Gemma3ForCausalLM (text only) for ``config``."""
  gemma = dict(norm_offset=1.0, post_norms=True, embed_scale=True, qk_norm=True,
               hidden_act="gelu_pytorch_tanh", mlp_bias=False)
  off = [f"{k}={getattr(config, k)!r}" for k, v in gemma.items()
         if getattr(config, k) != v]
  if off or config.qkv_bias != config.o_bias:
    raise UnsupportedModelError(
        "architecture='gemma3' but this ModelConfig differs from Gemma 3 in "
        + ", ".join(off or [f"qkv_bias={config.qkv_bias} != o_bias={config.o_bias}"]))
  hf = {
      **_common_hf_fields(config, "gemma3_text", "Gemma3ForCausalLM"),
      "hidden_activation": config.hidden_act,
      "rope_local_base_freq": config.rope_local_theta,
      "query_pre_attn_scalar": _int_if_whole(config.query_pre_attn_scalar
                                             if config.query_pre_attn_scalar
                                             is not None else config.head_dim),
      "sliding_window": config.sliding_window,
      "layer_types": list(config.layer_types) or ["full_attention"] * config.num_layers,
      "final_logit_softcapping": config.final_logit_softcapping,
      "attn_logit_softcapping": None,
      "attention_bias": config.o_bias,
  }
  rs = config.rope_scaling
  if rs is not None:
    if rs.rope_type != "linear":
      raise UnsupportedModelError(
          f"Gemma 3 with rope_scaling {rs.rope_type!r}: only 'linear' is written.")
    hf["rope_scaling"] = {"rope_type": "linear", "factor": rs.factor}
  return {**hf, **_token_id_fields(config)}


def _int_if_whole(x: float) -> int | float:
  """transformers' Gemma3TextConfig types query_pre_attn_scalar as an int."""
  return int(x) if float(x).is_integer() else x


_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings",
                 "qkv_bias", "o_bias", "mlp_bias", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "architecture", "hidden_act", "norm_offset",
                 "qk_norm", "post_norms", "embed_scale", "layer_types",
                 "sliding_window", "rope_local_theta", "query_pre_attn_scalar",
                 "final_logit_softcapping")


def save_hf_dir(path: str | os.PathLike, config: ModelConfig, params: PyTree,
                hf_config: Mapping[str, Any] | None = None, *,
                max_shard_bytes: int | None = None) -> None:
  """Writes ``params`` as a Hugging Face model directory (inverse of load).

  Tensors keep the dtype of ``params`` and get HF names and ``[out, in]``
  Linear layout, so transformers' ``from_pretrained`` and :func:`load_hf_dir`
  both read the result.

  Args:
    path: output directory, created if needed. An existing config.json and
      model weights there (``model.safetensors``, shards, index) are replaced.
    config: the model's config.
    params: parameters in the llama.py layout (jax or numpy arrays).
    hf_config: the ``config.json`` dict to write; by default one is built with
      :func:`to_hf_config`. It must describe the same architecture as ``config``.
    max_shard_bytes: if given, split the tensors over
      ``model-0000i-of-0000n.safetensors`` shards of at most about this many
      bytes, with ``model.safetensors.index.json``; otherwise one file.

  Raises:
    ValueError: ``params`` or ``hf_config`` does not match ``config``.
  """
  path = os.fspath(path)
  want = jax.tree.map(lambda s: tuple(s.shape), llama.param_shapes(config))
  got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
  if want != got:
    raise ValueError(f"save_hf_dir: params have shapes {got}, but the config "
                     f"needs {want}.")
  if hf_config is None:
    hf_config = to_hf_config(config)
  else:
    hf_config = dict(hf_config)
    described = ModelConfig.from_hf_config(hf_config, source="hf_config")
    diff = [f"{k}: hf_config gives {getattr(described, k)!r}, config has "
            f"{getattr(config, k)!r}" for k in _SHAPE_FIELDS
            if getattr(described, k) != getattr(config, k)]
    if diff:
      raise ValueError("save_hf_dir: hf_config does not describe config: "
                       + "; ".join(diff))

  tensors: dict[str, np.ndarray] = {}
  for hf_name, key, transpose in _TOP_TENSORS:
    if key in params:
      x = np.asarray(params[key])
      tensors[hf_name] = np.ascontiguousarray(x.T if transpose else x)
  for suffix, tree_path, transpose in _layer_tensors(config):
    leaf = _get(params["layers"], tree_path)
    if leaf is None:
      continue
    leaf = np.asarray(leaf)
    for i in range(config.num_layers):
      x = leaf[i]
      tensors[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(
          x.T if transpose else x)

  os.makedirs(path, exist_ok=True)
  for stale in (SINGLE_FILE, INDEX_NAME):
    if os.path.exists(os.path.join(path, stale)):
      os.remove(os.path.join(path, stale))
  for e in os.listdir(path):
    if re.fullmatch(r"model-\d+-of-\d+\.safetensors", e):
      os.remove(os.path.join(path, e))
  with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
    f.write("\n")

  metadata = {"format": "pt"}  # transformers refuses safetensors without it.
  if max_shard_bytes is None:
    safetensors.numpy.save_file(tensors, os.path.join(path, SINGLE_FILE),
                                metadata=metadata)
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, x in tensors.items():
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = x
    size += x.nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, os.path.join(path, file), metadata=metadata)
    weight_map.update({name: file for name in shard})
  index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
           "weight_map": weight_map}
  with open(os.path.join(path, INDEX_NAME), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2, sort_keys=True)
    f.write("\n")
