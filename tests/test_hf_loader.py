"""Loading and saving Hugging Face model directories, good and bad."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from fedjax_u2s import testing
from fedjax_u2s.models import hf_loader, llama
from fedjax_u2s.models.config import UnsupportedModelError


def _write(path, hf_config=None, state_dict=None, *, seed=0):
  """A model directory from a config dict and an HF state dict."""
  hf_config = testing.TINY_HF_LLAMA if hf_config is None else hf_config
  if state_dict is None:
    state_dict = testing.random_hf_state_dict(hf_config, seed)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f)
  safetensors.numpy.save_file(state_dict, os.path.join(path, "model.safetensors"))
  return str(path)


def _index(path):
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    return json.load(f)["weight_map"]


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               a, b)


@pytest.mark.parametrize("name", sorted(testing.TINY_HF_CONFIGS))
def test_load_maps_names_and_layout(tmp_path, name):
  hf_config = testing.TINY_HF_CONFIGS[name]
  sd = testing.random_hf_state_dict(hf_config, 0)
  config, params = hf_loader.load_hf_dir(_write(tmp_path, hf_config, sd))
  want = jax.tree.map(lambda s: (s.shape, s.dtype), llama.param_shapes(config))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == want
  np.testing.assert_array_equal(params["embed"], sd["model.embed_tokens.weight"])
  np.testing.assert_array_equal(params["final_norm"], sd["model.norm.weight"])
  np.testing.assert_array_equal(params["layers"]["q"]["w"][1],
                                sd["model.layers.1.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(params["layers"]["down"]["w"][0],
                                sd["model.layers.0.mlp.down_proj.weight"].T)
  # Llama's post_attention_layernorm is the MLP's input norm; Gemma's is the
  # norm on the attention's output, and pre_feedforward_layernorm the MLP's.
  mlp_norm = ("pre_feedforward_layernorm" if config.post_norms
              else "post_attention_layernorm")
  np.testing.assert_array_equal(params["layers"]["mlp_norm"][1],
                                sd[f"model.layers.1.{mlp_norm}.weight"])
  if config.post_norms:
    np.testing.assert_array_equal(params["layers"]["post_attn_norm"][1],
                                  sd["model.layers.1.post_attention_layernorm.weight"])
  if config.qk_norm:
    np.testing.assert_array_equal(params["layers"]["k_norm"][1],
                                  sd["model.layers.1.self_attn.k_norm.weight"])
  if config.qkv_bias:
    np.testing.assert_array_equal(params["layers"]["k"]["b"][1],
                                  sd["model.layers.1.self_attn.k_proj.bias"])
  if config.tie_word_embeddings:
    assert "lm_head" not in params
  else:
    np.testing.assert_array_equal(params["lm_head"], sd["lm_head.weight"].T)


@pytest.mark.parametrize("name", sorted(testing.TINY_HF_CONFIGS))
def test_save_load_round_trip_is_exact(tmp_path, name):
  config, params = hf_loader.load_hf_dir(
      _write(tmp_path / "a", testing.TINY_HF_CONFIGS[name]))
  hf_loader.save_hf_dir(tmp_path / "b", config, params)
  config2, params2 = hf_loader.load_hf_dir(tmp_path / "b")
  _assert_trees_equal(params2, params)
  assert config2.replace(name="") == config.replace(name="")
  # With the original config.json, the files are identical tensor by tensor.
  hf_loader.save_hf_dir(tmp_path / "c", config, params,
                        hf_config=testing.TINY_HF_CONFIGS[name])
  with open(tmp_path / "c" / "config.json") as f:
    assert json.load(f) == testing.TINY_HF_CONFIGS[name]
  original = safetensors.numpy.load_file(tmp_path / "a" / "model.safetensors")
  written = safetensors.numpy.load_file(tmp_path / "c" / "model.safetensors")
  assert original.keys() == written.keys()
  for k in original:
    np.testing.assert_array_equal(written[k], original[k], err_msg=k)


def test_sharded_checkpoint_with_index_round_trip(tmp_path):
  config, params = hf_loader.load_hf_dir(_write(tmp_path / "a"))
  hf_loader.save_hf_dir(tmp_path / "b", config, params, max_shard_bytes=40_000)
  shards = sorted(f for f in os.listdir(tmp_path / "b") if f.endswith(".safetensors"))
  assert len(shards) > 2 and "model.safetensors" not in shards
  assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s)
             for s in shards)
  with open(tmp_path / "b" / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert set(index["weight_map"].values()) == set(shards)
  _, params2 = hf_loader.load_hf_dir(tmp_path / "b")
  _assert_trees_equal(params2, params)
  # Shards without their index are read too.
  os.remove(tmp_path / "b" / "model.safetensors.index.json")
  _, params3 = hf_loader.load_hf_dir(tmp_path / "b")
  _assert_trees_equal(params3, params)


def test_bf16_checkpoint_loads_exactly_in_fp32_and_bf16(tmp_path):
  config, params = hf_loader.load_hf_dir(_write(tmp_path / "a"))
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  hf_loader.save_hf_dir(tmp_path / "b", config.replace(param_dtype="bfloat16"),
                        params16)
  _, p32 = hf_loader.load_hf_dir(tmp_path / "b")
  _assert_trees_equal(p32, jax.tree.map(lambda x: x.astype(jnp.float32), params16))
  _, p16 = hf_loader.load_hf_dir(tmp_path / "b", param_dtype="bfloat16")
  _assert_trees_equal(p16, params16)


def test_config_overrides_and_param_dtype(tmp_path):
  config, params = hf_loader.load_hf_dir(_write(tmp_path), param_dtype="bfloat16",
                                         remat=True)
  assert config.remat and config.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_transformers5_rope_parameters_are_read(tmp_path):
  hf = dict(testing.TINY_HF_LLAMA)
  rp = dict(hf.pop("rope_scaling"), rope_theta=hf.pop("rope_theta"))
  hf["rope_parameters"] = rp  # as transformers>=5 writes config.json
  config, _ = hf_loader.load_hf_dir(_write(tmp_path, hf))
  assert config.rope_theta == 500000.0
  assert config.rope_scaling.original_max_position_embeddings == 64


def test_tied_checkpoint_with_identical_lm_head_is_accepted(tmp_path):
  hf = testing.TINY_HF_QWEN2
  sd = testing.random_hf_state_dict(hf, 0)
  sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()
  _, params = hf_loader.load_hf_dir(_write(tmp_path / "a", hf, sd))
  assert "lm_head" not in params
  sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
  with pytest.raises(ValueError, match=r"'lm_head\.weight' differs.*tie_word_embeddings"):
    hf_loader.load_hf_dir(_write(tmp_path / "b", hf, sd))


def test_old_rotary_inv_freq_buffers_are_ignored(tmp_path):
  sd = testing.random_hf_state_dict(testing.TINY_HF_LLAMA, 0)
  sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  hf_loader.load_hf_dir(_write(tmp_path, state_dict=sd))


# Bad inputs: each error names the file and, where there is one, the tensor.


def test_missing_config_json(tmp_path):
  path = _write(tmp_path)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(FileNotFoundError, match=r"config\.json not found.*needs"):
    hf_loader.load_hf_dir(path)


def test_not_a_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope: not a directory"):
    hf_loader.load_hf_dir(tmp_path / "nope")


def test_no_safetensors_file(tmp_path):
  path = _write(tmp_path)
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
    hf_loader.load_hf_dir(path)


def test_pickle_checkpoint_is_refused(tmp_path):
  path = _write(tmp_path)
  os.remove(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
    f.write(b"\x80\x02not really a pickle")
  with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safe_serialization=True"):
    hf_loader.load_hf_dir(path)


def test_truncated_safetensors(tmp_path):
  path = _write(tmp_path)
  file = os.path.join(path, "model.safetensors")
  with open(file, "rb") as f:
    data = f.read()
  with open(file, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match=re.escape(file) + r": not a valid safetensors"):
    hf_loader.load_hf_dir(path)


def test_garbage_safetensors(tmp_path):
  path = _write(tmp_path)
  file = os.path.join(path, "model.safetensors")
  with open(file, "wb") as f:
    f.write(np.random.default_rng(0).bytes(5000))
  with pytest.raises(ValueError, match=re.escape(file) + r": not a valid safetensors"):
    hf_loader.load_hf_dir(path)


def test_index_naming_missing_shard(tmp_path):
  config, params = hf_loader.load_hf_dir(_write(tmp_path / "a"))
  hf_loader.save_hf_dir(tmp_path / "b", config, params, max_shard_bytes=40_000)
  shard = _index(tmp_path / "b")["model.layers.1.mlp.up_proj.weight"]
  os.remove(tmp_path / "b" / shard)
  with pytest.raises(FileNotFoundError,
                     match=rf"index\.json names shard '{re.escape(shard)}'"):
    hf_loader.load_hf_dir(tmp_path / "b")


def test_index_pointing_at_wrong_shard(tmp_path):
  config, params = hf_loader.load_hf_dir(_write(tmp_path / "a"))
  hf_loader.save_hf_dir(tmp_path / "b", config, params, max_shard_bytes=40_000)
  index_file = tmp_path / "b" / "model.safetensors.index.json"
  index = json.loads(index_file.read_text())
  wrong = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
  assert index["weight_map"]["model.norm.weight"] != wrong
  index["weight_map"]["model.norm.weight"] = wrong
  index_file.write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"places tensor 'model\.norm\.weight' in "
                     rf".*{re.escape(wrong)}, which does not hold it"):
    hf_loader.load_hf_dir(tmp_path / "b")


def test_missing_tensor(tmp_path):
  sd = testing.random_hf_state_dict(testing.TINY_HF_LLAMA, 0)
  del sd["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"
                     r"\.weight'.*model\.safetensors"):
    hf_loader.load_hf_dir(_write(tmp_path, state_dict=sd))


def test_missing_lm_head_when_untied(tmp_path):
  sd = testing.random_hf_state_dict(testing.TINY_HF_LLAMA, 0)
  del sd["lm_head.weight"]
  with pytest.raises(ValueError, match=r"missing tensor 'lm_head\.weight'"):
    hf_loader.load_hf_dir(_write(tmp_path, state_dict=sd))


def test_extra_tensor(tmp_path):
  sd = testing.random_hf_state_dict(testing.TINY_HF_LLAMA, 0)
  sd["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn"
                     r"\.q_proj\.bias' in .*model\.safetensors"):
    hf_loader.load_hf_dir(_write(tmp_path, state_dict=sd))


def test_extra_layer(tmp_path):
  sd = testing.random_hf_state_dict(testing.TINY_HF_LLAMA, 0)
  sd["model.layers.2.input_layernorm.weight"] = np.ones(64, np.float32)
  with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.2\."):
    hf_loader.load_hf_dir(_write(tmp_path, state_dict=sd))


def test_wrong_shape(tmp_path):
  sd = testing.random_hf_state_dict(testing.TINY_HF_LLAMA, 0)
  sd["model.layers.1.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
  with pytest.raises(ValueError, match=(
      r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' "
      r"has shape \[64, 64\], expected \[32, 64\]")):
    hf_loader.load_hf_dir(_write(tmp_path, state_dict=sd))


def test_integer_tensor_is_refused(tmp_path):
  sd = testing.random_hf_state_dict(testing.TINY_HF_LLAMA, 0)
  sd["model.norm.weight"] = np.ones(64, np.int32)
  with pytest.raises(ValueError, match=r"'model\.norm\.weight' has dtype I32"):
    hf_loader.load_hf_dir(_write(tmp_path, state_dict=sd))


def test_unknown_model_type(tmp_path):
  hf = dict(testing.TINY_HF_LLAMA, model_type="mistral",
            architectures=["MistralForCausalLM"])
  path = _write(tmp_path, hf, testing.random_hf_state_dict(testing.TINY_HF_LLAMA, 0))
  with pytest.raises(UnsupportedModelError, match=r"config\.json: model_type='mistral'"):
    hf_loader.load_hf_dir(path)


def test_invalid_config_json(tmp_path):
  path = _write(tmp_path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
    hf_loader.load_hf_dir(path)


def test_save_refuses_params_that_do_not_fit(tmp_path):
  config, params = hf_loader.load_hf_dir(_write(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"params have shapes"):
    hf_loader.save_hf_dir(tmp_path / "b", config.replace(num_layers=3), params)
  with pytest.raises(ValueError, match=r"hf_config does not describe config: "
                     r"hidden_size"):
    hf_loader.save_hf_dir(tmp_path / "b", config, params,
                          hf_config=dict(testing.TINY_HF_LLAMA, hidden_size=32))
