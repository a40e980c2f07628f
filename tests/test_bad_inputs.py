"""Bad inputs a new user tries, through the job itself: counted, named, nothing lost.

The families of docs/BAD_INPUTS.md that reach the pipelines (the readers'
own cases are in test_instructions.py, test_corpus.py; checkpoints in
test_train_resume.py; config fields in test_config_validation.py; reruns
with other inputs in test_workdir.py).
"""

import json
import os

import pytest

from fedjax_u2s import pipelines
from fedjax_u2s import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fedit_instructions.py")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_path):
  del smollm2_path  # Needed for the tokenizer; skips when absent.
  return testing.write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny")))


def _rows(path, n, without_response):
  rows = [{"instruction": f"Say {i}.", "category": f"c{i % 2}",
           **({} if i < without_response else {"output": f"{i}"})} for i in range(n)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _config(model, data, **kw):
  return testing.load_config(CONFIG, "smoke", **{
      "model.name": model, "data.path": data, "federated.num_rounds": 1,
      "partition.method": "iid", **kw})


def test_rows_without_a_response_are_counted_not_vanished(tiny_model, tmp_path, capsys):
  data = _rows(tmp_path / "rows.jsonl", 40, without_response=30)
  # 10 rows left cannot fill 4 clients of 4: the error says why there are 10.
  with pytest.raises(ValueError, match=r"30 of 40 rows of .*rows\.jsonl were dropped "
                                       r"\(30 missing_response\)"):
    pipelines.run(_config(tiny_model, data), str(tmp_path / "a"))
  # With room for 10, the run goes on and says what it dropped.
  wd = str(tmp_path / "b")
  pipelines.run(_config(tiny_model, data, **{
      "partition.num_clients": 2, "partition.min_size": 2,
      "federated.clients_per_round": 2, "data.eval_fraction": 0.0}), wd)
  out = capsys.readouterr().out
  assert "read 40 rows" in out and "kept 10; dropped 30 (75.0%): 30 missing_response" in out
  stats = json.load(open(os.path.join(wd, "data_stats.json")))
  assert stats["read"] == {"read": 40, "kept": 10,
                           "dropped": {"missing_response": 30, "empty_response": 0}}
  assert sum(c["kept"] for c in stats["clients"]) == 10


def test_prompts_longer_than_max_length_are_counted(tiny_model, tmp_path, capsys):
  data = _rows(tmp_path / "rows.jsonl", 40, without_response=0)
  with pytest.raises(ValueError, match=r"max_length"):
    pipelines.run(_config(tiny_model, data, **{"train.max_length": 5}),
                  str(tmp_path / "a"))
  out = capsys.readouterr().out
  assert "prompt_too_long" in out


def test_a_column_mapping_reads_other_names(tiny_model, tmp_path):
  path = tmp_path / "mine.jsonl"
  path.write_text("".join(json.dumps({"question": f"Say {i}.", "completion": f"{i}",
                                      "category": f"c{i % 2}"}) + "\n"
                          for i in range(40)))
  with pytest.raises(ValueError, match=r"config\.data\.fields"):
    pipelines.run(_config(tiny_model, str(path)), str(tmp_path / "a"))
  wd = str(tmp_path / "b")
  pipelines.run(_config(tiny_model, str(path), **{
      "data.fields.instruction": "question", "data.fields.response": "completion"}), wd)
  stats = json.load(open(os.path.join(wd, "data_stats.json")))
  assert stats["read"]["kept"] == 40
