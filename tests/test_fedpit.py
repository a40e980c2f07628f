"""FedPIT: parameter-isolated rounds, self-generation, and the job end to end.

The engine tests pin what isolation promises: the server's inputs and its
new state are those of the global phase alone (the local phase's real
examples cannot change them), every sampled client's local adapter is what a
plain per-client loop computes, and clients that were not sampled (or are
padding) keep theirs. The training loop resumes such a run bit-exactly. The
job runs on a tiny random model with SmolLM2's tokenizer and the packaged
Wikipedia text.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import testing
from fedjax_u2s import train
from fedjax_u2s.evaluation import report
from fedjax_u2s.federated import algorithms
from fedjax_u2s.federated import client as client_lib
from fedjax_u2s.federated.state import ClientBatches
from fedjax_u2s.models import llama
from fedjax_u2s.pipelines import fedpit
from fedjax_u2s.u2s import filters
from fedjax_u2s.u2s import selfgen

NUM_CLIENTS = 5


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  with jax.default_matmul_precision("float32"):
    yield


def _local_squares(own, frozen, batch, rng):
  """Squares loss of the personal weight: global (frozen) + own."""
  _, global_params = frozen
  return testing.squares_loss({"w": global_params["w"] + own["w"]}, None, batch, rng)


def _batches(seed: int, ids, steps: int = 2) -> ClientBatches:
  rs = np.random.default_rng(seed)
  c = len(ids)
  return ClientBatches(
      batch={"x": jnp.asarray(rs.normal(size=(c, steps, 1, 2, 3)), jnp.float32),
             "y": jnp.asarray(rs.normal(size=(c, steps, 1, 2)), jnp.float32),
             "m": jnp.ones((c, steps, 1, 2), bool)},
      step_mask=jnp.ones((c, steps), bool),
      num_examples=jnp.asarray(rs.integers(1, 5, c), jnp.float32),
      client_ids=jnp.asarray(ids, jnp.int32))


def _algorithm(**overrides):
  cfg = testing.federated_config(client_lr=0.05, client_optimizer="sgd", **overrides)
  return algorithms.build(cfg, testing.squares_loss, local_loss_fn=_local_squares)


def _start(alg):
  w0 = {"w": jnp.asarray([0.1, -0.2, 0.3], jnp.float32)}
  state = alg.init(w0, jax.random.key(7), NUM_CLIENTS)
  local = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(NUM_CLIENTS, 3)),
                            jnp.float32)}
  return state, local


def test_server_state_does_not_depend_on_the_local_phase():
  alg = _algorithm()
  ids = [3, 1]
  global_batches = _batches(0, ids)
  state, local = _start(alg)
  plain, _ = jax.jit(alg.apply)(state, None, global_batches)
  outs = [jax.jit(alg.apply_isolated)(state, local, None, global_batches,
                                      _batches(seed, ids))
          for seed in (1, 2)]
  for new_state, new_local, _ in outs:
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(new_state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ...while the local adapters did see the (different) real data.
  assert not np.array_equal(np.asarray(outs[0][1]["w"]), np.asarray(outs[1][1]["w"]))


def test_aggregation_inputs_hold_no_local_adapter(monkeypatch):
  seen = []
  real_step = algorithms.server_step

  def spy(cfg, server_opt, server_state, sums):
    seen.append(jax.tree.map(lambda x: x.shape, (server_state, sums)))
    return real_step(cfg, server_opt, server_state, sums)

  monkeypatch.setattr(algorithms, "server_step", spy)
  alg = _algorithm()
  state, local = _start(alg)
  alg.apply_isolated(state, local, None, _batches(0, [0, 2]), _batches(1, [0, 2]))
  assert seen
  shapes = jax.tree.leaves(seen[0], is_leaf=lambda x: isinstance(x, tuple))
  # Nothing with the population axis of the stacked local adapters.
  assert all(s[:1] != (NUM_CLIENTS,) for s in shapes), shapes


@pytest.mark.parametrize("clients_per_chunk", [0, 1])
def test_local_adapters_equal_a_per_client_loop(clients_per_chunk):
  alg = _algorithm(clients_per_chunk=clients_per_chunk)
  ids = [4, 0, 2]
  state, local = _start(alg)
  gb, lb = _batches(0, ids), _batches(1, ids)
  _, new_local, m = jax.jit(alg.apply_isolated)(state, local, None, gb, lb)
  root = jax.random.fold_in(jax.random.fold_in(state.key(), algorithms.LOCAL_STREAM),
                            state.round)
  lr = algorithms.client_learning_rate(alg.config, state.round)
  cfg = alg.config
  opt = client_lib.make_client_optimizer("sgd", lr, weight_decay=cfg.client_weight_decay)
  expected = np.asarray(local["w"]).copy()
  for j, cid in enumerate(ids):
    out = client_lib.client_update(
        {"w": local["w"][cid]}, (None, state.params),
        jax.tree.map(lambda x: x[j], lb.batch), lb.step_mask[j],
        jax.random.fold_in(root, cid), loss_fn=_local_squares, optimizer=opt,
        learning_rate=lr, grad_clip=cfg.grad_clip)
    expected[cid] = np.asarray(local["w"][cid] + out.delta["w"])
  np.testing.assert_allclose(np.asarray(new_local["w"]), expected, rtol=1e-6, atol=1e-7)
  # Clients 1 and 3 were not sampled: untouched, bit for bit.
  for cid in (1, 3):
    np.testing.assert_array_equal(np.asarray(new_local["w"][cid]),
                                  np.asarray(local["w"][cid]))
  assert float(m["local_num_tokens"]) == len(ids) * 2 * 2


def test_padding_clients_never_write_client_zero():
  # 3 real clients in chunks of 2: the fourth slot is a padding client whose
  # id is 0; client 0 is not sampled and must keep its adapter.
  alg = _algorithm(clients_per_chunk=2)
  state, local = _start(alg)
  ids = [1, 2, 3]
  _, new_local, _ = jax.jit(alg.apply_isolated)(state, local, None, _batches(0, ids),
                                                _batches(1, ids))
  np.testing.assert_array_equal(np.asarray(new_local["w"][0]),
                                np.asarray(local["w"][0]))


def test_concat_rank_adds_the_two_updates():
  cfg = testing.tiny_llama_config()
  lcfg = lora_lib.LoraConfig(rank=2, alpha=4.0, targets=("q", "v"))
  a = jax.tree.map(lambda x: x + 0.1, lora_lib.init(jax.random.key(1), cfg, lcfg))
  b = jax.tree.map(lambda x: x - 0.05, lora_lib.init(jax.random.key(2), cfg, lcfg))
  params = llama.init_params(jax.random.key(0), cfg)
  both = lora_lib.merge(lora_lib.merge(params, a, lcfg), b, lcfg)
  joined = lora_lib.merge(params, lora_lib.concat_rank(a, b), lcfg)
  for x, y in zip(jax.tree.leaves(both), jax.tree.leaves(joined)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# The training loop with isolation and data that changes per round.

MODEL = testing.tiny_llama_config()


class _EveryOtherRound:
  """Synthetic-like data: client c has a set only in rounds where (r + c) is even."""

  def __init__(self, n):
    self.num_clients = n
    self.sets_ = [testing.random_token_set(10 + i, 4, MODEL.vocab_size)
                  for i in range(n)]

  def sets(self, round_, client_ids, params):
    del params
    return [self.sets_[c] if (round_ + c) % 2 == 0 else None for c in client_ids]

  def round_metrics(self, round_):
    return {"phase_note": round_}


def _isolated_train(workdir, **overrides):
  base = llama.init_params(jax.random.key(0), MODEL)
  return train.train(
      testing.tiny_train_config(**overrides), str(workdir), model_config=MODEL,
      base_params=base, client_sets=_EveryOtherRound(3),
      local_sets=[testing.random_token_set(i, 5, MODEL.vocab_size) for i in range(3)],
      eval_set=testing.random_token_set(99, 4, MODEL.vocab_size))


def test_isolated_training_resumes_bit_exactly(tmp_path):
  ref = _isolated_train(tmp_path / "ref")
  assert ref.local is not None and jax.tree.leaves(ref.local)[0].shape[0] == 3
  assert all("local_loss" in r for r in ref.metrics if "train_loss" in r)
  assert [r["phase_note"] for r in ref.metrics if "train_loss" in r] == [0, 1, 2, 3]
  halted = _isolated_train(tmp_path / "run", **{"train.halt_after_round": 2})
  assert halted.rounds == 2
  resumed = _isolated_train(tmp_path / "run")
  for a, b in zip(jax.tree.leaves((ref.lora, ref.local)),
                  jax.tree.leaves((resumed.lora, resumed.local))):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# Self-generation.


def test_near_copy_score_by_hand():
  real = [("Describe the aardvark.", "A burrowing mammal native to Africa")]
  # Response trigrams: "a burrowing mammal", "burrowing mammal native",
  # "mammal native to", "native to africa" vs the candidate's
  # "a burrowing mammal", "burrowing mammal of", "mammal of africa":
  # 1 shared of 6 distinct -> 1/6 (the pair comparison is lower).
  score = selfgen.near_copy_score("Describe a pangolin.", "A burrowing mammal of Africa",
                                  real, 3)
  assert score == pytest.approx(1 / 6)
  assert selfgen.near_copy_score("Q?", real[0][1], real, 3) == 1.0


def test_judge_reasons_in_order():
  cfg = selfgen.default_config()
  real = [("Describe the aardvark in a few words.",
           "Burrowing mammal native to Africa, active at night and eating ants")]
  tracker = filters.DuplicateTracker(cfg.filters)
  copy = ("Instruction: Describe the aardwolf in a few words.\nResponse: Burrowing "
          "mammal native to Africa, active at night and eating ants")
  assert selfgen.judge(copy, real, real, tracker, cfg)[0] == selfgen.NEAR_COPY
  demo_copy = ("Instruction: Describe the aardvark in a few words.\nResponse: A "
               "large bird of South America that cannot fly")
  assert selfgen.judge(demo_copy, real, real, tracker, cfg)[0] == filters.COPIED_DEMONSTRATION
  new = ("Instruction: Describe the rhea in a few words.\nResponse: A large "
         "flightless bird of South America")
  assert selfgen.judge(new, real, real, tracker, cfg)[0] == filters.KEPT
  assert selfgen.judge(new, real, real, tracker, cfg)[0] == filters.DUPLICATE
  assert selfgen.judge("no markers here", real, real, tracker, cfg)[0] != filters.KEPT


class _FakeSampler:
  """Returns canned continuations and records what it was asked."""

  def __init__(self, tokenizer, texts):
    self.tokenizer = tokenizer
    self.texts = texts
    self.calls = []

  def __call__(self, params, prompts, **kw):
    self.calls.append((prompts, kw))
    return type("Out", (), {"texts": self.texts[:len(prompts)],
                            "stop_reasons": ["eos"] * len(prompts)})()


class _ChatTokenizer(testing.ByteTokenizer):
  def apply_chat_template(self, messages, add_generation_prompt=True):
    return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_generate_shows_real_examples_and_counts_reasons():
  cfg = selfgen.default_config()
  cfg.unlock()
  cfg.per_client = 3
  cfg.num_demonstrations = 3
  real = [(f"Describe thing {i} in a few words.", f"The thing number {i} of a set")
          for i in range(4)]
  # The third answer restates real example 1 word for word but for its
  # instruction: a near copy whether or not its draw showed example 1.
  texts = [" Describe the rhea in a few words.\nResponse: A large flightless bird",
           " Describe the emu in a few words.\nResponse: A large bird of Australia",
           " Tell me about thing one.\nResponse: The thing number 1 of a set"]
  fake = _FakeSampler(_ChatTokenizer(), texts)
  recs, counts = selfgen.generate(fake, None, real, client_id=2, round_=5, seed=0,
                                  cfg=cfg)
  assert counts == {"kept": 2, selfgen.NEAR_COPY: 1}
  assert [r["instruction"] for r in recs] == ["Describe the rhea in a few words.",
                                              "Describe the emu in a few words."]
  assert all(r["client"] == 2 and r["round"] == 5 and len(r["demos"]) == 3
             for r in recs)
  prompts, kw = fake.calls[0]
  text = bytes(prompts[0]).decode("latin-1")
  for i in recs[0]["demos"]:  # The drawn real examples are what the prompt shows.
    assert real[i][1] in text
  assert text.endswith("<assistant>Instruction:")
  again = selfgen.generate(_FakeSampler(_ChatTokenizer(), texts), None, real,
                           client_id=2, round_=5, seed=0, cfg=cfg)
  assert again == (recs, counts)


def test_synthetic_store_round_trip(tmp_path):
  store = selfgen.SyntheticStore(str(tmp_path))
  assert store.get(0, 1) is None and store.rounds(1) == []
  store.put(2, 1, [{"instruction": "a", "response": "b"}], {"kept": 1, "near_copy": 2})
  store.put(0, 1, [], {"no_response_marker": 3})
  assert store.rounds(1) == [0, 2] and store.rounds(0) == []
  assert store.get(2, 1) == ([{"instruction": "a", "response": "b"}],
                             {"kept": 1, "near_copy": 2})
  assert store.get(0, 1) == ([], {"no_response_marker": 3})


# ----------------------------------------------------------------------------
# The job.


def test_split_articles_is_disjoint_and_deterministic():
  config = testing.load_config("configs/fedpit.py")
  clients, non_members, split = fedpit.split_articles(config)
  again = fedpit.split_articles(config)[2]
  assert split == again
  held = [t for c in split["clients"] for t in c["titles"]]
  assert len(held) == len(set(held)) == 4 * 6
  assert not set(held) & set(split["non_member_titles"])
  assert all(len(exs) == 2 * c["articles"] >= 2 * 3
             for exs, c in zip(clients, split["clients"]))
  assert len(non_members) == 2 * 16
  assert {fedpit.subtopic("Genus of birds"), fedpit.subtopic("Skin condition"),
          fedpit.subtopic("Species of flowering plant"),
          fedpit.subtopic("Physical quantity")} == {"animals", "health", "plants", "other"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  return testing.write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny")))


def _job(tiny_model, workdir, **overrides):
  from fedjax_u2s.pipelines import run as run_job  # pylint: disable=import-outside-toplevel
  config = testing.load_config("configs/fedpit.py", "smoke", **{
      "model.name": tiny_model, "fedpit.selfgen.max_new_tokens": 24,
      "train.tensorboard": False, **overrides})
  run_job(config, str(workdir))
  return config


@pytest.mark.parametrize("variant,dp", [("fedpit", True), ("local", False)])
def test_job_end_to_end(tiny_model, tmp_path, variant, dp):
  _job(tiny_model, tmp_path, **{"fedpit.variant": variant,
                                "federated.dp.enabled": dp,
                                "federated.dp.noise_multiplier": 1.0})
  with open(tmp_path / "privacy.json") as f:
    priv = json.load(f)
  models = {"fedpit": {"base", "global", "personal_0", "personal_1", "personal"},
            "local": {"base", "personal_0", "personal_1", "personal"}}[variant]
  assert set(priv["extraction"]) == models
  for m in priv["extraction"].values():
    assert {"verbatim_rate", "near_verbatim_rate", "mia_auc", "n"} <= set(m)
  if dp:
    assert priv["dp"]["epsilon"] > 0 and priv["dp"]["rounds"] == 2
    assert priv["dp"]["sampling_rate"] == 1.0
  else:
    assert priv["dp"] is None
  for c in (0, 1):
    assert os.path.exists(tmp_path / "local_adapters" / f"client_{c:04d}" /
                          "adapter_config.json")
  report_md = (tmp_path / "report.md").read_text()
  assert "Task accuracy and privacy" in report_md and "MIA AUC" in report_md
  with open(tmp_path / "stages" / "evaluate.json") as f:
    summary = json.load(f)
  row = report.fedpit_arms_table({variant: summary}).splitlines()[2]
  assert row.startswith(f"| {variant} | personal |")
  assert row.rstrip(" |").endswith("-") != dp  # epsilon only with DP.
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  trained = [r for r in rows if "train_loss" in r]
  assert len(trained) == 2 and all("local_loss" in r for r in trained)
  if variant == "fedpit":
    assert "synthetic" in trained[0]  # Every client generates in round 0.
    assert os.path.isdir(tmp_path / "synthetic" / "round_0000")
    assert all(r["dp_epsilon"] > 0 for r in trained)
  else:
    assert not os.path.exists(tmp_path / "synthetic")
    assert all(r["num_tokens"] == 0 for r in trained)  # The global phase is empty,
    assert all(r["bytes_up"] == 0 for r in trained)    # so nothing leaves a client.
