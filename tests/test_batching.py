"""Round batching: exact example order, cursors, padding rows and steps."""

import numpy as np
import pytest

from fedjax_u2s.data import batching
from fedjax_u2s.data.instructions import TokenizedSet

PAD = 9
T = 4


def _set(n, tag=0, t=T):
  """n examples; row i has tokens [tag*1000 + i, 1, 2, PAD], 3 real tokens."""
  tokens = np.full((n, t), PAD, np.int32)
  tokens[:, 0] = tag * 1000 + np.arange(n)
  tokens[:, 1:3] = [1, 2]
  input_mask = np.zeros((n, t), bool)
  input_mask[:, :3] = True
  loss_mask = np.zeros((n, t), bool)
  loss_mask[:, 1:3] = True
  return TokenizedSet(tokens, input_mask, loss_mask, PAD, np.arange(n),
                      num_response_tokens=2 * n)


def _rows(batches, client):
  """Example ids per step of one client: [[id or None per row], ...]."""
  tok = batches.batch["tokens"][client]  # [S, A, B, T]
  real = batches.batch["input_mask"][client].any(-1)  # [S, A, B]
  s = tok.shape[0]
  ids = tok[..., 0].reshape(s, -1) % 1000
  real = real.reshape(s, -1)
  return [[int(i) if r else None for i, r in zip(ids[k], real[k])]
          for k in range(s)]


def test_epoch_order_is_the_documented_permutation():
  np.testing.assert_array_equal(batching.epoch_order(5, 7, 0, 5), [1, 4, 2, 3, 0])
  np.testing.assert_array_equal(batching.epoch_order(5, 7, 1, 5), [3, 1, 4, 2, 0])
  np.testing.assert_array_equal(
      batching.epoch_order(3, 2, 4, 11),
      np.random.default_rng([3, 2, 4]).permutation(11))


def test_hand_made_case_with_epoch_boundary_repeat():
  # seed 5, client 7, n=5: epoch 0 = [1 4 2 3 0], epoch 1 = [3 1 4 2 0].
  # Step 1: 1 4 2. Step 2: 3 0, then epoch 1 starts with 3 -- already in this
  # step -- so the step stops and its third row is padding. Step 3: 3 1 4.
  b, cur = batching.round_batches([_set(5)], [7], [0], batch_size=3,
                                  grad_accum=1, local_steps=3, seed=5)
  assert _rows(b, 0) == [[1, 4, 2], [3, 0, None], [3, 1, 4]]
  np.testing.assert_array_equal(cur, [8])
  assert b.batch["tokens"].shape == (1, 3, 1, 3, T)
  assert b.step_mask.tolist() == [[True, True, True]]
  # The padding row: pad tokens, no input, no loss.
  np.testing.assert_array_equal(b.batch["tokens"][0, 1, 0, 2], [PAD] * T)
  assert not b.batch["input_mask"][0, 1, 0, 2].any()
  assert not b.batch["loss_mask"][0, 1, 0, 2].any()
  # Real rows carry their example's masks.
  np.testing.assert_array_equal(b.batch["loss_mask"][0, 0, 0, 0],
                                [False, True, True, False])
  # Same stream split over grad_accum micro-batches of 1.
  b2, _ = batching.round_batches([_set(5)], [7], [0], batch_size=1,
                                 grad_accum=3, local_steps=3, seed=5)
  assert b2.batch["tokens"].shape == (1, 3, 3, 1, T)
  assert _rows(b2, 0) == _rows(b, 0)
  # Resuming from cursor 3 continues at step 2.
  b3, cur3 = batching.round_batches([_set(5)], [7], [3], batch_size=3,
                                    grad_accum=1, local_steps=2, seed=5)
  assert _rows(b3, 0) == [[3, 0, None], [3, 1, 4]]
  np.testing.assert_array_equal(cur3, [8])


def test_types_and_weights():
  sets = [_set(10, 1), _set(3, 2)]
  b, cur = batching.round_batches(sets, [4, 11], [0, 0], batch_size=2,
                                  grad_accum=2, local_steps=2, seed=0)
  assert b.batch["tokens"].dtype == np.int32
  assert b.batch["input_mask"].dtype == bool
  assert b.batch["loss_mask"].dtype == bool
  assert b.num_examples.dtype == np.float32
  np.testing.assert_array_equal(b.num_examples, [10.0, 3.0])
  assert b.client_ids.dtype == np.int32
  np.testing.assert_array_equal(b.client_ids, [4, 11])
  # Client ids tag the rows: no mixing between clients.
  assert (b.batch["tokens"][0][b.batch["input_mask"][0][..., 0]][:, 0] // 1000
          == 1).all()
  np.testing.assert_array_equal(cur, [8, 6])


def test_cursor_resume_reproduces_batches():
  sets = [_set(7, 1), _set(2, 2), _set(12, 3)]
  ids = [0, 5, 9]
  kw = dict(batch_size=2, grad_accum=2, local_steps=2, seed=3)
  # Three rounds in one go.
  cur = np.zeros(3, np.int64)
  straight = []
  for _ in range(3):
    b, cur = batching.round_batches(sets, ids, cur, **kw)
    straight.append(b)
  final = cur
  # One round, "save" the cursors, then a fresh run resumes from them.
  b1, saved = batching.round_batches(sets, ids, [0, 0, 0], **kw)
  saved = np.array(saved.tolist())
  resumed = [b1]
  cur = saved
  for _ in range(2):
    b, cur = batching.round_batches(sets, ids, cur, **kw)
    resumed.append(b)
  np.testing.assert_array_equal(cur, final)
  for x, y in zip(straight, resumed):
    for k in x.batch:
      np.testing.assert_array_equal(x.batch[k], y.batch[k])
    np.testing.assert_array_equal(x.step_mask, y.step_mask)
  # And 3 one-step rounds equal one three-step round.
  one = [batching.round_batches(sets, ids, c, **dict(kw, local_steps=1))[0]
         for c in [[0, 0, 0]]][0]
  cur = np.zeros(3, np.int64)
  steps = []
  for _ in range(3):
    b, cur = batching.round_batches(sets, ids, cur, **dict(kw, local_steps=1))
    steps.append(b.batch["tokens"])
  big, big_cur = batching.round_batches(sets, ids, [0, 0, 0],
                                        **dict(kw, local_steps=3))
  np.testing.assert_array_equal(np.concatenate(steps, axis=1),
                                big.batch["tokens"])
  np.testing.assert_array_equal(cur, big_cur)
  np.testing.assert_array_equal(one.batch["tokens"], steps[0])


def test_each_example_once_per_epoch():
  ts = _set(13)
  b, cur = batching.round_batches([ts], [2], [0], batch_size=4, grad_accum=1,
                                  local_steps=20, seed=1)
  flat = [i for step in _rows(b, 0) for i in step if i is not None]
  assert len(flat) == int(cur[0])
  for e in range(len(flat) // 13):
    assert sorted(flat[13 * e:13 * (e + 1)]) == list(range(13))
  for step in _rows(b, 0):
    real = [i for i in step if i is not None]
    assert len(real) == len(set(real))


def test_small_client_pads_rows_never_repeats():
  b, cur = batching.round_batches([_set(3)], [0], [0], batch_size=4,
                                  grad_accum=2, local_steps=2, seed=0)
  rows = _rows(b, 0)
  for step in rows:
    assert sorted(i for i in step if i is not None) == [0, 1, 2]
    assert step[3:] == [None] * 5  # real rows first, then padding
  np.testing.assert_array_equal(cur, [6])
  assert b.batch["input_mask"][0].any(-1).sum() == 6
  assert not b.batch["loss_mask"][0].reshape(2, 8, T)[:, 3:].any()


def test_local_epochs_steps_and_step_mask():
  sets = [_set(10, 1), _set(3, 2), _set(6, 3)]
  b, cur = batching.round_batches(sets, [0, 1, 2], [0, 0, 0], batch_size=2,
                                  grad_accum=2, local_epochs=1, seed=0)
  # k = 4: client 0 takes 4, 4, 2; client 1 takes 3; client 2 takes 4, 2.
  assert b.step_mask.tolist() == [[True, True, True], [True, False, False],
                                  [True, True, False]]
  np.testing.assert_array_equal(cur, [10, 3, 6])
  for c, n in enumerate([10, 3, 6]):
    flat = [i for step in _rows(b, c) for i in step if i is not None]
    assert sorted(flat) == list(range(n))
  # Padded steps are entirely masked.
  assert not b.batch["input_mask"][1, 1:].any()
  assert not b.batch["loss_mask"][2, 2].any()
  # Capped.
  b, cur = batching.round_batches(sets, [0, 1, 2], [0, 0, 0], batch_size=2,
                                  grad_accum=2, local_epochs=1,
                                  max_local_steps=2, seed=0)
  assert b.step_mask.tolist() == [[True, True], [True, False], [True, True]]
  np.testing.assert_array_equal(cur, [8, 3, 6])
  # Fractional epochs: ceil(0.5 * 10) = 5 examples -> steps of 4 and 1.
  b, cur = batching.round_batches([_set(10)], [0], [0], batch_size=4,
                                  grad_accum=1, local_epochs=0.5, seed=0)
  assert [len([i for i in s if i is not None]) for s in _rows(b, 0)] == [4, 1]
  np.testing.assert_array_equal(cur, [5])
  # Two epochs of a client smaller than a step: one epoch per step.
  b, cur = batching.round_batches([_set(3)], [0], [0], batch_size=4,
                                  grad_accum=1, local_epochs=2, seed=0)
  assert b.step_mask.tolist() == [[True, True]]
  np.testing.assert_array_equal(cur, [6])


def test_errors():
  with pytest.raises(ValueError, match="Client 42 has no examples"):
    batching.round_batches([_set(3), _set(0)], [1, 42], [0, 0], batch_size=2,
                           local_steps=1)
  with pytest.raises(ValueError, match="exactly one of local_steps"):
    batching.round_batches([_set(3)], [1], [0], batch_size=2)
  with pytest.raises(ValueError, match="exactly one of local_steps"):
    batching.round_batches([_set(3)], [1], [0], batch_size=2, local_steps=1,
                           local_epochs=1)
  with pytest.raises(ValueError, match="different max_length"):
    batching.round_batches([_set(3), _set(3, t=6)], [1, 2], [0, 0],
                           batch_size=2, local_steps=1)
  with pytest.raises(ValueError, match="2 client sets, 1 client ids"):
    batching.round_batches([_set(3), _set(3)], [1], [0, 0], batch_size=2,
                           local_steps=1)


def test_empty_client_says_tokenize_dropped_its_examples():
  from fedjax_u2s.data.instructions import DropReport
  report = DropReport("examples tokenized with max_length=4", 5, 0,
                      {"prompt_too_long": 5, "empty_response": 0})
  emptied = TokenizedSet(np.zeros((0, T), np.int32), np.zeros((0, T), bool),
                         np.zeros((0, T), bool), PAD, np.zeros(0, np.int64),
                         num_dropped=5, drops=report)
  with pytest.raises(ValueError) as e:
    batching.round_batches([_set(3), emptied], [1, 42], [0, 0], batch_size=2,
                           local_steps=1)
  assert str(e.value) == (
      "Client 42 has no examples: all 5 of its examples were dropped by "
      "tokenize (5 of 5 examples tokenized with max_length=4 were dropped "
      "(5 prompt_too_long) -- prompt_too_long: raise config.train.max_length "
      "or shorten the prompts).")


def test_eval_batches():
  ts = _set(5)
  out = batching.eval_batches(ts, 2)
  assert out["tokens"].shape == (3, 2, T)
  np.testing.assert_array_equal(out["tokens"].reshape(6, T)[:5], ts.tokens)
  np.testing.assert_array_equal(out["tokens"][2, 1], [PAD] * T)
  np.testing.assert_array_equal(out["input_mask"].any(-1).ravel(),
                                [True] * 5 + [False])
  assert not out["loss_mask"][2, 1].any()
  np.testing.assert_array_equal(out["loss_mask"].reshape(6, T)[:5], ts.loss_mask)
  with pytest.raises(ValueError, match="empty"):
    batching.eval_batches(_set(0), 2)
