"""Federated engine: hand-computed rounds, masking, invariances, LM loss, sampling.

The toy model is 1-D least squares, ``loss = 1/2 (x w - y)^2`` per example,
so every number below is worked out by hand in the comments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_u2s import config_blocks
from fedjax_u2s import lora as lora_lib
from fedjax_u2s import testing
from fedjax_u2s.federated import aggregation
from fedjax_u2s.federated import algorithms
from fedjax_u2s.federated import client as client_lib
from fedjax_u2s.federated import objectives
from fedjax_u2s.federated import sampling
from fedjax_u2s.federated.state import ClientBatches, ServerState, pad_clients
from fedjax_u2s.models import llama


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


squares_loss = testing.squares_loss


def _config(**kw) -> ml_collections.ConfigDict:
  """The production defaults, with what the hand-computed numbers assume.

  Plain SGD at lr 0.5, no gradient clipping, the same lr every round, and all
  clients in one vmapped step; ``kw`` overrides any of them.
  """
  return testing.federated_config(**{
      "client_optimizer": "sgd", "client_lr": 0.5, "grad_clip": 0.0,
      "lr_schedule": "constant", "warmup_rounds": 0, "clients_per_chunk": 0,
      **kw})


_hand_batches = testing.hand_round_batches


def _run(cfg, batches, rounds=1, num_clients=4, w0=0.0, loss_fn=squares_loss):
  alg = algorithms.build(cfg, loss_fn)
  state = alg.init({"w": jnp.full((1,), w0, jnp.float32)}, jax.random.key(0),
                   num_clients)
  apply = jax.jit(alg.apply)
  metrics = []
  for _ in range(rounds):
    state, m = apply(state, None, batches)
    metrics.append(m)
  return state, metrics


def _w(state) -> float:
  return float(state.params["w"][0])


# --- Hand-computed rounds ------------------------------------------------------
# Client 0: grad = w - 2, lr 0.5: w 0 -> 1 -> 1.5, delta 1.5; losses 2, 0.5 per
#   example, two examples per step: loss sum 5 over 4 tokens.
# Client 1: grad = 4w - 4: w 0 -> 2 -> 0, delta 0; losses 2, 2: sum 4, 2 tokens.
# FedAvg: mean delta = (1 * 1.5 + 3 * 0) / 4 = 0.375.


def test_fedavg_one_round_by_hand():
  state, (m,) = _run(_config(algorithm="fedavg"), _hand_batches())
  assert _w(state) == pytest.approx(0.375, abs=1e-7)
  assert int(state.round) == 1
  np.testing.assert_allclose(m["client_loss"], [1.25, 2.0], rtol=1e-7)
  np.testing.assert_allclose(m["client_tokens"], [4.0, 2.0])
  assert float(m["loss"]) == pytest.approx(9.0 / 6.0, rel=1e-7)
  assert float(m["num_tokens"]) == 6.0
  assert float(m["update_norm"]) == pytest.approx(0.375, rel=1e-7)
  assert not bool(m["nonfinite"])


def test_fedavg_server_lr_scales_the_mean_delta():
  state, _ = _run(_config(algorithm="fedavg", server_lr=0.5), _hand_batches())
  assert _w(state) == pytest.approx(0.1875, abs=1e-7)


def test_fedprox_by_hand():
  # mu = 1 adds w to the gradient. Client 0: g = 2w - 2: w 0 -> 1 -> 1.
  # Client 1: g = 5w - 4: w 0 -> 2 -> -1. Mean: (1 - 3) / 4 = -0.5.
  state, _ = _run(_config(algorithm="fedprox", prox_mu=1.0), _hand_batches())
  assert _w(state) == pytest.approx(-0.5, abs=1e-7)


def test_fedprox_mu_zero_is_fedavg_and_mu_is_ignored_by_fedavg():
  a, _ = _run(_config(algorithm="fedprox", prox_mu=0.0), _hand_batches(), w0=0.3)
  b, _ = _run(_config(algorithm="fedavg"), _hand_batches(), w0=0.3)
  c, _ = _run(_config(algorithm="fedavg", prox_mu=5.0), _hand_batches(), w0=0.3)
  assert _w(a) == _w(b) == _w(c)


def test_fedavgm_two_rounds_by_hand():
  # Round 1 as FedAvg: trace = -0.375, w = 0.375.
  # Round 2 from w = 0.375: client 0: 0.375 -> 1.1875 -> 1.59375 (delta
  # 1.21875); client 1: 0.375 -> 1.625 -> 0.375 (delta 0); mean 0.3046875.
  # trace = -0.3046875 + 0.9 * -0.375 = -0.6421875; w = 0.375 + 0.6421875.
  state, _ = _run(_config(algorithm="fedavgm", server_momentum=0.9),
                  _hand_batches(), rounds=2)
  assert _w(state) == pytest.approx(1.0171875, abs=1e-6)


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_step_by_hand(kind):
  # Pseudo-gradient g = -0.375, m = (1 - b1) g, v starts at tau^2.
  b1, b2, tau, lr = 0.9, 0.99, 0.1, 0.1
  g = -0.375
  m = (1 - b1) * g
  v0 = tau * tau
  v = {"fedadam": b2 * v0 + (1 - b2) * g * g,
       "fedyogi": v0 - (1 - b2) * g * g * np.sign(v0 - g * g),
       "fedadagrad": v0 + g * g}[kind]
  expected = -lr * m / (np.sqrt(v) + tau)
  state, _ = _run(_config(algorithm=kind, server_lr=lr, server_b1=b1,
                          server_b2=b2, server_tau=tau), _hand_batches())
  assert _w(state) == pytest.approx(expected, rel=1e-6)
  mu, nu = state.opt_state[0]
  assert float(mu["w"][0]) == pytest.approx(m, rel=1e-6)
  assert float(nu["w"][0]) == pytest.approx(v, rel=1e-6)


def test_scaffold_two_rounds_by_hand():
  # Round 1: c = c_i = 0, so params as FedAvg (0.375). K = 2, lr = 0.5:
  # c_i+ - c_i = -c - delta / (K lr) = -delta: client id 1: -1.5, id 3: 0.
  # c = 0 + (-1.5 + 0) / N with N = 4: -0.375.
  state, _ = _run(_config(algorithm="scaffold"), _hand_batches())
  assert _w(state) == pytest.approx(0.375, abs=1e-7)
  np.testing.assert_allclose(state.client_controls["w"][:, 0], [0, -1.5, 0, 0])
  assert float(state.control["w"][0]) == pytest.approx(-0.375, abs=1e-7)
  # Round 2 from w = 0.375. Client id 1: correction c - c_1 = 1.125,
  # g = w - 0.875: 0.375 -> 0.625 -> 0.75, delta 0.375, control delta
  # 0.375 - 0.375 = 0. Client id 3: correction -0.375, g = 4w - 4.375:
  # 0.375 -> 1.8125 -> 0.375, delta 0, control delta 0.375.
  # w = 0.375 + 0.375 / 4 = 0.46875; c = -0.375 + 0.375 / 4 = -0.28125.
  state, _ = _run(_config(algorithm="scaffold"), _hand_batches(), rounds=2)
  assert _w(state) == pytest.approx(0.46875, abs=1e-6)
  np.testing.assert_allclose(state.client_controls["w"][:, 0],
                             [0, -1.5, 0, 0.375], atol=1e-6)
  assert float(state.control["w"][0]) == pytest.approx(-0.28125, abs=1e-6)


# --- Masking and padding ---------------------------------------------------------


def _random_batches(seed, c=4, s=3, a=2, b=3, d=3):
  rs = np.random.default_rng(seed)
  return ClientBatches(
      batch={"x": jnp.asarray(rs.normal(size=(c, s, a, b, d)), jnp.float32),
             "y": jnp.asarray(rs.normal(size=(c, s, a, b)), jnp.float32),
             "m": jnp.asarray(rs.random((c, s, a, b)) < 0.8)},
      step_mask=jnp.ones((c, s), bool),
      num_examples=jnp.asarray(rs.integers(1, 10, c), jnp.float32),
      client_ids=jnp.asarray(rs.permutation(10)[:c], jnp.int32))


def _adam_config(**kw):
  return _config(client_optimizer="adamw", client_lr=0.05,
                 client_weight_decay=0.01, grad_clip=0.5, **kw)


def _run_random(cfg, batches, rounds=2, d=3):
  alg = algorithms.build(cfg, squares_loss)
  state = alg.init({"w": jnp.linspace(-0.5, 0.5, d)}, jax.random.key(1), 10)
  apply = jax.jit(alg.apply)
  for _ in range(rounds):
    state, m = apply(state, None, batches)
  return state, m


def _assert_trees_close(a, b, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol, rtol=1e-5),
               a, b)


def _append(tree, extra_tree):
  """Concatenates ``extra_tree`` along axis 1 (local steps) of every leaf."""
  return jax.tree.map(lambda x, e: jnp.concatenate([x, e], axis=1), tree, extra_tree)


@pytest.mark.parametrize("algorithm", ["scaffold"])
def test_padded_steps_and_padded_clients_change_nothing(algorithm):
  cfg = _adam_config(algorithm=algorithm)
  base = _random_batches(0)
  garbage = _random_batches(5, c=4, s=1)
  # Two garbage steps appended to every client, masked out.
  padded = ClientBatches(
      batch=_append(base.batch, jax.tree.map(lambda x: 100 * x, garbage.batch)),
      step_mask=jnp.concatenate([base.step_mask, jnp.zeros((4, 1), bool)], 1),
      num_examples=base.num_examples, client_ids=base.client_ids)
  # Plus a garbage client with weight 0 and every step masked.
  extra = _random_batches(6, c=1, s=4)
  padded = ClientBatches(
      batch=jax.tree.map(lambda x, e: jnp.concatenate([x, e]), padded.batch,
                         extra.batch),
      step_mask=jnp.concatenate([padded.step_mask, jnp.zeros((1, 4), bool)]),
      num_examples=jnp.concatenate([padded.num_examples, jnp.zeros((1,))]),
      client_ids=jnp.concatenate([padded.client_ids, jnp.array([9], jnp.int32)]))
  s_base, m_base = _run_random(cfg, base)
  s_pad, m_pad = _run_random(cfg, padded)
  _assert_trees_close(s_base, s_pad)
  assert float(m_base["loss"]) == pytest.approx(float(m_pad["loss"]), rel=1e-6)
  assert m_pad["client_loss"].shape == (5,)
  assert float(m_pad["client_tokens"][4]) == 0.0
  # pad_clients: weight-0, all-masked clients, and C rounded up.
  p = pad_clients(base, 3)
  assert p.num_examples.shape == (6,)
  assert not bool(p.step_mask[4:].any()) and not bool(p.num_examples[4:].any())
  s_p, _ = _run_random(cfg, p)
  _assert_trees_close(s_base, s_p)


def test_one_client_with_all_data_is_centralized_training():
  cfg = _adam_config(algorithm="fedavg")
  batches = _random_batches(2, c=1, s=4)
  state, m = _run_random(cfg, batches, rounds=1)
  # Centralized: AdamW over the same steps, each step's gradient being that of
  # the token-mean loss over all of its micro-batches, clipped.
  opt = optax.chain(optax.clip_by_global_norm(0.5),
                    optax.adamw(0.05, weight_decay=0.01))
  params = {"w": jnp.linspace(-0.5, 0.5, 3)}
  opt_state = opt.init(params)

  def mean_loss(p, step_batch):
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), step_batch)
    l, w = squares_loss(p, None, flat, None)
    return l / w

  losses, tokens = [], []
  for s in range(4):
    step_batch = jax.tree.map(lambda x: x[0, s], batches.batch)
    g = jax.grad(mean_loss)(params, step_batch)
    updates, opt_state = opt.update(g, opt_state, params)
    losses.append(float(mean_loss(params, step_batch)))
    tokens.append(float(jnp.sum(step_batch["m"])))
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(state.params["w"], params["w"], atol=1e-6)
  expected_loss = np.dot(losses, tokens) / np.sum(tokens)
  assert float(m["loss"]) == pytest.approx(expected_loss, rel=1e-6)


@pytest.mark.parametrize("algorithm", ["scaffold", "fedadam"])
def test_chunk_size_does_not_change_the_result(algorithm):
  batches = _random_batches(3, c=5)
  results = [_run_random(_adam_config(algorithm=algorithm, clients_per_chunk=k),
                         batches) for k in (1, 2, 0)]
  for state, m in results[1:]:
    _assert_trees_close(results[0][0], state)
    _assert_trees_close(results[0][1], m)


def test_nonfinite_loss_leaves_the_state_unchanged():
  cfg = _adam_config(algorithm="scaffold")
  batches = _random_batches(4)
  alg = algorithms.build(cfg, squares_loss)
  state0 = alg.init({"w": jnp.linspace(-0.5, 0.5, 3)}, jax.random.key(1), 10)
  apply = jax.jit(alg.apply)
  state1, m = apply(state0, None, batches)
  assert not bool(m["nonfinite"])
  y = batches.batch["y"].at[2, 1, 0, 0].set(jnp.nan)
  bad = batches.replace(batch=dict(batches.batch, y=y))
  state2, m = apply(state1, None, bad)
  assert bool(m["nonfinite"])
  jax.tree.map(np.testing.assert_array_equal, state1, state2)
  # A NaN in a masked-out step or example is not an error.
  y = batches.batch["y"].at[2, 1, 0, 0].set(jnp.nan)
  mask = batches.batch["m"].at[2, 1, 0, 0].set(False)
  ok = batches.replace(batch=dict(batches.batch, y=jnp.where(mask, y, 0.0), m=mask))
  _, m = apply(state1, None, ok)
  assert not bool(m["nonfinite"])


def test_unknown_names_raise_listing_the_valid_ones():
  with pytest.raises(ValueError, match="fedavgm"):
    algorithms.build(_config(algorithm="fedsgd"), squares_loss)
  with pytest.raises(ValueError, match="adamw"):
    algorithms.build(_config(client_optimizer="lion"), squares_loss)
  with pytest.raises(ValueError, match="cosine"):
    algorithms.build(_config(lr_schedule="linear"), squares_loss)


def test_config_has_one_definition_and_from_config_takes_exactly_its_fields():
  production = config_blocks.federated_config()
  assert algorithms.AlgorithmConfig.from_config(production) == (
      algorithms.AlgorithmConfig())
  assert production.to_dict() == algorithms.AlgorithmConfig().to_dict()
  full = production.to_dict()
  missing = {k: v for k, v in full.items() if k != "prox_mu"}
  with pytest.raises(ValueError, match=r"missing field\(s\) prox_mu; .*client_lr"):
    algorithms.AlgorithmConfig.from_config(missing)
  with pytest.raises(ValueError, match=r"unknown field\(s\) clientlr; .*client_lr"):
    algorithms.AlgorithmConfig.from_config({**full, "clientlr": 1.0})
  with pytest.raises(ValueError, match=r"config\.federated\.num_rounds=2\.5"):
    algorithms.AlgorithmConfig.from_config({**full, "num_rounds": 2.5})


@pytest.mark.parametrize("field,value,allowed", [
    ("num_rounds", 0, ">= 1"), ("clients_per_round", -2, ">= 1"),
    ("clients_per_chunk", -1, ">= 0"), ("client_lr", 0.0, "> 0"),
    ("server_b2", 1.0, r"in \[0, 1\)"), ("client_b1", -0.1, r"in \[0, 1\)"),
    ("grad_clip", -1.0, ">= 0"), ("lr_schedule", "linear", "constant, cosine"),
    ("algorithm", "fedsgd", "fedavgm")])
def test_config_values_are_checked_up_front(field, value, allowed):
  with pytest.raises(ValueError,
                     match=rf"config\.federated\.{field}=.*must be .*{allowed}"):
    algorithms.AlgorithmConfig.from_config(_config(**{field: value}))


def test_client_lr_schedule():
  cfg = algorithms.AlgorithmConfig.from_config(
      _config(client_lr=1.0, lr_schedule="cosine", warmup_rounds=2, num_rounds=6))
  lrs = [float(algorithms.client_learning_rate(cfg, r)) for r in range(7)]
  # Warmup (r + 1) / 2, then 0.5 (1 + cos(pi (r - 2) / 4)).
  np.testing.assert_allclose(
      lrs, [0.5, 1.0, 1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5,
            0.5 * (1 + np.cos(3 * np.pi / 4)), 0.0], atol=1e-6)
  const = algorithms.AlgorithmConfig.from_config(_config(client_lr=0.3))
  assert float(algorithms.client_learning_rate(const, 7)) == pytest.approx(0.3)


def test_server_rng_is_raw_key_data():
  alg = algorithms.build(_config(), squares_loss)
  state = alg.init({"w": jnp.zeros(1)}, jax.random.key(7), 2)
  assert state.rng.dtype == jnp.uint32
  assert jnp.array_equal(jax.random.key_data(state.key()),
                         jax.random.key_data(jax.random.key(7)))
  assert state.client_controls is None
  assert isinstance(state, ServerState)


def test_evaluate_sums_over_microbatches():
  alg = algorithms.build(_config(), squares_loss)
  b = _random_batches(8, c=1, s=1)
  batch = jax.tree.map(lambda x: x[0, 0], b.batch)  # [A, B, ...]
  params = {"w": jnp.array([0.1, -0.2, 0.3])}
  loss_sum, weight = jax.jit(alg.evaluate)(params, None, batch)
  m = np.asarray(batch["m"], np.float64)
  r = np.asarray(batch["x"], np.float64) @ np.asarray(params["w"]) - np.asarray(
      batch["y"])
  assert float(loss_sum) == pytest.approx(np.sum(0.5 * m * r * r), rel=1e-6)
  assert float(weight) == np.sum(m)


def test_aggregation_weighted_mean_by_hand():
  deltas = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]])}
  weights = jnp.array([1.0, 3.0, 0.0])
  total = aggregation.accumulate({"a": jnp.zeros(2)}, deltas, weights)
  mean = aggregation.weighted_mean(total, jnp.sum(weights))
  np.testing.assert_allclose(mean["a"], [2.5, 3.5])
  zero = aggregation.weighted_mean(total, jnp.float32(0.0))
  np.testing.assert_array_equal(zero["a"], [0.0, 0.0])


# --- The LM loss ------------------------------------------------------------------

CONFIG = testing.tiny_llama_config()
LCFG = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"),
                           dropout=0.1)


@pytest.fixture(scope="module")
def base_params():
  return jax.jit(llama.init_params, static_argnums=1)(jax.random.key(0), CONFIG)


def _lm_batches(seed, c=3, s=2, a=2, b=2, t=8):
  rs = np.random.default_rng(seed)
  tokens = rs.integers(0, CONFIG.vocab_size, (c, s, a, b, t))
  lengths = rs.integers(3, t + 1, (c, s, a, b))
  input_mask = np.arange(t) < lengths[..., None]
  loss_mask = input_mask & (np.arange(t) >= 2)
  step_mask = np.ones((c, s), bool)
  step_mask[-1, -1] = False
  return ClientBatches(
      batch={"tokens": jnp.asarray(tokens, jnp.int32),
             "input_mask": jnp.asarray(input_mask),
             "loss_mask": jnp.asarray(loss_mask)},
      step_mask=jnp.asarray(step_mask), num_examples=jnp.array([3.0, 1.0, 2.0]),
      client_ids=jnp.array([4, 0, 2], jnp.int32))


# Module-level so the jit cache is shared between the tests below.
LM_LOSS = objectives.make_causal_lm_loss(CONFIG, LCFG, logits_chunk_size=4)
LM_GRAD = jax.jit(jax.value_and_grad(LM_LOSS, has_aux=True))


def test_causal_lm_loss_matches_logits_and_chunking(base_params):
  lora = lora_lib.init(jax.random.key(1), CONFIG, LCFG)
  lora = jax.tree.map(lambda x: x + 0.05, lora)
  batch = jax.tree.map(lambda x: x[0, 0, 0], _lm_batches(0).batch)
  rng = jax.random.key(3)
  w = batch["loss_mask"][:, 1:].astype(jnp.float32)
  assert 0 < float(w.sum()) < w.size

  def reference(lora):  # Full logits, then log-softmax; same dropout key.
    logits, _ = llama.forward(base_params, batch["tokens"], config=CONFIG,
                              input_mask=batch["input_mask"], lora=lora,
                              lora_config=LCFG, dropout_rng=rng)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * w)

  l_ref, g_ref = jax.jit(jax.value_and_grad(reference))(lora)
  (l_chunk, w_chunk), g_chunk = LM_GRAD(lora, base_params, batch, rng)
  assert float(w_chunk) == float(w.sum())
  assert float(l_chunk) == pytest.approx(float(l_ref), rel=1e-6)
  _assert_trees_close(g_chunk, g_ref, atol=1e-6)
  (l_other, _), _ = LM_GRAD(lora, base_params, batch, jax.random.key(4))
  assert float(l_other) != pytest.approx(float(l_chunk), rel=1e-4)  # Dropout on.
  # The unchunked path, and the same key gives the same dropout masks.
  full = objectives.make_causal_lm_loss(CONFIG, LCFG)
  l_full, w_full = jax.jit(full)(lora, base_params, batch, rng)
  assert float(w_full) == float(w.sum())
  assert float(l_full) == pytest.approx(float(l_ref), rel=1e-6)


def _reference_round(cfg, loss_fn, params, frozen, batches, root_key, round_=0):
  """Plain Python loop over clients, steps and micro-batches (no vmap/scan)."""
  cfg = algorithms.AlgorithmConfig.from_config(cfg)
  lr = float(algorithms.client_learning_rate(cfg, round_))
  grad_fn = LM_GRAD if loss_fn is LM_LOSS else jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True))
  round_key = jax.random.fold_in(root_key, round_)
  c, s, a = batches.step_mask.shape + (jax.tree.leaves(batches.batch)[0].shape[2],)
  total_w, sum_delta, loss_sum, tokens = 0.0, None, 0.0, 0.0
  for i in range(c):
    opt = optax.adamw(lr, b1=cfg.client_b1, b2=cfg.client_b2,
                      weight_decay=cfg.client_weight_decay)
    opt_update = jax.jit(opt.update)
    p, opt_state = params, opt.init(params)
    key = jax.random.fold_in(round_key, int(batches.client_ids[i]))
    for k in range(s):
      if not bool(batches.step_mask[i, k]):
        continue
      g_acc, w_acc = None, 0.0
      for j in range(a):
        mb = jax.tree.map(lambda x: x[i, k, j], batches.batch)
        (l, w), g = grad_fn(p, frozen, mb,
                            jax.random.fold_in(jax.random.fold_in(key, k), j))
        g_acc = g if g_acc is None else jax.tree.map(jnp.add, g_acc, g)
        w_acc += float(w)
        loss_sum += float(l)
      tokens += w_acc
      scale = min(1.0, cfg.grad_clip / (float(optax.tree.norm(g_acc)) /
                                        max(w_acc, 1.0)))
      g = jax.tree.map(lambda x: x * (scale / max(w_acc, 1.0)), g_acc)
      updates, opt_state = opt_update(g, opt_state, p)
      p = jax.tree.map(jnp.add, p, updates)
    wi = float(batches.num_examples[i])
    d = jax.tree.map(lambda x, y: wi * (x - y), p, params)
    sum_delta = d if sum_delta is None else jax.tree.map(jnp.add, sum_delta, d)
    total_w += wi
  new_params = jax.tree.map(lambda x, d: x + d / total_w, params, sum_delta)
  return new_params, loss_sum / tokens


def test_lm_rounds_match_a_plain_python_loop(base_params):
  cfg = _config(algorithm="fedavg", client_optimizer="adamw", client_lr=1e-2,
                client_weight_decay=0.01, grad_clip=1.0, clients_per_chunk=2)
  loss_fn = LM_LOSS
  batches = _lm_batches(1)
  lora = lora_lib.init(jax.random.key(2), CONFIG, LCFG)
  alg = algorithms.build(cfg, loss_fn)
  state = alg.init(lora, jax.random.key(5), 5)
  new_state, m = jax.jit(alg.apply)(state, base_params, batches)
  expected, expected_loss = _reference_round(cfg, loss_fn, lora, base_params,
                                             batches, jax.random.key(5))
  _assert_trees_close(new_state.params, expected, atol=1e-6)
  assert float(m["loss"]) == pytest.approx(expected_loss, rel=1e-6)
  assert float(m["update_norm"]) > 0


# --- Client sampling --------------------------------------------------------------


def test_sample_clients_is_deterministic_uniform_without_replacement():
  a = sampling.sample_clients(3, 7, 100, 10)
  assert a.dtype == np.int32 and a.shape == (10,)
  assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
  np.testing.assert_array_equal(a, sampling.sample_clients(3, 7, 100, 10))
  assert not np.array_equal(a, sampling.sample_clients(3, 8, 100, 10))
  assert not np.array_equal(a, sampling.sample_clients(4, 7, 100, 10))
  np.testing.assert_array_equal(sampling.sample_clients(0, 0, 5, 5), np.arange(5))
  # Roughly uniform: each of 10 clients drawn ~ 3/10 of 2000 rounds.
  counts = np.bincount(np.concatenate(
      [sampling.sample_clients(1, r, 10, 3) for r in range(2000)]), minlength=10)
  assert counts.min() > 520 and counts.max() < 680


def test_sample_clients_error_names_both_numbers():
  with pytest.raises(ValueError, match=r"clients_per_round=12.*num_clients=10"):
    sampling.sample_clients(0, 0, 10, 12)


def test_client_optimizer_sgd_with_weight_decay():
  opt = client_lib.make_client_optimizer("sgd", 0.5, weight_decay=0.1)
  params = {"w": jnp.array([2.0])}
  updates, _ = opt.update({"w": jnp.array([1.0])}, opt.init(params), params)
  # -lr * (g + wd * w) = -0.5 * (1 + 0.2)
  assert float(updates["w"][0]) == pytest.approx(-0.6)
