"""Packed training rows: the same steps, losses and gradients as unpacked.

Packing only changes the layout of a step's examples (several per row, each
attending to itself from position 0), so every check here is an equality
against the unpacked path at fp32 tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import ops as ops_lib
from fedjax_u2s import testing
from fedjax_u2s.data import batching
from fedjax_u2s.data.instructions import TokenizedSet
from fedjax_u2s.federated import client as client_lib
from fedjax_u2s.federated import objectives
from fedjax_u2s.models import llama

T = 16
CONFIG = testing.tiny_llama_config()
LCFG = lora_lib.LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "o"))


def _set(lengths, seed=0, prompt=3, t=T):
  """Examples of the given lengths; loss on all tokens after ``prompt``."""
  rs = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  input_mask = np.arange(t) < lengths[:, None]
  tokens = np.where(input_mask, rs.integers(1, CONFIG.vocab_size, (len(lengths), t)), 0)
  loss_mask = input_mask & (np.arange(t) >= prompt)
  return TokenizedSet(tokens.astype(np.int32), input_mask, loss_mask, 0,
                      np.arange(len(lengths)), num_response_tokens=int(loss_mask.sum()))


def _params():
  base = llama.init_params(jax.random.key(0), CONFIG, std=0.2)
  lora = lora_lib.init(jax.random.key(1), CONFIG, LCFG)
  # b = 0 at init would zero every gradient of a: give b values.
  lora = jax.tree.map(
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), lora)
  return base, lora


def _loss(lora, base, batch):
  return objectives.causal_lm_loss(lora, base, batch, None, model_config=CONFIG,
                                   lora_config=LCFG)


def _flat(batch, lead):
  """Merges the leading ``lead`` axes into rows: [..., R, P] -> [R', P]."""
  return {k: jnp.asarray(v).reshape((-1, v.shape[-1])) for k, v in batch.items()}


def test_pack_rows_first_fit_decreasing_by_hand():
  # Capacity 10. Longest first, ties in index order: 7 (i=1), 6 (i=3),
  # 3 (i=0), 3 (i=4), 2 (i=2). 7 -> row 0; 6 -> row 1; 3 -> row 0 (10);
  # 3 -> row 1 (9); 2 -> row 2.
  assert batching.pack_rows([3, 7, 2, 6, 3], 10) == [[1, 0], [3, 4], [2]]
  assert batching.pack_rows([], 10) == []
  with pytest.raises(ValueError, match="raise pack_length"):
    batching.pack_rows([11], 10)


def test_packed_round_holds_the_same_steps():
  sets = [_set([5, 9, 3, 12, 7, 4, 6], seed=1), _set([16, 2, 8, 11, 5], seed=2)]
  kw = dict(batch_size=2, grad_accum=2, local_steps=3, seed=4)
  plain, cur = batching.round_batches(sets, [3, 8], [2, 0], **kw)
  packed, cur_p = batching.round_batches(sets, [3, 8], [2, 0], pack=True, **kw)
  np.testing.assert_array_equal(cur, cur_p)
  np.testing.assert_array_equal(plain.step_mask, packed.step_mask)
  np.testing.assert_array_equal(plain.num_examples, packed.num_examples)
  np.testing.assert_array_equal(plain.num_examples, [7, 5])  # Examples, not rows.
  b = packed.batch
  c, s, a, rows, p = b["tokens"].shape
  assert p % batching.PACK_MULTIPLE == 0 or p == 2 * T
  assert p <= 2 * T and rows * p <= 2 * T  # No micro-batch holds more than B x T.
  assert a * rows < 4  # Fewer rows than the 4 unpacked ones per step.
  for j in range(c):
    for i in range(s):
      # Every example of the step, once: compare the multisets of sequences.
      want = sorted(tuple(r[m].tolist()) for r, m in zip(
          plain.batch["tokens"][j, i].reshape(-1, T),
          plain.batch["input_mask"][j, i].reshape(-1, T)) if m.any())
      got = []
      tok = b["tokens"][j, i].reshape(-1, p)
      seg = b["segment_ids"][j, i].reshape(-1, p)
      pos = b["positions"][j, i].reshape(-1, p)
      for r in range(tok.shape[0]):
        for sid in range(1, seg[r].max() + 1):
          where = seg[r] == sid
          np.testing.assert_array_equal(pos[r][where], np.arange(where.sum()))
          got.append(tuple(tok[r][where].tolist()))
      assert sorted(got) == want
  # Padding: segment 0, no input, no loss.
  pad = b["segment_ids"] == 0
  assert not b["input_mask"][pad].any() and not b["loss_mask"][pad].any()
  np.testing.assert_array_equal(b["input_mask"], ~pad)


def _segments(batch, j, i):
  """Client j's step i of a packed batch: its examples' token tuples, sorted."""
  p = batch["tokens"].shape[-1]
  tok = batch["tokens"][j, i].reshape(-1, p)
  seg = batch["segment_ids"][j, i].reshape(-1, p)
  return sorted(tuple(tok[r][seg[r] == sid].tolist())
                for r in range(tok.shape[0]) for sid in range(1, seg[r].max() + 1))


def test_packed_round_is_deterministic_and_resumes_exactly():
  sets = [_set([5, 9, 3, 12, 7, 4, 6], seed=1)]
  kw = dict(batch_size=3, local_steps=2, seed=0, pack=True)
  first, cur = batching.round_batches(sets, [0], [0], **kw)
  again, _ = batching.round_batches(sets, [0], [0], **kw)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  second, _ = batching.round_batches(sets, [0], cur, **kw)
  both, _ = batching.round_batches(sets, [0], [0], **{**kw, "local_steps": 4})
  # Round 2 from the saved cursors = steps 3 and 4 of one 4-step round
  # (shapes are per round, so compare the examples of each step).
  for i in range(2):
    assert _segments(second.batch, 0, i) == _segments(both.batch, 0, 2 + i)
    assert _segments(first.batch, 0, i) == _segments(both.batch, 0, i)


def test_pack_length_bounds_rows_and_is_checked():
  sets = [_set([5, 9, 3, 12, 7, 4, 6, 8], seed=1)]
  b, _ = batching.round_batches(sets, [0], [0], batch_size=4, local_steps=2,
                                pack=True, pack_length=T)
  assert b.batch["tokens"].shape[-1] == T  # Rows of at most T tokens.
  # Up to 4 * T // T rows per micro-batch, only as many as a step needs.
  assert b.batch["tokens"].shape[2:4] == (1, 2)
  with pytest.raises(ValueError, match="pack_length"):
    batching.round_batches(sets, [0], [0], batch_size=4, local_steps=1,
                           pack=True, pack_length=T - 1)


def test_per_example_losses_and_gradients_equal_unpacked():
  base, lora = _params()
  ts = _set([5, 9, 3, 12, 7, 4], seed=3)
  plain = batching.eval_batches(ts, 6)
  packed = batching.eval_batches(ts, 6, pack=True, pack_length=2 * T)
  assert packed["tokens"].shape[-1] < 6 * T  # Packing saved positions.
  plain, packed = _flat(plain, 1), _flat(packed, 1)

  def per_token(batch):
    logits, _ = llama.forward(
        base, batch["tokens"], config=CONFIG, input_mask=batch["input_mask"],
        positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
        lora=lora, lora_config=LCFG)
    return objectives.token_cross_entropy(logits[:, :-1], batch["tokens"][:, 1:])

  lp, lq = per_token(plain), per_token(packed)
  seg = np.asarray(packed["segment_ids"])
  tok = np.asarray(packed["tokens"])
  found = 0
  for e in range(6):  # Locate example e in the packed rows by its tokens.
    n = int(ts.input_mask[e].sum())
    for r in range(seg.shape[0]):
      for sid in range(1, seg[r].max() + 1):
        idx = np.flatnonzero(seg[r] == sid)
        if len(idx) == n and (tok[r, idx] == ts.tokens[e, :n]).all():
          found += 1
          np.testing.assert_allclose(lq[r, idx[:-1]], lp[e, :n - 1],
                                     rtol=1e-5, atol=1e-5)
          # Its gradient alone: loss only on this segment vs only this row.
          only_q = dict(packed, loss_mask=packed["loss_mask"] & (packed["segment_ids"] == sid)
                        & (jnp.arange(seg.shape[0]) == r)[:, None])
          only_p = dict(plain, loss_mask=plain["loss_mask"]
                        & (jnp.arange(plain["tokens"].shape[0]) == e)[:, None])
          (l_q, w_q), g_q = jax.value_and_grad(_loss, has_aux=True)(lora, base, only_q)
          (l_p, w_p), g_p = jax.value_and_grad(_loss, has_aux=True)(lora, base, only_p)
          assert float(w_q) == float(w_p) == n - 3
          np.testing.assert_allclose(l_q, l_p, rtol=1e-5)
          jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                       g_q, g_p)
  assert found == 6


def test_eval_loss_sums_equal_unpacked():
  base, lora = _params()
  ts = _set([5, 9, 3, 12, 7, 4, 16, 2, 10], seed=5)
  plain = batching.eval_batches(ts, 4)
  packed = batching.eval_batches(ts, 4, pack=True)
  assert packed["tokens"].size < plain["tokens"].size

  def total(batches):
    out = [_loss(lora, base, jax.tree.map(lambda x: x[i], batches))
           for i in range(batches["tokens"].shape[0])]
    return sum(float(l) for l, _ in out), sum(float(w) for _, w in out)

  (lp, wp), (lq, wq) = total(plain), total(packed)
  assert wp == wq == float(ts.loss_mask[:, 1:].sum())
  np.testing.assert_allclose(lq, lp, rtol=1e-5)


def test_federated_client_update_equals_unpacked():
  base, lora = _params()
  sets = [_set([5, 9, 3, 12, 7, 4, 6], seed=6)]
  kw = dict(batch_size=2, grad_accum=2, local_steps=2, seed=1)
  loss_fn = objectives.make_causal_lm_loss(CONFIG, LCFG)

  def delta(batches):
    b = jax.tree.map(lambda x: jnp.asarray(x[0]), batches.batch)
    out = client_lib.client_update(
        lora, base, b, jnp.asarray(batches.step_mask[0]), jax.random.key(0),
        loss_fn=loss_fn, optimizer=optax.adamw(1e-2), learning_rate=1e-2)
    return out

  plain = delta(batching.round_batches(sets, [0], [0], **kw)[0])
  packed = delta(batching.round_batches(sets, [0], [0], pack=True, **kw)[0])
  assert float(plain.num_tokens) == float(packed.num_tokens)
  np.testing.assert_allclose(packed.loss_sum, plain.loss_sum, rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               packed.delta, plain.delta)


def test_unpacked_rows_are_one_segment_each():
  """Absent leaves mean one segment per row: giving them changes nothing."""
  base, lora = _params()
  b = _flat(batching.eval_batches(_set([5, 9, 3, 12], seed=7), 4), 1)
  seg = b["input_mask"].astype(jnp.int32)
  pos = jnp.maximum(jnp.cumsum(b["input_mask"], axis=1) - 1, 0)
  np.testing.assert_allclose(
      _loss(lora, base, dict(b, segment_ids=seg, positions=pos))[0],
      _loss(lora, base, b)[0], rtol=1e-6)


@pytest.mark.skipif(not ops_lib.kernel_runs_here(), reason="CPU kernel not built here")
def test_cpu_kernel_ops_take_the_segment_mask():
  base, lora = _params()
  b = _flat(batching.eval_batches(_set([5, 9, 3, 12, 7], seed=8), 5, pack=True), 1)
  kw = dict(config=CONFIG, input_mask=b["input_mask"], positions=b["positions"],
            segment_ids=b["segment_ids"], lora=lora, lora_config=LCFG)
  want = llama.sequence_hidden(base, b["tokens"], **kw)
  got = llama.sequence_hidden(base, b["tokens"], ops=ops_lib.CPU_KERNEL, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_segments_need_positions_and_no_cache():
  base, _ = _params()
  tok = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="per-segment positions"):
    llama.sequence_hidden(base, tok, config=CONFIG, segment_ids=jnp.ones((1, 4), jnp.int32))
  cache = llama.init_cache(CONFIG, 1, 8)
  with pytest.raises(ValueError, match="not with a cache"):
    llama.forward(base, tok, config=CONFIG, cache=cache,
                  segment_ids=jnp.ones((1, 4), jnp.int32))


def test_config_rule_pack_length():
  from fedjax_u2s.pipelines import validate
  ok = testing.tiny_train_config(**{"train.max_length": 16})
  assert not [p for p in validate.problems(ok) if "pack" in p]
  assert ok.train.pack  # The default: packed rows.
  short = testing.tiny_train_config(**{"train.max_length": 16, "train.pack_length": 10})
  assert any("pack_length=10 is shorter than config.train.max_length=16" in p
             for p in validate.problems(short))
  negative = testing.tiny_train_config(**{"train.pack_length": -1})
  assert any("config.train.pack_length=-1" in p for p in validate.problems(negative))
