"""Every config field is checked before any work, and the error names it."""

import os

import pytest

from fedjax_u2s import pipelines
from fedjax_u2s import testing
from fedjax_u2s.pipelines import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {name: os.path.join(REPO, "configs", *name.split("/")) for name in
           ("fedit_instructions.py", "u2s_wiki.py", "generate.py",
            "experiments/u2s_claim.py", "experiments/u2s_champ.py")}
# Variants beyond "" and "smoke", per config.
VARIANTS = {"u2s_wiki.py": ("power", "gpu", "tpu"),
            "fedit_instructions.py": ("gpu", "tpu"),
            "experiments/u2s_claim.py": ("gpu",)}


@pytest.mark.parametrize("name,arg", [(n, a) for n in sorted(CONFIGS)
                                      for a in ("", "smoke") + VARIANTS.get(n, ())])
def test_shipped_configs_are_valid(name, arg):
  assert validate.problems(testing.load_config(CONFIGS[name], arg)) == []


@pytest.mark.parametrize("name", ["u2s_wiki.py", "fedit_instructions.py"])
@pytest.mark.parametrize("kind", ["gpu", "tpu"])
def test_accelerator_variants_change_only_the_accelerator_settings(name, kind):
  cpu = testing.load_config(CONFIGS[name], "").to_dict()
  acc = testing.load_config(CONFIGS[name], kind).to_dict()

  def flat(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from flat(v, f"{prefix}{k}.")
      else:
        yield f"{prefix}{k}", v

  cpu, acc = dict(flat(cpu)), dict(flat(acc))
  changed = {k for k in cpu if cpu[k] != acc[k]}
  assert {"model.dtype", "model.remat", "train.logits_chunk_size",
          "federated.clients_per_chunk"} <= changed
  # The job itself (data, sizes, algorithm) is the CPU default's.
  allowed = {"model.dtype", "model.remat", "train.logits_chunk_size",
             "federated.clients_per_chunk", "train_eval.batch_size",
             "evaluate.batch_size", "evaluate.decode", "u2s.batch_size",
             "u2s.sampling.decode", "mesh.model_parallel"}
  assert changed <= allowed, changed - allowed
  with pytest.raises(ValueError, match="'cpu'"):
    testing.load_config(CONFIGS[name], "cpu")


@pytest.mark.parametrize("field,value,says", [
    ("checkpoint.keep", 0, "an integer >= 1"),
    ("checkpoint.every", 0, "an integer >= 1"),
    ("train.batch_size", 0, "an integer >= 1"),
    ("train.grad_accum", -1, "an integer >= 1"),
    ("model.dtype", "float8", "one of 'float32', 'bfloat16'"),
    ("model.param_dtype", "fp16", "one of 'float32', 'bfloat16'"),
    ("data.eval_fraction", 1.0, r"a number in \[0, 1\)"),
    ("lora.rank", 0, "an integer >= 1"),
    ("lora.dropout", 1.0, r"a number in \[0, 1\)"),
    ("partition.method", "random", "one of 'iid', 'dirichlet', 'natural'"),
    ("data.format", "fields", "one of 'auto', 'alpaca', 'dolly', 'chat'"),
    ("train_eval.batch_size", 0, "an integer >= 1"),
])
def test_bad_field_is_named_before_the_model_loads(tmp_path, field, value, says):
  # The model does not exist: a validation error proves nothing was loaded.
  config = testing.load_config(CONFIGS["fedit_instructions.py"], "smoke", **{
      "model.name": str(tmp_path / "no-such-model"), field: value})
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=rf"config\.{field}={value!r}: must be {says}"):
    pipelines.run(config, str(workdir))
  assert not workdir.exists()  # Nothing written.


def test_every_problem_is_listed_at_once():
  config = testing.load_config(CONFIGS["fedit_instructions.py"], "smoke", **{
      "train.local_steps": 0, "train.local_epochs": 0.0, "checkpoint.keep": 0,
      "federated.clients_per_round": 9})
  found = validate.problems(config)
  assert any("config.train.local_steps=0 and config.train.local_epochs=0" in p
             for p in found)
  assert any(p.startswith("config.checkpoint.keep=0") for p in found)
  assert any("clients_per_round=9 exceeds config.partition.num_clients=4" in p
             for p in found)


def test_federated_block_is_checked_up_front():
  config = testing.load_config(CONFIGS["u2s_wiki.py"], "smoke", **{
      "federated.algorithm": "fedsgd"})
  with pytest.raises(ValueError, match="config.federated.algorithm='fedsgd'"):
    validate.validate(config)


def test_sampler_blocks_are_checked():
  config = testing.load_config(CONFIGS["u2s_wiki.py"], "smoke", **{
      "u2s.sampling.top_p": 0.0})
  assert validate.problems(config) == [
      "config.u2s.sampling.top_p=0.0: must be a number in (0, 1] with strategy "
      "'top_p'."]
  config = testing.load_config(CONFIGS["generate.py"], "", **{
      "sampling.strategy": "beam"})
  with pytest.raises(ValueError, match="config.sampling.strategy='beam'"):
    validate.validate(config)


def test_a_strategy_is_checked_only_on_its_own_parameters():
  greedy = testing.load_config(CONFIGS["generate.py"], "", **{
      "sampling.strategy": "greedy", "sampling.temperature": 0.0})
  assert validate.problems(greedy) == []  # Greedy ignores temperature.
  top_k = testing.load_config(CONFIGS["generate.py"], "", **{
      "sampling.strategy": "top_k", "sampling.top_k": 0})
  assert validate.problems(top_k) == [
      "config.sampling.top_k=0: must be an integer >= 1 with strategy 'top_k'."]


@pytest.mark.parametrize("overrides,says", [
    ({"federated.clients_per_round": 9, "corpus.num_clients": 6},
     "config.federated.clients_per_round=9 exceeds config.corpus.num_clients=6"),
    ({"corpus.num_clients": 4},
     r"config.corpus.num_clients=4 is not a multiple of the 3 topics"),
    ({"corpus.encoding": "utf-9"}, "config.corpus.encoding='utf-9': not a codec"),
    ({"lora.targets": ("q", "attn")}, r"config.lora.targets=\('q', 'attn'\)"),
])
def test_u2s_fields_that_used_to_fail_late(overrides, says):
  config = testing.load_config(CONFIGS["u2s_wiki.py"], "smoke", **overrides)
  with pytest.raises(ValueError, match=says):
    validate.validate(config)


def test_claim_needs_local_steps_before_generation():
  config = testing.load_config(CONFIGS["experiments/u2s_claim.py"], "smoke", **{
      "train.local_steps": 0, "train.local_epochs": 1.0})
  with pytest.raises(ValueError, match="matches compute in optimizer steps"):
    validate.validate(config)


def test_unknown_data_field_role():
  config = testing.load_config(CONFIGS["fedit_instructions.py"], "smoke")
  with config.unlocked():
    config.data.fields.answer = "completion"
  with pytest.raises(ValueError, match=r"config.data.fields has \['answer'\]"):
    validate.validate(config)
