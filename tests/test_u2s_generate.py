"""generate_client end to end: scripted sampler, resume after crashes, real Sampler."""

import dataclasses
import json
import os

import numpy as np
import pytest

from fedjax_u2s.u2s import generate
from fedjax_u2s.u2s import writer
from fedjax_u2s.u2s.chunking import Piece


@dataclasses.dataclass(frozen=True)
class Demo:
  id: str
  domain: str
  task_type: str
  text: str
  instruction: str
  response: str


KEYWORDS = ("cat", "dog", "tea", "sun")


class KeywordEmbedder:
  """[count of each keyword, 0.1], L2-normalised: similarities by hand."""

  def embed(self, texts):
    v = np.asarray([[t.lower().count(k) for k in KEYWORDS] + [0.1] for t in texts],
                   np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def top_k_select(pool_embeddings):
  def select(queries, k, seed):
    del seed
    scores = queries @ pool_embeddings.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return select


class CharTokenizer:
  """One token per character; a plain chat template."""
  bos_id = None

  def apply_chat_template(self, messages, add_generation_prompt=True):
    out = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
    return out + ("<assistant>" if add_generation_prompt else "")

  def encode(self, text):
    return [ord(c) for c in text]


@dataclasses.dataclass
class Out:
  texts: list
  tokens: list
  stop_reasons: list


class ScriptedSampler:
  """Answers each prompt by the passage it ends with; records every call."""

  def __init__(self, script, fail_on_call=None):
    self.script = script
    self.calls = []
    self.fail_on_call = fail_on_call

  def __call__(self, params, prompts, *, max_new_tokens, strategy, stop_strings,
               seed, row_seeds):
    self.calls.append(dict(n=len(prompts), seed=seed, row_seeds=list(row_seeds),
                           strategy=strategy, stop_strings=stop_strings))
    if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
      raise RuntimeError("simulated crash")
    texts = []
    for ids in prompts:
      prompt = "".join(map(chr, ids))
      passage = prompt.rsplit("Passage:\n", 1)[1].split("</>", 1)[0]
      texts.append(self.script[passage])
    return Out(texts, [[0]] * len(texts), ["eos"] * len(texts))


DEMOS = [Demo("cat1", "wiki", "qa", "A cat sat on a mat.", "Where did the cat sit?",
              "On a mat."),
         Demo("dog1", "wiki", "qa", "A dog ran home.", "Where did the dog run?",
              "Home."),
         Demo("tea1", "wiki", "qa", "Tea is brewed hot.", "How is tea brewed?",
              "Hot.")]
LONG = "Sunlight falls. " * 40
PIECES = [
    Piece("c7-p0", 7, "doc-a", "Cats purr when content.", 0, 23),
    Piece("c7-p1", 7, "doc-a", "Dogs bark at night.", 24, 43),
    Piece("c7-p2", 7, "doc-b", "Tea leaves are dried.", 0, 21),
    Piece("c7-p3", 7, "doc-b", "Dogs love long walks.", 22, 43),
    Piece("c7-p4", 7, "doc-c", "Cats purr a lot.", 0, 16),
    Piece("c7-p5", 7, "doc-c", LONG, 17, 17 + len(LONG)),
]
SCRIPT = {
    "Cats purr when content.":
        " Why do cats purr?\nResponse: Cats purr when they are content.",
    "Dogs bark at night.": " When do dogs bark? They bark at night.",
    "Tea leaves are dried.": " How is tea brewed?\nResponse: Tea leaves are dried.",
    "Dogs love long walks.": " What do dogs love?\nResponse: The sun is very warm.",
    "Cats purr a lot.": " Why do cats purr?\nResponse: Cats purr when they are content.",
}


def make_config(**kw):
  cfg = generate.default_config()
  cfg.num_demonstrations = 2
  cfg.batch_size = 2
  cfg.max_new_tokens = 16
  cfg.max_prompt_tokens = 1000
  cfg.sampling.strategy = "greedy"
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def run(out_dir, sampler, **cfg_kw):
  emb = KeywordEmbedder()
  pool_emb = emb.embed([d.text for d in DEMOS])
  return generate.generate_client(
      PIECES, client_id=7, pool=DEMOS, pool_embeddings=pool_emb,
      select_fn=top_k_select(pool_emb), embedder=emb, sampler=sampler, params=None,
      tokenizer=CharTokenizer(), config=make_config(**cfg_kw), out_dir=out_dir,
      generator_name="fake-lm", seed=11)


def read_lines(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_default_config_fields():
  cfg = generate.default_config()
  assert (cfg.num_demonstrations, cfg.selection, cfg.prompt_style) == (
      3, "retrieval", "multiturn")
  assert cfg.filters.min_grounding == 0.3
  with pytest.raises(AttributeError):
    cfg.num_demos = 2


def test_scripted_end_to_end_exact_lines(tmp_path):
  out = str(tmp_path / "generated")
  smp = ScriptedSampler(SCRIPT)
  stats = run(out, smp)
  kept = read_lines(writer.client_path(out, 7))
  # Batch seed from (seed, client, batch); row seeds are positions in the batch.
  b0 = generate.batch_seed(11, 7, 0)
  assert kept == [{
      "client_id": 7, "piece_id": "c7-p0", "doc_id": "doc-a", "start": 0, "end": 23,
      "instruction": "Why do cats purr?",
      "response": "Cats purr when they are content.",
      "grounding": 1.0,
      # cats, purr, content: all three in the piece; no number or name.
      "support": 1.0,
      "scores": {"repetition": 0.0, "demo_jaccard": 0.0, "grounding": 1.0,
                 "support": 1.0, "unsupported_facts": 0.0,
                 "duplicate_jaccard": 0.0},
      # cat1 scores 1; dog1 and tea1 tie at 0.01 / (1 + 0.01): the first wins.
      "demo_ids": ["cat1", "dog1"], "retrieval_scores": [1.0, 0.009901],
      "num_demos_dropped": 0, "generator": "fake-lm", "seed": 11, "batch": 0,
      "batch_seed": b0, "row_seed": 0, "prompt_style": "multiturn",
      "selection": "retrieval", "stop_reason": "eos"}]
  rejected = read_lines(writer.rejected_path(out, 7))
  assert [(r["piece_id"], r["reason"]) for r in rejected] == [
      ("c7-p1", "no_response_marker"),
      ("c7-p2", "copied_demonstration"),
      ("c7-p3", "ungrounded"),
      ("c7-p4", "duplicate"),
      ("c7-p5", "prompt_too_long")]
  assert rejected[2]["scores"]["grounding"] == round(0.01 / 1.01, 6)
  # "The sun is very warm." about dogs' walks: sun, warm -- neither in the piece.
  assert rejected[2]["scores"]["support"] == 0.0
  assert rejected[3]["scores"]["duplicate_jaccard"] == 1.0
  assert rejected[4]["num_demos_dropped"] == 2 and rejected[4]["demo_ids"] == []
  # One sampler call per batch; the too-long prompt was never sampled: a copy
  # of row 0 (row seed 2, past the batch) fills its place.
  assert [(c["n"], c["seed"], c["row_seeds"]) for c in smp.calls] == [
      (2, b0, [0, 1]), (2, generate.batch_seed(11, 7, 1), [0, 1]),
      (2, generate.batch_seed(11, 7, 2), [0, 2])]
  assert smp.calls[0]["stop_strings"] == tuple(generate.default_config().stop_strings)
  assert stats == generate.ClientStats(
      client_id=7, num_pieces=6, skipped=0, generated=6, kept=1, rejected=5,
      rejected_by_reason={"copied_demonstration": 1, "duplicate": 1,
                          "no_response_marker": 1, "prompt_too_long": 1,
                          "ungrounded": 1},
      demos_dropped=2, seconds=stats.seconds)
  with open(writer.stats_path(out)) as f:
    s = json.load(f)
  assert s["clients"]["0007"]["kept"] == 1 and s["totals"]["processed"] == 6
  # A rerun has nothing left to do.
  again = ScriptedSampler(SCRIPT)
  stats2 = run(out, again)
  assert again.calls == [] and (stats2.skipped, stats2.generated) == (6, 0)
  assert read_lines(writer.client_path(out, 7)) == kept


def test_unpadded_batches_give_the_same_files(tmp_path):
  run(str(tmp_path / "padded"), ScriptedSampler(SCRIPT))
  smp = ScriptedSampler(SCRIPT)
  run(str(tmp_path / "unpadded"), smp, pad_batches=False)
  assert [c["row_seeds"] for c in smp.calls] == [[0, 1], [0, 1], [0]]
  assert _files(str(tmp_path / "padded")) == _files(str(tmp_path / "unpadded"))


def test_keep_raw_and_single_style(tmp_path):
  out = str(tmp_path)
  run(out, ScriptedSampler(SCRIPT), keep_raw=True, prompt_style="single")
  (line,) = read_lines(writer.client_path(out, 7))
  assert line["raw"] == "Instruction:" + SCRIPT["Cats purr when content."]
  assert line["prompt_style"] == "single"


def _files(out):
  names = ("client_0007.jsonl", "client_0007.rejected.jsonl", "stats.json")
  data = {}
  for n in names:
    with open(os.path.join(out, n), "rb") as f:
      data[n] = f.read()
  return data


def test_crash_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
  clean = str(tmp_path / "clean")
  run(clean, ScriptedSampler(SCRIPT))
  reference = _files(clean)

  # 1. Crash while sampling batch 1, plus a torn line left in the kept file.
  out = str(tmp_path / "a")
  with pytest.raises(RuntimeError, match="simulated crash"):
    run(out, ScriptedSampler(SCRIPT, fail_on_call=2))
  with open(writer.client_path(out, 7), "ab") as f:
    f.write(b'{"client_id": 7, "piece_id": "c7-p2", "instr')
  smp = ScriptedSampler(SCRIPT)
  stats = run(out, smp)
  assert (stats.skipped, stats.generated) == (2, 4)
  assert _files(out) == reference

  # 2. Crash between a batch's rejected write and its kept write.
  out = str(tmp_path / "b")
  real = writer._append_lines

  def flaky(path, records):
    if path.endswith("client_0007.jsonl") and records:
      raise OSError("disk went away")
    real(path, records)

  monkeypatch.setattr(writer, "_append_lines", flaky)
  with pytest.raises(OSError):
    run(out, ScriptedSampler(SCRIPT))
  assert [r["piece_id"] for r in read_lines(writer.rejected_path(out, 7))] == ["c7-p1"]
  monkeypatch.setattr(writer, "_append_lines", real)
  smp = ScriptedSampler(SCRIPT)
  run(out, smp)
  # Batch 0 resumes with only its kept piece, at its original row seed.
  assert smp.calls[0]["row_seeds"] == [0, 2]
  assert _files(out) == reference


def test_select_fn_may_return_demo_ids(tmp_path):
  run(str(tmp_path / "rows"), ScriptedSampler(SCRIPT))
  emb = KeywordEmbedder()
  pool_emb = emb.embed([d.text for d in DEMOS])
  by_row = top_k_select(pool_emb)
  names = np.asarray([d.id for d in DEMOS])

  def by_id(queries, k, seed):
    return names[by_row(queries, k, seed)]

  generate.generate_client(
      PIECES, client_id=7, pool=DEMOS, pool_embeddings=pool_emb, select_fn=by_id,
      embedder=emb, sampler=ScriptedSampler(SCRIPT), params=None,
      tokenizer=CharTokenizer(), config=make_config(),
      out_dir=str(tmp_path / "ids"), generator_name="fake-lm", seed=11)
  assert _files(str(tmp_path / "ids")) == _files(str(tmp_path / "rows"))
  with pytest.raises(ValueError, match=r"not in the pool: \['nope'\]"):
    generate._pool_rows(np.asarray([["nope"]]), {"a": 0}, 1, 1)
  with pytest.raises(ValueError, match=r"expected \(2, 1\)"):
    generate._pool_rows(np.zeros((1, 1), int), {"a": 0}, 2, 1)


def test_make_select_fn_matches_exact_top_k():
  emb = KeywordEmbedder()
  pool_emb = emb.embed([d.text for d in DEMOS])
  queries = emb.embed([p.text for p in PIECES])
  select = generate.make_select_fn("retrieval", pool_emb, method="exact")
  got = np.asarray(select(queries, 1, 0))
  np.testing.assert_array_equal(got, top_k_select(pool_emb)(queries, 1, 0))
  fixed = np.asarray(generate.make_select_fn("fixed", pool_emb)(queries, 2, 5))
  assert fixed.shape == (6, 2) and (fixed == fixed[0]).all()


def test_duplicate_piece_ids_raise(tmp_path):
  emb = KeywordEmbedder()
  with pytest.raises(ValueError, match="'x' appears more than once"):
    generate.generate_client(
        [PIECES[0].__class__("x", 7, "d", "a", 0, 1)] * 2, client_id=7, pool=DEMOS,
        pool_embeddings=emb.embed([d.text for d in DEMOS]), select_fn=None,
        embedder=emb, sampler=None, params=None, tokenizer=CharTokenizer(),
        config=make_config(), out_dir=str(tmp_path), generator_name="x", seed=0)


def test_real_sampler_tiny_model_plumbing(tmp_path):
  import jax
  from fedjax_u2s import sampler as sampler_lib
  from fedjax_u2s import testing
  from fedjax_u2s.models import llama

  class ByteChatTokenizer(testing.ByteTokenizer):

    def apply_chat_template(self, messages, add_generation_prompt=True):
      return CharTokenizer().apply_chat_template(messages, add_generation_prompt)

  tok = ByteChatTokenizer()
  cfg = testing.tiny_llama_config(vocab_size=tok.vocab_size,
                                  max_position_embeddings=2048)
  rng = np.random.default_rng(0)  # Numpy weights: no init compile.
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype),
                        llama.param_shapes(cfg))
  smp = sampler_lib.Sampler(cfg, tok, pad_multiple=256, decode="scan")
  out = str(tmp_path)
  emb = KeywordEmbedder()
  pool_emb = emb.embed([d.text for d in DEMOS])
  pieces = PIECES[:3]
  cfg = make_config(num_demonstrations=1, keep_raw=True, batch_size=4)
  cfg.sampling.strategy = "top_p"  # Seeds matter.
  stats = generate.generate_client(
      pieces, client_id=3, pool=DEMOS, pool_embeddings=pool_emb,
      select_fn=top_k_select(pool_emb), embedder=emb, sampler=smp, params=params,
      tokenizer=tok, config=cfg, out_dir=out, generator_name="tiny-llama", seed=0)
  kept = read_lines(writer.client_path(out, 3)) if os.path.exists(
      writer.client_path(out, 3)) else []
  rejected = read_lines(writer.rejected_path(out, 3))
  assert stats.kept + stats.rejected == 3 == len(kept) + len(rejected)
  assert sorted(r["piece_id"] for r in kept + rejected) == ["c7-p0", "c7-p1", "c7-p2"]
  assert len({r["raw"] for r in kept + rejected}) == 3
  for r in kept + rejected:
    assert r["raw"].startswith("Instruction:")
    assert len(r["raw"]) <= len("Instruction:") + 16  # max_new_tokens bytes.
    assert r["stop_reason"] in ("eos", "stop_string", "length")
    assert r["generator"] == "tiny-llama" and r["demo_ids"] in (["cat1"], ["dog1"],
                                                                ["tea1"])
  with open(writer.stats_path(out)) as f:
    assert json.load(f)["clients"]["0003"]["processed"] == 3

  # Resume with the first piece already done: the others are sampled beside
  # different batch-mates, yet come out the same (row seeds, per-row stops).
  first = (kept + rejected)[0]["piece_id"]
  out2 = str(tmp_path / "resumed")
  os.makedirs(out2)
  for path_fn in (writer.client_path, writer.rejected_path):
    if os.path.exists(path_fn(out, 3)):
      with open(path_fn(out, 3), encoding="utf-8") as f:
        done = [line for line in f if json.loads(line)["piece_id"] == first]
      with open(path_fn(out2, 3), "w", encoding="utf-8") as f:
        f.writelines(done)
  stats2 = generate.generate_client(
      pieces, client_id=3, pool=DEMOS, pool_embeddings=pool_emb,
      select_fn=top_k_select(pool_emb), embedder=emb, sampler=smp, params=params,
      tokenizer=tok, config=cfg, out_dir=out2, generator_name="tiny-llama", seed=0)
  assert (stats2.skipped, stats2.generated) == (1, 2)
  for path_fn in (writer.client_path, writer.rejected_path):
    assert (writer.read_records(path_fn(out, 3))
            == writer.read_records(path_fn(out2, 3)))


@pytest.mark.slow
def test_smollm2_follows_the_prompt_format(tmp_path, smollm2_path):
  """The real model, greedy, answers both pieces in the parseable format."""
  from fedjax_u2s import sampler as sampler_lib
  from fedjax_u2s.models import registry

  model = registry.load(smollm2_path)
  demos = [
      Demo("bee", "wiki", "qa", "The honey bee is a eusocial flying insect. Worker "
           "bees collect nectar from flowers and turn it into honey, which the colony "
           "stores as food for winter.", "Why do honey bees make honey?",
           "Honey bees make honey from flower nectar so the colony has stored food "
           "to survive the winter."),
      Demo("tea", "wiki", "qa", "Green tea is made from the leaves of Camellia "
           "sinensis that have not undergone withering and oxidation. It originated "
           "in China.", "How is green tea different from other teas?",
           "Green tea is made from Camellia sinensis leaves that are not withered or "
           "oxidized, and it originated in China.")]
  texts = ["The domestic cat is a small carnivorous mammal. Cats purr when content, "
           "and they sleep between 12 and 16 hours a day.",
           "Mount Everest is Earth's highest mountain above sea level, located in the "
           "Himalayas on the border between Nepal and China."]
  pieces = [Piece(f"p{i}", 0, f"doc{i}", t, 0, len(t)) for i, t in enumerate(texts)]
  emb = KeywordEmbedder()
  pool_emb = emb.embed([d.text for d in demos])
  cfg = make_config(max_new_tokens=64, keep_raw=True)
  cfg.filters.min_grounding = -1.0  # The keyword embedder is no judge of that.
  # The format is under test, not the facts: greedy 135M answers the Everest
  # piece with "the Himalayan mountain range ... the Indian subcontinent".
  cfg.filters.max_unsupported_facts = -1
  cfg.filters.min_support = 0.0
  stats = generate.generate_client(
      pieces, client_id=0, pool=demos, pool_embeddings=pool_emb,
      select_fn=top_k_select(pool_emb), embedder=emb,
      sampler=sampler_lib.Sampler(model.config, model.tokenizer, decode="scan"),
      params=model.params, tokenizer=model.tokenizer, config=cfg,
      out_dir=str(tmp_path), generator_name="smollm2-135m-instruct", seed=0)
  kept = read_lines(writer.client_path(str(tmp_path), 0))
  assert stats.kept == 2, read_lines(writer.rejected_path(str(tmp_path), 0))
  assert [r["stop_reason"] for r in kept] == ["eos", "eos"]
  assert "cat" in kept[0]["instruction"].lower()
  assert "everest" in kept[1]["instruction"].lower()
