"""Filters on generated pairs: each keeps or rejects with a reason, and scores.

Order (the first failing filter names the reason):

1. parse: the parser's reason code (``no_response_marker``, ...).
2. length: ``instruction_too_short`` / ``instruction_too_long`` /
   ``response_too_short`` / ``response_too_long`` (characters and words).
3. repetition: ``repetitive`` -- the fraction of repeated word n-grams in the
   instruction or the response is above a threshold (degenerate loops).
4. demonstration copy: ``copied_demonstration`` -- the instruction equals a
   demonstration's after normalisation, or their word Jaccard is high.
5. grounding: ``ungrounded`` -- cosine(embed(response), embed(piece)) is below
   a threshold (embeddings are L2-normalised, so cosine is a dot product).
6. duplicates: ``duplicate`` -- the pair equals (normalised) or nearly equals
   (word-shingle Jaccard) a pair already kept for this client.

Scores computed on the way (``demo_jaccard``, ``repetition``, ``grounding``,
``duplicate_jaccard``) are returned so they can go into provenance.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Any, Iterable, Sequence

import ml_collections
import numpy as np

from fedjax_u2s.u2s import parse as parse_lib

KEPT = "kept"
INSTRUCTION_TOO_SHORT = "instruction_too_short"
INSTRUCTION_TOO_LONG = "instruction_too_long"
RESPONSE_TOO_SHORT = "response_too_short"
RESPONSE_TOO_LONG = "response_too_long"
REPETITIVE = "repetitive"
COPIED_DEMONSTRATION = "copied_demonstration"
UNGROUNDED = "ungrounded"
DUPLICATE = "duplicate"


def default_filter_config() -> ml_collections.ConfigDict:
  """Filter thresholds; a bound of 0 disables a maximum."""
  c = ml_collections.ConfigDict()
  c.min_instruction_chars = 10      # Shorter instructions are rejected.
  c.max_instruction_chars = 600     # Longer instructions are rejected (0: no bound).
  c.min_instruction_words = 3       # Instructions need at least this many words.
  c.max_instruction_words = 120     # Word bound on instructions (0: no bound).
  c.min_response_chars = 10         # Shorter responses are rejected.
  c.max_response_chars = 3000       # Longer responses are rejected (0: no bound).
  c.min_response_words = 2          # Responses need at least this many words.
  c.max_response_words = 600        # Word bound on responses (0: no bound).
  c.repetition_ngram = 3            # n of the word n-grams counted for repetition.
  c.max_repetition = 0.3            # Max fraction of repeated n-grams (1.0: off).
  c.max_demo_jaccard = 0.7          # Max word Jaccard of instruction vs a demo's.
  c.min_grounding = 0.3             # Min cosine(response, piece) (-1.0: off).
  c.dedup_shingle = 3               # n of the word shingles for near-duplicates.
  c.max_duplicate_jaccard = 0.8     # Max shingle Jaccard vs a kept pair.
  c.lock()
  return c


@dataclasses.dataclass(frozen=True)
class FilterResult:
  """The verdict on one pair.

  Attributes:
    kept: True when every filter passed.
    reason: :data:`KEPT` or the first failing filter's reason.
    scores: the scores computed so far (name -> float).
  """
  kept: bool
  reason: str
  scores: dict[str, float]


# ----------------------------------------------------------------------------
# Text helpers.


def normalize(text: str) -> str:
  """Lowercase, NFKC, punctuation dropped, whitespace collapsed."""
  text = unicodedata.normalize("NFKC", text).lower()
  text = re.sub(r"[^\w\s]", " ", text)
  return " ".join(text.split())


def words(text: str) -> list[str]:
  return normalize(text).split()


def jaccard(a: Iterable[Any], b: Iterable[Any]) -> float:
  a, b = set(a), set(b)
  if not a and not b:
    return 1.0
  return len(a & b) / len(a | b)


def shingles(text: str, n: int) -> set[tuple[str, ...]]:
  """Word n-grams of the normalised text (the whole text if shorter)."""
  w = words(text)
  if len(w) < n:
    return {tuple(w)} if w else set()
  return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def repeated_ngram_fraction(text: str, n: int) -> float:
  """Fraction of word n-gram occurrences that repeat an earlier one."""
  w = words(text)
  grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
  if not grams:
    return 0.0
  return (len(grams) - len(set(grams))) / len(grams)


# ----------------------------------------------------------------------------
# Single filters: each returns a reason (None when passing) and its score.


def check_length(instruction: str, response: str,
                 cfg: ml_collections.ConfigDict) -> str | None:
  """Character and word bounds on both sides."""
  for text, side in ((instruction, "instruction"), (response, "response")):
    n_chars, n_words = len(text), len(words(text))
    lo_c, hi_c = cfg[f"min_{side}_chars"], cfg[f"max_{side}_chars"]
    lo_w, hi_w = cfg[f"min_{side}_words"], cfg[f"max_{side}_words"]
    if n_chars < lo_c or n_words < lo_w:
      return f"{side}_too_short"
    if (hi_c and n_chars > hi_c) or (hi_w and n_words > hi_w):
      return f"{side}_too_long"
  return None


def check_repetition(instruction: str, response: str,
                     cfg: ml_collections.ConfigDict) -> tuple[str | None, float]:
  score = max(repeated_ngram_fraction(instruction, cfg.repetition_ngram),
              repeated_ngram_fraction(response, cfg.repetition_ngram))
  return (REPETITIVE if score > cfg.max_repetition else None), score


def check_demo_copy(instruction: str, demo_instructions: Sequence[str],
                    cfg: ml_collections.ConfigDict) -> tuple[str | None, float]:
  """Exact (normalised) or near (word Jaccard) copy of a demonstration."""
  norm, w = normalize(instruction), words(instruction)
  best = 0.0
  copied = False
  for d in demo_instructions:
    if normalize(d) == norm:
      copied, best = True, 1.0
      continue
    best = max(best, jaccard(w, words(d)))
  copied = copied or best > cfg.max_demo_jaccard
  return (COPIED_DEMONSTRATION if copied else None), best


def check_grounding(similarity: float,
                    cfg: ml_collections.ConfigDict) -> str | None:
  return UNGROUNDED if similarity < cfg.min_grounding else None


def pair_text(instruction: str, response: str) -> str:
  return instruction + "\n" + response


class DuplicateTracker:
  """The pairs kept so far for one client: exact and near duplicates.

  Args:
    cfg: filter config (``dedup_shingle``, ``max_duplicate_jaccard``).
    pairs: already kept ``(instruction, response)`` pairs (e.g. read back from
      a client's file on restart), in the order they were kept.
  """

  def __init__(self, cfg: ml_collections.ConfigDict,
               pairs: Iterable[tuple[str, str]] = ()):
    self.cfg = cfg
    self._exact: set[str] = set()
    self._shingles: list[set[tuple[str, ...]]] = []
    for i, r in pairs:
      self.add(i, r)

  def __len__(self) -> int:
    return len(self._shingles)

  def check(self, instruction: str, response: str) -> tuple[str | None, float]:
    """(``"duplicate"`` or None, the highest Jaccard with a kept pair)."""
    text = pair_text(instruction, response)
    if normalize(text) in self._exact:
      return DUPLICATE, 1.0
    s = shingles(text, self.cfg.dedup_shingle)
    best = max((jaccard(s, t) for t in self._shingles), default=0.0)
    return (DUPLICATE if best > self.cfg.max_duplicate_jaccard else None), best

  def add(self, instruction: str, response: str) -> None:
    text = pair_text(instruction, response)
    self._exact.add(normalize(text))
    self._shingles.append(shingles(text, self.cfg.dedup_shingle))


# ----------------------------------------------------------------------------
# All filters over a batch.


def apply_filters(parsed: Sequence[parse_lib.ParseResult],
                  piece_embeddings: np.ndarray,
                  demo_instructions: Sequence[Sequence[str]],
                  tracker: DuplicateTracker, embedder,
                  cfg: ml_collections.ConfigDict) -> list[FilterResult]:
  """Runs the filters in order over a batch of parsed generations.

  Pairs are checked against ``tracker`` in order, and each kept pair is added
  to it, so a batch gives the same verdicts as its pairs one at a time.

  Args:
    parsed: one :class:`~fedjax_u2s.u2s.parse.ParseResult` per piece.
    piece_embeddings: [N, D] L2-normalised embeddings of the pieces.
    demo_instructions: per piece, the instructions of the demonstrations its
      prompt showed.
    tracker: the client's kept pairs; updated in place.
    embedder: ``.embed(texts) -> [M, D]`` L2-normalised; called once, on the
      responses that reach the grounding filter.
    cfg: :func:`default_filter_config`.

  Returns:
    One :class:`FilterResult` per piece.
  """
  n = len(parsed)
  if len(piece_embeddings) != n or len(demo_instructions) != n:
    raise ValueError(f"apply_filters: {n} parsed pairs, {len(piece_embeddings)} "
                     f"piece embeddings, {len(demo_instructions)} demo lists.")
  verdicts: list[str | None] = [None] * n
  scores: list[dict[str, float]] = [{} for _ in range(n)]
  for i, p in enumerate(parsed):
    if not p.ok:
      verdicts[i] = p.reason
      continue
    reason = check_length(p.instruction, p.response, cfg)
    if reason is None:
      reason, scores[i]["repetition"] = check_repetition(p.instruction, p.response, cfg)
    if reason is None:
      reason, scores[i]["demo_jaccard"] = check_demo_copy(
          p.instruction, demo_instructions[i], cfg)
    verdicts[i] = reason
  todo = [i for i in range(n) if verdicts[i] is None]
  if todo:
    emb = np.asarray(embedder.embed([parsed[i].response for i in todo]), np.float32)
    sims = np.sum(emb * np.asarray(piece_embeddings, np.float32)[todo], axis=-1)
    for i, s in zip(todo, sims):
      scores[i]["grounding"] = float(s)
      verdicts[i] = check_grounding(float(s), cfg)
  out = []
  for i, p in enumerate(parsed):
    if verdicts[i] is None:
      verdicts[i], scores[i]["duplicate_jaccard"] = tracker.check(p.instruction,
                                                                 p.response)
      if verdicts[i] is None:
        tracker.add(p.instruction, p.response)
    reason = verdicts[i]
    out.append(FilterResult(kept=reason is None, reason=reason or KEPT,
                            scores=scores[i]))
  return out
