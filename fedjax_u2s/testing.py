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
