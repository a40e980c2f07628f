"""CHAMP competition math as a math client's text and held-out problems, by concept.

The ``champ-dataset`` package (1.0.0) carries ``dataset_files/v0.json``: 270
competition problems in five categories (number theory, inequalities,
polynomials, sequences, combinatorics), each with a written step-by-step
solution, a final answer and the list of concepts (``C_*``, 89 general
statements such as the AM-GM inequality) and problem-specific hints
(``H_*``) it uses. All of it was written by people, none by a model.

The setting this module builds: a math client whose *text* can teach what
the math evaluation measures. :func:`split` holds out, per category, a seeded
share of the problems that (a) have a single-number answer (so they can be
scored exactly) and (b) use only concepts that some problem the client keeps
also uses (so the client's text shows each concept at work). The client's
text (:func:`client_texts`) is every concept statement of the kept
categories plus every kept problem with its full solution and answer; a held
problem's statement, solution, hints and answer text never appear in it.

The file is located with :func:`importlib.util.find_spec` (via
``registry.package_file``), never imported. Usage::

    s = champ.split(held_fraction=0.3, seed=0)
    texts = champ.client_texts(s)          # documents for the math client
    champ.write_corpus_jsonl("champ.jsonl", s)  # corpus.kind="files" input
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
from typing import Sequence

from fedjax_u2s.models import registry

PACKAGE = "champ_dataset"
PIP_NAME = "champ-dataset==1.0.0"
CATEGORIES = ("Combinatorics", "Inequality", "Number-Theory", "Polynomial", "Sequence")
# A single-number answer: an integer, a decimal or a simple fraction.
NUMBER_ANSWER = re.compile(r"-?\d+(?:\.\d+)?|-?\d+/\d+")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One CHAMP problem.

  Attributes:
    id: the dataset's identifier, e.g. ``P_Combinatorics_1``.
    category: one of :data:`CATEGORIES`.
    text: the problem statement.
    solution: the solution steps, joined by spaces.
    answer: the final answer as written.
    concepts: the general concepts (``C_*``) the solution uses.
  """
  id: str
  category: str
  text: str
  solution: str
  answer: str
  concepts: tuple[str, ...]

  @property
  def numeric(self) -> bool:
    return NUMBER_ANSWER.fullmatch(self.answer) is not None


@dataclasses.dataclass(frozen=True)
class Concept:
  id: str
  name: str
  category: str
  text: str


@dataclasses.dataclass(frozen=True)
class Split:
  """Problems the client's text holds, problems held out, and the concepts."""
  kept: tuple[Problem, ...]
  held: tuple[Problem, ...]
  concepts: tuple[Concept, ...]
  seed: int
  held_fraction: float


def resolve_path() -> str:
  path = registry.package_file(PACKAGE, "dataset_files", "v0.json")
  if path is None:
    raise FileNotFoundError(f"CHAMP needs the package {PIP_NAME!r}: "
                            f"`pip install {PIP_NAME}`.")
  return path


@functools.lru_cache(maxsize=2)
def load(path: str | None = None) -> tuple[tuple[Problem, ...], dict[str, Concept]]:
  """Every problem (sorted by id) and every concept by id."""
  path = path or resolve_path()
  with open(path, encoding="utf-8") as f:
    raw = json.load(f)
  for key in ("problems", "concepts"):
    if key not in raw:
      raise ValueError(f"{path}: no {key!r} table; is this CHAMP's v0.json?")
  problems = []
  for pid in sorted(raw["problems"]):
    p = raw["problems"][pid]
    steps = " ".join(s["_text"].strip() for s in p["solution"]["steps"])
    problems.append(Problem(
        id=pid, category=p["category"], text=p["_text"].strip(), solution=steps,
        answer=p["_answer"].strip(),
        concepts=tuple(c for c in p["ch_list"] if c.startswith("C_"))))
  concepts = {cid: Concept(id=cid, name=(c.get("name") or "").strip(),
                           category=c.get("category") or "", text=c["_text"].strip())
              for cid, c in sorted(raw["concepts"].items())}
  return tuple(problems), concepts


def split(held_fraction: float = 0.3, seed: int = 0,
          categories: Sequence[str] = CATEGORIES, path: str | None = None) -> Split:
  """Held-out problems by concept, and what the client keeps.

  Per category, the candidates are the problems with a single-number answer
  and at least one concept; they are shuffled with ``seed`` and taken in
  turn while (a) fewer than ``round(held_fraction * candidates)`` are held
  and (b) every concept of the candidate is still used by some problem
  not held. So each held problem's concepts appear, worked, in the kept
  text.

  Args:
    held_fraction: share of each category's candidates to hold, in [0, 1).
    seed: the split is a function of this seed (and the file).
    categories: which categories (see :data:`CATEGORIES`).
    path: the v0.json file (default: the packaged one).
  """
  if not 0.0 <= held_fraction < 1.0:
    raise ValueError(f"champ.split: held_fraction must be in [0, 1), got {held_fraction}.")
  unknown = [c for c in categories if c not in CATEGORIES]
  if unknown or not categories:
    raise ValueError(f"champ.split: categories {tuple(categories)} must be a non-empty "
                     f"subset of {CATEGORIES}.")
  problems, concepts = load(path)
  kept, held = [], []
  for cat in categories:
    pool = [p for p in problems if p.category == cat]
    candidates = [p for p in pool if p.numeric and p.concepts]
    random.Random(f"{seed}:champ:{cat}").shuffle(candidates)
    target = int(round(held_fraction * len(candidates)))
    held_ids: set[str] = set()
    for p in candidates:
      if len(held_ids) >= target:
        break
      others = [q for q in pool if q.id != p.id and q.id not in held_ids]
      if all(any(c in q.concepts for q in others) for c in p.concepts):
        held_ids.add(p.id)
    held += [p for p in pool if p.id in held_ids]
    kept += [p for p in pool if p.id not in held_ids]
  used = {c for p in kept for c in p.concepts}
  return Split(kept=tuple(kept), held=tuple(held),
               concepts=tuple(concepts[c] for c in sorted(used) if c in concepts),
               seed=seed, held_fraction=held_fraction)


def problem_text(p: Problem) -> str:
  """A kept problem as prose: statement, worked solution, answer."""
  return f"Problem: {p.text}\nSolution: {p.solution}\nAnswer: {p.answer}"


def concept_text(c: Concept) -> str:
  return f"{c.name[:1].upper() + c.name[1:]}: {c.text}" if c.name else c.text


def client_texts(s: Split) -> list[tuple[str, str, str]]:
  """``(doc id, category, text)`` of the math client's documents.

  One document per concept a kept problem uses and one per kept problem
  (statement, solution, answer), in id order.
  """
  docs = [(c.id, c.category, concept_text(c)) for c in s.concepts]
  docs += [(p.id, p.category, problem_text(p)) for p in s.kept]
  return docs


def write_corpus_jsonl(path: str, s: Split, client: str = "math") -> int:
  """Writes the client's documents as JSONL for ``corpus.kind="files"``.

  Records carry ``id``, ``text``, ``category`` and ``client`` (set
  ``corpus.id_field="id"``, ``corpus.client_field="client"``,
  ``corpus.partition="natural"``). Returns the number of records.
  """
  docs = client_texts(s)
  with open(path, "w", encoding="utf-8") as f:
    for doc_id, cat, text in docs:
      f.write(json.dumps({"id": doc_id, "text": text, "category": cat,
                          "client": client}, ensure_ascii=False) + "\n")
  return len(docs)
