"""Sentence-cloze suites, their config wiring, and the power analysis."""

import json
import math
import os
import random
import re

import ml_collections
import pytest

from fedjax_u2s import testing
from fedjax_u2s.data import wiki
from fedjax_u2s.evaluation import report
from fedjax_u2s.evaluation import stats
from fedjax_u2s.evaluation import suites
from fedjax_u2s.pipelines import validate
from fedjax_u2s.u2s import corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEO = wiki.TOPICS["geography"]


def _corpus(tmp_path, articles):
  path = tmp_path / "summaries.json"
  path.write_text(json.dumps({t: {"title": t, "extract": x, "description": "",
                                  "topic": GEO} for t, x in articles.items()}))
  return str(path)


# Four towns with one year and one number each (the distractor pools), plus
# articles that break one rule each.
TOWNS = {
    "Alpha": "Alpha is a town in the north. It was founded in 1850 and has 12,400 inhabitants.",
    "Beta": "Beta is a town in the west. It was founded in 1720 and has 45,100 inhabitants.",
    "Gamma": "Gamma is a town in the east. It was founded in 1901 and has 98,700 inhabitants.",
    "Delta": "Delta is a town in the south. It was founded in 1655 and has 33,300 inhabitants.",
}


def test_split_sentences_and_spans():
  assert suites.split_sentences(
      "Dr. Smith was born in 1900 in St. Louis. He died in 1950. E. Coli is a germ."
  ) == ["Dr. Smith was born in 1900 in St. Louis.", "He died in 1950.",
        "E. Coli is a germ."]
  s = "It was founded in 1850 and has 12,400 inhabitants near Oslo Fjord, (3.5 km) COVID-19."
  assert suites.cloze_spans(s) == [
      ("year", s.index("1850"), "1850"), ("number", s.index("12,400"), "12,400"),
      ("name", s.index("Oslo"), "Oslo Fjord"), ("number", s.index("3.5"), "3.5")]
  # A capital that opens the sentence, stop words and acronyms are not names.
  assert suites.cloze_spans("Paris lies in The Hague of DNA.") == []


def test_wiki_cloze_exact_options_on_a_tiny_corpus(tmp_path):
  path = _corpus(tmp_path, TOWNS)
  task = suites.wiki_cloze(("geography",), path=path, num_questions=None,
                           kinds=("year", "number"), per_article=3)
  # One question per article: both spans sit in the same sentence.
  assert [q.meta["title"] for q in task.questions] == ["Alpha", "Beta", "Delta", "Gamma"]
  years, numbers = {"1850", "1720", "1901", "1655"}, {"12,400", "45,100", "98,700", "33,300"}
  for q in task.questions:
    text = TOWNS[q.meta["title"]]
    gold = q.options[q.answer]
    assert set(q.options) == (years if q.meta["kind"] == "year" else numbers)
    sentence = suites.split_sentences(text)[1]
    assert q.prompt == suites.CLOZE_TEMPLATE.format(
        title=q.meta["title"], sentence=sentence.replace(gold, suites.CLOZE_BLANK),
        what=q.meta["kind"])
  assert task == suites.wiki_cloze(("geography",), path=path, num_questions=None,
                                   kinds=("year", "number"), per_article=3)
  assert suites.build_suite("wiki_cloze", topics=("geography",), path=path,
                            num_questions=2, kinds=("year", "number")).questions == (
      tuple(q for i, q in enumerate(task.questions)
            if i in set(random.Random(0).sample(range(4), 2))))


def test_wiki_cloze_skips_ambiguous_and_given_answers(tmp_path):
  towns = dict(TOWNS)
  # The year occurs twice: ambiguous. The number occurs in the title: given away.
  towns["Epsilon 7"] = ("Epsilon 7 is a town in the north. It was founded in 1770 and "
                        "rebuilt in 1770 with 7 gates.")
  # Two years in one sentence: each occurs once, so each is askable, and the
  # other one (it is in the article) is never a distractor.
  towns["Zeta"] = "Zeta is a town in the far north. It was founded in 1999 and named in 1720."
  path = _corpus(tmp_path, towns)
  task = suites.wiki_cloze(("geography",), path=path, num_questions=None,
                           kinds=("year", "number"), include_titles={"Epsilon 7", "Zeta"})
  assert [q.meta["title"] for q in task.questions] == ["Zeta"]
  (q,) = task.questions
  assert len({"1999", "1720"} & set(q.options)) == 1
  assert set(q.options) - {"1999", "1720"} <= {"1850", "1901", "1655", "1770"}


def test_wiki_cloze_packaged_corpus_invariants():
  topics = ("medicine", "math", "geography")
  task = suites.wiki_cloze(topics, seed=1, num_questions=200, per_article=2)
  assert len(task.questions) == 200
  assert task == suites.wiki_cloze(topics, seed=1, num_questions=200, per_article=2)
  by_id = {a.id: a for a in wiki.load_articles()}
  per_article = {}
  for q in task.questions:
    art = by_id[q.meta["article_id"]]
    gold = q.options[q.answer]
    sentence = q.prompt.split("\n")[1]
    assert sentence.count(suites.CLOZE_BLANK) == 1
    assert sentence.replace(suites.CLOZE_BLANK, gold) in art.text
    assert len(set(o.casefold() for o in q.options)) == len(q.options) == 4
    for o in q.options:
      if o != gold:
        assert o.casefold() not in art.text.casefold()
      if q.meta["kind"] == "year":
        assert re.fullmatch(r"\d{4}", o)
      elif q.meta["kind"] == "number":
        assert suites._number_shape(o) == suites._number_shape(gold)
      else:
        assert len(o.split()) == len(gold.split()) and o[0].isupper()
    per_article[art.id] = per_article.get(art.id, 0) + 1
  assert max(per_article.values()) <= 2
  # An article gets the same questions whichever split asks about it.
  some = sorted({q.meta["title"] for q in task.questions})[:5]
  sub = suites.wiki_cloze(topics, seed=1, num_questions=None, per_article=2,
                          include_titles=some)
  full = {q.id: q for q in suites.wiki_cloze(topics, seed=1, num_questions=None,
                                             per_article=2).questions}
  assert sub.questions and all(full[q.id] == q for q in sub.questions)


def _eval_cfg(**kw):
  c = ml_collections.ConfigDict(dict(topics=("medicine", "geography"), seed=0,
                                     num_wiki_questions=5, num_math_questions=0,
                                     math_max_new_tokens=8))
  for k, v in kw.items():
    c[k] = v
  return c


def test_from_config_cloze_sets_and_merge():
  arts = wiki.articles_by_topic("geography")
  held, unheld = [a.title for a in arts[:40]], [a.title for a in arts[40:80]]
  plain = suites.from_config(_eval_cfg(), held, unheld)
  assert [t.name for t in plain] == ["wiki_known", "wiki_unseen"]
  assert [t.name for t in suites.from_config(_eval_cfg(num_cloze_questions=0), held,
                                             unheld)] == ["wiki_known", "wiki_unseen"]
  sep = suites.from_config(_eval_cfg(num_cloze_questions=7, cloze_per_article=1),
                           held, unheld)
  assert [t.name for t in sep] == ["wiki_known", "wiki_unseen", "cloze_known",
                                   "cloze_unseen"]
  assert [len(t.questions) for t in sep] == [5, 5, 7, 7]
  assert {q.meta["title"] for q in sep[2].questions} <= set(held)
  assert {q.meta["title"] for q in sep[3].questions} <= set(unheld)
  merged = suites.from_config(_eval_cfg(num_cloze_questions=7, cloze_per_article=1,
                                        cloze_merge=True), held, unheld)
  assert [t.name for t in merged] == ["wiki_known", "wiki_unseen"]
  assert merged[0].questions == sep[0].questions + sep[2].questions
  assert merged[1].questions == sep[1].questions + sep[3].questions
  only_cloze = suites.from_config(_eval_cfg(num_wiki_questions=0, num_cloze_questions=7,
                                            cloze_per_article=1, cloze_merge=True),
                                  held, unheld)
  assert [(t.name, t.questions) for t in only_cloze] == [
      ("wiki_known", sep[2].questions), ("wiki_unseen", sep[3].questions)]


# ----------------------------------------------------------------------------
# Power.


def test_minimum_detectable_effect_by_hand():
  # z_0.975 = 1.959964, z_0.8 = 0.841621: MDE = 2.801585 * 0.5 / sqrt(100).
  assert stats.minimum_detectable_effect(0.5, 100) == pytest.approx(0.1400793, abs=1e-6)
  assert stats.minimum_detectable_effect(0.3, 400, power=0.5) == pytest.approx(
      1.959964 * 0.3 / 20, abs=1e-6)
  # (1.959964 * 0.5 / 0.05)^2 = 384.15 -> 385 questions.
  assert stats.questions_for_half_width(0.5, 0.05) == 385
  # 10% gained, 5% lost: 0.15 - 0.05^2 = 0.1475.
  assert stats.sd_from_discordance(0.10, 0.05) == pytest.approx(math.sqrt(0.1475))
  with pytest.raises(ValueError, match="n must be >= 1"):
    stats.minimum_detectable_effect(0.5, 0)


def test_power_analysis_of_a_paired_result():
  a = {"kind": "multiple_choice", "values": {f"q{i}": v for i, v in enumerate([1, 0, 1, 1])}}
  b = {"kind": "multiple_choice", "values": {f"q{i}": v for i, v in enumerate([0, 0, 1, 0])}}
  r = stats.paired_bootstrap(a, b, num_samples=2000)
  # Differences 1, 0, 0, 1: mean 0.5, sample SD sqrt(1/3).
  assert r["sd"] == pytest.approx(math.sqrt(1 / 3))
  p = stats.power_analysis(r)
  assert p["n"] == 4 and p["sd"] == r["sd"]
  assert p["half_width"] == pytest.approx((r["ci_high"] - r["ci_low"]) / 2)
  assert p["half_width_normal"] == pytest.approx(1.959964 * math.sqrt(1 / 3) / 2, abs=1e-6)
  assert p["mde"] == pytest.approx(2.801585 * math.sqrt(1 / 3) / 2, abs=1e-6)
  assert p["n_for_target"] == math.ceil((1.959964 * math.sqrt(1 / 3) / 0.05) ** 2)
  ppl = {"kind": "perplexity", "values": {"x": [1.0, 2.0], "y": [2.0, 2.0]}}
  q = stats.power_analysis(stats.paired_bootstrap(ppl, ppl, num_samples=100))
  assert q["sd"] is None and q["mde"] is None and q["half_width"] == 0.0
  table = report.power_table({"tuned - base": {"wiki_known": r, "heldout_ppl":
                                               stats.paired_bootstrap(ppl, ppl, num_samples=100)}})
  assert "| tuned - base | wiki_known | 4 | 0.577 | 0.500 | 0.809 | 513 |" in table
  assert "| tuned - base | heldout_ppl | 2 | - | 0.000 | - | - |" in table


def test_u2s_wiki_power_variant_has_300_questions_per_split():
  """configs/u2s_wiki.py:power: >= 300 paired questions in each wiki split."""
  config = testing.load_config(os.path.join(REPO, "configs", "u2s_wiki.py"), "power")
  assert validate.problems(config) == []
  clients, holdout = corpus.load_corpora_and_holdout(config.corpus)
  held = [d.doc_id for c in clients for d in c.documents]
  tasks = suites.from_config(config.evaluate, held, [d.doc_id for d in holdout])
  sizes = {t.name: len(t.questions) for t in tasks}
  assert sizes == {"wiki_known": 100 + 218, "wiki_unseen": 100 + 300,
                   "math_arithmetic": 40}
  # The default job is unchanged.
  default = testing.load_config(os.path.join(REPO, "configs", "u2s_wiki.py"), "")
  assert default.evaluate.num_cloze_questions == 0


def test_clustered_questions_resample_articles():
  """Questions of one article move together: the bootstrap resamples articles."""
  records = lambda vals: [dict(id=f"q{i}", correct_norm=bool(v), meta=dict(article_id=i // 2))
                          for i, v in enumerate(vals)]
  qa = stats.question_values({"t": {"kind": "multiple_choice", "records": records([1, 1, 0, 0])}})
  qb = stats.question_values({"t": {"kind": "multiple_choice", "records": records([0, 0, 0, 0])}})
  assert qa["t"]["clusters"] == {"q0": "article:0", "q1": "article:0",
                                 "q2": "article:1", "q3": "article:1"}
  assert stats.mean_question_values([qa, qa])["t"]["clusters"] == qa["t"]["clusters"]
  r = stats.paired_bootstrap(qa["t"], qb["t"], num_samples=4000)
  # Differences 1, 1 | 0, 0: resamples of two articles give 0, 0.5 or 1.
  assert r["clusters"] == 2 and r["diff"] == 0.5
  assert (r["ci_low"], r["ci_high"]) == (0.0, 1.0)
  # Question-level SD sqrt(1/3); cluster-robust: T = (+1, -1),
  # SE^2 = 2/1 * (1 + 1) / 16 = 0.25, effective SD = sqrt(4) * 0.5 = 1.
  assert r["sd"] == pytest.approx(math.sqrt(1 / 3))
  assert r["sd_effective"] == pytest.approx(1.0)
  assert stats.power_analysis(r)["mde"] == pytest.approx(2.801585 * 1.0 / 2, abs=1e-6)
  # One question per article (wiki_mc): no clusters, the plain bootstrap.
  single = stats.question_values({"t": {"kind": "multiple_choice", "records": [
      dict(id=f"q{i}", correct_norm=True, meta=dict(article_id=i)) for i in range(3)]}})
  assert "clusters" not in single["t"]
