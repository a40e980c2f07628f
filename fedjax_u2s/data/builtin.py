"""A built-in instruction set with categories, made from real text on PyPI.

:func:`wiki_instructions` turns the Wikipedia lead paragraphs of
:mod:`fedjax_u2s.data.wiki` into Dolly-style single-turn examples whose
``category`` is the article's topic, so federated configs (Dirichlet or
natural splits by category) have ready data without any download. Two fixed
templates, each answered by a real field of the article and nothing else:

* ``summary``: "Summarize what Wikipedia says about {title}." -> the lead
  paragraph (``extract``), verbatim.
* ``description``: "Describe {title} in a few words." -> Wikipedia's short
  description, verbatim (only for articles that have one; 9,862 of 10,033).

No text is generated or paraphrased. The text is CC BY-SA (Wikipedia).
:func:`write_jsonl` saves any examples as a file :func:`read_instructions`
reads back.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from fedjax_u2s.data import wiki
from fedjax_u2s.data.instructions import Example

# name -> (instruction template, Article attribute answering it).
TEMPLATES: dict[str, tuple[str, str]] = {
    "summary": ("Summarize what Wikipedia says about {title}.", "text"),
    "description": ("Describe {title} in a few words.", "description"),
}


def wiki_instructions(topics: Sequence[str] | None = None,
                      max_per_topic: int | None = None, seed: int = 0,
                      path: str | None = None) -> list[Example]:
  """Dolly-style examples from the built-in Wikipedia corpus.

  Args:
    topics: short names (``medicine``) or full labels; None: all topics.
    max_per_topic: keep at most this many examples per topic, a random
      subset drawn with ``seed`` (kept in article order); None: all.
    seed: seeds the subset.
    path: a summaries file (tests); defaults to the packaged one.

  Returns:
    Examples ordered by topic (as given, or sorted labels), then article id,
    then template (``summary`` first). ``meta``: ``category`` (the full topic
    label), ``title``, ``article_id``, ``template``, ``source`` ("wiki").
  """
  articles = wiki.load_articles(path)
  if topics is None:
    labels = sorted({a.topic for a in articles})
  else:
    labels = list(dict.fromkeys(wiki.topic_name(t) for t in topics))
  if max_per_topic is not None and max_per_topic < 1:
    raise ValueError(f"max_per_topic must be >= 1, got {max_per_topic}.")
  by_topic = {label: [] for label in labels}
  for a in articles:
    if a.topic not in by_topic:
      continue
    for name, (template, attr) in TEMPLATES.items():
      answer = getattr(a, attr).strip()
      if not answer:
        continue
      by_topic[a.topic].append(Example(
          ({"role": "user", "content": template.format(title=a.title)},
           {"role": "assistant", "content": answer}),
          {"source": "wiki", "category": a.topic, "title": a.title,
           "article_id": a.id, "template": name}))
  out = []
  rng = np.random.default_rng(seed)
  for label in labels:
    exs = by_topic[label]
    if max_per_topic is not None and len(exs) > max_per_topic:
      keep = np.sort(rng.choice(len(exs), max_per_topic, replace=False))
      exs = [exs[i] for i in keep]
    out.extend(exs)
  return out


def write_jsonl(examples: Sequence[Example], path: str | os.PathLike,
                format: str = "chat") -> None:  # pylint: disable=redefined-builtin
  """Writes examples as JSON lines that :func:`read_instructions` reads back.

  Args:
    examples: the examples.
    path: the output file (its directory is created).
    format: ``chat``: ``{"messages": [...], **meta}``; ``dolly``:
      ``{"instruction", "context": "", "response", **meta}`` (single-turn
      user/assistant examples only). ``source`` and ``row`` are not written
      (the reader sets them anew).

  Raises:
    ValueError: unknown format, or a multi-turn example with ``dolly``.
  """
  if format not in ("chat", "dolly"):
    raise ValueError(f"Unknown format {format!r}; use 'chat' or 'dolly'.")
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for i, ex in enumerate(examples):
      meta = {k: v for k, v in ex.meta.items() if k not in ("source", "row")}
      if format == "chat":
        row = {"messages": [dict(m) for m in ex.messages]}
      else:
        roles = [m["role"] for m in ex.messages]
        if roles != ["user", "assistant"]:
          raise ValueError(f"Example {i} has roles {roles}; the dolly format "
                           "holds one user and one assistant turn.")
        row = {"instruction": ex.messages[0]["content"], "context": "",
               "response": ex.messages[1]["content"]}
      for k, v in meta.items():
        row.setdefault(k, v)
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
