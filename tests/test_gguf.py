"""GGUF loading: tiny files written here in llama.cpp's layout, bad inputs, SmolLM2."""

import os
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from fedjax_u2s import testing
from fedjax_u2s.models import formats, gguf_loader, llama
from fedjax_u2s.models.config import UnsupportedModelError


def llama_cpp_permute(w, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_tensors(cfg, params, arch):
  """{gguf name: numpy array in HF [out, in] layout, as the converter writes}."""
  p = jax.tree.map(np.asarray, params)
  permute = arch == "llama"
  out = {"token_embd.weight": p["embed"],
         "output_norm.weight": p["final_norm"]}
  if not cfg.tie_word_embeddings:
    out["output.weight"] = p["lm_head"].T
  names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
           "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
  lp = p["layers"]
  for i in range(cfg.num_layers):
    out[f"blk.{i}.attn_norm.weight"] = lp["attn_norm"][i]
    out[f"blk.{i}.ffn_norm.weight"] = lp["mlp_norm"][i]
    for key, name in names.items():
      for kind, arr in lp[key].items():
        a = arr[i].T if kind == "w" else arr[i]
        if permute and key in ("q", "k"):
          a = llama_cpp_permute(a, cfg.num_heads if key == "q" else cfg.num_kv_heads)
        out[f"blk.{i}.{name}.{'weight' if kind == 'w' else 'bias'}"] = a
  return out


def write_gguf(path, cfg, tensors, arch="llama", qtype=Q.F32, metadata=True,
               raw=None):
  """Writes a GGUF with llama.cpp's metadata keys; 2-D tensors stored as qtype.

  Args:
    raw: {name: (uint8 bytes array, ggml type)} written as-is.
  """
  w = gguf.GGUFWriter(os.fspath(path), arch)
  if metadata:
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "llama":
      w.add_rope_dimension_count(cfg.head_dim)
      w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
  for name, arr in tensors.items():
    arr = np.ascontiguousarray(arr, np.float32)
    if raw and name in raw:
      data, t = raw[name]
      w.add_tensor(name, data, raw_dtype=t)
    elif arr.ndim == 2 and qtype != Q.F32:
      w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(name, arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


_logits = testing.full_logits


TOKENS = jnp.asarray([[3, 17, 5, 42, 8, 1, 29, 11], [7, 7, 60, 2, 33, 19, 4, 50]])


def assert_same_model(cfg2, cfg):
  """The loaded config describes the same network (names and ids may differ)."""
  for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
            "num_heads", "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta",
            "rope_scaling", "max_position_embeddings", "tie_word_embeddings",
            "qkv_bias", "o_bias", "mlp_bias"):
    assert getattr(cfg2, f) == getattr(cfg, f), f


def assert_trees_equal(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    assert x.shape == y.shape, path
    if tol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=str(path), **tol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


# ---------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("tied", [False, True])
def test_llama_f32_exact(tmp_path, tied):
  cfg = testing.tiny_llama_config(tie_word_embeddings=tied, rms_norm_eps=1e-5,
                                  rope_theta=10000.0)
  params = llama.init_params(jax.random.key(0), cfg, std=0.3)
  path = write_gguf(tmp_path / "tiny.gguf", cfg, hf_tensors(cfg, params, "llama"))
  cfg2, loaded = gguf_loader.load_gguf(path)
  assert_same_model(cfg2, cfg)
  assert cfg2.bos_token_id == 1 and cfg2.eos_token_ids == (2,)
  assert_trees_equal(loaded, params)
  np.testing.assert_allclose(_logits(loaded, TOKENS, cfg), _logits(params, TOKENS, cfg),
                             atol=1e-5, rtol=0)


def test_unpermute_inverts_llama_cpp_permute():
  w = np.arange(4 * 8 * 3).reshape(4 * 8, 3)
  np.testing.assert_array_equal(
      gguf_loader.unpermute_qk_rows(llama_cpp_permute(w, 4), 4), w)
  b = np.arange(2 * 6)
  np.testing.assert_array_equal(
      gguf_loader.unpermute_qk_rows(llama_cpp_permute(b, 2), 2), b)


def _q8_config():
  # Every input dim (D, F, H*hd) a multiple of Q8_0's 32-element block.
  return testing.tiny_llama_config(hidden_size=64, intermediate_size=96,
                                   num_heads=4, num_kv_heads=2, head_dim=16)


def test_llama_q8_0(tmp_path):
  cfg = _q8_config()
  params = llama.init_params(jax.random.key(1), cfg, std=0.1)
  tensors = hf_tensors(cfg, params, "llama")
  path = write_gguf(tmp_path / "q8.gguf", cfg, tensors, qtype=Q.Q8_0)
  cfg2, loaded = gguf_loader.load_gguf(path)
  assert_same_model(cfg2, cfg)
  assert gguf_loader.read_gguf(path).tensors["blk.0.attn_q.weight"].ggml_type == Q.Q8_0

  # Q8_0 blocks run along rows, so quantization commutes with the row
  # permutation: the expected weights are the original ones, quantized.
  def rows_q8(x):  # Q8_0 round trip, blocks along the last axis
    x = np.asarray(x, np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0)

  expected = jax.tree.map(np.asarray, params)
  expected["embed"] = rows_q8(expected["embed"])  # [V, D]: stored as is
  expected["lm_head"] = rows_q8(expected["lm_head"].T).T  # kernels: [in, out]
  for k in ("q", "k", "v", "o", "gate", "up", "down"):
    expected["layers"][k]["w"] = np.stack(
        [rows_q8(w.T).T for w in expected["layers"][k]["w"]])
  assert_trees_equal(loaded, expected)
  # Within Q8_0's error of the originals: half a step of absmax/127, plus the
  # fp16 rounding of the block scale (2^-11 relative, times |q| <= 127).
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    bound = float(np.max(np.abs(y))) * (0.5 / 127 + 2.0**-11) + 1e-7
    assert float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) <= bound
  np.testing.assert_allclose(_logits(loaded, TOKENS, cfg),
                             _logits(jax.tree.map(jnp.asarray, expected), TOKENS, cfg),
                             atol=1e-5, rtol=0)
  # And close to the unquantized model (about 2% relative error here).
  got, want = _logits(loaded, TOKENS, cfg), _logits(params, TOKENS, cfg)
  rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  assert rel < 0.03, rel


def test_qwen2_f32_biases_not_permuted(tmp_path):
  cfg = testing.tiny_qwen2_config()
  params = llama.init_params(jax.random.key(2), cfg, std=0.3)
  path = write_gguf(tmp_path / "qwen2.gguf", cfg, hf_tensors(cfg, params, "qwen2"),
                    arch="qwen2")
  cfg2, loaded = gguf_loader.load_gguf(path)
  assert cfg2.qkv_bias and cfg2.tie_word_embeddings and cfg2.rope_theta == 1e6
  assert_same_model(cfg2, cfg)
  assert_trees_equal(loaded, params)
  np.testing.assert_allclose(_logits(loaded, TOKENS, cfg), _logits(params, TOKENS, cfg),
                             atol=1e-5, rtol=0)


def test_llama_bias_is_unpermuted_too(tmp_path):
  # A Llama with attention_bias: llama.cpp permutes q/k biases like the rows.
  cfg = testing.tiny_llama_config(qkv_bias=True, o_bias=True)
  params = llama.init_params(jax.random.key(3), cfg, std=0.3)
  path = write_gguf(tmp_path / "bias.gguf", cfg, hf_tensors(cfg, params, "llama"))
  cfg2, loaded = gguf_loader.load_gguf(path)
  assert cfg2.qkv_bias and cfg2.o_bias
  assert_trees_equal(loaded, params)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0,
                                   Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_quant_types_match_gguf_dequantize(tmp_path, qtype):
  # K-quants use 256-element super-blocks: every input dim is 256.
  cfg = testing.tiny_llama_config(vocab_size=40, hidden_size=256, intermediate_size=256,
                                  num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64)
  params = llama.init_params(jax.random.key(4), cfg, std=0.3)
  tensors = hf_tensors(cfg, params, "llama")
  rng = np.random.default_rng(0)
  raw = {}
  for name, arr in tensors.items():
    if arr.ndim != 2:
      continue
    try:
      data = gguf.quants.quantize(np.asarray(arr, np.float32), qtype)
    except NotImplementedError:  # gguf-py cannot quantize K-types: random blocks.
      block, size = gguf.GGML_QUANT_SIZES[qtype]
      data = rng.integers(0, 256, (arr.shape[0], arr.shape[1] // block * size),
                          dtype=np.uint8)
      # Keep the f16 super-block scales finite and small.
      blocks = data.reshape(-1, size)
      scale = np.float16(rng.uniform(-1e-2, 1e-2, (blocks.shape[0], 1)))
      blocks[:, -2:] = scale.view(np.uint8)
      if qtype == Q.Q4_K:
        blocks[:, :4] = np.repeat(scale, 2, axis=1).view(np.uint8)
    raw[name] = (data, qtype)
  path = write_gguf(tmp_path / f"{qtype.name}.gguf", cfg, tensors, raw=raw)
  _, loaded = gguf_loader.load_gguf(path)
  got = loaded["layers"]["k"]["w"][0]
  data = raw["blk.0.attn_k.weight"][0]
  want = gguf_loader.unpermute_qk_rows(gguf.quants.dequantize(data, qtype), 2).T
  np.testing.assert_array_equal(np.asarray(got), want)
  want_embed = gguf.quants.dequantize(raw["token_embd.weight"][0], qtype)
  np.testing.assert_array_equal(np.asarray(loaded["embed"]), want_embed)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(loaded))


def test_param_dtype_bfloat16(tmp_path):
  cfg = testing.tiny_llama_config()
  params = llama.init_params(jax.random.key(5), cfg, std=0.3)
  path = write_gguf(tmp_path / "t.gguf", cfg, hf_tensors(cfg, params, "llama"))
  cfg2, loaded = gguf_loader.load_gguf(path, dtype="bfloat16", param_dtype="bfloat16")
  assert cfg2.dtype == cfg2.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_array_equal(
      np.asarray(loaded["layers"]["q"]["w"]),
      np.asarray(params["layers"]["q"]["w"].astype(jnp.bfloat16)))


def test_reader_agrees_with_gguf_reader(tmp_path):
  cfg = testing.tiny_llama_config()
  params = llama.init_params(jax.random.key(6), cfg)
  path = tmp_path / "t.gguf"
  w = gguf.GGUFWriter(os.fspath(path), "llama")
  w.add_token_list(["<unk>", "a b", "ü", ""])
  w.add_token_types([2, 1, 1, 3])
  w.add_array("test.floats", [0.5, -1.25])
  w.add_bool("test.flag", True)
  w.add_string("test.str", "naïve\n")
  for name, arr in hf_tensors(cfg, params, "llama").items():
    w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  ours = gguf_loader.read_gguf(path)
  ref = gguf.GGUFReader(path)
  assert ours.metadata == {k: f.contents() for k, f in ref.fields.items()
                           if not k.startswith("GGUF.")}
  for t in ref.tensors:
    np.testing.assert_array_equal(ours.dequantize(t.name), t.data)
  # A GGUFReader is accepted wherever a path is.
  assert gguf_loader.as_gguf_file(ref).metadata == ours.metadata
  with pytest.raises(UnsupportedModelError):  # the metadata lacks block_count
    gguf_loader.config_from_gguf(ref)


def test_config_from_reader_equals_from_path(tmp_path):
  cfg = testing.tiny_llama_config()
  params = llama.init_params(jax.random.key(7), cfg)
  path = write_gguf(tmp_path / "t.gguf", cfg, hf_tensors(cfg, params, "llama"))
  assert (gguf_loader.config_from_gguf(gguf.GGUFReader(path))
          == gguf_loader.config_from_gguf(path))
  assert gguf_loader.config_from_gguf(path, dtype="bfloat16").dtype == "bfloat16"


def test_llama3_rope_freqs_tensor(tmp_path):
  cfg = testing.tiny_llama_config(head_dim=64, num_heads=2, num_kv_heads=1,
                                  hidden_size=64, rope_theta=500000.0)
  from fedjax_u2s.models.config import RopeScaling
  rs = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
  params = llama.init_params(jax.random.key(8), cfg)
  tensors = hf_tensors(cfg, params, "llama")
  inv = 1.0 / (500000.0 ** (np.arange(0, 64, 2) / 64))
  tensors["rope_freqs.weight"] = gguf_loader._llama3_factors(inv, rs).astype(np.float32)
  path = write_gguf(tmp_path / "l3.gguf", cfg, tensors)
  cfg2, _ = gguf_loader.load_gguf(path)
  assert cfg2.rope_scaling == rs
  np.testing.assert_allclose(llama.rope_frequencies(cfg2),
                             llama.rope_frequencies(cfg.replace(rope_scaling=rs)))


# ---------------------------------------------------------------------------
# Bad inputs.


@pytest.fixture
def good_file(tmp_path):
  cfg = testing.tiny_llama_config()
  params = llama.init_params(jax.random.key(9), cfg)
  tensors = hf_tensors(cfg, params, "llama")
  return cfg, tensors, write_gguf(tmp_path / "good.gguf", cfg, tensors)


def test_truncated_file(good_file, tmp_path):
  _, _, path = good_file
  data = path.read_bytes()
  for frac, name in ((0.5, "half.gguf"), (0.999, "nearly.gguf"), (0.001, "head.gguf")):
    bad = tmp_path / name
    bad.write_bytes(data[:int(len(data) * frac)])
    with pytest.raises(ValueError, match=rf"{name}.*(truncated|not a GGUF)"):
      gguf_loader.load_gguf(bad)


def test_random_bytes(tmp_path):
  bad = tmp_path / "noise.gguf"
  bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
  with pytest.raises(ValueError, match=r"noise\.gguf.*not a GGUF file"):
    gguf_loader.load_gguf(bad)
  # Valid magic and version, garbage after: still a clear ValueError.
  bad2 = tmp_path / "garbage.gguf"
  bad2.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(range(256)) * 4)
  with pytest.raises(ValueError, match=r"garbage\.gguf.*(truncated|corrupt)"):
    gguf_loader.load_gguf(bad2)


def test_empty_and_missing_file(tmp_path):
  (tmp_path / "empty.gguf").write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty\.gguf"):
    gguf_loader.load_gguf(tmp_path / "empty.gguf")
  with pytest.raises(FileNotFoundError, match=r"nope\.gguf"):
    gguf_loader.load_gguf(tmp_path / "nope.gguf")


def test_unknown_architecture(tmp_path):
  cfg = testing.tiny_llama_config()
  params = llama.init_params(jax.random.key(10), cfg)
  path = write_gguf(tmp_path / "fal.gguf", cfg, hf_tensors(cfg, params, "llama"),
                    arch="falcon", metadata=False)
  with pytest.raises(UnsupportedModelError, match=r"fal\.gguf.*'falcon'"):
    gguf_loader.load_gguf(path)
  with pytest.raises(UnsupportedModelError, match=r"fal\.gguf.*'falcon'"):
    gguf_loader.config_from_gguf(path)


def test_missing_tensor(good_file, tmp_path):
  cfg, tensors, _ = good_file
  del tensors["blk.1.ffn_up.weight"]
  path = write_gguf(tmp_path / "missing.gguf", cfg, tensors)
  with pytest.raises(ValueError, match=r"missing\.gguf.*blk\.1\.ffn_up\.weight"):
    gguf_loader.load_gguf(path)


def test_wrong_shape(good_file, tmp_path):
  cfg, tensors, _ = good_file
  tensors["blk.0.attn_k.weight"] = np.zeros((8, cfg.hidden_size), np.float32)
  path = write_gguf(tmp_path / "shape.gguf", cfg, tensors)
  with pytest.raises(ValueError, match=r"shape\.gguf.*blk\.0\.attn_k\.weight.*\[8, 32\]"):
    gguf_loader.load_gguf(path)


def test_unexpected_tensor(good_file, tmp_path):
  cfg, tensors, _ = good_file
  tensors["blk.0.ffn_gate_inp.weight"] = np.zeros((4, cfg.hidden_size), np.float32)
  path = write_gguf(tmp_path / "extra.gguf", cfg, tensors)
  with pytest.raises(ValueError, match=r"extra\.gguf.*blk\.0\.ffn_gate_inp\.weight"):
    gguf_loader.load_gguf(path)


def test_unsupported_tensor_type(good_file, tmp_path):
  cfg, tensors, _ = good_file
  block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
  name = "blk.1.attn_v.weight"
  rows, cols = tensors[name].shape
  raw = {name: (np.zeros((rows, cols // block * size), np.uint8), Q.Q8_1)}
  path = write_gguf(tmp_path / "q81.gguf", cfg, tensors, raw=raw)
  with pytest.raises(UnsupportedModelError,
                     match=r"q81\.gguf.*blk\.1\.attn_v\.weight.*Q8_1"):
    gguf_loader.load_gguf(path)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_refused(tmp_path, suffix):
  path = tmp_path / f"pytorch_model{suffix}"
  path.write_bytes(b"\x80\x04K\x01.")  # A valid pickle: must not be opened at all.
  with pytest.raises(ValueError, match=rf"pytorch_model\{suffix}.*pickle.*safetensors"):
    gguf_loader.load_gguf(path)
  with pytest.raises(ValueError, match="safetensors"):
    formats.reject_pickle(path)
  formats.reject_pickle(tmp_path / "model.safetensors")  # fine


def test_moe_refused(good_file, tmp_path):
  cfg, tensors, _ = good_file
  path = tmp_path / "moe.gguf"
  w = gguf.GGUFWriter(os.fspath(path), "llama")
  w.add_block_count(cfg.num_layers)
  w.add_expert_count(8)
  w.add_tensor("token_embd.weight", tensors["token_embd.weight"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(UnsupportedModelError, match=r"moe\.gguf.*expert"):
    gguf_loader.load_gguf(path)


# ---------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1).


# Greedy continuation of "The capital of France is" by the Q4_1 model.
SMOLLM2_GOLDEN_IDS = [7042, 30, 198, 198, 504, 2988, 314, 42]
SMOLLM2_GOLDEN_TEXT = " Paris.\n\nThe answer is:"


@pytest.mark.slow
def test_smollm2_loads_and_says_paris(smollm2_path):
  from fedjax_u2s.tokenizer import Tokenizer
  path = smollm2_path
  start = time.perf_counter()
  cfg, params = gguf_loader.load_gguf(path)
  jax.block_until_ready(params)
  print(f"load_gguf: {time.perf_counter() - start:.2f} s")
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
  assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and not cfg.qkv_bias
  assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
  assert cfg.max_position_embeddings == 8192 and cfg.rope_scaling is None
  assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, (2,), 2)
  assert "lm_head" not in params
  assert cfg.num_params == sum(x.size for x in jax.tree.leaves(params))

  tok = Tokenizer.from_gguf(path)
  prompt = tok.encode("The capital of France is")
  assert prompt == [504, 3575, 282, 4649, 314]
  seq, width = list(prompt), len(prompt) + len(SMOLLM2_GOLDEN_IDS)
  for _ in range(len(SMOLLM2_GOLDEN_IDS)):
    # Right padding to one width: one compile, and the causal mask keeps the
    # padding out of the positions read.
    padded = jnp.asarray([seq + [0] * (width - len(seq))])
    seq.append(int(jnp.argmax(_logits(params, padded, cfg)[0, len(seq) - 1])))
  text = tok.decode(seq[len(prompt):])
  assert "Paris" in text
  assert seq[len(prompt):] == SMOLLM2_GOLDEN_IDS, text
  assert text == SMOLLM2_GOLDEN_TEXT


@pytest.mark.slow
def test_smollm2_sampler_and_chat_answer(smollm2_path):
  """The jitted sampler on the real model: same greedy ids as the plain loop
  above, in a ragged batch, and a chat answer that stops at <|im_end|>."""
  from fedjax_u2s import sampler as sampler_lib
  from fedjax_u2s.models import registry
  model = registry.load("smollm2-135m-instruct")
  tok = model.tokenizer
  s = sampler_lib.Sampler(model.config, tok)
  chat = tok.apply_chat_template(
      [{"role": "user", "content": "What is the capital of France?"}],
      add_generation_prompt=True)
  out = s(model.params, ["The capital of France is", chat],
          max_new_tokens=len(SMOLLM2_GOLDEN_IDS) + 24, eos_ids=(),
          stop_strings=("<|im_end|>",))
  assert out.tokens[0][:len(SMOLLM2_GOLDEN_IDS)] == SMOLLM2_GOLDEN_IDS
  assert out.stop_reasons[1] == "stop_string" and "Paris" in out.texts[1]
  out = s(model.params, [chat], max_new_tokens=32)  # tokenizer EOS: <|im_end|>
  assert out.stop_reasons == ["eos"] and out.tokens[0][-1] == 2
  assert "Paris" in out.texts[0]
  if s.keeps_decode_weights:  # The decode read the GGUF's own blocks, losslessly.
    dec = s.decode_params(model.params)
    layer = dec["layers"][0]
    assert {layer[n]["w"].fmt for n in ("qkv", "o", "gate_up", "down")} == {"q4_1"}
    assert dec["lm_head"].fmt == "q8_0"
    np.testing.assert_array_equal(layer["down"]["w"].unpack(),
                                  model.params["layers"]["down"]["w"][0])
    np.testing.assert_array_equal(dec["lm_head"].unpack(), model.params["embed"].T)
