"""Offline evaluation: exact log-likelihoods from fake logits, answer
extraction, suite construction, loaders, and end-to-end runs on a tiny model."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import testing
from fedjax_u2s.data import wiki
from fedjax_u2s.evaluation import loaders
from fedjax_u2s.evaluation import report
from fedjax_u2s.evaluation import runner
from fedjax_u2s.evaluation import scoring
from fedjax_u2s.evaluation import suites
from fedjax_u2s.evaluation import tasks
from fedjax_u2s.models import llama

DATA = os.path.join(os.path.dirname(__file__), "testdata", "eval")
TOK = testing.ByteTokenizer()
CONFIG = testing.tiny_llama_config(vocab_size=TOK.vocab_size)

# The fake model: the next token repeats the current one with probability
# 742/1000; each of the 258 other ids gets 1/1000.
P_REPEAT, P_OTHER = 0.742, 0.001
_C = math.log(742.0)


def repeat_logits(tokens, input_mask):
  del input_mask
  return jnp.where(jax.nn.one_hot(tokens, TOK.vocab_size, dtype=bool), _C, 0.0)


FAKE = jax.jit(scoring.logprob_fn_from_logits(repeat_logits))


def fake_reference(ids):
  """The fake model's next-token log-probs of a row, in plain Python."""
  return [math.log(P_REPEAT if b == a else P_OTHER) for a, b in zip(ids, ids[1:])]


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def params():
  return jax.jit(llama.init_params, static_argnums=1)(jax.random.key(0), CONFIG)


# ----------------------------------------------------------------------------
# Log-likelihoods on hand-made cases.


def test_logprobs_from_logits_hand_computed():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1.0, 1.0, 1.0]]]))
  tokens = jnp.array([[0, 2, 1]])
  out = scoring.logprobs_from_logits(logits, tokens)
  np.testing.assert_allclose(out, [[math.log(0.25), math.log(0.2)]], rtol=1e-6)


def test_fake_model_probabilities():
  out = FAKE(jnp.array([[65, 65, 66]]), jnp.ones((1, 3), bool))
  np.testing.assert_allclose(out, [[math.log(P_REPEAT), math.log(P_OTHER)]], rtol=1e-5)


def test_multiple_choice_exact_scores_and_length_normalisation():
  # Plain fallback: context "Question: Q\nAnswer:", continuations " xxxx", " y".
  # " xxxx": ' ' after ':' and 'x' after ' ' are "other", then 3 repeats.
  q = tasks.MCQuestion(id="q", prompt="Q", options=("xxxx", "y"), answer=0)
  res = tasks.run_multiple_choice(tasks.MultipleChoiceTask("t", (q,)), FAKE, TOK,
                                  batch_size=2)
  rec = res["records"][0]
  long_lp = 2 * math.log(P_OTHER) + 3 * math.log(P_REPEAT)
  short_lp = 2 * math.log(P_OTHER)
  np.testing.assert_allclose(rec["logprobs"], [long_lp, short_lp], rtol=1e-5)
  np.testing.assert_allclose(rec["per_char"], [long_lp / 5, short_lp / 2], rtol=1e-5)
  np.testing.assert_allclose(rec["per_token"], [long_lp / 5, short_lp / 2], rtol=1e-5)
  # The raw sum prefers the short option, both normalisations the long one.
  assert (rec["pred"], rec["pred_norm"], rec["pred_token_norm"]) == (1, 0, 0)
  assert res["accuracy"] == 0.0 and res["acc_norm"] == 1.0
  assert res["acc_token_norm"] == 1.0 and res["chance"] == 0.5
  assert res["headline"] == "acc_norm"
  # A task may lead with another metric (numeric options: plain accuracy).
  task = tasks.MultipleChoiceTask("t", (q,), headline="accuracy")
  assert tasks.run_multiple_choice(task, FAKE, TOK, batch_size=2)["headline"] == "accuracy"
  with pytest.raises(ValueError, match="headline 'acc' is not one of"):
    tasks.MultipleChoiceTask("t", (q,), headline="acc")


def test_choose_per_char_vs_per_token():
  # Option 0: 10 chars in 2 tokens; option 1: 3 chars in 3 tokens.
  scores = [scoring.ContinuationScore(-6.0, 2), scoring.ContinuationScore(-4.5, 3)]
  c = scoring.choose(scores, ["a" * 10, "bcd"])
  assert c.per_char == (-0.6, -1.5) and c.per_token == (-3.0, -1.5)
  assert (c.pred, c.pred_norm, c.pred_token_norm) == (1, 0, 1)


def test_score_continuations_batching_and_truncation_invariant():
  rng = np.random.default_rng(0)
  pairs = [(list(rng.integers(0, 256, rng.integers(1, 40))),
            list(rng.integers(0, 256, rng.integers(1, 9)))) for _ in range(7)]
  ref = [sum(fake_reference(ctx + cont)[len(ctx) - 1:]) for ctx, cont in pairs]
  for bs, mult in [(1, 32), (3, 16), (7, 64)]:
    got = scoring.score_continuations(FAKE, pairs, batch_size=bs, pad_id=TOK.pad_id,
                                      length_multiple=mult)
    np.testing.assert_allclose([s.logprob for s in got], ref, rtol=1e-5)
    assert [s.num_tokens for s in got] == [len(c) for _, c in pairs]
  # max_length cuts the context from the left, never the continuation.
  got = scoring.score_continuations(FAKE, pairs, batch_size=4, pad_id=TOK.pad_id,
                                    max_length=12)
  for (ctx, cont), s in zip(pairs, got):
    cut = max(0, len(ctx) + len(cont) - 12)
    assert s.truncated == cut
    ref = sum(fake_reference(ctx[cut:] + cont)[len(ctx) - cut - 1:])
    np.testing.assert_allclose(s.logprob, ref, rtol=1e-5)
  with pytest.raises(ValueError, match="continuation alone"):
    scoring.score_continuations(FAKE, [([1], [2] * 20)], batch_size=1, pad_id=0,
                                max_length=10)


def test_perplexity_exact():
  ex = tasks.PPLExample(id="e", instruction="Q", response="aa")
  # " aa" + eos: ' ' other, 'a' other, 'a' repeat, eos other.
  res = tasks.run_perplexity(tasks.PerplexityTask("p", (ex,)), FAKE, TOK, batch_size=1)
  nll = -(3 * math.log(P_OTHER) + math.log(P_REPEAT))
  assert res["num_tokens"] == 4
  np.testing.assert_allclose(res["nll"], nll / 4, rtol=1e-5)
  np.testing.assert_allclose(res["perplexity"], math.exp(nll / 4), rtol=1e-5)
  res = tasks.run_perplexity(tasks.PerplexityTask("p", (ex,), add_eos=False), FAKE, TOK,
                             batch_size=1)
  np.testing.assert_allclose(res["nll"], -(2 * math.log(P_OTHER) + math.log(P_REPEAT)) / 3,
                             rtol=1e-5)


def test_chunked_llama_logprobs_match_full_logits(params):
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 256, (3, 64)), jnp.int32)
  mask = jnp.asarray(np.arange(64)[None] < np.array([[64], [40], [7]]))
  logits, _ = llama.forward(params, tokens, config=CONFIG, input_mask=mask)
  ref = scoring.logprobs_from_logits(logits, tokens)
  got = scoring.llama_token_logprobs(params, tokens, mask, config=CONFIG, chunk=16)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Answer extraction.


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", "42"),
    ("We get 1,234 apples", "1234"),
    ("It is -7 degrees", "-7"),
    ("Total: 3.50 dollars", "7/2"),
    ("half is 3/4 of it", "3/4"),
    ("so \\boxed{\\frac{3}{4}} and then 9", "3/4"),
    ("\\boxed{12} is wrong, \\boxed{1,000}", "1000"),
    ("First 5, then the answer is 8, checking 3 times", "8"),
    ("Answer: $2,500", "2500"),
    ("#### -12", "-12"),
    ("5 - 3 = 2", "2"),
    ("x2 plus 0.25", "1/4"),
    ("no digits here", None),
    ("The answer is 10/0", None),  # Division by zero is no answer.
])
def test_extract_number(text, expected):
  assert scoring.extract_number(text) == expected


def test_canonical_answers_compare_values():
  assert scoring.canonical_answer("0.5", "number") == scoring.extract_number("1/2")
  assert scoring.canonical_answer("1,000", "number") == "1000"
  assert scoring.canonical_answer("The Heart.", "text") == "heart"
  assert scoring.extract_answer("  Yes, it does.\nmore", "text") == "yes it does"
  with pytest.raises(ValueError, match="is not a number"):
    tasks.GenQuestion(id="g", prompt="p", answer="two")


# ----------------------------------------------------------------------------
# Built-in suites.


def test_wiki_mc_deterministic_same_topic_and_unique():
  a = suites.wiki_mc(("medicine", "math"), seed=3, num_questions=30)
  b = suites.wiki_mc(("medicine", "math"), seed=3, num_questions=30)
  c = suites.wiki_mc(("medicine", "math"), seed=4, num_questions=30)
  assert a == b and [q.meta for q in a.questions] == [q.meta for q in b.questions]
  assert a.questions != c.questions
  assert len(a.questions) == 30 and len({q.id for q in a.questions}) == 30
  by_title = {x.title: x for x in wiki.load_articles()}
  for q in a.questions:
    art = by_title[q.meta["title"]]
    assert q.prompt == suites.WIKI_TEMPLATE.format(title=art.title)
    assert q.options[q.answer] == art.description.strip()
    assert len(q.options) == 4 and len({o.casefold() for o in q.options}) == 4
    assert all(o for o in q.options)
    dis = [by_title[t] for t in q.meta["distractor_titles"]]
    assert all(d.topic == art.topic for d in dis)
    assert sorted(d.description.strip() for d in dis) == sorted(
        o for i, o in enumerate(q.options) if i != q.answer)
  # Answers are shuffled across positions.
  assert len({q.answer for q in a.questions}) > 1


def test_wiki_mc_include_exclude():
  full = suites.wiki_mc(("medicine",), seed=0, num_questions=None)
  titles = [q.meta["title"] for q in full.questions]
  held = set(titles[::3])
  known = suites.wiki_mc(("medicine",), seed=1, num_questions=None, include_titles=held)
  unknown = suites.wiki_mc(("medicine",), seed=1, num_questions=None, exclude_titles=held)
  assert {q.meta["title"] for q in known.questions} == held
  assert {q.meta["title"] for q in unknown.questions} == set(titles) - held
  few = suites.wiki_mc(("medicine",), seed=1, num_questions=5, exclude_titles=held)
  assert len(few.questions) == 5
  assert not {q.meta["title"] for q in few.questions} & held
  # The same title gets the same question whatever else is sampled.
  q_known = {q.meta["title"]: q for q in known.questions}
  q_full1 = {q.meta["title"]: q for q in suites.wiki_mc(
      ("medicine",), seed=1, num_questions=None).questions}
  assert all(q_known[t] == q_full1[t] for t in held)


def test_math_arithmetic_suite_deterministic_integer_answers():
  import random
  state = random.getstate()
  a = suites.math("arithmetic", num_questions=12, seed=5)
  assert random.getstate() == state  # Global random state restored.
  b = suites.math("arithmetic", num_questions=12, seed=5)
  c = suites.math("arithmetic", num_questions=12, seed=6)
  assert a == b and a != c
  assert len(a.questions) == 12
  assert [q.id.split(":")[-1] for q in a.questions[:4]] == list(suites.ARITHMETIC_MODULES)
  for q in a.questions:
    assert int(q.answer) == float(q.answer)
    assert q.prompt.endswith("Give only the final number.")


def test_math_champ_suite():
  task = suites.math("champ", num_questions=None)
  assert len(task.questions) == 85
  first = {q.id: q for q in task.questions}["P_Combinatorics_1"]
  assert first.answer == "239" and "strings of length 6" in first.prompt
  sub = suites.math("champ", num_questions=10, seed=0)
  assert len(sub.questions) == 10
  assert sub == suites.math("champ", num_questions=10, seed=0)


def test_build_suite_registry():
  task = suites.build_suite("heldout_ppl", path=os.path.join(DATA, "heldout_pairs.jsonl"))
  assert [e.id for e in task.examples] == ["p0", "2", "p2"]
  with pytest.raises(ValueError, match="Unknown evaluation suite"):
    suites.build_suite("nope")


# ----------------------------------------------------------------------------
# Loaders.


def test_load_mmlu_csv():
  task = loaders.load_mmlu_csv(os.path.join(DATA, "mmlu_anatomy_test.csv"))
  assert task.name == "mmlu_anatomy_test"
  assert [q.answer for q in task.questions] == [0, 2, 1]
  q = task.questions[1]
  assert q.options == ("Two", "Three", "Four", "Five")
  assert q.prompt == ("How many chambers does the human heart have?\nA. Two\nB. Three\n"
                      "C. Four\nD. Five")
  assert q.meta["subject"] == "mmlu anatomy"


def test_load_pubmedqa_medqa_gsm8k():
  pm = loaders.load_pubmedqa_json(os.path.join(DATA, "pubmedqa.json"))
  assert [q.answer for q in pm.questions] == [0, 1, 2]
  assert pm.questions[0].prompt.startswith("Context: Trained athletes")
  assert pm.questions[2].prompt.startswith("Does coffee")
  mq = loaders.load_medqa_jsonl(os.path.join(DATA, "medqa.jsonl"))
  assert [q.answer for q in mq.questions] == [1, 2]
  assert len(mq.questions[1].options) == 5 and mq.questions[1].meta["line"] == 3
  gs = loaders.load_gsm8k_jsonl(os.path.join(DATA, "gsm8k.jsonl"))
  assert [q.answer for q in gs.questions] == ["7", "3600", "-3"]


@pytest.mark.parametrize("loader, filename, content, match", [
    (loaders.load_mmlu_csv, "bad.csv", "q,a,b,c,A\n", r"bad.csv:1: expected 6 columns"),
    (loaders.load_mmlu_csv, "bad.csv", "q,a,b,c,d,A\nq,a,b,c,d,E\n",
     r"bad.csv:2: answer must be one of A-D"),
    (loaders.load_pubmedqa_json, "bad.json", '{"7": {"QUESTION": "q", "final_decision": "y"}}',
     r"bad.json: record '7': final_decision"),
    (loaders.load_pubmedqa_json, "bad.json", '{"7": {"final_decision": "yes"}}',
     r"record '7': missing or non-string field 'QUESTION'"),
    (loaders.load_pubmedqa_json, "bad.json", "[1, 2", r"bad.json: not valid JSON"),
    (loaders.load_medqa_jsonl, "bad.jsonl",
     '{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "C"}\n',
     r"bad.jsonl:1: field 'answer_idx' is 'C'"),
    (loaders.load_medqa_jsonl, "bad.jsonl", '\n{"options": {"A": "x"}}\n',
     r"bad.jsonl:2: missing field 'question'"),
    (loaders.load_gsm8k_jsonl, "bad.jsonl", '{"question": "q", "answer": "7"}\n',
     r"bad.jsonl:1: field 'answer' has no '#### <number>'"),
    (loaders.load_gsm8k_jsonl, "bad.jsonl", '{"question": "q"\n', r"bad.jsonl:1: not valid JSON"),
])
def test_loader_errors(tmp_path, loader, filename, content, match):
  path = tmp_path / filename
  path.write_text(content)
  with pytest.raises(ValueError, match=match):
    loader(str(path))


# ----------------------------------------------------------------------------
# End to end on a tiny random model.


@pytest.fixture(scope="module")
def fixture_tasks():
  return [
      suites.wiki_mc(("medicine",), seed=0, num_questions=4),
      suites.math("arithmetic", num_questions=3, seed=0, max_new_tokens=6),
      suites.heldout_ppl(os.path.join(DATA, "heldout_pairs.jsonl")),
      loaders.load_mmlu_csv(os.path.join(DATA, "mmlu_anatomy_test.csv")),
  ]


# One padded length (256) for every scored row and every prompt: one compile
# of the scorer and one of the sampler per model variant.
RUN = dict(batch_size=4, max_length=256, length_multiple=256, decode="scan",
           progress=False)


@pytest.fixture(scope="module")
def base_results(params, fixture_tasks):
  return runner.evaluate(CONFIG, params, TOK, fixture_tasks, **RUN)


def test_tiny_model_runs_every_suite(base_results, params, fixture_tasks):
  assert list(base_results) == ["wiki_mc", "math_arithmetic", "heldout_ppl",
                                "mmlu_anatomy_test"]
  wiki_res = base_results["wiki_mc"]
  assert wiki_res["n"] == 4 and len(wiki_res["records"]) == 4
  assert all(np.isfinite(r["logprobs"]).all() for r in wiki_res["records"])
  # The decoder path agrees with scoring a row by hand with llama.forward.
  q = fixture_tasks[0].questions[0]
  ctx = tasks.prompt_ids(TOK, q.prompt)
  opt = tasks.continuation_ids(TOK, q.options[0])
  row = jnp.asarray([ctx + opt])
  logits, _ = llama.forward(params, row, config=CONFIG)
  ref = float(scoring.logprobs_from_logits(logits, row)[0, len(ctx) - 1:].sum())
  np.testing.assert_allclose(wiki_res["records"][0]["logprobs"][0], ref, rtol=1e-4)
  gen = base_results["math_arithmetic"]
  assert gen["n"] == 3 and all(isinstance(r["output"], str) for r in gen["records"])
  assert all(r["stop_reason"] in ("eos", "stop_string", "length") for r in gen["records"])
  ppl = base_results["heldout_ppl"]
  # A random model over 259 ids: perplexity near the vocabulary size.
  assert 100 < ppl["perplexity"] < 600 and ppl["num_tokens"] == 16 + 13 + 5 + 3


def test_zero_b_lora_gives_identical_scores(base_results, params, fixture_tasks):
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("*",))
  lora = lora_lib.init(jax.random.key(7), CONFIG, lcfg)
  tuned = runner.evaluate(CONFIG, params, TOK, fixture_tasks, lora=lora, lora_config=lcfg,
                          **RUN)
  for name, res in base_results.items():
    for r0, r1 in zip(res["records"], tuned[name]["records"]):
      for key in ("logprobs", "output", "nll"):
        assert r0.get(key) == r1.get(key), (name, key)
  # A non-zero adapter does change the scores (the adapter is really applied).
  lora_b = jax.tree.map(lambda x: x + 0.5, lora)
  changed = runner.evaluate(CONFIG, params, TOK, fixture_tasks[2:3], lora=lora_b,
                            lora_config=lcfg, **RUN)
  assert changed["heldout_ppl"]["nll"] != base_results["heldout_ppl"]["nll"]


def test_write_results_and_compare_table(tmp_path, base_results):
  json_path, md_path = report.write_results(base_results, str(tmp_path), "base")
  with open(json_path) as f:
    loaded = json.load(f)
  assert loaded["wiki_mc"]["acc_norm"] == base_results["wiki_mc"]["acc_norm"]
  assert "| wiki_mc | multiple_choice | 4 | acc_norm |" in open(md_path).read()
  a = {"t": dict(kind="multiple_choice", n=10, headline="acc_norm", acc_norm=0.5,
                 accuracy=0.4, acc_token_norm=0.3),
       "p": dict(kind="perplexity", n=3, headline="perplexity", perplexity=10.0, nll=2.0)}
  b = {"t": dict(a["t"], acc_norm=0.75), "p": dict(a["p"], perplexity=8.0)}
  table = report.compare_table({"base": a, "tuned": b})
  lines = table.splitlines()
  assert lines[0] == "| task | metric | n | base | tuned | Δ tuned |"
  assert "| t | acc_norm* | 10 | 0.5000 | 0.7500 | +0.2500 |" in lines
  assert "| p | perplexity* (lower better) | 3 | 10.0000 | 8.0000 | -2.0000 |" in lines


def test_evaluate_resolves_suite_specs_with_injected_model():
  res = runner.evaluate(CONFIG, None, TOK, [("heldout_ppl", dict(pairs=[("Q", "aa")]))],
                        logprob_fn=FAKE, progress=False)
  nll = -(3 * math.log(P_OTHER) + math.log(P_REPEAT))
  np.testing.assert_allclose(res["heldout_ppl"]["perplexity"], math.exp(nll / 4), rtol=1e-5)
  with pytest.raises(TypeError, match="A suite must be"):
    runner.evaluate(CONFIG, None, TOK, [3], logprob_fn=FAKE)


def test_evaluate_rejects_bad_arguments(params):
  with pytest.raises(ValueError, match="needs lora_config"):
    runner.evaluate(CONFIG, params, TOK, [], lora={})
  task = suites.heldout_ppl(pairs=[("a", "b")])
  with pytest.raises(ValueError, match="unique"):
    runner.evaluate(CONFIG, params, TOK, [task, task], progress=False)


# ----------------------------------------------------------------------------
# The real model.


@pytest.mark.slow
def test_smollm2_wiki_mc_above_chance(smollm2_path):
  from fedjax_u2s.models import registry
  model = registry.load(smollm2_path)
  task = suites.wiki_mc(("medicine",), seed=0, num_questions=20)
  res = runner.evaluate(model.config, model.params, model.tokenizer, [task],
                        batch_size=8, progress=False)["wiki_mc"]
  # Measured on CPU (2 cores, ~25 s): acc_norm 0.60, acc_token_norm 0.60,
  # raw accuracy 0.55 on these 20 questions; chance is 0.25 and P(>= 9/20 by
  # chance) ~ 0.04. The bound leaves three questions of margin for numerics.
  assert res["n"] == 20 and res["chance"] == 0.25
  assert res["acc_norm"] >= 0.45 and res["acc_token_norm"] >= 0.45
