"""Writes tests/testdata/golden_logits.npz: logits of the tiny HF configs from
transformers' PyTorch Llama/Qwen2, the reference for tests/test_model_parity.py.

Run it in the reference venv (CPU torch; never install torch into .venv)::

    python3.11 -m venv .venv-ref
    .venv-ref/bin/pip install torch==2.13.0 transformers safetensors numpy \
        "jax[cpu]" flax jinja2 pytest ml-collections tokenizers gguf
    .venv-ref/bin/pip install --no-deps -e .
    .venv-ref/bin/python tests/reference/make_golden_logits.py

For each config in ``fedjax_u2s.testing.TINY_HF_CONFIGS`` it builds the
transformers model from the config dict (fp32, eager attention), loads
``random_hf_state_dict(config, SEEDS[name])`` into it and records two cases,
each a batch of 2 rows of 12 tokens:

* ``full``: no padding, default positions 0..11.
* ``left_padded``: row 0 left-padded with 5 pad tokens (id 0), row 1 full;
  ``attention_mask`` marks the padding and ``position_ids`` are
  ``max(cumsum(mask) - 1, 0)``, which is what transformers' ``generate`` uses
  for left padding at the real tokens (it writes 1 at the pads; the pads'
  positions do not reach the real tokens, whose keys never see the pads).

Logits at padding positions are stored but meaningless; the test compares real
positions only. Re-run this script whenever ``random_hf_state_dict`` or the
tiny configs change: the npz stores a checksum of each state dict, and the
test fails with a pointer here when they drift.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import transformers

from fedjax_u2s import testing

SEEDS = {"llama": 0, "qwen2": 1, "llama_bias": 2, "gemma3": 3, "gemma3_scaled": 4,
         "qwen3": 5}
PAD_ID = 0
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                   "testdata", "golden_logits.npz")


def state_dict_checksum(sd: dict[str, np.ndarray]) -> np.ndarray:
  """[2] float64: sum and sum of squares over all tensors, in name order."""
  flat = np.concatenate([sd[k].astype(np.float64).ravel() for k in sorted(sd)])
  return np.array([flat.sum(), (flat * flat).sum()])


def build_hf_model(hf_config: dict, state_dict: dict[str, np.ndarray]):
  """The transformers PyTorch model of ``hf_config`` holding ``state_dict``."""
  kw = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")}
  config = transformers.AutoConfig.for_model(hf_config["model_type"], **kw)
  model = transformers.AutoModelForCausalLM.from_config(
      config, attn_implementation="eager", dtype=torch.float32)
  assert model.config._attn_implementation == "eager"
  result = model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=False)
  tied = hf_config.get("tie_word_embeddings", False)
  allowed_missing = {"lm_head.weight"} if tied else set()
  if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
    raise RuntimeError(f"state dict mismatch: {result}")
  if tied:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  return model.eval()


def cases(vocab_size: int) -> dict[str, dict[str, np.ndarray]]:
  rng = np.random.default_rng(1234)
  tokens = rng.integers(3, vocab_size, size=(2, 12)).astype(np.int32)
  full = {"tokens": tokens, "mask": np.ones_like(tokens, dtype=bool),
          "positions": np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12)).copy()}
  padded = rng.integers(3, vocab_size, size=(2, 12)).astype(np.int32)
  mask = np.ones_like(padded, dtype=bool)
  mask[0, :5] = False
  padded[~mask] = PAD_ID
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return {"full": full,
          "left_padded": {"tokens": padded, "mask": mask, "positions": positions}}


def hf_logits(model, case: dict[str, np.ndarray]) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(case["tokens"]).long(),
                attention_mask=torch.from_numpy(case["mask"]).long(),
                position_ids=torch.from_numpy(case["positions"]).long(),
                use_cache=False)
  return out.logits.float().numpy()


def main() -> None:
  torch.manual_seed(0)
  out = {"meta": np.array(
      f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"python {sys.version.split()[0]}")}
  for name, hf_config in testing.TINY_HF_CONFIGS.items():
    sd = testing.random_hf_state_dict(hf_config, SEEDS[name])
    model = build_hf_model(hf_config, sd)
    out[f"{name}/seed"] = np.array(SEEDS[name])
    out[f"{name}/checksum"] = state_dict_checksum(sd)
    for case_name, case in cases(hf_config["vocab_size"]).items():
      for k, v in case.items():
        out[f"{name}/{case_name}/{k}"] = v
      out[f"{name}/{case_name}/logits"] = hf_logits(model, case).astype(np.float32)
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  np.savez_compressed(OUT, **out)
  print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes): "
        f"{sorted(out)}")


if __name__ == "__main__":
  main()
