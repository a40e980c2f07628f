"""Tests of the extraction / membership-inference audit (privacy_audit.py)."""

import itertools
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_u2s import lora as lora_lib
from fedjax_u2s import testing
from fedjax_u2s.data.instructions import Example
from fedjax_u2s.evaluation import privacy_audit as pa
from fedjax_u2s.evaluation import report
from fedjax_u2s.models import llama


# ----------------------------------------------------------------------------
# A byte tokenizer with a chat template: "<e>" in text is the end-of-turn id.


class ByteChatTokenizer(testing.ByteTokenizer):
  """``<u>instruction\\n<a>response<e>\\n``; ``<e>`` encodes to eos (258)."""
  chat_template = "byte-chat"
  name = "byte-chat"

  def apply_chat_template(self, messages, add_generation_prompt=False):
    out = ""
    for m in messages:
      out += ("<u>" + m["content"] + "\n" if m["role"] == "user"
              else "<a>" + m["content"] + "<e>\n")
    return out + ("<a>" if add_generation_prompt else "")

  def encode(self, text):
    ids = []
    for i, part in enumerate(text.split("<e>")):
      if i:
        ids.append(self.eos_ids[0])
      ids += list(part.encode("latin-1"))
    return ids


def ex(instruction, response, **meta):
  return Example(({"role": "user", "content": instruction},
                  {"role": "assistant", "content": response}), meta)


# ----------------------------------------------------------------------------
# ROUGE-L.


def naive_lcs(a, b):
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, j in itertools.product(range(len(a)), range(len(b))):
    table[i + 1][j + 1] = (table[i][j] + 1 if a[i] == b[j]
                           else max(table[i][j + 1], table[i + 1][j]))
  return table[-1][-1]


def words(text, vocab={}):  # pylint: disable=dangerous-default-value
  return [vocab.setdefault(w, len(vocab)) for w in text.split()]


def test_rouge_l_by_hand():
  # Lin (2004)'s example: the reference and two candidates.
  ref = words("police killed the gunman")
  r1 = pa.rouge_l(words("police kill the gunman"), ref)  # LCS "police the gunman"
  assert r1["lcs"] == 3 and r1["f1"] == pytest.approx(0.75, abs=1e-12)
  r2 = pa.rouge_l(words("the gunman kill police"), ref)  # LCS "the gunman"
  assert r2["lcs"] == 2 and r2["f1"] == pytest.approx(0.5, abs=1e-12)
  # 6 candidate tokens, 5 reference tokens, all 5 in order: P 5/6, R 1.
  r3 = pa.rouge_l(words("the cat sat on the mat"), words("the cat on the mat"))
  assert r3["lcs"] == 5 and r3["precision"] == pytest.approx(5 / 6)
  assert r3["recall"] == 1.0 and r3["f1"] == pytest.approx(10 / 11, abs=1e-12)
  assert pa.rouge_l([1, 2, 3], [1, 2, 3])["f1"] == 1.0
  assert pa.rouge_l([1, 2, 3], [4, 5])["f1"] == 0.0
  assert pa.rouge_l([], [1])["f1"] == 0.0 and pa.rouge_l([], [])["f1"] == 1.0
  # One substitution in 20 tokens: LCS 19, P = R = F1 = 0.95.
  a = list(range(20))
  assert pa.rouge_l(a[:19] + [99], a)["f1"] == pytest.approx(0.95)


def test_lcs_matches_the_textbook_dynamic_program():
  rng = np.random.default_rng(0)
  for _ in range(200):
    a = rng.integers(0, 4, rng.integers(0, 15)).tolist()
    b = rng.integers(0, 4, rng.integers(0, 15)).tolist()
    assert pa.lcs_length(a, b) == naive_lcs(a, b), (a, b)


# ----------------------------------------------------------------------------
# AUC, intervals, verbatim.


def test_mia_auc_by_hand_with_ties():
  # Pairs (member, non-member) where the member's loss is lower: m=1: 2 of 2;
  # m=2: 1 of 2 and one tie (1.5); m=3: 1 of 2. (2 + 1.5 + 1) / 6 = 0.75.
  assert pa.mia_auc([1.0, 2.0, 3.0], [2.0, 4.0]) == 0.75
  assert pa.mia_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
  assert pa.mia_auc([0.1, 0.2], [0.3, 0.4]) == 1.0
  assert pa.mia_auc([0.3, 0.4], [0.1, 0.2]) == 0.0
  assert pa.auc([3.0], [2.0, 3.0, 4.0]) == pytest.approx(0.5)  # 1 + 0.5 + 0 of 3
  assert np.isnan(pa.mia_auc([1.0], []))
  rng = np.random.default_rng(1)
  for _ in range(50):  # Against the definition, with many ties.
    m = rng.integers(0, 5, rng.integers(1, 12)).astype(float)
    n = rng.integers(0, 5, rng.integers(1, 12)).astype(float)
    brute = np.mean([1.0 if x < y else 0.5 if x == y else 0.0 for x in m for y in n])
    assert pa.mia_auc(m, n) == pytest.approx(brute, abs=1e-12)


def test_wilson_interval_by_hand():
  # 5/10: (0.5 + z^2/20 +- z sqrt(0.025 + z^2/400)) / (1 + z^2/10).
  lo, hi = pa.wilson_interval(5, 10)
  assert lo == pytest.approx(0.236593, abs=1e-6) and hi == pytest.approx(0.763407, abs=1e-6)
  # 0/20: the interval is [0, z^2/20 / (1 + z^2/20)] = [0, 0.161125].
  z2 = pa.Z95 ** 2
  lo, hi = pa.wilson_interval(0, 20)
  assert lo == 0.0 and hi == pytest.approx((z2 / 20) / (1 + z2 / 20), abs=1e-12)
  assert hi == pytest.approx(0.161125, abs=1e-6)
  assert pa.wilson_interval(20, 20)[1] == 1.0
  assert pa.wilson_interval(0, 0) == (0.0, 1.0)
  with pytest.raises(ValueError):
    pa.wilson_interval(3, 2)


def test_bootstrap_interval_is_seeded_and_brackets_the_auc():
  rng = np.random.default_rng(0)
  m, n = rng.normal(0.0, 1.0, 30), rng.normal(0.5, 1.0, 30)
  a = pa.bootstrap_auc_interval(m, n, num_resamples=500, seed=3)
  assert a == pa.bootstrap_auc_interval(m, n, num_resamples=500, seed=3)
  assert a != pa.bootstrap_auc_interval(m, n, num_resamples=500, seed=4)
  assert 0.0 <= a[0] <= pa.mia_auc(m, n) <= a[1] <= 1.0
  assert pa.bootstrap_auc_interval([0.1, 0.2], [0.3, 0.4], num_resamples=50) == (1.0, 1.0)


def test_is_verbatim():
  ref = list(range(30))
  assert pa.is_verbatim(ref[:20], ref)                    # the next 20 tokens
  assert not pa.is_verbatim(ref[:19] + [99], ref)         # one off at token 20
  assert pa.is_verbatim(ref[:20] + [99], ref)             # after 20: free
  assert not pa.is_verbatim(ref[:12], ref)                # stopped early
  assert pa.is_verbatim([1, 2, 3, 258], [1, 2, 3, 258])   # a short one, whole
  assert not pa.is_verbatim([1, 2, 3, 4], [1, 2, 3, 258]) # did not stop there
  assert pa.is_verbatim([5, 6], ref[5:], min_tokens=2)


# ----------------------------------------------------------------------------
# The audit with a fake sampler and fake log-probs: counts known by design.


class FakeSampler:
  """The Sampler call signature; returns the continuation chosen per prompt."""

  def __init__(self, continuations):
    self.continuations = {tuple(k): list(v) for k, v in continuations.items()}
    self.calls = []

  def __call__(self, params, prompts, *, max_new_tokens, strategy, lora=None,
               lora_config=None, **kw):
    self.calls.append(dict(n=len(prompts), strategy=strategy, lora=lora,
                           lora_config=lora_config, max_new_tokens=max_new_tokens))
    tokens, reasons = [], []
    for p in prompts:
      out = self.continuations[tuple(p)][:max_new_tokens]
      tokens.append(out)
      reasons.append("eos" if out and out[-1] == 258 else "length")
    return types.SimpleNamespace(tokens=tokens, stop_reasons=reasons,
                                 texts=[""] * len(prompts))


def fake_logprob_fn(tokens, input_mask):
  del input_mask
  return -0.01 * tokens[:, 1:].astype(jnp.float32)  # loss of a token: id / 100


LONG = "The quick brown fox jumps over the lazy dog again."  # 50 bytes


def fake_setup(prefix_tokens=0):
  tok = ByteChatTokenizer()
  members = {"alice": [ex("q0", LONG), ex("q1", LONG.upper())],
             "bob": [ex("q2", "abc"), ex("q3", LONG[::-1]), ex("q4", "xyz")]}
  non_members = [ex("n0", "zzzzzzzzzzzzzzzzzzzzzzzzz"), ex("n1", "yyyy"),
                 ex("n2", LONG)]
  flat = members["alice"] + members["bob"]
  split, _ = pa.split_targets(flat + non_members, tok, 256)
  conts = {}
  for i, (prompt, target) in enumerate(split):
    p, ref = prompt + target[:prefix_tokens], target[prefix_tokens:]
    if i == 0:
      out = ref                                   # memorized, 20+ tokens
    elif i == 1:
      out = ref[:5] + [ord("#")] * 30             # diverges after 5 tokens
    elif i == 2:
      out = ref                                   # "abc" + eos, whole
    elif i == 3:
      out = ref[:19] + [ord("#")] + ref[20:]      # one token off at 20: near only
    elif i == 4:
      out = ref[:3] + [ord("!")]                  # "xyz" then no stop
    elif i == 7:
      out = ref                                   # a non-member "extracted"
    else:
      out = [ord("#")] * 30
    conts[tuple(p)] = out
  return tok, members, non_members, split, FakeSampler(conts)


def test_audit_counts_with_a_fake_sampler():
  tok, members, non_members, split, sampler = fake_setup()
  res = pa.audit(None, {}, tok, members, non_members, sampler=sampler,
                 logprob_fn=fake_logprob_fn, batch_size=2, num_resamples=200)
  assert json.loads(json.dumps(res)) == res  # JSON-ready, nothing lost
  # Members: 0 and 2 verbatim; 0, 2 and 3 near-verbatim (3: F1 0.95).
  assert (res["n"], res["verbatim"], res["near_verbatim"]) == (5, 2, 3)
  assert res["verbatim_rate"] == 0.4 and res["near_verbatim_rate"] == 0.6
  assert res["verbatim_ci"] == pytest.approx(list(pa.wilson_interval(2, 5)))
  assert res["baseline"]["n"] == 3 and res["baseline"]["verbatim"] == 1
  assert res["per_client"] == {"alice": {"n": 2, "verbatim": 1, "near_verbatim": 1},
                               "bob": {"n": 3, "verbatim": 1, "near_verbatim": 2}}
  recs = res["records"]
  assert [r["set"] for r in recs] == ["member"] * 5 + ["non_member"] * 3
  assert [r["client"] for r in recs[:5]] == ["alice"] * 2 + ["bob"] * 3
  assert [r["matched_prefix"] for r in recs[:5]] == [20, 5, 4, 19, 3]
  assert recs[3]["rouge_l"] == pytest.approx(0.95)
  assert recs[0]["generated_text"] == LONG[:20] and recs[2]["reference_text"] == "abc"
  # Every sampler call is greedy, full (filled) batches, no adapter.
  assert all(c["n"] == 2 and isinstance(c["strategy"], pa.sampler_lib.Greedy)
             and c["lora"] is None and c["max_new_tokens"] == 20 for c in sampler.calls)
  assert len(sampler.calls) == 4  # 8 prompts / 2
  # Loss = mean target id / 100, target = response bytes + eos (258).
  for r, (_, target) in zip(recs, split):
    assert r["loss"] == pytest.approx(np.mean(target) / 100, rel=1e-6)
    assert r["target_tokens"] == len(target)
  m = [r["loss"] for r in recs[:5]]
  n = [r["loss"] for r in recs[5:]]
  assert res["mia_auc"] == pa.mia_auc(m, n)
  assert res["n_members"] == 5 and res["n_non_members"] == 3
  lo, hi = res["mia_auc_ci"]
  assert lo <= res["mia_auc"] <= hi


def test_audit_with_a_response_prefix_and_lora_passed_through():
  tok, members, non_members, _, sampler = fake_setup(prefix_tokens=4)
  lora_config = lora_lib.LoraConfig(rank=2)
  res = pa.audit(None, {}, tok, members, non_members, prefix_tokens=4,
                 lora={"q": None}, lora_config=lora_config, sampler=sampler,
                 logprob_fn=fake_logprob_fn, baseline=False, batch_size=8,
                 num_resamples=10)
  # "abc" and "xyz" (3 bytes) are covered by a 4-token prefix: not audited.
  assert res["skipped"]["members"][pa.PREFIX_COVERS_RESPONSE] == 2
  assert res["n"] == 3 and res["verbatim"] == 1 and res["near_verbatim"] == 2
  assert res["baseline"] is None and res["n_members"] == 5  # MIA scores all
  assert res["records"][0]["prefix_text"] == LONG[:4]
  assert res["records"][0]["generated_text"] == LONG[4:24]
  assert all(c["lora"] == {"q": None} and c["lora_config"] == lora_config
             for c in sampler.calls)
  with pytest.raises(ValueError, match="lora_config"):
    pa.audit(None, {}, tok, members, non_members, lora={"q": None}, sampler=sampler)
  with pytest.raises(ValueError, match="max_new_tokens"):
    pa.audit(None, {}, tok, members, non_members, max_new_tokens=5, sampler=sampler)


def test_audit_table():
  tok, members, non_members, _, sampler = fake_setup()
  res = pa.audit(None, {}, tok, members, non_members, sampler=sampler,
                 logprob_fn=fake_logprob_fn, num_resamples=20)
  table = report.audit_table({"fake": res, "fake again": res})
  lines = table.strip().splitlines()
  assert lines[0].startswith("| model |") and len(lines) >= 4
  assert "2/5" in lines[2] and "3/5" in lines[2] and "1/3" in lines[2]
  assert "fake again" in lines[3]
  assert "Wilson" in table and "bootstrap" in table


# ----------------------------------------------------------------------------
# End to end on a tiny random decoder: memorization made on purpose.


def train_lora_to_memorize(config, params, tok, examples, lora_config, steps,
                           learning_rate=1e-2):
  split, _ = pa.split_targets(examples, tok, 128)
  width = max(len(p) + len(t) for p, t in split)
  tokens = np.full((len(split), width), tok.pad_id, np.int32)
  mask = np.zeros_like(tokens, bool)
  loss_mask = np.zeros_like(tokens, bool)
  for i, (p, t) in enumerate(split):
    tokens[i, :len(p) + len(t)] = p + t
    mask[i, :len(p) + len(t)] = True
    loss_mask[i, len(p):len(p) + len(t)] = True
  tokens, mask, loss_mask = map(jnp.asarray, (tokens, mask, loss_mask))

  def loss_fn(lora):
    logits, _ = llama.forward(params, tokens, config=config, input_mask=mask,
                              lora=lora, lora_config=lora_config)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * loss_mask[:, 1:]) / jnp.sum(loss_mask[:, 1:])

  opt = optax.adam(learning_rate)
  lora = lora_lib.init(jax.random.key(1), config, lora_config)
  state = opt.init(lora)

  @jax.jit
  def step(lora, state):
    loss, grads = jax.value_and_grad(loss_fn)(lora)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(lora, updates), state, loss

  for _ in range(steps):
    lora, state, loss = step(lora, state)
  return lora, float(loss)


def test_audit_end_to_end_on_a_tiny_model():
  tok = ByteChatTokenizer()
  config = testing.tiny_llama_config(vocab_size=259, max_position_embeddings=256)
  # Weights at std 0.5 (not 0.02): the frozen LM head must be able to give a
  # memorized token most of the mass.
  params = llama.init_params(jax.random.key(0), config, std=0.5)
  # Members and non-members from one distribution: a code of 24 random
  # letters, which only memorization can reproduce.
  rng = np.random.default_rng(0)
  rows = [ex(f"Code {i}?", f"Code {i}: " + "".join(rng.choice(list("abcdefgh"), 24)))
          for i in range(8)]
  members, non_members = rows[:4], rows[4:]
  lora_config = lora_lib.LoraConfig(rank=8, alpha=16.0, targets=("*",))
  lora, final_loss = train_lora_to_memorize(config, params, tok, members,
                                            lora_config, steps=200)
  assert final_loss < 0.05, final_loss
  kw = dict(batch_size=4, num_resamples=200, decode="scan", length_multiple=16)
  tuned = pa.audit(config, params, tok, members, non_members, lora=lora,
                   lora_config=lora_config, **kw)
  base = pa.audit(config, params, tok, members, non_members, **kw)
  for res in (tuned, base):  # The summary is the records' sum.
    mem = [r for r in res["records"] if r["set"] == "member"]
    assert res["n"] == len(mem) == 4 and res["n_non_members"] == 4
    assert res["verbatim"] == sum(r["verbatim"] for r in mem)
    assert res["near_verbatim"] == sum(r["near_verbatim"] for r in mem)
    assert res["near_verbatim"] >= res["verbatim"]  # max_new_tokens == min_tokens
  # The adapter memorized its 4 examples: all extracted, and their losses
  # are far below the held-out ones'.
  assert tuned["verbatim"] == 4 and tuned["mia_auc"] == 1.0
  assert tuned["member_loss"] < 0.05 < tuned["non_member_loss"]
  # The random base model reproduces nothing.
  assert base["verbatim"] == 0 and base["near_verbatim"] == 0
  assert base["baseline"]["verbatim"] == 0


# ----------------------------------------------------------------------------
# The real model (a measurement, not a timed test).


@pytest.mark.slow
def test_smollm2_base_model_has_not_trained_on_wiki_rows(smollm2_path):
  from fedjax_u2s.data import builtin
  from fedjax_u2s.models import registry
  model = registry.load(smollm2_path)
  rows = [e for e in builtin.wiki_instructions(topics=("medicine",), max_per_topic=200,
                                               seed=0)
          if e.meta["template"] == "summary"]
  members, non_members = rows[:20], rows[20:40]
  # max_length=160: the loss of the first ~130 response tokens (whole lead
  # paragraphs cost a minute more to score on a 2-core CPU).
  start = time.perf_counter()
  res = pa.audit(model.config, model.params, model.tokenizer, members, non_members,
                 batch_size=20, max_length=160)
  seconds = time.perf_counter() - start
  print(report.audit_table({"smollm2-135m-instruct (base)": res}))
  print(f"wall {seconds:.1f}s: {res['seconds']}")
  assert res["n"] == 20 and res["n_members"] == 20 and res["n_non_members"] == 20
  # Never trained on either set: no extraction, AUC near chance.
  assert res["verbatim"] <= 1
  assert res["mia_auc_ci"][0] < 0.5 < res["mia_auc_ci"][1]
