"""The entry point and its configs."""

import json
import os
import subprocess
import sys

import pytest

from fedjax_u2s import pipelines
from fedjax_u2s import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(arg=""):
  return testing.load_config(os.path.join(REPO, "configs", "generate.py"), arg)


def test_config_is_locked_and_smoke_shrinks():
  config = _load_config()
  with pytest.raises(AttributeError):
    config.sampling.max_new_token = 3  # A typo must raise, not add a field.
  assert _load_config("smoke").sampling.max_new_tokens < config.sampling.max_new_tokens
  with pytest.raises(ValueError, match="Unknown config argument"):
    _load_config("nope")


def test_unknown_pipeline_is_named(tmp_path):
  config = _load_config()
  with config.unlocked():
    config.pipeline = "nope"
  with pytest.raises(ValueError, match="config.pipeline='nope'"):
    pipelines.run(config, str(tmp_path))


@pytest.mark.slow
def test_main_generates_with_the_real_model(tmp_path, smollm2_path):
  """`python -m fedjax_u2s.main --config=configs/generate.py:smoke` end to end."""
  del smollm2_path  # Only for the skip when the package is absent.
  result = subprocess.run(
      [sys.executable, "-m", "fedjax_u2s.main",
       "--config=" + os.path.join(REPO, "configs", "generate.py") + ":smoke",
       f"--workdir={tmp_path}", "--config.sampling.max_new_tokens=24"],
      capture_output=True, text=True, cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "generations.jsonl")]
  assert len(rows) == 2
  assert rows[0]["prompt"] == "What is the capital of France?"
  assert "Paris" in rows[0]["response"]
  assert all(r["num_tokens"] <= 24 for r in rows)
  assert json.load(open(tmp_path / "config.json"))["sampling"]["max_new_tokens"] == 24
