"""Gemma 3 (and Qwen3's q/k norms): config, sliding-window cache, GGUF, tokenizers.

Logit parity with transformers' Gemma3ForCausalLM / Qwen3ForCausalLM on the
tiny configs (``fedjax_u2s.testing.TINY_HF_GEMMA3`` and friends: local and
global layers mixed, a window of 4 under 12-token rows) is checked with the
other architectures in tests/test_model_parity.py, golden logits and live. This
file checks what is Gemma's own: the config's fields, that the window and the
per-layer RoPE tables matter, decoding with a KV cache past the window against
recomputation (every decode path), the gemma3 GGUF loader (norms stored plus
one), the real ``gemma3-270m`` model against transformers reading the same
GGUF, and tokenizers from a sentencepiece ``tokenizer.model``.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from fedjax_u2s import decoding
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s import testing
from fedjax_u2s import tokenizer as tokenizer_lib
from fedjax_u2s.models import gguf_loader, hf_loader, llama, registry
from fedjax_u2s.models.config import ModelConfig, UnsupportedModelError


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _write(path, hf_config, seed=0):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f)
  safetensors.numpy.save_file(testing.random_hf_state_dict(hf_config, seed),
                              os.path.join(path, "model.safetensors"))
  return str(path)


def _load(tmp_path, name="gemma3", seed=0):
  return hf_loader.load_hf_dir(_write(tmp_path / name, testing.TINY_HF_CONFIGS[name],
                                      seed))


# ----------------------------------------------------------------------------
# Config.


def test_gemma3_config_fields():
  cfg = ModelConfig.from_hf_config(testing.TINY_HF_GEMMA3)
  assert cfg.architecture == "gemma3" and cfg.hidden_act == "gelu_pytorch_tanh"
  assert (cfg.norm_offset, cfg.qk_norm, cfg.post_norms, cfg.embed_scale) == (
      1.0, True, True, True)
  assert cfg.layer_types == ("sliding_attention", "full_attention",
                             "sliding_attention")
  assert (cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (4, 1e6, 1e4)
  assert cfg.query_pre_attn_scalar == 24 and cfg.tie_word_embeddings
  # transformers' default pattern when layer_types is absent: every 6th global.
  hf = {k: v for k, v in testing.TINY_HF_GEMMA3.items() if k != "layer_types"}
  cfg = ModelConfig.from_hf_config({**hf, "num_hidden_layers": 12})
  assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11]
  # transformers 5's per-layer-type rope_parameters.
  hf5 = {k: v for k, v in testing.TINY_HF_GEMMA3_SCALED.items()
         if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
  hf5["rope_parameters"] = {
      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
  assert ModelConfig.from_hf_config(hf5) == ModelConfig.from_hf_config(
      testing.TINY_HF_GEMMA3_SCALED)


@pytest.mark.parametrize("change, field", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "sliding_attention"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
])
def test_gemma3_config_refuses_what_is_not_implemented(change, field):
  with pytest.raises(UnsupportedModelError, match=field):
    ModelConfig.from_hf_config({**testing.TINY_HF_GEMMA3, **change})


def test_num_params_counts_the_extra_norms(tmp_path):
  for name in ("gemma3", "gemma3_scaled", "qwen3"):
    cfg, params = _load(tmp_path, name)
    assert cfg.num_params == sum(x.size for x in jax.tree.leaves(params)), name


# ----------------------------------------------------------------------------
# The window, the RoPE tables, the scale: each changes the logits.


def _logits(params, tokens, cfg, input_mask=None):
  return np.asarray(testing.full_logits(params, tokens, cfg, input_mask))


@pytest.mark.parametrize("change", [
    dict(sliding_window=64),                     # the window masks keys
    dict(rope_local_theta=1e6),                  # local layers' own RoPE base
    dict(rope_theta=1e4),                        # global layers' RoPE base
    dict(query_pre_attn_scalar=16.0),            # the attention scale
    dict(layer_types=("full_attention",) * 3),   # which layers slide
    dict(norm_offset=0.0),                       # (1 + w) norms
    dict(embed_scale=False),
    dict(post_norms=False),
])
def test_each_gemma_field_changes_the_logits(tmp_path, change):
  cfg, params = _load(tmp_path)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 12)))
  base = _logits(params, tokens, cfg)
  if change.get("post_norms") is False:
    params = {**params, "layers": {k: v for k, v in params["layers"].items()
                                   if not k.startswith("post_")}}
  other = _logits(params, tokens, cfg.replace(**change))
  assert np.abs(base - other).max() > 1e-3


def test_window_hides_exactly_the_old_keys(tmp_path):
  """Within the window nothing changes: the first 4 positions (all inside
  every window) are the same with any window >= 4; later ones differ."""
  cfg, params = _load(tmp_path)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 128, (1, 12)))
  a = _logits(params, tokens, cfg)
  b = _logits(params, tokens, cfg.replace(sliding_window=1000))
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6, rtol=0)
  assert np.abs(a[:, 4:] - b[:, 4:]).max(axis=-1).min() > 1e-4


def test_linear_rope_scaling_applies_to_global_layers_only():
  cfg = ModelConfig.from_hf_config(testing.TINY_HF_GEMMA3_SCALED)
  plain = cfg.replace(rope_scaling=None)
  np.testing.assert_allclose(llama.rope_frequencies(cfg),
                             llama.rope_frequencies(plain) / 8.0, rtol=1e-6)
  np.testing.assert_array_equal(llama.rope_frequencies(cfg, local=True),
                                llama.rope_frequencies(plain, local=True))


# ----------------------------------------------------------------------------
# KV-cache decoding past the window == recomputation.


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("name", ["gemma3", "gemma3_scaled", "qwen3"])
def test_kv_cache_decoding_past_the_window_matches_recompute(tmp_path, name,
                                                             per_layer):
  """A 3-token prompt (shorter than the window), then 1- and 2-token steps to
  14 tokens (3.5 windows): every step's logits equal a full forward pass,
  so the local layers' cache hides exactly the keys older than the window."""
  config, params = _load(tmp_path, name, 3)
  if per_layer:
    params = llama.unstack_layers(params)
  rng = np.random.default_rng(0)
  prompt_len, total = 3, 14
  tokens = rng.integers(3, config.vocab_size, (2, total))
  mask = np.ones(tokens.shape, bool)
  mask[1, :2] = False  # left padding
  tokens[~mask] = 0
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  full = _logits(params, tokens, config, mask)
  cache = llama.init_cache(config, 2, 16, per_layer=per_layer)
  logits, cache = jax.jit(functools.partial(llama.forward, config=config,
                                            prefill=True))(
      params, tokens[:, :prompt_len], input_mask=mask[:, :prompt_len], cache=cache)
  step = jax.jit(functools.partial(llama.forward, config=config))
  t = prompt_len
  for width in (1, 2, 1, 1, 1, 2, 1, 1, 1):
    logits, cache = step(params, tokens[:, t:t + width], cache=cache)
    np.testing.assert_allclose(logits, full[:, t:t + width], atol=2e-5, rtol=0,
                               err_msg=f"step at {t}")
    t += width
  assert t == total


@pytest.mark.parametrize("decode", ["scan_xla", "unrolled", "cpu_kernel"])
def test_sampler_decode_paths_agree_past_the_window(tmp_path, decode):
  """The sampler's greedy tokens on every decode path (the CPU kernel's
  packed weights keep gate and up apart for GeGLU) equal a plain greedy
  loop of full forward passes, for 12 new tokens after a 5-token prompt."""
  # The vocabulary covers ByteTokenizer's ids (its pad id is 256).
  config, params = hf_loader.load_hf_dir(_write(
      tmp_path / "m", {**testing.TINY_HF_GEMMA3, "vocab_size": 260}, 5))
  if decode == "cpu_kernel" and not decoding.kernel_decodes(config):
    pytest.skip("the CPU kernel does not run here")
  prompt = [int(x) for x in np.random.default_rng(2).integers(3, 256, 5)]
  s = sampler_lib.Sampler(config, testing.ByteTokenizer(), decode=decode)
  out = s(params, [prompt], max_new_tokens=12, eos_ids=())
  assert out.tokens[0] == testing.greedy_by_recompute(params, config, prompt, 12)


def test_decode_weights_keep_gate_and_up_apart_for_geglu(tmp_path):
  config, params = _load(tmp_path, "gemma3")
  packed = decoding.pack_weights(llama.unstack_layers(params), config)
  assert "gate_up" not in packed["layers"][0] and "gate" in packed["layers"][0]
  qwen_cfg, qwen = _load(tmp_path, "qwen3")
  assert "gate_up" in decoding.pack_weights(llama.unstack_layers(qwen),
                                            qwen_cfg)["layers"][0]


# ----------------------------------------------------------------------------
# GGUF: a tiny gemma3 file written as llama.cpp's converter writes it.


def _write_gemma3_gguf(path, hf_config, sd):
  import gguf
  cfg = ModelConfig.from_hf_config(hf_config)
  w = gguf.GGUFWriter(str(path), "gemma3")
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_sliding_window(cfg.sliding_window)
  w.add_uint32("gemma3.attention.sliding_window_pattern", 3)  # local, global, local
  names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
           "self_attn.k_norm": "attn_k_norm",
           "post_attention_layernorm": "post_attention_norm",
           "pre_feedforward_layernorm": "ffn_norm",
           "post_feedforward_layernorm": "post_ffw_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
  for name, x in sd.items():
    if name == "model.embed_tokens.weight":
      out = "token_embd.weight"
    elif name == "model.norm.weight":
      out = "output_norm.weight"
    else:
      _, _, i, rest = name.split(".", 3)
      out = f"blk.{i}.{names[rest.removesuffix('.weight')]}.weight"
    if out.endswith("norm.weight"):
      x = x + np.float32(1.0)  # llama.cpp's converter: norms stored as 1 + w.
    w.add_tensor(out, np.ascontiguousarray(x))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_gemma3_gguf_loads_to_the_hf_model(tmp_path):
  hf_config = {**testing.TINY_HF_GEMMA3, "layer_types": [
      "sliding_attention", "sliding_attention", "full_attention"]}
  sd = testing.random_hf_state_dict(hf_config, 11)
  hf_cfg, hf_params = hf_loader.load_hf_dir(_write(tmp_path / "hf", hf_config, 11))
  path = _write_gemma3_gguf(tmp_path / "tiny.gguf", hf_config, sd)
  cfg, params = gguf_loader.load_gguf(path)
  assert cfg.layer_types == hf_cfg.layer_types
  # The file does not record these: llama.cpp's rules for gemma3 give them.
  assert cfg.query_pre_attn_scalar == cfg.head_dim == 16
  assert cfg.rope_local_theta == 1e4
  np.testing.assert_allclose(params["layers"]["q_norm"], hf_params["layers"]["q_norm"],
                             atol=1e-7)
  tokens = jnp.asarray(np.random.default_rng(3).integers(3, 128, (2, 12)))
  want = _logits(hf_params, tokens, hf_cfg.replace(query_pre_attn_scalar=16.0))
  np.testing.assert_allclose(_logits(params, tokens, cfg), want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------
# Tokenizers: a sentencepiece tokenizer.model; a directory with none.


def _train_spm(d, add_dummy_prefix):
  """A tiny byte-fallback BPE sentencepiece model, trained here (no download)
  like Llama's (dummy prefix) and Gemma's (none): identity normalizer, no
  extra-whitespace removal."""
  import pathlib
  import sentencepiece as spm
  d = pathlib.Path(d)
  d.mkdir(parents=True, exist_ok=True)
  text = d / "corpus.txt"
  rng = np.random.default_rng(0)
  words = ["insulin", "federated", "learning", "gemma", "token", "the", "of",
           "a", "model", "client", "server", "round", "text", "pair", "café"]
  with open(text, "w", encoding="utf-8") as f:
    for _ in range(400):
      f.write(" ".join(rng.choice(words, 8)) + "\n")
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(d / "m"), vocab_size=300, model_type="bpe",
      byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix,
      user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
      bos_piece="<bos>", unk_piece="<unk>", minloglevel=2)
  return str(d / "m.model")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  """Gemma-style: no dummy prefix."""
  return _train_spm(tmp_path_factory.mktemp("spm"), add_dummy_prefix=False)


SPM_TEXTS = ["insulin federated learning", "  two  spaces", "café 東京 🙂",
             "zzz qqq", "", "a\tb\n\nc", " lead"]
SPM_SPECIAL = "<start_of_turn>user\nhello<end_of_turn>"


@pytest.mark.parametrize("add_dummy_prefix", [False, True])
def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path, add_dummy_prefix):
  """Our ids and text equal sentencepiece's own. With a dummy prefix
  (Llama-2), text holding a user-defined token is the one difference: as in
  llama.cpp, the prefix goes on each piece of text between such tokens,
  where sentencepiece prefixes the whole text once; Gemma has no prefix and
  matches there too."""
  import sentencepiece as spm
  path = _train_spm(tmp_path, add_dummy_prefix)
  sp = spm.SentencePieceProcessor(model_file=path)
  tok = tokenizer_lib.Tokenizer.from_sentencepiece(path)
  assert tok.vocab_size == sp.get_piece_size()
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0) and tok.add_bos
  texts = SPM_TEXTS + ([] if add_dummy_prefix else [SPM_SPECIAL])
  for text in texts:
    ids = tok.encode(text, add_bos=False)
    assert ids == sp.encode(text), text
    assert tok.decode(ids) == sp.decode(ids), text
  assert tok.encode("insulin")[0] == 2


def test_hf_dir_with_only_tokenizer_model_loads(tmp_path, spm_model):
  import shutil
  path = _write(tmp_path / "m", {**testing.TINY_HF_GEMMA3, "vocab_size": 300})
  shutil.copy(spm_model, os.path.join(path, "tokenizer.model"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"chat_template": tokenizer_lib.GEMMA3_CHAT_TEMPLATE,
               "bos_token": "<not_a_token>"}, f)
  with pytest.raises(ValueError, match="<not_a_token>"):  # Not in the vocabulary.
    registry.load(path)
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"chat_template": tokenizer_lib.GEMMA3_CHAT_TEMPLATE}, f)
  model = registry.load(path)
  tok = model.tokenizer
  assert model.config.architecture == "gemma3"
  prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
  assert prompt == "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"
  # The template writes BOS; encode adds no second one.
  assert tok.encode(prompt)[:2] == [tok.bos_id, tok.hf.token_to_id("<start_of_turn>")]
  assert tok.eos_ids == (1, tok.hf.token_to_id("<end_of_turn>"))


def test_hf_dir_without_tokenizer_loads_weights_and_says_so(tmp_path, caplog):
  path = _write(tmp_path / "m", testing.TINY_HF_GEMMA3)
  with caplog.at_level("WARNING"):
    model = registry.load(path)
  assert model.tokenizer is None and "layers" in model.params
  assert "no tokenizer" in caplog.text and "tokenizer.json" in caplog.text


def test_sentencepiece_unigram_is_refused(tmp_path):
  import sentencepiece as spm
  text = tmp_path / "c.txt"
  text.write_text("hello world\n" * 50 + "foo bar baz\n" * 50)
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "u"),
                                 vocab_size=16, model_type="unigram", minloglevel=2)
  with pytest.raises(NotImplementedError, match="unigram"):
    tokenizer_lib.Tokenizer.from_sentencepiece(str(tmp_path / "u.model"))


# ----------------------------------------------------------------------------
# The registry's assembled file.


def test_gemma3_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
  named = registry.NAMED_MODELS["gemma3-270m"]
  if importlib_spec(named.package) is None:
    pytest.skip(registry._install_hint(named, "gemma3-270m"))  # pylint: disable=protected-access
  monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path))
  path = registry.resolve("gemma3-270m")
  assert path == str(tmp_path / named.filename) and os.path.isfile(path)
  hashes = []
  real = registry.file_sha256
  monkeypatch.setattr(registry, "file_sha256", lambda p: hashes.append(p) or real(p))
  assert registry.resolve("gemma3-270m") == path and hashes == []  # stamp: no hash
  with open(path, "r+b") as f:  # A damaged file is hashed and assembled again.
    f.seek(1000)
    f.write(b"\0" * 16)
  assert registry.resolve("gemma3-270m") == path and len(hashes) == 2
  assert real(path) == named.sha256
  assert [e for e in os.listdir(tmp_path) if e.endswith(".part")] == []


def importlib_spec(name):
  import importlib.util
  return importlib.util.find_spec(name)


# ----------------------------------------------------------------------------
# The real Gemma 3 270M (Q4_K_M).


@pytest.fixture(scope="module")
def gemma3_path():
  try:
    return registry.resolve("gemma3-270m")
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.mark.slow
def test_real_gemma3_dequantization_matches_gguf(gemma3_path):
  """Every tensor the loader wrote (Q4_K, Q6_K, Q5_0, Q8_0, F32) equals
  gguf's own reader + ``gguf.quants.dequantize``, transposed into our layout
  and with the norms' stored +1 removed."""
  import gguf
  cfg, params = gguf_loader.load_gguf(gemma3_path)
  reader = gguf.GGUFReader(gemma3_path)
  types = set()
  targets = gguf_loader._targets(cfg, "gemma3")  # pylint: disable=protected-access
  for t in reader.tensors:
    tgt = targets[t.name]
    ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    ref = ref.reshape(tgt.np_shape)
    ref = ref.T if tgt.transpose else ref
    if tgt.shift:
      ref = ref - np.float32(tgt.shift)
    ours = params
    for k in tgt.path:
      ours = ours[k]
    ours = np.asarray(ours if tgt.layer is None else ours[tgt.layer])
    np.testing.assert_array_equal(ours, ref, err_msg=t.name)
    types.add(t.tensor_type.name)
  assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= types


GEMMA3_PROMPTS = ["The capital of France is", "def fibonacci(n):",
                  "Insulin is a hormone that"]


@pytest.mark.slow
def test_real_gemma3_greedy_agrees_with_transformers(gemma3_path):
  """Greedy 16-token continuations of 3 prompts from our sampler are
  transformers' greedy continuations on the same GGUF (dequantized to
  float32): one transformers forward over prompt + our tokens has its argmax
  at every generated position on our next token (so its ``generate`` would
  pick the same 16), and its logits agree with ours to fp32 rounding."""
  import torch
  import transformers
  model = registry.load("gemma3-270m")
  cfg, tok = model.config, model.tokenizer
  assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (18, 640, 262144)
  assert cfg.layer_types.count("full_attention") == 3 and cfg.sliding_window == 512
  assert tok.eos_ids == (1, 106)  # <eos>, and <end_of_turn> of the chat template
  s = sampler_lib.Sampler(cfg, tok, decode="scan")
  out = s(model.params, GEMMA3_PROMPTS, max_new_tokens=16, eos_ids=())
  # The base model (not instruction-tuned): " the capital of the country of
  # France. It is the largest city in France and".
  assert "France" in out.texts[0]
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gemma3_path), gguf_file=os.path.basename(gemma3_path),
      dtype=torch.float32, attn_implementation="eager").eval()
  fwd = jax.jit(lambda p, t: llama.forward(p, t, config=cfg)[0])
  for prompt, ours in zip(GEMMA3_PROMPTS, out.tokens):
    ids = tok.encode(prompt)
    assert ids[0] == 2 and ids[1] != 2  # Gemma wants one BOS first.
    seq = ids + ours
    with torch.no_grad():
      want = ref(torch.tensor([seq])).logits.numpy()[0]
    assert want[len(ids) - 1:-1].argmax(-1).tolist() == ours, prompt
    got = np.asarray(fwd(model.params, jnp.asarray([seq])))[0]
    assert np.abs(got - want).max() < 2e-4, prompt
