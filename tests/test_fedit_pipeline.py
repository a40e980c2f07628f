"""The federated tuning job end to end: main command, exact resume, devices, hosts.

A tiny random Llama with SmolLM2's real tokenizer and chat template stands in
for the 135M model so that every run takes seconds; everything else (data
reading, chat formatting, partitioning, the jitted rounds, orbax checkpoints,
export) is the real job.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from fedjax_u2s import pipelines
from fedjax_u2s.pipelines import fedit
from fedjax_u2s.pipelines import workdir as workdir_lib
from fedjax_u2s import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fedit_instructions.py")
ROUNDS = 6


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_path):
  del smollm2_path  # Needed for the tokenizer; skips when absent.
  return testing.write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny")))


def _flags(model, workdir, *extra):
  return [f"--config={CONFIG}:smoke", f"--workdir={workdir}",
          f"--config.model.name={model}", f"--config.federated.num_rounds={ROUNDS}",
          *extra]


def _main(model, workdir, *extra, env=None, timeout=600):
  cmd = [sys.executable, "-m", "fedjax_u2s.main", *_flags(model, workdir, *extra)]
  env = {**os.environ, **(env or {})}
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env,
                        timeout=timeout)


def _config(model, **overrides):
  return testing.load_config(CONFIG, "smoke", **{
      "model.name": model, "federated.num_rounds": ROUNDS, **overrides})


def _metrics(workdir):
  """The rows of ``metrics.jsonl`` (row 0: the evaluation before round 1)."""
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def _adapter(workdir):
  return safetensors.numpy.load_file(
      os.path.join(workdir, "adapter", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
  """An uninterrupted single-device run of the main command."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = _main(tiny_model, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_main_command_writes_everything(reference):
  rows = _metrics(reference)
  assert [r["round"] for r in rows] == list(range(ROUNDS + 1))  # 0: eval before.
  train_rows = rows[1:]
  assert all(np.isfinite(r["train_loss"]) and r["num_tokens"] > 0 for r in train_rows)
  assert all(len(r["clients"]) == 2 and r["bytes_up"] > 0 for r in train_rows)
  # Compiled before round 1 and timed apart. Packed rows (the default) have
  # per-round shapes (data/batching.py), so a later round may compile again,
  # once per shape not seen before.
  assert train_rows[0]["compile_s"] > 0
  assert all("eval_loss" in r for r in rows)
  for name in ("curves.png", "data_stats.json", "config.json",
               "adapter/adapter_config.json"):
    assert os.path.exists(os.path.join(reference, name)), name
  assert os.listdir(os.path.join(reference, "tensorboard"))
  ckpts = sorted(int(d) for d in os.listdir(os.path.join(reference, "checkpoints"))
                 if d.isdigit())
  assert ckpts == [ROUNDS - 2, ROUNDS - 1, ROUNDS]  # keep=3.
  adapter = _adapter(reference)
  assert any(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k)
  stats = json.load(open(os.path.join(reference, "data_stats.json")))
  assert len(stats["clients"]) == 4 and all(c["examples"] > 0 for c in stats["clients"])


def test_halt_and_rerun_is_bit_identical(reference, tiny_model, tmp_path):
  """Preempted after round 2 (in this process), then the same job again."""
  workdir = str(tmp_path)
  pipelines.run(_config(tiny_model, **{"train.halt_after_round": 2}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
  pipelines.run(_config(tiny_model), workdir)
  want, got = _adapter(reference), _adapter(workdir)
  assert sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  rows = _metrics(workdir)
  assert [r["round"] for r in rows] == list(range(ROUNDS + 1))  # No round twice.
  ref_rows = _metrics(reference)
  assert [r.get("train_loss") for r in rows] == [r.get("train_loss") for r in ref_rows]


def test_sigkill_mid_run_then_rerun_is_bit_identical(reference, tiny_model, tmp_path):
  workdir = str(tmp_path)
  cmd = [sys.executable, "-m", "fedjax_u2s.main", *_flags(tiny_model, workdir)]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = os.path.join(workdir, "checkpoints", "1")
  deadline = time.time() + 300
  while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert max(done) < ROUNDS, "the run finished before it could be killed"
  result = _main(tiny_model, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming from the checkpoint of round" in result.stdout + result.stderr
  want, got = _adapter(reference), _adapter(workdir)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_eight_devices_equal_one(reference, tiny_model, tmp_path):
  result = _main(tiny_model, str(tmp_path),
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 0, result.stderr[-3000:]
  want, got = _adapter(reference), _adapter(str(tmp_path))
  for k in want:  # Sums over devices reorder float additions: not bit-exact.
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-5, err_msg=k)


def test_two_processes_equal_one(reference, tiny_model, tmp_path):
  """launch/multihost_local.sh: 2 jax.distributed processes x 2 CPU devices."""
  env = {**os.environ, "NPROC": "2", "DEVICES_PER_PROC": "2", "VENV": sys.prefix}
  result = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "multihost_local.sh"),
       *_flags(tiny_model, str(tmp_path))],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  want, got = _adapter(reference), _adapter(str(tmp_path))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-5, err_msg=k)
  rows = _metrics(str(tmp_path))
  assert len(rows) == ROUNDS + 1  # Only process 0 writes metrics.


def test_model_parallel_equals_one(reference, tiny_model, tmp_path):
  """8 devices as a (2 clients, 4 model) mesh: the base is split at load
  (common.load_model) and trained, evaluated and exported split."""
  result = _main(tiny_model, str(tmp_path), "--config.mesh.model_parallel=4",
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 0, result.stderr[-3000:]
  want, got = _adapter(reference), _adapter(str(tmp_path))
  for k in want:  # Split products sum in another order in every layer.
    np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-4, err_msg=k)


def test_two_processes_model_parallel_equal_one(reference, tiny_model, tmp_path):
  """2 jax.distributed processes x 2 CPU devices, the base split over 2: a
  model group inside each process, the clients across the two."""
  env = {**os.environ, "NPROC": "2", "DEVICES_PER_PROC": "2", "VENV": sys.prefix}
  result = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "multihost_local.sh"),
       *_flags(tiny_model, str(tmp_path)), "--config.mesh.model_parallel=2"],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  want, got = _adapter(reference), _adapter(str(tmp_path))
  for k in want:  # Split products sum in another order in every layer.
    np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-4, err_msg=k)


def test_bf16_training_tracks_fp32(reference, tiny_model, tmp_path):
  """The whole job with bf16 compute (the accelerator configs' setting)
  against fp32: every round's train loss within 1% and the adapters' trained
  B factors pointing the same way (the issue's bf16-vs-fp32 pair, on the CPU,
  where XLA converts bf16 matmul inputs to f32: what is checked is bf16
  rounding of weights and activations, the same as on an accelerator). The
  tiny random model's loss stays near log(vocab), so the loss check is weak
  here and the adapters' direction carries the test; the real SmolLM2 pair is
  in docs/benchmarks.md ("Accelerators")."""
  workdir = str(tmp_path)
  pipelines.run(_config(tiny_model, **{"model.dtype": "bfloat16"}), workdir)
  rows = _metrics(workdir)[1:]
  ref_rows = _metrics(reference)[1:]
  got = np.array([r["train_loss"] for r in rows])
  want = np.array([r["train_loss"] for r in ref_rows])
  rel = np.abs(got - want) / want
  print("bf16 vs fp32 train loss, relative difference per round:", rel)
  assert rel.max() < 0.01
  a, b = _adapter(reference), _adapter(workdir)
  keys = [k for k in a if "lora_B" in k]
  x = np.concatenate([a[k].ravel() for k in keys]).astype(np.float64)
  y = np.concatenate([b[k].ravel() for k in keys]).astype(np.float64)
  cos = x @ y / np.linalg.norm(x) / np.linalg.norm(y)
  print(f"lora_B cosine {cos:.5f}, relative L2 {np.linalg.norm(x - y) / np.linalg.norm(x):.3e}")
  assert cos > 0.98


def test_nonfinite_loss_stops_with_checkpoint_intact(tiny_model, tmp_path):
  workdir = str(tmp_path)
  pipelines.run(_config(tiny_model, **{"train.halt_after_round": 1}), workdir)
  before = _adapter(workdir)
  from fedjax_u2s import checkpoint
  ckpt_dir = os.path.join(workdir, "checkpoints")
  files = lambda: {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
                   for d, _, fs in os.walk(os.path.join(ckpt_dir, "1")) for f in fs}
  saved = files()
  diverging = _config(tiny_model, **{"federated.client_lr": 1e30,
                                     "federated.grad_clip": 0.0,
                                     "federated.lr_schedule": "constant",
                                     "federated.warmup_rounds": 0})
  # Another learning rate is another run: refused before anything is touched.
  with pytest.raises(workdir_lib.WorkdirMismatchError,
                     match=r"config\.federated\.client_lr: 0\.0002 \(workdir\) -> 1e\+30"):
    pipelines.run(diverging, workdir)
  assert files() == saved
  # The job itself (past the workdir guard) stops at the non-finite round.
  with pytest.raises(FloatingPointError,
                     match=r"Round 2: .*non-finite.*last good checkpoint \(round 1\)"):
    fedit.run(diverging, workdir)
  assert checkpoint.Checkpointer(ckpt_dir).latest_round() == 1
  assert files() == saved  # The good checkpoint is untouched.
  # And the job goes on from it with a sane learning rate.
  pipelines.run(_config(tiny_model, **{"train.halt_after_round": 2}), workdir)
  assert checkpoint.Checkpointer(ckpt_dir).latest_round() == 2
  assert sorted(_adapter(workdir)) == sorted(before)


def test_bad_inputs_are_named(tiny_model, tmp_path):
  with pytest.raises(ValueError, match=r"clients_per_round=9 exceeds "
                     r"config\.partition\.num_clients=4"):
    pipelines.run(_config(tiny_model, **{"federated.clients_per_round": 9}),
                 str(tmp_path / "a"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": "q", "answer": "a"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl"):
    pipelines.run(_config(tiny_model, **{"data.path": str(bad)}), str(tmp_path / "b"))
  rows = tmp_path / "rows.jsonl"
  rows.write_text("".join(json.dumps({"instruction": f"i{i}", "output": f"o{i}"}) + "\n"
                          for i in range(20)))
  with pytest.raises(ValueError, match=r"needs the field 'category'"):
    pipelines.run(_config(tiny_model, **{"data.path": str(rows)}), str(tmp_path / "c"))
