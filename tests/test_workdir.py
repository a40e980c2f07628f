"""A workdir records what made each stage; a rerun with other inputs stops."""

import json
import os

import ml_collections
import pytest

from fedjax_u2s import pipelines
from fedjax_u2s import testing
from fedjax_u2s.pipelines import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fedit_instructions.py")


def _config(data_dir, **kw):
  return ml_collections.ConfigDict({
      "seed": 0, "corpus": {"path": str(data_dir), "kind": "folder"},
      "train": {"steps": 4, "halt_after_round": 0}, "evaluate": {"n": 10}, **kw})


STAGES = (
    workdir_lib.Stage("generate", fields=("seed", "corpus"),
                      files=lambda c: {"corpus": c.corpus.path},
                      outputs=("generated",)),
    workdir_lib.Stage("train", fields=("seed", "train"), ignore=("train.halt_after_round",),
                      outputs=("checkpoints", "metrics.jsonl")),
    workdir_lib.Stage("evaluate", fields=("evaluate",), outputs=("eval",)),
)


@pytest.fixture
def corpus(tmp_path):
  d = tmp_path / "corpus"
  d.mkdir()
  (d / "a.txt").write_text("alpha")
  (d / "b.txt").write_text("beta")
  return d


def _outputs(wd):
  for rel in ("generated/client_0000.jsonl", "checkpoints/1/x", "metrics.jsonl",
              "eval/base.json"):
    os.makedirs(os.path.dirname(os.path.join(wd, rel)) or wd, exist_ok=True)
    open(os.path.join(wd, rel), "w").write("old")


def _snapshot(wd):
  return {os.path.relpath(os.path.join(d, f), wd): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(wd) for f in fs}


def test_same_inputs_resume_and_ignored_fields_do_not_count(tmp_path, corpus):
  wd = str(tmp_path / "wd")
  workdir_lib.check_and_record(_config(corpus), wd, STAGES)
  _outputs(wd)
  before = _snapshot(wd)
  cfg = _config(corpus)
  cfg.train.halt_after_round = 3  # A simulated preemption is the same run.
  assert workdir_lib.check_and_record(cfg, wd, STAGES) == []
  after = _snapshot(wd)
  old_configs = [k for k in after if k.startswith("config.") and k != "config.json"]
  assert len(old_configs) == 1  # halt_after_round differs: the old config kept.
  assert after[old_configs[0]] == before["config.json"]
  assert {k: v for k, v in after.items() if not k.startswith("config.")} == {
      k: v for k, v in before.items() if not k.startswith("config.")}
  assert workdir_lib.check_and_record(cfg, wd, STAGES) == []
  assert _snapshot(wd) == after  # The same config again: nothing rewritten.


def test_other_inputs_stop_before_anything_is_written(tmp_path, corpus):
  wd = str(tmp_path / "wd")
  workdir_lib.check_and_record(_config(corpus), wd, STAGES)
  _outputs(wd)
  before = _snapshot(wd)
  other = tmp_path / "other"
  other.mkdir()
  (other / "a.txt").write_text("alpha")
  cfg = _config(other)
  cfg.train.steps = 8
  with pytest.raises(workdir_lib.WorkdirMismatchError) as e:
    workdir_lib.check_and_record(cfg, wd, STAGES)
  msg = str(e.value)
  assert f'config.corpus.path: "{corpus}" (workdir) -> "{other}" (this run)' in msg
  assert "file.corpus: contents differ: b.txt (removed)" in msg
  assert "stage 'train':" in msg and "config.train.steps: 4 (workdir) -> 8" in msg
  assert "--redo=generate" in msg and "another --workdir" in msg
  assert _snapshot(wd) == before  # config.json untouched, nothing moved.


def test_changed_file_contents_are_named(tmp_path, corpus):
  wd = str(tmp_path / "wd")
  workdir_lib.check_and_record(_config(corpus), wd, STAGES)
  _outputs(wd)
  (corpus / "b.txt").write_text("beta, edited")
  (corpus / "c.txt").write_text("new")
  with pytest.raises(workdir_lib.WorkdirMismatchError,
                     match=r"file\.corpus: contents differ: b\.txt \(changed\), "
                           r"c\.txt \(added\)"):
    workdir_lib.check_and_record(_config(corpus), wd, STAGES)


def test_long_values_keep_their_ends():
  """A long path is cut in the middle: the part that differs stays in view."""
  old = "/data/" + "x" * 300 + "/batch_a.jsonl"
  new = "/data/" + "x" * 300 + "/batch_b.jsonl"
  (line,) = workdir_lib.differences({"config.data.path": old},
                                    {"config.data.path": new})
  a, b = line[len("config.data.path: "):].split(" (workdir) -> ")
  assert a == '"/data/' + "x" * 71 + "..." + "x" * 64 + '/batch_a.jsonl"'
  assert b == '"/data/' + "x" * 71 + "..." + "x" * 64 + '/batch_b.jsonl" (this run)'
  assert len(a) == 160
  short = {"config.seed": 0}
  assert workdir_lib.differences(short, {"config.seed": 1}) == [
      "config.seed: 0 (workdir) -> 1 (this run)"]


def test_a_run_that_made_nothing_does_not_lock_the_workdir(tmp_path, corpus):
  """A typo'd corpus path fails before generating: the fixed rerun just runs."""
  wd = str(tmp_path / "wd")
  typo = _config(tmp_path / "corpsu")
  workdir_lib.check_and_record(typo, wd, STAGES)
  assert json.load(open(workdir_lib.inputs_path(wd, "generate")))["file.corpus"] == {
      "missing": str(tmp_path / "corpsu")}
  assert workdir_lib.check_and_record(_config(corpus), wd, STAGES) == []
  record = json.load(open(workdir_lib.inputs_path(wd, "generate")))
  assert record["file.corpus"].keys() == {"a.txt", "b.txt"}
  # Once the stage has made something, the same change is refused.
  _outputs(wd)
  with pytest.raises(workdir_lib.WorkdirMismatchError):
    workdir_lib.check_and_record(typo, wd, STAGES)


def test_redo_moves_the_stage_and_later_ones_aside(tmp_path, corpus):
  wd = str(tmp_path / "wd")
  workdir_lib.check_and_record(_config(corpus), wd, STAGES)
  _outputs(wd)
  old_config = open(os.path.join(wd, "config.json")).read()
  cfg = _config(corpus)
  cfg.train.steps = 8
  with pytest.raises(ValueError, match=r"stages are \['generate', 'train', 'evaluate'\]"):
    workdir_lib.check_and_record(cfg, wd, STAGES, redo=("tune",))
  moved = workdir_lib.check_and_record(cfg, wd, STAGES, redo=("train",))
  assert sorted(moved) == ["checkpoints", "eval", "metrics.jsonl",
                           "stages/evaluate.inputs.json", "stages/train.inputs.json"]
  assert os.path.exists(os.path.join(wd, "generated", "client_0000.jsonl"))  # Kept.
  [stamp] = os.listdir(os.path.join(wd, "superseded"))
  assert open(os.path.join(wd, "superseded", stamp, "checkpoints", "1", "x")).read() == "old"
  record = json.load(open(os.path.join(wd, "stages", "train.inputs.json")))
  assert record["config.train.steps"] == 8
  # The earlier config.json is kept beside the new one.
  assert open(os.path.join(wd, f"config.{stamp}.json")).read() == old_config
  assert json.load(open(os.path.join(wd, "config.json")))["train"]["steps"] == 8
  assert workdir_lib.check_and_record(cfg, wd, STAGES) == []  # Now it resumes.


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_path):
  del smollm2_path  # Needed for the tokenizer; skips when absent.
  return testing.write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny")))


def _rows(path, n, tag):
  path.write_text("".join(json.dumps({"instruction": f"{tag} {i}", "output": f"o{i}",
                                      "category": f"c{i % 3}"}) + "\n"
                          for i in range(n)))
  return str(path)


def test_fedit_rerun_on_another_data_file_is_refused(tiny_model, tmp_path):
  """The found bug: a rerun with another data.path resumed and mixed both sets."""
  wd = str(tmp_path / "wd")
  base = {"model.name": tiny_model, "federated.num_rounds": 2,
          "train.halt_after_round": 1}
  first = _rows(tmp_path / "a.jsonl", 60, "a")
  pipelines.run(testing.load_config(CONFIG, "smoke", **base, **{"data.path": first}), wd)
  rows = open(os.path.join(wd, "metrics.jsonl")).read()
  second = _rows(tmp_path / "b.jsonl", 60, "b")
  with pytest.raises(workdir_lib.WorkdirMismatchError,
                     match=r"config\.data\.path: .*a\.jsonl\" \(workdir\) -> .*b\.jsonl"):
    pipelines.run(testing.load_config(CONFIG, "smoke", **base, **{"data.path": second}),
                  wd)
  assert open(os.path.join(wd, "metrics.jsonl")).read() == rows
  assert json.load(open(os.path.join(wd, "config.json")))["data"]["path"] == first
  # The same file edited in place is caught by its content hash.
  _rows(tmp_path / "a.jsonl", 60, "edited")
  with pytest.raises(workdir_lib.WorkdirMismatchError,
                     match=r"file\.data: contents differ: a\.jsonl \(changed\)"):
    pipelines.run(testing.load_config(CONFIG, "smoke", **base, **{"data.path": first}), wd)
