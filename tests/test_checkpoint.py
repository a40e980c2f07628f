"""Checkpoints restore bit-identical state, keep the last K, survive a torn save."""

import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_u2s import checkpoint
from fedjax_u2s import metrics
from fedjax_u2s.evaluation import report


@flax.struct.dataclass
class _State:
  params: dict
  opt_state: optax.OptState
  round: jax.Array
  rng: jax.Array


def _state(seed):
  params = {"a": jax.random.normal(jax.random.key(seed), (3, 4)),
            "b": {"w": jnp.arange(5, dtype=jnp.float32) * seed}}
  opt = optax.adam(1e-3)
  opt_state = opt.update(params, opt.init(params), params)[1]
  return _State(params=params, opt_state=opt_state, round=jnp.int32(seed),
                rng=jax.random.key_data(jax.random.key(seed)))


def test_round_trip_is_exact_and_keeps_types(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  assert ckpt.restore(checkpoint.abstract(_state(0))) is None
  for r in (1, 2, 3):
    ckpt.save(r, _state(r), {"cursors": np.array([r, 2 * r]), "note": "x"})
  assert ckpt.all_rounds() == [2, 3]  # keep=2
  state, meta, r = ckpt.restore(checkpoint.abstract(_state(0)))
  assert r == 3 and meta == {"cursors": [3, 6], "note": "x"}
  want = _state(3)
  assert type(state) is _State
  assert type(state.opt_state[0]) is type(want.opt_state[0])  # NamedTuples kept.
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  state2, _, r2 = ckpt.restore(checkpoint.abstract(_state(0)), round_=2)
  assert r2 == 2
  np.testing.assert_array_equal(state2.params["a"], _state(2).params["a"])


def test_unfinished_save_is_ignored(tmp_path):
  d = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(str(d), keep=3)
  ckpt.save(1, _state(1), {})
  # A save killed half-way leaves only orbax's temporary directory behind.
  os.makedirs(d / "2.orbax-checkpoint-tmp-123" / "state")
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(d), keep=3)
  assert ckpt.latest_round() == 1
  _, _, r = ckpt.restore(checkpoint.abstract(_state(0)))
  assert r == 1


def test_mismatched_state_names_the_checkpoint(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, _state(1), {})
  other = _state(0).replace(params={"a": jnp.zeros((7, 7))})
  with pytest.raises(ValueError, match="does not match this run's state"):
    ckpt.restore(checkpoint.abstract(other))


def _empty_meta(step_dir):
  open(step_dir / "meta" / "metadata", "w").close()


def _truncate_array_data(step_dir):
  """Halves the OCDBT data file the state's arrays are read from."""
  data = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
  big = max(data, key=lambda p: p.stat().st_size)
  with open(big, "r+b") as f:
    f.truncate(big.stat().st_size // 2)


@pytest.mark.parametrize("corrupt", [_empty_meta, _truncate_array_data])
def test_unreadable_newest_checkpoint_is_moved_aside(tmp_path, corrupt):
  d = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(str(d), keep=3)
  for r in (1, 2):
    ckpt.save(r, _state(r), {"cursors": [r]})
  ckpt.close()
  corrupt(d / "2")
  ckpt = checkpoint.Checkpointer(str(d), keep=3)
  with pytest.raises(checkpoint.CorruptCheckpointError,
                     match=r"ckpt/2 cannot be read: .*\w+Error: ") as e:
    ckpt.restore(checkpoint.abstract(_state(0)))
  assert "\n" not in str(e.value)  # One line, not a TensorStore spec dump.
  state, meta, r = ckpt.restore_newest_intact(checkpoint.abstract(_state(0)))
  assert r == 1 and meta == {"cursors": [1]}
  np.testing.assert_array_equal(state.params["a"], _state(1).params["a"])
  assert ckpt.all_rounds() == [1] and not (d / "2").exists()
  (aside,) = os.listdir(tmp_path / "ckpt_corrupt")
  assert aside.startswith("2-") and os.listdir(tmp_path / "ckpt_corrupt" / aside)
  ckpt.save(2, _state(2), {})  # The round can be written again.
  assert ckpt.all_rounds() == [1, 2]


def test_all_unreadable_starts_from_scratch_keeping_them(tmp_path):
  d = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(str(d), keep=3)
  for r in (1, 2):
    ckpt.save(r, _state(r), {})
  ckpt.close()
  _empty_meta(d / "1")
  _truncate_array_data(d / "2")
  ckpt = checkpoint.Checkpointer(str(d), keep=3)
  assert ckpt.restore_newest_intact(checkpoint.abstract(_state(0))) is None
  assert ckpt.all_rounds() == []
  assert sorted(p.split("-")[0] for p in os.listdir(tmp_path / "ckpt_corrupt")) == ["1", "2"]


def test_other_config_is_an_error_not_a_fallback(tmp_path):
  d = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(str(d))
  ckpt.save(1, _state(1), {})
  other = _state(0).replace(params={"a": jnp.zeros((3, 8)),
                                    "b": {"w": jnp.zeros(5)}})
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"params\.a: saved \(3, 4\) float32, this run \(3, 8\)"):
    ckpt.restore_newest_intact(checkpoint.abstract(other))
  assert ckpt.all_rounds() == [1] and not (tmp_path / "ckpt_corrupt").exists()


def test_keep_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match=r"config\.checkpoint\.keep=0"):
    checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=0)


def test_metric_writer_drops_rerun_rounds_and_torn_lines(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), tensorboard=True)
  for r in (1, 2, 3):
    w.write(r, {"loss": np.float32(1.0 / r), "n": r})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"round": 4, "lo')  # Killed mid-write.
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["round"] for r in rows] == [1, 2, 3]
  w = metrics.MetricWriter(str(tmp_path), resume_round=2)
  w.write(3, {"loss": 0.25})
  w.close()
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["round"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  assert os.listdir(tmp_path / "tensorboard")
  png = report.plot_curves(rows, ["loss", "missing"], str(tmp_path / "c.png"))
  assert png and os.path.getsize(png) > 1000
