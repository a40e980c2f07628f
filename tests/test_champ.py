"""CHAMP as a math client's text and held-out problems of the same concepts."""

import json

import pytest

from fedjax_u2s.data import champ
from fedjax_u2s.evaluation import suites


def test_split_holds_numeric_problems_whose_concepts_the_kept_text_shows():
  s = champ.split(held_fraction=0.5, seed=0)
  assert s == champ.split(held_fraction=0.5, seed=0)
  assert s != champ.split(held_fraction=0.5, seed=1)
  problems, _ = champ.load()
  assert len(s.kept) + len(s.held) == len(problems) == 270
  assert not {p.id for p in s.kept} & {p.id for p in s.held}
  kept_concepts = {c for p in s.kept for c in p.concepts}
  for p in s.held:
    assert p.numeric and p.concepts
    assert set(p.concepts) <= kept_concepts
  # At most round(fraction * candidates) per category.
  for cat in champ.CATEGORIES:
    cands = [p for p in problems if p.category == cat and p.numeric and p.concepts]
    held = [p for p in s.held if p.category == cat]
    assert 0 < len(held) <= round(0.5 * len(cands))
  assert champ.split(held_fraction=0.0).held == ()


def test_client_text_never_contains_a_held_problem(tmp_path):
  s = champ.split(held_fraction=0.9, seed=0)
  docs = champ.client_texts(s)
  assert len(docs) == len(s.concepts) + len(s.kept)
  blob = "\n".join(text for _, _, text in docs)
  for p in s.held:
    assert p.text not in blob and p.solution not in blob
  kept = s.kept[0]
  assert champ.problem_text(kept) == (
      f"Problem: {kept.text}\nSolution: {kept.solution}\nAnswer: {kept.answer}")
  path = tmp_path / "champ.jsonl"
  assert champ.write_corpus_jsonl(str(path), s) == len(docs)
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r["id"], r["category"], r["text"]) for r in rows] == docs
  assert {r["client"] for r in rows} == {"math"}


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="held_fraction must be in"):
    champ.split(held_fraction=1.0)
  with pytest.raises(ValueError, match="categories"):
    champ.split(categories=("Geometry",))


def test_champ_heldout_suites():
  s = champ.split(held_fraction=0.9, seed=0)
  mc = suites.build_suite("champ_heldout", form="mc")
  assert mc == suites.champ_heldout("mc")
  assert mc.headline == "accuracy"  # Short numeric options: acc_norm measured nothing.
  assert [q.id for q in mc.questions] == [p.id for p in s.held]
  by_id = {p.id: p for p in s.held}
  for q in mc.questions:
    gold = by_id[q.id].answer
    assert q.options[q.answer] == gold and len(set(q.options)) == 4
    assert {suites._answer_shape(o) for o in q.options} == {suites._answer_shape(gold)}
  gen = suites.champ_heldout("generation", held_fraction=0.9)
  assert [(q.id, q.answer) for q in gen.questions] == [(p.id, p.answer) for p in s.held]
  with pytest.raises(ValueError, match="form must be"):
    suites.champ_heldout("essay")


def test_champ_corpus_clients_and_their_questions():
  """corpus.kind="champ": clients by category, the holdout is what is asked."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.config_blocks import u2s_config  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.pipelines import validate  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.u2s import corpus  # pylint: disable=g-import-not-at-top

  clients, held = corpus.champ_clients(num_clients=3, holdout_fraction=0.9, seed=0)
  s = champ.split(0.9, 0)
  assert [d.doc_id for d in held] == [p.id for p in s.held]
  assert [c.name for c in clients] == ["math:Combinatorics+Polynomial",
                                       "math:Inequality+Sequence", "math:Number-Theory"]
  docs = [d for c in clients for d in c.documents]
  # Every kept problem and used concept exactly once, and no held problem text.
  assert sorted(d.doc_id for d in docs) == sorted(i for i, _, _ in champ.client_texts(s))
  blob = "\n".join(d.text for d in docs)
  assert not any(p.text in blob for p in s.held)
  for c, cats in zip(clients, (("Combinatorics", "Polynomial"), ("Inequality", "Sequence"),
                               ("Number-Theory",))):
    problem_cats = {d.meta["category"] for d in c.documents if d.doc_id.startswith("P_")}
    assert problem_cats == set(cats)
  # A concept of a problem category goes with that category; a general one
  # (e.g. "Algebra") to the client whose kept problems use it most.
  owner = {"Combinatorics": 0, "Polynomial": 0, "Inequality": 1, "Sequence": 1,
           "Number-Theory": 2}
  where = {d.doc_id: k for k, c in enumerate(clients) for d in c.documents}
  for concept in s.concepts:
    counts = [0, 0, 0]
    for p in s.kept:
      counts[owner[p.category]] += concept.id in p.concepts
    expected = owner.get(concept.category, counts.index(max(counts)))
    assert where[concept.id] == expected

  # The evaluation asks exactly the held problems, through the config path.
  cfg = u2s_config()
  cfg.corpus.kind, cfg.corpus.num_clients, cfg.corpus.holdout_fraction = "champ", 3, 0.9
  cfg.evaluate.num_wiki_questions = cfg.evaluate.num_math_questions = 0
  cfg.evaluate.num_champ_questions = 10
  clients2, held2 = corpus.load_corpora_and_holdout(cfg.corpus)
  assert [d.doc_id for d in held2] == [d.doc_id for d in held]
  (task,) = suites.from_config(cfg.evaluate, [d.doc_id for d in docs],
                               [d.doc_id for d in held2])
  assert task.name == "champ_heldout" and len(task.questions) == 10
  assert {q.id for q in task.questions} <= {d.doc_id for d in held}
  with pytest.raises(ValueError, match="not CHAMP problems"):
    suites.champ_heldout("mc", ids=["Paris"])

  # Asked of a Wikipedia run, the field is refused by name.
  bad = ml_collections.ConfigDict(cfg.to_dict())
  bad.corpus.kind = "wiki"
  with pytest.raises(ValueError, match=r"num_champ_questions=10 needs config.corpus.kind='champ'"):
    validate.validate(bad)
  with pytest.raises(ValueError, match="corpus.num_clients=7"):
    corpus.champ_clients(num_clients=7)


def test_champ_experiment_smoke_end_to_end(tmp_path, smollm2_path):
  """configs/experiments/u2s_champ.py:smoke through the claim job, on
  pre-generated pairs (a tiny random model writes no parseable pair): the
  only headline set is champ_heldout, asked of exactly the held problems."""
  import os  # pylint: disable=g-import-not-at-top
  from fedjax_u2s import pipelines, testing  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.pipelines import claim  # pylint: disable=g-import-not-at-top
  from test_claim import write_generated  # pylint: disable=g-import-not-at-top

  del smollm2_path  # The tiny model needs the real tokenizer.
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path / "champ")
  s = champ.split(0.9, 0)
  held = [p.id for p in s.held]
  write_generated(workdir, "retrieval", [s.kept[0].id, s.kept[1].id], held)
  model = testing.write_tiny_chat_model(str(tmp_path / "tiny"))
  config = testing.load_config(
      os.path.join(repo, "configs", "experiments", "u2s_champ.py"), "smoke", **{
          "model.name": model, "experiment.arms": ("base", "fedit_u2s", "raw_text"),
          "experiment.seeds": (0,), "train.max_length": 96,
          "data.eval_fraction": 0.25, "lora.rank": 2, "lora.alpha": 4.0,
          "checkpoint.every": 100, "model.remat": False,
          "train.logits_chunk_size": 0})
  pipelines.run(config, workdir)
  scores = json.load(open(claim.scores_path(claim.arm_dir(workdir, "fedit_u2s", 0))))
  assert set(scores) == {"champ_heldout", "heldout_ppl"}
  asked = [r["id"] for r in scores["champ_heldout"]["records"]]
  assert len(asked) == config.evaluate.num_champ_questions == 6
  assert set(asked) <= set(held)
  md = open(os.path.join(workdir, "results.md")).read()
  assert "champ_heldout" in md and "| fedit_u2s - raw_text |" in md
