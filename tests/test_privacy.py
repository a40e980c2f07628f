"""Client-level DP (DP-FedAvg): clipping, noise, accountant, resume, refusals.

The toy model is the 1-D least squares of ``test_federated_core``: client 0's
delta is 1.5 and client 1's is 0 after one round from w = 0 (worked out there),
so the DP round's numbers follow by hand. Noise statistics use a model whose
updates are exactly zero, so the server step adds pure noise.
"""

from __future__ import annotations

import os

import dp_accounting
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedjax_u2s import config_blocks
from fedjax_u2s import testing
from fedjax_u2s import train
from fedjax_u2s.federated import algorithms
from fedjax_u2s.federated import privacy
from fedjax_u2s.federated.config import AlgorithmConfig
from fedjax_u2s.federated.state import ClientBatches
from fedjax_u2s.models import llama


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


squares_loss = testing.squares_loss


def _config(dp=None, **kw) -> ml_collections.ConfigDict:
  """Plain SGD at lr 0.5, constant lr, all clients in one step; DP on."""
  return testing.federated_config(**{
      "client_optimizer": "sgd", "client_lr": 0.5, "grad_clip": 0.0,
      "lr_schedule": "constant", "warmup_rounds": 0, "clients_per_chunk": 0,
      "clients_per_round": 2,
      "dp": {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 0.0,
             **(dp or {})},
      **kw})


_hand_batches = testing.hand_round_batches


def _one_round(cfg, w0=0.0):
  alg = algorithms.build(cfg, squares_loss)
  state = alg.init({"w": jnp.full((1,), w0, jnp.float32)}, jax.random.key(0), 4)
  return jax.jit(alg.apply)(state, None, _hand_batches())


# --- Clipping and the fixed denominator ---------------------------------------


def test_clip_factors_by_hand():
  # Client 0: ||(2, 2, 1)|| = 3 = 3C -> scaled by 1/3 to norm C = 1.
  # Client 1: ||(0.3, 0.4, 0)|| = 0.5 < C -> untouched. Client 2: zero.
  deltas = {"a": jnp.array([[2.0, 2.0], [0.3, 0.4], [0.0, 0.0]]),
            "b": jnp.array([[1.0], [0.0], [0.0]])}
  factors, norms = privacy.clip_factors(deltas, 1.0)
  np.testing.assert_allclose(norms, [3.0, 0.5, 0.0], rtol=1e-6)
  np.testing.assert_allclose(factors, [1 / 3, 1.0, 1.0], rtol=1e-6)
  clipped = jax.tree.map(lambda d: d * factors[:, None], deltas)
  np.testing.assert_allclose(privacy.client_norms(clipped), [1.0, 0.5, 0.0],
                             rtol=1e-6)
  np.testing.assert_allclose(clipped["a"][1], [0.3, 0.4])


def test_dp_round_by_hand_uniform_weights_fixed_denominator():
  # Deltas 1.5 and 0; clipped to C = 1: 1.0 and 0. Uniform weights over the
  # fixed m = clients_per_round = 2: w = 0.5 (FedAvg's example weights: 0.375).
  state, m = _one_round(_config())
  assert float(state.params["w"][0]) == pytest.approx(0.5, abs=1e-7)
  assert float(m["dp_clipped_fraction"]) == pytest.approx(0.5)
  assert float(m["update_norm"]) == pytest.approx(0.5, abs=1e-7)
  # The denominator is the expected count, not the realised one: m = 4.
  state, _ = _one_round(_config(clients_per_round=4))
  assert float(state.params["w"][0]) == pytest.approx(0.25, abs=1e-7)
  # A bound above every delta: no clipping, still uniform: (1.5 + 0) / 2.
  state, m = _one_round(_config(dp={"clip_norm": 10.0}))
  assert float(state.params["w"][0]) == pytest.approx(0.75, abs=1e-7)
  assert float(m["dp_clipped_fraction"]) == 0.0


def test_fedprox_and_server_optimizers_take_the_private_mean():
  # FedProx mu = 1: deltas 1 and -3 (test_federated_core); clipped 1 and -1.
  state, _ = _one_round(_config(algorithm="fedprox", prox_mu=1.0))
  assert float(state.params["w"][0]) == pytest.approx(0.0, abs=1e-7)
  # FedAdam on the pseudo-gradient g = -0.5 (Reddi et al. Alg. 2, step 1).
  state, _ = _one_round(_config(algorithm="fedadam", server_lr=1.0))
  b1, b2, tau, g = 0.9, 0.99, 1e-3, -0.5
  mu, nu = (1 - b1) * g, tau**2 + (1 - b2) * g * g
  assert float(state.params["w"][0]) == pytest.approx(
      -mu / (np.sqrt(nu) + tau), rel=1e-5)


# --- Noise --------------------------------------------------------------------


def zero_loss(params, frozen, batch, rng):
  """A loss with zero gradient: every client's update is exactly 0."""
  del frozen, rng
  return 0.0 * sum(jnp.sum(p) for p in jax.tree.leaves(params)), jnp.sum(batch["m"])


def _noise_setup(clip=0.5, z=1.3, m=4):
  cfg = _config(clients_per_round=m,
                dp={"clip_norm": clip, "noise_multiplier": z})
  alg = algorithms.build(cfg, zero_loss)
  params = {"w": jnp.zeros((4000,)), "v": {"u": jnp.zeros((60, 100))}}
  state = alg.init(params, jax.random.key(3), 10)
  batches = ClientBatches(
      batch={"m": jnp.ones((m, 1, 1, 1))}, step_mask=jnp.ones((m, 1), bool),
      num_examples=jnp.full((m,), 5.0), client_ids=jnp.arange(m, dtype=jnp.int32))
  return jax.jit(alg.apply), state, batches


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_noise_std_is_z_c_over_expected_clients():
  apply, state, batches = _noise_setup(clip=0.5, z=1.3, m=4)
  draws = []
  for _ in range(3):
    prev = _flat(state.params)
    state, _ = apply(state, None, batches)
    draws.append(_flat(state.params) - prev)  # Server lr 1: params += noise / m.
  draws = np.stack(draws)  # [3 rounds, 10000]
  expected = 1.3 * 0.5 / 4
  assert np.std(draws) == pytest.approx(expected, rel=0.03)
  assert abs(np.mean(draws)) < 3 * expected / np.sqrt(draws.size)
  # Fresh noise every round: draws of different rounds are uncorrelated.
  corr = np.corrcoef(draws)
  assert np.all(np.abs(corr[~np.eye(3, dtype=bool)]) < 0.05)


def test_noise_is_a_pure_function_of_rng_and_round():
  apply, state0, batches = _noise_setup()
  s1, _ = apply(state0, None, batches)
  s1_again, _ = apply(state0, None, batches)
  jax.tree.map(np.testing.assert_array_equal, s1.params, s1_again.params)
  s2, _ = apply(s1, None, batches)
  assert not np.allclose(_flat(s2.params) - _flat(s1.params), _flat(s1.params))
  # Same round, same rng: same noise, whatever the params were.
  moved = s1.replace(params=jax.tree.map(lambda p: p + 1.0, s1.params),
                     round=state0.round)
  s1_moved, _ = apply(moved, None, batches)
  np.testing.assert_allclose(_flat(s1_moved.params) - _flat(moved.params),
                             _flat(s1.params), atol=1e-6)


def test_noise_key_is_not_a_client_key():
  root = jax.random.key(0)
  round_key = jax.random.fold_in(root, 5)
  noise = jax.random.key_data(privacy.noise_key(root, 5))
  for cid in (0, 1, 2**31 - 2):
    assert not np.array_equal(
        noise, jax.random.key_data(jax.random.fold_in(round_key, cid)))


# --- The accountant -----------------------------------------------------------


@pytest.mark.parametrize("q,z,steps,delta", [
    (0.01, 1.0, 1000, 1e-5), (0.1, 1.1, 50, 1e-5), (0.5, 0.8, 3, 1e-6),
    (1.0, 2.0, 20, 1e-5)])
def test_epsilon_matches_dp_accounting_rdp(q, z, steps, delta):
  # Independently: one Poisson-subsampled Gaussian composed `steps` times.
  acc = dp_accounting.rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(z)), steps)
  got = privacy.epsilon(noise_multiplier=z, sampling_rate=q, rounds=steps,
                        delta=delta)
  assert got == pytest.approx(acc.get_epsilon(delta), rel=1e-9)


def test_epsilon_edges():
  assert privacy.epsilon(noise_multiplier=1.0, sampling_rate=0.1, rounds=0,
                         delta=1e-5) == 0.0
  assert privacy.epsilon(noise_multiplier=0.0, sampling_rate=0.1, rounds=3,
                         delta=1e-5) == float("inf")
  eps = [privacy.epsilon(noise_multiplier=1.0, sampling_rate=0.1, rounds=r,
                         delta=1e-5) for r in (1, 10, 100)]
  assert eps[0] < eps[1] < eps[2]
  assert privacy.sampling_rate(2, 8) == 0.25
  with pytest.raises(ValueError, match="clients_per_round=9"):
    privacy.sampling_rate(9, 8)


# --- Config -------------------------------------------------------------------


def test_dp_block_is_in_every_federated_config():
  production = config_blocks.federated_config()
  assert production.dp.to_dict() == {"enabled": False, "clip_norm": 1.0,
                                     "noise_multiplier": 1.0, "delta": 1e-5}
  cfg = AlgorithmConfig.from_config(production)
  assert cfg == AlgorithmConfig() and not cfg.dp.enabled
  hash(AlgorithmConfig.from_config(_config()))  # Static for jit.
  full = production.to_dict()
  with pytest.raises(ValueError, match=r"config\.federated\.dp is missing field"
                     r"\(s\) delta"):
    AlgorithmConfig.from_config(
        {**full, "dp": {k: v for k, v in full["dp"].items() if k != "delta"}})
  with pytest.raises(ValueError, match=r"config\.federated\.dp has unknown field"
                     r"\(s\) sigma"):
    AlgorithmConfig.from_config({**full, "dp": {**full["dp"], "sigma": 1.0}})
  with pytest.raises(ValueError, match=r"config\.federated\.dp\.enabled=1"):
    AlgorithmConfig.from_config({**full, "dp": {**full["dp"], "enabled": 1}})


def test_scaffold_with_dp_is_refused_saying_why():
  with pytest.raises(ValueError, match=r"dp\.enabled=True with algorithm="
                     r"'scaffold': SCAFFOLD .*control-variate.*leaks"):
    algorithms.build(_config(algorithm="scaffold"), squares_loss)
  algorithms.build(_config(algorithm="scaffold", dp={"enabled": False}),
                   squares_loss)


@pytest.mark.parametrize("field,value,allowed", [
    ("clip_norm", 0.0, "> 0"), ("clip_norm", -1.0, "> 0"),
    ("noise_multiplier", -0.1, ">= 0"), ("delta", 0.0, r"in \(0, 1\)"),
    ("delta", 1.0, r"in \(0, 1\)")])
def test_bad_dp_values_are_refused_naming_the_field(field, value, allowed):
  with pytest.raises(ValueError, match=rf"config\.federated\.dp\.{field}="
                     rf".*must be {allowed}"):
    AlgorithmConfig.from_config(_config(dp={field: value}))
  # Only checked when enabled.
  AlgorithmConfig.from_config(_config(dp={field: value, "enabled": False}))


# --- The training loop: dp_epsilon per round, exact resume ---------------------

MODEL = testing.tiny_llama_config()
NUM_CLIENTS = 3
TIMING = ("seconds", "tokens_per_s", "compile_s")


def _train(workdir, base_params, **overrides):
  c = testing.tiny_train_config(**{
      "federated.num_rounds": 3, "federated.dp.enabled": True,
      "federated.dp.clip_norm": 0.05, "federated.dp.noise_multiplier": 1.0,
      "train_eval.every": 0, "checkpoint.keep": 3, **overrides})
  return train.train(c, str(workdir), model_config=MODEL, base_params=base_params,
                     client_sets=[testing.random_token_set(i, 5 + i, MODEL.vocab_size)
                                  for i in range(NUM_CLIENTS)])


def test_training_logs_dp_epsilon_and_resumes_bit_exactly(tmp_path):
  base = llama.init_params(jax.random.key(0), MODEL)
  ref = _train(tmp_path / "ref", base)
  rows = [r for r in ref.metrics if "train_loss" in r]
  assert [r["round"] for r in rows] == [1, 2, 3]
  expected = [privacy.epsilon(noise_multiplier=1.0, sampling_rate=2 / 3,
                              rounds=r, delta=1e-5) for r in (1, 2, 3)]
  assert [r["dp_epsilon"] for r in rows] == pytest.approx(expected)
  assert 0 < rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"] < rows[2]["dp_epsilon"]
  assert all(0.0 <= r["dp_clipped_fraction"] <= 1.0 for r in rows)

  halted = _train(tmp_path / "resumed", base, **{"train.halt_after_round": 1})
  assert halted.rounds == 1
  resumed = _train(tmp_path / "resumed", base)
  assert resumed.rounds == 3
  jax.tree.map(np.testing.assert_array_equal, resumed.lora, ref.lora)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]
  assert strip(resumed.metrics) == strip(ref.metrics)
  assert os.path.exists(tmp_path / "ref" / "metrics.jsonl")
