"""The decoder against transformers' PyTorch Llama/Qwen2 at fp32 tolerance.

The golden logits in testdata/golden_logits.npz come from
tests/reference/make_golden_logits.py (run in .venv-ref, which has torch); the
golden comparisons need no torch. ``test_live_transformers`` redoes the
comparison against transformers directly; torch and transformers are in the
``[test]`` extra, so it always runs (a missing torch fails it, not skips it).

Observed max |error| against transformers at real positions (CPU, fp32) is
about 2e-7 for every config; ATOL leaves 50x headroom.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from fedjax_u2s import testing
from fedjax_u2s.models import hf_loader, llama

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "testdata", "golden_logits.npz")
REFERENCE_SCRIPT = os.path.join(HERE, "reference", "make_golden_logits.py")
ATOL = 1e-5
CASES = ("full", "left_padded")


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  # fp32 parity needs fp32 matmuls; TPUs/GPUs default to bf16/tf32 passes.
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as f:
    return {k: f[k] for k in f.files}


def _checksum(sd):
  # Must match state_dict_checksum in tests/reference/make_golden_logits.py.
  flat = np.concatenate([sd[k].astype(np.float64).ravel() for k in sorted(sd)])
  return np.array([flat.sum(), (flat * flat).sum()])


def _write_hf_dir(path, hf_config, state_dict):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f)
  safetensors.numpy.save_file(state_dict, os.path.join(path, "model.safetensors"))
  return path


def _load(tmp_path, name, seed, **overrides):
  hf_config = testing.TINY_HF_CONFIGS[name]
  sd = testing.random_hf_state_dict(hf_config, seed)
  path = _write_hf_dir(os.path.join(tmp_path, name), hf_config, sd)
  return hf_loader.load_hf_dir(path, **overrides)


def _max_err(logits, ref, mask):
  """Max |logits - ref| over real (mask True) positions."""
  return float(np.abs(np.asarray(logits) - ref)[np.asarray(mask)].max())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", sorted(testing.TINY_HF_CONFIGS))
def test_logits_match_golden(tmp_path, golden, name, case):
  seed = int(golden[f"{name}/seed"])
  sd = testing.random_hf_state_dict(testing.TINY_HF_CONFIGS[name], seed)
  np.testing.assert_allclose(
      _checksum(sd), golden[f"{name}/checksum"], rtol=1e-9, err_msg=(
          "random_hf_state_dict or the tiny configs changed since the golden "
          "logits were made: rerun tests/reference/make_golden_logits.py."))
  config, params = _load(tmp_path, name, seed)
  g = {k: golden[f"{name}/{case}/{k}"] for k in ("tokens", "mask", "positions",
                                                 "logits")}
  # The decoder's default positions are the left-padding rule of the golden run.
  logits, _ = llama.forward(params, jnp.asarray(g["tokens"]), config=config,
                            input_mask=jnp.asarray(g["mask"]))
  assert logits.dtype == jnp.float32
  assert logits.shape == g["logits"].shape
  err = _max_err(logits, g["logits"], g["mask"])
  print(f"{name}/{case}: max |jax - transformers| = {err:.2e}")
  assert err <= ATOL, f"{name}/{case}: max error {err:.3e} > {ATOL}"
  # Explicit positions give the same answer.
  logits2, _ = llama.forward(params, jnp.asarray(g["tokens"]), config=config,
                             input_mask=jnp.asarray(g["mask"]),
                             positions=jnp.asarray(g["positions"]))
  assert _max_err(logits2, g["logits"], g["mask"]) <= ATOL


def test_golden_comparison_is_sensitive(tmp_path, golden):
  """Guards the tolerance: dropping llama3 RoPE scaling must fail it widely."""
  config, params = _load(tmp_path, "llama", int(golden["llama/seed"]))
  assert config.rope_scaling is not None
  g = "llama/full/"
  logits, _ = llama.forward(params, jnp.asarray(golden[g + "tokens"]),
                            config=config.replace(rope_scaling=None))
  assert _max_err(logits, golden[g + "logits"], golden[g + "mask"]) > 100 * ATOL


def _reference_module():
  spec = importlib.util.spec_from_file_location("make_golden_logits",
                                                REFERENCE_SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", sorted(testing.TINY_HF_CONFIGS))
def test_live_transformers(tmp_path, name):
  """Against transformers directly, through a directory it saved itself."""
  ref = _reference_module()  # Imports torch and transformers.
  hf_config = testing.TINY_HF_CONFIGS[name]
  model = ref.build_hf_model(hf_config, testing.random_hf_state_dict(hf_config, 7))
  # A directory as transformers writes it (its own config.json field names).
  model.save_pretrained(tmp_path, safe_serialization=True)
  config, params = hf_loader.load_hf_dir(tmp_path)
  for case_name, case in ref.cases(hf_config["vocab_size"]).items():
    want = ref.hf_logits(model, case)
    got, _ = llama.forward(params, jnp.asarray(case["tokens"]), config=config,
                           input_mask=jnp.asarray(case["mask"]))
    err = _max_err(got, want, case["mask"])
    print(f"live {name}/{case_name}: max |jax - transformers| = {err:.2e}")
    assert err <= ATOL, f"{name}/{case_name}: max error {err:.3e} > {ATOL}"


@pytest.mark.parametrize("name", sorted(testing.TINY_HF_CONFIGS))
def test_live_save_hf_dir_is_read_by_transformers(tmp_path, name):
  """What save_hf_dir writes, transformers' from_pretrained reads faithfully."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  ref = _reference_module()
  config, params = _load(tmp_path, name, 8)
  hf_loader.save_hf_dir(tmp_path / "export", config, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "export", attn_implementation="eager", dtype=torch.float32).eval()
  for case in ref.cases(config.vocab_size).values():
    want, _ = llama.forward(params, jnp.asarray(case["tokens"]), config=config,
                            input_mask=jnp.asarray(case["mask"]))
    err = _max_err(ref.hf_logits(model, case), want, case["mask"])
    assert err <= ATOL, f"{name}: max error {err:.3e} > {ATOL}"


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_kv_cache_decoding_matches_full_recompute(tmp_path, name, prefill,
                                                  per_layer):
  """Prefill, a 2-token chunk, then 1-token steps == one full forward pass.

  per_layer: unrolled layers over a cache of per-layer buffers (the
  sampler's default) instead of the layer scan over a stacked cache.
  """
  config, params = _load(tmp_path, name, 3)
  if per_layer:
    params = llama.unstack_layers(params)
  rng = np.random.default_rng(0)
  prompt_len, total = 7, 12
  tokens = rng.integers(3, config.vocab_size, (3, total))
  mask = np.ones(tokens.shape, bool)
  mask[0, :3] = False  # left padding of different lengths
  mask[2, :6] = False
  tokens[~mask] = 0
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  full, _ = llama.forward(params, tokens, config=config, input_mask=mask)

  step = jax.jit(functools.partial(llama.forward, config=config))
  cache = llama.init_cache(config, batch_size=3, max_length=16,  # spare slots
                           per_layer=per_layer)
  assert cache.per_layer == per_layer and cache.max_length == 16
  logits, cache = jax.jit(functools.partial(llama.forward, config=config,
                                            prefill=prefill))(
      params, tokens[:, :prompt_len], input_mask=mask[:, :prompt_len], cache=cache)
  assert _max_err(logits, full[:, :prompt_len], mask[:, :prompt_len]) <= 1e-5
  t = prompt_len
  for width in (2, 1, 1, 1):
    logits, cache = step(params, tokens[:, t:t + width], cache=cache)
    np.testing.assert_allclose(logits, full[:, t:t + width], atol=1e-5, rtol=0)
    t += width
  assert t == total and int(cache.index) == total
  np.testing.assert_array_equal(cache.valid[:, :total], mask)
  assert not cache.valid[:, total:].any()


def _loss(params, tokens, config):
  logits, _ = llama.forward(params, tokens[:, :-1], config=config)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def test_remat_gives_same_logits_and_gradients(tmp_path):
  config, params = _load(tmp_path, "llama_bias", 4)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 128, (2, 10)))
  remat = config.replace(remat=True)
  l0, _ = llama.forward(params, tokens, config=config)
  l1, _ = llama.forward(params, tokens, config=remat)
  np.testing.assert_allclose(l1, l0, atol=1e-6, rtol=0)
  g0 = jax.jit(jax.grad(functools.partial(_loss, config=config)))(params, tokens)
  g1 = jax.jit(jax.grad(functools.partial(_loss, config=remat)))(params, tokens)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               g1, g0)
  # The gradient reaches every parameter (nothing is cut off by remat).
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g1))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_compute_is_close_to_fp32(tmp_path, param_dtype):
  """bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%) per matmul input.

  Over two layers that amounts to about 1% of the logits' scale; we allow 3%
  of the largest fp32 logit per element and 3% relative RMS error, and require
  the argmax to agree almost everywhere. Loose by nature: this checks that the
  bf16 path runs and is not broken, not bit-level parity.
  """
  config, params = _load(tmp_path, "llama", 5)
  config16, params16 = _load(tmp_path, "llama", 5, dtype="bfloat16",
                             param_dtype=param_dtype)
  assert all(x.dtype == jnp.dtype(param_dtype) for x in jax.tree.leaves(params16))
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, 128, (2, 12)))
  ref, _ = llama.forward(params, tokens, config=config)
  got, _ = llama.forward(params16, tokens, config=config16)
  assert got.dtype == jnp.float32 and bool(jnp.isfinite(got).all())
  ref, got = np.asarray(ref), np.asarray(got)
  scale = np.abs(ref).max()
  max_err = np.abs(got - ref).max()
  rel_rms = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  print(f"bf16 ({param_dtype} params): max err {max_err:.2e} of scale "
        f"{scale:.2e}, relative RMS {rel_rms:.2e}")
  assert max_err <= 0.03 * scale
  assert rel_rms <= 0.03
  assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.9


def test_unstacked_layers_give_the_same_logits_and_cache():
  """forward over unstack_layers(params) (unrolled) == stacked (scanned)."""
  config = testing.tiny_llama_config()
  params = llama.init_params(jax.random.key(0), config, std=0.1)
  tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, config.vocab_size)
  unstacked = llama.unstack_layers(params)
  assert isinstance(unstacked["layers"], tuple) and len(unstacked["layers"]) == 2
  assert llama.unstack_layers(unstacked) is unstacked
  a, _ = llama.forward(params, tokens, config=config)
  b, _ = llama.forward(unstacked, tokens, config=config)
  np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  cache = llama.init_cache(config, 2, 9)
  _, ca = llama.forward(params, tokens, config=config, cache=cache)
  _, cb = llama.forward(unstacked, tokens, config=config, cache=cache)
  np.testing.assert_allclose(ca.k, cb.k, atol=1e-6, rtol=0)
  np.testing.assert_allclose(ca.v, cb.v, atol=1e-6, rtol=0)
  # A per-layer cache holds the same keys and values, layer by layer, and
  # the next token sees the same logits through it.
  per_layer = llama.init_cache(config, 2, 9, per_layer=True)
  _, cc = llama.forward(unstacked, tokens, config=config, cache=per_layer)
  assert isinstance(cc.k, tuple) and len(cc.k) == config.num_layers
  np.testing.assert_allclose(ca.k, jnp.stack(cc.k), atol=1e-6, rtol=0)
  np.testing.assert_allclose(ca.v, jnp.stack(cc.v), atol=1e-6, rtol=0)
  np.testing.assert_array_equal(ca.valid, cc.valid)
  nxt = tokens[:, :1]
  la, _ = llama.forward(params, nxt, config=config, cache=ca)
  lc, _ = llama.forward(unstacked, nxt, config=config, cache=cc)
  np.testing.assert_allclose(la, lc, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="per-layer KV cache needs unstacked"):
    llama.forward(params, tokens, config=config, cache=per_layer)


@pytest.mark.parametrize("per_layer", [False, True])
def test_grow_cache_after_a_scanned_prefill(per_layer):
  """The sampler's path: prefill over the prompt's slots with the layer scan,
  grow the cache (and split it per layer), decode: == one full forward."""
  config = testing.tiny_llama_config()
  params = llama.init_params(jax.random.key(0), config, std=0.1)
  tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, config.vocab_size)
  mask = jnp.ones((2, 7), bool).at[0, :2].set(False)
  full, _ = llama.forward(params, tokens, config=config, input_mask=mask)
  _, cache = llama.forward(params, tokens[:, :5], config=config, input_mask=mask[:, :5],
                           cache=llama.init_cache(config, 2, 5), prefill=True)
  cache = llama.grow_cache(cache, 9, per_layer=per_layer)
  assert cache.per_layer == per_layer and cache.max_length == 9
  assert int(cache.index) == 5 and not cache.valid[:, 5:].any()
  decode_params = llama.unstack_layers(params) if per_layer else params
  for t in (5, 6):
    logits, cache = llama.forward(decode_params, tokens[:, t:t + 1], config=config,
                                  cache=cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="grow_cache"):
    llama.grow_cache(cache, 8, per_layer=per_layer)
