"""Sampler: exact greedy decoding, per-row stops, seeds, strategies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s import testing
from fedjax_u2s.models import llama


@pytest.fixture(scope="module")
def model():
  tok = testing.ByteTokenizer()
  cfg = testing.tiny_llama_config(vocab_size=tok.vocab_size)
  params = llama.init_params(jax.random.key(0), cfg, std=0.3)
  return cfg, params, tok


def argmax_loop(params, cfg, prompt, n):
  """Reference: greedy by full recomputation (one width for every prompt here)."""
  return testing.greedy_by_recompute(params, cfg, prompt, n, width=32)


def test_greedy_equals_argmax_loop_for_ragged_batch(model):
  cfg, params, tok = model
  prompts = [[5, 17, 33], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
  s = sampler_lib.Sampler(cfg, tok, pad_multiple=4)
  out = s(params, prompts, max_new_tokens=12, eos_ids=())
  for p, got in zip(prompts, out.tokens):
    assert got == argmax_loop(params, cfg, p, 12)
  assert out.stop_reasons == ["length"] * 3


def test_greedy_with_lora_equals_merged(model):
  cfg, params, tok = model
  lcfg = lora_lib.LoraConfig(rank=2, alpha=4.0, targets=("*",))
  lora = jax.tree.map(lambda x: x + 0.2, lora_lib.init(jax.random.key(3), cfg, lcfg))
  s = sampler_lib.Sampler(cfg, tok)
  a = s(params, [[3, 4, 5]], max_new_tokens=8, eos_ids=(), lora=lora, lora_config=lcfg)
  b = s(lora_lib.merge(params, lora, lcfg), [[3, 4, 5]], max_new_tokens=8, eos_ids=())
  assert a.tokens == b.tokens
  assert a.tokens != s(params, [[3, 4, 5]], max_new_tokens=8, eos_ids=()).tokens


def _reference_tokens(model, prompts, n):
  cfg, params, tok = model
  return [argmax_loop(params, cfg, p, n) for p in prompts]


def test_eos_stops_only_its_row(model):
  cfg, params, tok = model
  prompts = [[5, 17, 33], [40, 41]]
  ref = _reference_tokens(model, prompts, 10)
  eos = ref[0][3]  # Row 0 emits this at step 3; make it the EOS id.
  s = sampler_lib.Sampler(cfg, tok)
  out = s(params, prompts, max_new_tokens=10, eos_ids=(eos,))
  assert out.tokens[0] == ref[0][:4]
  assert out.stop_reasons[0] == "eos"
  first = ref[1].index(eos) + 1 if eos in ref[1] else 10
  assert out.tokens[1] == ref[1][:first]


def test_stop_string_across_token_boundary(model):
  cfg, params, tok = model
  prompts = [[5, 17, 33], [40, 41]]
  ref = _reference_tokens(model, prompts, 12)
  # A stop string made of the bytes of two consecutive ASCII tokens of row 0
  # (past the first): it straddles two tokens, so only a byte-level automaton
  # can catch it the step it completes.
  i = next(i for i in range(1, 11) if ref[0][i] < 128 and ref[0][i + 1] < 128)
  stop = bytes(ref[0][i:i + 2]).decode("ascii")
  s = sampler_lib.Sampler(cfg, tok)
  out = s(params, prompts, max_new_tokens=12, eos_ids=(), stop_strings=(stop,))
  row0 = ref[0]
  text0 = bytes(row0).decode("latin-1")
  first_end = text0.find(stop) + len(stop)  # 1 byte per token here.
  assert out.tokens[0] == row0[:first_end]
  assert out.stop_reasons[0] == "stop_string"
  assert out.texts[0] == text0[:text0.find(stop)]
  text1 = bytes(ref[1]).decode("latin-1")
  if stop in text1:
    assert len(out.tokens[1]) == text1.find(stop) + len(stop)
  else:
    assert out.tokens[1] == ref[1] and out.stop_reasons[1] == "length"


def test_stop_string_table_multibyte_tokens():
  # Tokens: "a", "\n", "\n\n", ".\n", "x\n\ny".
  token_bytes = [b"a", b"\n", b"\n\n", b".\n", b"x\n\ny"]
  tables = sampler_lib.stop_string_tables(["\n\n"], token_bytes)
  assert tables.shape == (1, 3, 5)
  t = tables[0]

  def run(seq):
    s = 0
    for tid in seq:
      s = t[s, tid]
    return s

  assert run([1, 1]) == 2          # "\n" + "\n"
  assert run([2]) == 2             # "\n\n"
  assert run([3, 1]) == 2          # ".\n" + "\n"
  assert run([4]) == 2             # inside one token
  assert run([1, 0, 1]) == 1       # "\na\n": not a match, one "\n" pending
  assert run([0, 3]) == 1
  # A pattern with a self-overlap exercises the KMP fallback: "aab" in "aaab".
  tables = sampler_lib.stop_string_tables(["aab"], [b"a", b"b", b"aa"])
  s = 0
  for tid in [2, 0, 1]:
    s = tables[0, s, tid]
  assert s == 3


def test_seeds_reproduce_and_rows_are_independent_of_batch(model):
  cfg, params, tok = model
  s = sampler_lib.Sampler(cfg, tok)
  strat = sampler_lib.Temperature(1.5)
  prompts = [[5, 6], [7, 8, 9], [10]]
  a = s(params, prompts, max_new_tokens=16, strategy=strat, seed=7, eos_ids=())
  b = s(params, prompts, max_new_tokens=16, strategy=strat, seed=7, eos_ids=())
  c = s(params, prompts, max_new_tokens=16, strategy=strat, seed=8, eos_ids=())
  assert a.tokens == b.tokens
  assert a.tokens != c.tokens
  # The same prompt with the same row seed alone in its batch: same sample.
  d = s(params, [prompts[1]], max_new_tokens=16, strategy=strat, seed=7,
        row_seeds=[1], eos_ids=())
  assert d.tokens[0] == a.tokens[1]


@pytest.mark.parametrize("strategy", [
    sampler_lib.TopK(k=1, temperature=0.7),
    sampler_lib.TopP(p=1e-6, temperature=2.0),
])
def test_degenerate_topk_topp_are_greedy(model, strategy):
  cfg, params, tok = model
  s = sampler_lib.Sampler(cfg, tok)
  greedy = s(params, [[3, 9]], max_new_tokens=10, eos_ids=())
  other = s(params, [[3, 9]], max_new_tokens=10, eos_ids=(), strategy=strategy, seed=3)
  assert other.tokens == greedy.tokens


def test_topk_and_topp_support():
  logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
  keys = jax.random.split(jax.random.key(0), 2000)
  topk = jax.vmap(sampler_lib.TopK(k=2), (None, 0))(logits, keys)
  assert set(np.asarray(topk).tolist()) == {0, 1}
  # p=0.8: 0.5 alone < 0.8, 0.5+0.3 reaches it -> {0, 1}.
  topp = jax.vmap(sampler_lib.TopP(p=0.8), (None, 0))(logits, keys)
  assert set(np.asarray(topp).tolist()) == {0, 1}
  frac0 = float(jnp.mean(topp == 0))
  assert abs(frac0 - 0.5 / 0.8) < 0.05
  temp = jax.vmap(sampler_lib.Temperature(1.0), (None, 0))(logits, keys)
  assert set(np.asarray(temp).tolist()) == {0, 1, 2, 3}


def test_nucleus_matches_float64_definition():
  """The kept set: tokens whose more probable tokens hold less than p."""
  rng = np.random.default_rng(0)
  nucleus = jax.jit(sampler_lib.nucleus)
  for trial in range(60):
    v = int(rng.integers(1, 3000))
    p = float(rng.uniform(0.01, 1.0)) if trial else 1.0
    logits = rng.standard_normal(v).astype(np.float32) * rng.uniform(0.1, 8.0)
    if trial % 3 == 0:  # Ties.
      logits = np.round(logits)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    keep = np.asarray(nucleus(jnp.asarray(probs), p))
    p64 = probs.astype(np.float64)
    want = np.array([p64[p64 > x].sum() for x in p64]) < p
    np.testing.assert_array_equal(keep, want, err_msg=f"trial {trial}")
    assert keep[np.argmax(probs)]
  # By hand: 0.5 alone < 0.8, 0.5 + 0.3 reaches it -> {0, 1}; p = 0.5 -> {0}.
  probs = jnp.asarray([0.5, 0.3, 0.15, 0.05])
  assert np.asarray(nucleus(probs, 0.8)).tolist() == [True, True, False, False]
  assert np.asarray(nucleus(probs, 0.5)).tolist() == [True, False, False, False]
  assert np.asarray(nucleus(probs, 0.51)).tolist() == [True, True, False, False]
  assert np.asarray(nucleus(jnp.asarray([0.25] * 4), 0.3)).all()  # One tie group.


def test_bad_arguments():
  with pytest.raises(ValueError, match="temperature"):
    sampler_lib.Temperature(0.0)
  with pytest.raises(ValueError, match="TopP.p"):
    sampler_lib.TopP(p=0.0)
  with pytest.raises(ValueError, match="Unknown sampling strategy"):
    sampler_lib.make_strategy("beam")
  with pytest.raises(ValueError, match="at least one token"):
    sampler_lib.left_pad([[1], []], 0)


def test_left_pad():
  tokens, mask = sampler_lib.left_pad([[1, 2, 3], [4]], pad_id=0, multiple=4)
  np.testing.assert_array_equal(tokens, [[0, 1, 2, 3], [0, 0, 0, 4]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])


@pytest.mark.parametrize("decode", ["scan", "unrolled", "scan_xla", "cpu_kernel"])
def test_every_decode_path_samples_the_same(model, decode):
  """Unrolled or scanned layers, kernel or XLA, packed or row-major weights:
  the same greedy tokens as the default ("auto")."""
  cfg, params, tok = model
  prompts = [[5, 17, 33], [7]]
  a = sampler_lib.Sampler(cfg, tok)(params, prompts, max_new_tokens=10, eos_ids=())
  b = sampler_lib.Sampler(cfg, tok, decode=decode)(
      params, prompts, max_new_tokens=10, eos_ids=())
  assert a.tokens == b.tokens
