"""PEFT-format adapters and merged models round-trip exactly."""

import json
import os

import jax
import numpy as np
import pytest

from fedjax_u2s import export
from fedjax_u2s import lora as lora_lib
from fedjax_u2s import testing
from fedjax_u2s.models import hf_loader
from fedjax_u2s.models import llama


def _trained_adapter(cfg, lcfg, seed=0):
  """An adapter with non-zero B (a fresh one would hide transposition bugs)."""
  lora = lora_lib.init(jax.random.key(seed), cfg, lcfg)
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(
      jax.random.key(seed + 1), x.shape), lora)


def test_peft_round_trip_and_layout(tmp_path):
  cfg = testing.tiny_llama_config()
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
  lora = _trained_adapter(cfg, lcfg)
  export.save_peft(str(tmp_path), lora, lcfg, base_model="tiny")
  pc = json.load(open(tmp_path / export.CONFIG_FILE))
  assert pc["r"] == 4 and pc["lora_alpha"] == 8.0
  assert pc["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  import safetensors.numpy
  t = safetensors.numpy.load_file(str(tmp_path / export.ADAPTER_FILE))
  a = t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
  np.testing.assert_array_equal(a, np.asarray(lora["q"]["a"][1]).T)  # [r, in]
  assert t["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (
      cfg.hidden_size, 4)
  back, lcfg2 = export.load_peft(str(tmp_path), cfg)
  assert lcfg2.target_names == lcfg.target_names and lcfg2.scale == lcfg.scale
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lora)):
    np.testing.assert_array_equal(x, np.asarray(y))


def test_load_peft_errors_name_the_tensor(tmp_path):
  cfg = testing.tiny_llama_config()
  lcfg = lora_lib.LoraConfig(rank=4, targets=("q",))
  export.save_peft(str(tmp_path), _trained_adapter(cfg, lcfg), lcfg)
  with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape"):
    export.load_peft(str(tmp_path), testing.tiny_llama_config(hidden_size=16, head_dim=4))
  with pytest.raises(ValueError, match=r"layers\.2\.self_attn\.q_proj\.lora_A\.weight is missing"):
    export.load_peft(str(tmp_path), testing.tiny_llama_config(num_layers=3))
  os.remove(tmp_path / export.ADAPTER_FILE)
  with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
    export.load_peft(str(tmp_path), cfg)


def test_merged_model_matches_the_adapter(tmp_path):
  cfg = testing.tiny_llama_config()
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("*",))
  params = llama.init_params(jax.random.key(3), cfg)
  lora = _trained_adapter(cfg, lcfg)
  export.save_merged(str(tmp_path), cfg, params, lora, lcfg)
  cfg2, merged = hf_loader.load_hf_dir(str(tmp_path))
  tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, cfg.vocab_size)
  want, _ = llama.forward(params, tokens, config=cfg, lora=lora, lora_config=lcfg)
  got, _ = llama.forward(merged, tokens, config=cfg2)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# transformers and PEFT reading these exports (and PEFT's adapters read here):
# tests/test_interop.py.
