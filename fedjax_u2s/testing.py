"""Tiny configurations and fakes shared by the tests."""

from __future__ import annotations

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
