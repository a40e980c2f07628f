"""LoRA pytree: identity at init, merge, split/combine, targets, dropout, vmap."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import testing
from fedjax_u2s.models import llama

CONFIG = testing.tiny_llama_config()  # V=97, D=32, F=48, L=2, H=4, K=2, hd=8
NUM_CLIENTS = 3


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def params():
  return jax.jit(llama.init_params, static_argnums=1)(jax.random.key(0), CONFIG)


def _tokens(seed, shape=(2, 9)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, shape))


def _randomize_b(lora, rng, std=0.1):
  """Gives every ``b`` random values so the adapter is not the identity."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
  keys = jax.random.split(rng, len(leaves))
  out = [std * jax.random.normal(k, x.shape, x.dtype) if path[-1].key == "b" else x
         for (path, x), k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("lcfg",))
def _logits(params, tokens, lora=None, lcfg=None, dropout_rng=None):
  return llama.forward(params, tokens, config=CONFIG, lora=lora, lora_config=lcfg,
                       dropout_rng=dropout_rng)[0]


def _loss(params, lora, tokens, lcfg):
  logits = _logits(params, tokens[:, :-1], lora, lcfg)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def test_fresh_adapter_is_exactly_the_identity(params):
  lcfg = lora_lib.LoraConfig(rank=4, targets=("*",))
  lora = lora_lib.init(jax.random.key(1), CONFIG, lcfg)
  assert all(not bool(ab["b"].any()) for ab in lora.values())
  assert all(bool(ab["a"].any()) for ab in lora.values())
  tokens = _tokens(0)
  np.testing.assert_array_equal(_logits(params, tokens, lora, lcfg),
                                _logits(params, tokens))


TARGET_CASES = [
    (("*",), lora_lib.ALL_TARGETS),
    (("q", "v"), ("q", "v")),
    (("gate",), ("gate",)),
    (("up", "down"), ("up", "down")),
    (("gate", "up", "down"), ("gate", "up", "down")),
    (("[qkv]",), ("q", "k", "v")),
    (("o", "d*"), ("o", "down")),
]


@pytest.mark.parametrize("targets,names", TARGET_CASES)
def test_targets_select_projections_with_right_shapes(targets, names):
  lcfg = lora_lib.LoraConfig(rank=4, targets=targets)
  assert lcfg.target_names == names
  lora = lora_lib.init(jax.random.key(1), CONFIG, lcfg)
  assert tuple(lora) == names
  d_in_out = {"q": (32, 32), "k": (32, 16), "v": (32, 16), "o": (32, 32),
              "gate": (32, 48), "up": (32, 48), "down": (48, 32)}
  for name in names:
    d_in, d_out = d_in_out[name]
    assert lora[name]["a"].shape == (CONFIG.num_layers, d_in, 4)
    assert lora[name]["b"].shape == (CONFIG.num_layers, 4, d_out)
  assert lora_lib.num_params(lora) == sum(
      CONFIG.num_layers * 4 * sum(d_in_out[n]) for n in names)


def test_targets_matching_nothing_are_an_error():
  with pytest.raises(ValueError, match=r"matches none of"):
    lora_lib.LoraConfig(targets=("qproj",))


@pytest.mark.parametrize("targets,names", TARGET_CASES)
def test_merged_equals_unmerged(params, targets, names):
  del names
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=targets)
  lora = _randomize_b(lora_lib.init(jax.random.key(1), CONFIG, lcfg),
                      jax.random.key(2))
  tokens = _tokens(1)
  unmerged = _logits(params, tokens, lora, lcfg)
  merged = _logits(lora_lib.merge(params, lora, lcfg), tokens)
  base = _logits(params, tokens)
  assert float(jnp.abs(unmerged - base).max()) > 1e-3  # the adapter matters
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)


def test_merge_keeps_dtype_and_leaves_untargeted_weights(params):
  lcfg = lora_lib.LoraConfig(rank=2, targets=("q",))
  lora = _randomize_b(lora_lib.init(jax.random.key(1), CONFIG, lcfg),
                      jax.random.key(2))
  merged = lora_lib.merge(params, lora, lcfg)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_array_equal(merged["layers"]["k"]["w"], params["layers"]["k"]["w"])
  assert not np.array_equal(merged["layers"]["q"]["w"], params["layers"]["q"]["w"])
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert lora_lib.merge(bf16, lora, lcfg)["layers"]["q"]["w"].dtype == jnp.bfloat16


def test_split_combine_round_trip(params):
  lcfg = lora_lib.LoraConfig(rank=4, targets=("q", "v", "down"))
  lora = _randomize_b(lora_lib.init(jax.random.key(1), CONFIG, lcfg),
                      jax.random.key(2))
  combined = lora_lib.combine(params, lora)
  assert set(combined["layers"]["q"]) == {"w", "a", "b"}
  assert set(combined["layers"]["k"]) == {"w"}
  base, lora2 = lora_lib.split(combined, lcfg)
  for got, want in ((base, params), (lora2, lora)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  # Nothing to split: the adapter comes back empty and the base unchanged.
  base, empty = lora_lib.split(params, lcfg)
  assert empty == {}
  assert jax.tree.structure(base) == jax.tree.structure(params)


def test_dropout_needs_an_rng_and_is_identity_at_rate_zero(params):
  tokens = _tokens(2)
  no_drop = lora_lib.LoraConfig(rank=4, targets=("*",), dropout=0.0)
  drop = lora_lib.LoraConfig(rank=4, targets=("*",), dropout=0.5)
  lora = _randomize_b(lora_lib.init(jax.random.key(1), CONFIG, drop),
                      jax.random.key(2))
  reference = _logits(params, tokens, lora, no_drop)
  # Rate > 0 but no rng (evaluation): deterministic, no dropout.
  np.testing.assert_array_equal(_logits(params, tokens, lora, drop), reference)
  # Rate 0 with an rng: identity.
  np.testing.assert_array_equal(
      _logits(params, tokens, lora, no_drop, dropout_rng=jax.random.key(3)),
      reference)
  # Rate > 0 with an rng: applied, and reproducible for the same rng.
  d1 = _logits(params, tokens, lora, drop, dropout_rng=jax.random.key(3))
  d1_again = _logits(params, tokens, lora, drop, dropout_rng=jax.random.key(3))
  d2 = _logits(params, tokens, lora, drop, dropout_rng=jax.random.key(4))
  assert float(jnp.abs(d1 - reference).max()) > 1e-4
  assert float(jnp.abs(d1 - d2).max()) > 1e-4
  np.testing.assert_array_equal(d1, d1_again)
  # The same at the level of one projection.
  x = jax.random.normal(jax.random.key(5), (2, 3, 32))
  ab = jax.tree.map(lambda v: v[0], lora["q"])
  plain = lora_lib.apply(x, ab, 2.0)
  np.testing.assert_array_equal(lora_lib.apply(x, ab, 2.0, dropout=0.5), plain)
  np.testing.assert_array_equal(
      lora_lib.apply(x, ab, 2.0, dropout=0.0, rng=jax.random.key(6)), plain)
  assert not np.array_equal(
      lora_lib.apply(x, ab, 2.0, dropout=0.5, rng=jax.random.key(6)), plain)


# Clients: a stacked adapter vmapped over a leading client axis, base shared.

LCFG = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "gate", "down"))


@pytest.fixture(scope="module")
def clients():
  init = jax.jit(lora_lib.init_stacked, static_argnums=(1, 2, 3))
  stacked = jax.jit(_randomize_b)(init(jax.random.key(7), NUM_CLIENTS, CONFIG, LCFG),
                                  jax.random.key(8))
  # [C, B, T]: each client its own data. B=3 differs from L=2 so no activation
  # shape can pass for a per-client copy of a [L, ...] base weight.
  tokens = _tokens(3, (NUM_CLIENTS, 3, 9))
  return stacked, tokens


def _client(tree, c):
  return jax.tree.map(lambda x: x[c], tree)


def _vmapped_logits(params, stacked, tokens):
  return jax.vmap(lambda p, l, t: _logits(p, t, l, LCFG),
                  in_axes=(None, 0, 0))(params, stacked, tokens)


def _vmapped_grads(params, stacked, tokens):
  grad = jax.grad(functools.partial(_loss, lcfg=LCFG), argnums=1)
  return jax.vmap(grad, in_axes=(None, 0, 0))(params, stacked, tokens)


def test_init_stacked_has_client_axis_and_distinct_clients():
  stacked = lora_lib.init_stacked(jax.random.key(7), NUM_CLIENTS, CONFIG, LCFG)
  single = lora_lib.init(jax.random.key(7), CONFIG, LCFG)
  assert jax.tree.map(lambda x: x.shape, stacked) == jax.tree.map(
      lambda x: (NUM_CLIENTS,) + x.shape, single)
  a = stacked["q"]["a"]
  assert not np.array_equal(a[0], a[1])
  assert not stacked["q"]["b"].any()


def test_vmap_over_clients_equals_loop(params, clients):
  stacked, tokens = clients
  logits = jax.jit(_vmapped_logits)(params, stacked, tokens)
  grads = jax.jit(_vmapped_grads)(params, stacked, tokens)
  loss_grad = jax.jit(jax.grad(functools.partial(_loss, lcfg=LCFG), argnums=1))
  for c in range(NUM_CLIENTS):
    want = _logits(params, tokens[c], _client(stacked, c), LCFG)
    np.testing.assert_allclose(logits[c], want, atol=1e-6, rtol=0)
    want_g = loss_grad(params, _client(stacked, c), tokens[c])
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=0),
                 _client(grads, c), want_g)
  # Clients really differ (the comparison is not between copies).
  assert float(jnp.abs(logits[0] - logits[1]).max()) > 1e-3
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def _all_shapes(jaxpr) -> set[tuple[int, ...]]:
  """Shapes of every variable in a jaxpr, sub-jaxprs (scan, remat, jit) included."""
  shapes = set()

  def visit(j):
    j = getattr(j, "jaxpr", j)  # ClosedJaxpr -> Jaxpr
    for v in list(j.invars) + list(j.constvars):
      shapes.add(tuple(v.aval.shape))
    for eqn in j.eqns:
      for v in list(eqn.invars) + list(eqn.outvars):
        if hasattr(v, "aval") and hasattr(v.aval, "shape"):
          shapes.add(tuple(v.aval.shape))
      for p in eqn.params.values():
        for sub in p if isinstance(p, (list, tuple)) else (p,):
          if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
            visit(sub)

  visit(jaxpr)
  return shapes


def _client_copies_of_base(params) -> set[tuple[int, ...]]:
  """[C, ...] shapes a per-client copy of a base matrix would have.

  Covers the embedding, lm_head and every kernel, stacked [C, L, in, out] or
  one layer's [C, in, out]; the small norm and bias vectors are left out, as
  their shapes could coincide with activations'.
  """
  out = {(NUM_CLIENTS,) + params["embed"].shape,
         (NUM_CLIENTS,) + params["lm_head"].shape}
  for x in jax.tree.leaves(params["layers"]):
    if x.ndim == 3:
      out |= {(NUM_CLIENTS,) + x.shape, (NUM_CLIENTS,) + x.shape[1:]}
  return out


def test_vmap_does_not_replicate_base_params(params, clients):
  """No value in the traced program has the shape of a per-client base copy.

  With ``in_axes=None`` for the base, vmap should batch only activations and
  adapters; a [C, V, D] embedding or a [C, D, F] kernel anywhere (forward,
  backward, inside the layer scan) would mean the base got broadcast.
  """
  stacked, tokens = clients
  forbidden = _client_copies_of_base(params)
  # Guard against accidental coincidences with activation/adapter shapes.
  allowed = {tuple(x.shape) for x in jax.tree.leaves(stacked)}
  assert not forbidden & allowed
  for fn in (_vmapped_logits, _vmapped_grads):
    shapes = _all_shapes(jax.make_jaxpr(fn)(params, stacked, tokens))
    assert not shapes & forbidden, f"{fn.__name__}: {sorted(shapes & forbidden)}"
  # Control: the same check does see a replicated base.
  replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (NUM_CLIENTS,) + x.shape),
                            params)
  shapes = _all_shapes(jax.make_jaxpr(
      jax.vmap(lambda p, l, t: _logits(p, t, l, LCFG)))(replicated, stacked, tokens))
  assert (NUM_CLIENTS, CONFIG.vocab_size, CONFIG.hidden_size) in shapes
