"""The training loop resumes bit-exactly, past a corrupt newest checkpoint.

A tiny random Llama and synthetic token data for three clients run the real
loop of :func:`fedjax_u2s.train.train` in-process (jitted rounds, orbax
checkpoints, metrics): once uninterrupted, and once killed (simulated with
``train.halt_after_round``) with the newest checkpoint then damaged the two
ways a kill or a full disk leaves it, and started again.
"""

import os

import jax
import numpy as np
import pytest

from fedjax_u2s import checkpoint
from fedjax_u2s import testing
from fedjax_u2s import train
from fedjax_u2s.models import llama

MODEL = testing.tiny_llama_config()
NUM_CLIENTS = 3
TIMING = ("seconds", "tokens_per_s", "compile_s")


def _token_set(seed: int, n: int):
  return testing.random_token_set(seed, n, MODEL.vocab_size)


def _config(**overrides):
  return testing.tiny_train_config(**overrides)


@pytest.fixture(scope="module")
def base_params():
  return llama.init_params(jax.random.key(0), MODEL)


def _train(workdir, base_params, **overrides) -> train.TrainResult:
  return train.train(_config(**overrides), str(workdir), model_config=MODEL,
                     base_params=base_params,
                     client_sets=[_token_set(i, 5 + i) for i in range(NUM_CLIENTS)],
                     eval_set=_token_set(99, 4))


def _rows(result):
  return [{k: v for k, v in row.items() if k not in TIMING} for row in result.metrics]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_params):
  """An uninterrupted run."""
  return _train(tmp_path_factory.mktemp("reference"), base_params)


def _empty_meta(step_dir):
  open(os.path.join(step_dir, "meta", "metadata"), "w").close()


def _truncate_array_data(step_dir):
  """Halves the OCDBT data file the state's arrays are read from."""
  d = os.path.join(step_dir, "state", "d")
  big = max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)


@pytest.mark.parametrize("corrupt", [_empty_meta, _truncate_array_data])
def test_resume_past_a_corrupt_checkpoint_is_bit_exact(tmp_path, base_params,
                                                        reference, corrupt):
  halted = _train(tmp_path, base_params, **{"train.halt_after_round": 2})
  assert halted.rounds == 2
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(os.listdir(ckpt_dir)) == ["1", "2"]
  corrupt(str(ckpt_dir / "2"))
  damaged = {os.path.relpath(os.path.join(d, f), ckpt_dir / "2"):
             open(os.path.join(d, f), "rb").read()
             for d, _, fs in os.walk(ckpt_dir / "2") for f in fs}

  result = _train(tmp_path, base_params)
  assert result.rounds == 4
  jax.tree.map(np.testing.assert_array_equal, result.lora, reference.lora)
  assert _rows(result) == _rows(reference)
  # Moved aside whole, not deleted, and out of orbax's sight.
  (aside,) = os.listdir(tmp_path / "checkpoints_corrupt")
  assert aside.startswith("2-")
  moved = tmp_path / "checkpoints_corrupt" / aside
  assert {os.path.relpath(os.path.join(d, f), moved): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(moved) for f in fs} == damaged
  assert checkpoint.Checkpointer(str(ckpt_dir)).all_rounds() == [3, 4]

  # Another adapter rank is a config mismatch: an error, no fallback.
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"checkpoints/4 does not match this run's state: .*saved"):
    _train(tmp_path, base_params, **{"lora.rank": 4})
  assert os.listdir(tmp_path / "checkpoints_corrupt") == [aside]
  assert checkpoint.Checkpointer(str(ckpt_dir)).all_rounds() == [3, 4]


def test_every_checkpoint_lost_starts_over_with_one_log(tmp_path, base_params,
                                                       reference):
  """Rounds were logged, then every checkpoint went: a clean restart, no round-0 twice."""
  _train(tmp_path, base_params, **{"train.halt_after_round": 2})
  for step in os.listdir(tmp_path / "checkpoints"):
    _empty_meta(str(tmp_path / "checkpoints" / step))
  result = _train(tmp_path, base_params)
  assert [r["round"] for r in result.metrics] == [r["round"] for r in reference.metrics]
  assert _rows(result) == _rows(reference)
  jax.tree.map(np.testing.assert_array_equal, result.lora, reference.lora)


@pytest.mark.parametrize("key,value,message", [
    ("checkpoint.every", 0, r"config\.checkpoint\.every=0: must be >= 1"),
    ("checkpoint.keep", 0, r"config\.checkpoint\.keep=0: must be >= 1"),
    ("federated.client_lr", 0.0, r"config\.federated\.client_lr=0\.0: must be > 0"),
    ("federated.clients_per_round", 4,
     r"clients_per_round=4 but only 3 clients exist"),
])
def test_bad_config_is_refused_before_any_work(tmp_path, key, value, message):
  with pytest.raises(ValueError, match=message):
    _train(tmp_path, base_params=None, **{key: value})
  assert not os.listdir(tmp_path)
