"""The memory planner (fedjax_u2s/plan.py) against what a round really holds."""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_u2s import config_blocks
from fedjax_u2s import lora as lora_lib
from fedjax_u2s import plan
from fedjax_u2s import testing
from fedjax_u2s import train as train_lib
from fedjax_u2s.federated import objectives
from fedjax_u2s.federated import parallel
from fedjax_u2s.federated.state import ClientBatches
from fedjax_u2s.models import llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = testing.tiny_llama_config(vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_heads=4, num_kv_heads=2, head_dim=16)


def _config(**overrides):
  c = config_blocks.base_config()
  c.lora.rank = 4
  c.lora.dropout = 0.0
  c.federated.clients_per_round = 4
  c.federated.clients_per_chunk = 1
  c.train.max_length = 16
  c.train.batch_size = 2
  c.train.local_steps = 2
  c.train.pack = False
  return config_blocks.set_fields(c, **overrides)


def _real_round(config):
  """One round with real arrays; bytes on device 0 of the inputs, and of
  every live array after the round (inputs donated, outputs kept)."""
  mesh = parallel.make_mesh(1)
  lcfg = train_lib.lora_config_from(config.lora)
  loss_fn = lambda *a: objectives.causal_lm_loss(*a, model_config=MODEL, lora_config=lcfg)
  base = llama.init_params(jax.random.key(0), MODEL)
  alg = parallel.build(config.federated, loss_fn, mesh,
                       base_sharding=parallel.base_sharding(base, mesh))
  frozen = parallel.shard_base(base, mesh)
  state = parallel.replicate(alg.init(lora_lib.init(jax.random.key(1), MODEL, lcfg),
                                      jax.random.key(2), 4), mesh)
  structs = plan.batch_structs(config, 4)
  rs = np.random.default_rng(0)
  batch = {k: (rs.integers(1, 128, x.shape).astype(np.int32) if k == "tokens"
               else np.ones(x.shape, bool)) for k, x in structs.batch.items()}
  batches = parallel.shard_clients(ClientBatches(
      batch=batch, step_mask=np.ones(structs.step_mask.shape, bool),
      num_examples=np.ones(4, np.float32), client_ids=np.arange(4, dtype=np.int32)), mesh)
  device = jax.devices()[0]
  on_device = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree)
                               for s in x.addressable_shards if s.device == device)
  inputs = {"base": on_device(frozen), "state": on_device(state),
            "batches": on_device(batches)}
  compiled = alg.apply.lower(state, frozen, batches).compile()
  del base
  state, metrics = compiled(state, frozen, batches)
  jax.block_until_ready(state)
  live = sum(on_device(x) for x in jax.live_arrays())
  return inputs, live, compiled.memory_analysis()


def test_plan_matches_the_real_allocation():
  config = _config()
  p = plan.estimate(config, devices=1, device_memory_gb=1.0, model_config=MODEL)
  inputs, live, mem = _real_round(config)
  # The parts computed from shapes: what the arrays really hold.
  for name, want, got in (("base", inputs["base"], p.base_shard),
                          ("state", inputs["state"], p.server_state),
                          ("batches", inputs["batches"], p.client_batches)):
    assert abs(got - want) <= 0.15 * want, (name, got, want)
  assert abs(p.arguments - sum(inputs.values())) <= 0.15 * sum(inputs.values())
  # The compiled step's own numbers are those of the real step.
  assert p.temporaries == mem.temp_size_in_bytes
  # Resident after the round (the base, the new state, the batches and the
  # metrics): the planner's arguments + non-aliased outputs.
  resident = p.arguments + p.outputs - p.aliased
  assert abs(resident - live) <= 0.15 * live, (resident, live)
  assert p.fits and p.peak < 1e9 and p.cpu_upcast == 0
  assert p.step_clients > 0 and p.clients_per_step == 1


def test_more_clients_per_step_need_more_memory_and_search_finds_the_edge():
  config = _config()
  peaks = [plan.estimate(config, devices=1, clients_per_chunk=k, model_config=MODEL).peak
           for k in (1, 2, 3)]
  assert peaks == sorted(peaks) and peaks[0] < peaks[2], peaks
  memory_gb = (peaks[1] + peaks[2]) / 2 / plan.GB
  best, tried = plan.search(config, devices=1, device_memory_gb=memory_gb,
                            model_config=MODEL)
  assert best.clients_per_chunk == 2 and best.fits
  assert {t.clients_per_chunk: t.fits for t in tried}[3] is False
  none, _ = plan.search(config, devices=1, device_memory_gb=peaks[0] / 2 / plan.GB,
                        model_config=MODEL)
  assert none is None


def test_cpu_weight_upcast_is_counted_for_bf16_only():
  bf16 = _config(**{"model.dtype": "bfloat16", "model.param_dtype": "bfloat16"})
  mc = dataclasses.replace(MODEL, dtype="bfloat16", param_dtype="bfloat16")
  p = plan.estimate(bf16, devices=1, model_config=mc)
  # XLA:CPU converts the stacked bf16 weights to f32: at most all of them.
  base_f32 = 2 * p.base_shard
  assert 0 < p.cpu_upcast <= base_f32, (p.cpu_upcast, base_f32)
  assert p.peak == p.compiled_peak - p.cpu_upcast


def test_preset_cli_on_emulated_devices():
  """The Llama-3-8B preset's layout, shrunk, on 4 emulated devices (v4-8)."""
  small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
  cmd = [sys.executable, "-m", "fedjax_u2s.plan",
         "--config=configs/plans/llama3_8b.py:v4-8", "--search",
         "--config.train.max_length=32", "--config.federated.clients_per_round=8",
         *[f"--config.plan.hf_config.{k}={v}" for k, v in small.items()]]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "4 cpu devices to compile on" in out
  assert "devices 4 = 1 clients x 4 model" in out
  # 8 clients a round over 1 clients-axis device: the search stops at 8.
  assert "Largest that fits: clients_per_chunk=8 (8 clients per step)" in out, out
  assert re.search(r"\| base shard \| 0\.000 \|", out)


def test_unknown_hardware_and_gguf_model_are_named():
  with pytest.raises(ValueError, match=r"Unknown hardware 'v9'"):
    plan.preset_config({}, "v9")
  with pytest.raises(ValueError, match=r"config\.plan\.hf_config"):
    plan.model_config_from(config_blocks.base_config())
