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
