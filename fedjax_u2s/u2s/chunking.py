"""Documents -> token-bounded pieces with exact offsets, deduplicated.

A piece is what one U2S prompt turns into an instruction-response pair. Pieces
hold at most ``max_tokens`` tokens (by an injected ``count_tokens``: the real
tokenizer's ``len(encode(text))``, or ``len(text.split())`` in tests) and are
cut at the coarsest boundary that fits:

1. paragraphs (blank lines);
2. sentences, for a paragraph too long on its own (a regex splitter that keeps
   "e.g.", "Dr.", "3.14", initials "J. R. R." and "U.S." inside a sentence);
3. words, for a sentence too long on its own (and characters for a single
   "word" over the limit).

Consecutive small units are merged greedily while the merged text still fits.
Every piece is a slice of its document: ``doc.text[p.start:p.end] == p.text``,
with surrounding whitespace stripped, so provenance is exact.

Then pieces are filtered, each reason counted in the returned stats: pieces of
fewer than ``min_tokens`` tokens (``too_short``), exact duplicates after
whitespace/case normalisation (``exact_duplicates``) and near duplicates
(``near_duplicates``: word-3-gram Jaccard >= ``near_duplicate_threshold``
against an earlier kept piece; candidates from MinHash LSH with fixed seeds,
then verified exactly, so the result is deterministic).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Callable, Iterable, Sequence

import numpy as np

from fedjax_u2s.u2s.corpus import ClientCorpus, Document

Span = tuple[int, int]

# Words that end in "." without ending a sentence (compared lower-cased, with
# the dot). "etc." is left out on purpose: it usually does end a sentence.
ABBREVIATIONS = frozenset("""
    dr. mr. mrs. ms. prof. st. sr. jr. vs. v. e.g. i.e. cf. al. fig. figs.
    approx. ca. c. inc. ltd. co. corp. mt. ft. gen. col. lt. sgt. capt. rev.
    est. dept. univ. vol. vols. pp. p. no. nos. op. ed. eds. jan. feb. mar. apr.
    jun. jul. aug. sep. sept. oct. nov. dec. resp. viz. ph.d. m.d. b.c. a.d.
    u.s. u.k. e.u. u.n. a.m. p.m.
""".split())

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
# A sentence end: terminal punctuation, optional closing quotes/brackets, then
# whitespace (or the end). CJK full stops need no whitespace after them.
_SENTENCE_END = re.compile(
    r"(?:[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s|$))|(?:[\u3002\uff01\uff1f]+"
    r"[\"'\u201d\u2019)\]\u300d\u300f]*)")
_WORD = re.compile(r"\S+")
_DOTTED = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]?")  # U.S, e.g, J.R.R
_NORM_WORD = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class Piece:
  """A span of one document, the unit a U2S prompt sees.

  Attributes:
    piece_id: ``f"{doc_id}#{index}"``, index = position among the document's
      pieces before filtering (stable when other documents change).
    client_id: the client holding the document (-1 if unknown).
    doc_id: the source document.
    text: ``document.text[start:end]``.
    start: character offset of the first character in the document text.
    end: character offset one past the last character.
    meta: the document's meta plus ``tokens`` (the piece's token count).
  """
  piece_id: str
  client_id: int
  doc_id: str
  text: str
  start: int
  end: int
  meta: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------
# Boundaries.


def _strip_span(text: str, start: int, end: int) -> Span | None:
  """(start, end) with surrounding whitespace removed; None if blank."""
  while start < end and text[start].isspace():
    start += 1
  while end > start and text[end - 1].isspace():
    end -= 1
  return (start, end) if end > start else None


def split_paragraphs(text: str, start: int = 0, end: int | None = None
                    ) -> list[Span]:
  """Spans of the blank-line separated paragraphs of ``text[start:end]``."""
  end = len(text) if end is None else end
  spans, pos = [], start
  for m in _PARAGRAPH_BREAK.finditer(text, start, end):
    span = _strip_span(text, pos, m.start())
    if span:
      spans.append(span)
    pos = m.end()
  span = _strip_span(text, pos, end)
  if span:
    spans.append(span)
  return spans


def _word_before(text: str, start: int, end: int) -> str:
  """The run of non-whitespace that ends ``text[start:end]`` ("" if none).

  What ``re.search(r"(\\S+)$", text[start:end])`` matches, without copying or
  scanning the slice (doing so for every full stop made sentence splitting
  quadratic in the paragraph length): ``$`` also matches before one final
  newline, and ``\\s`` is exactly ``str.isspace``.
  """
  if end > start and text[end - 1] == "\n":
    end -= 1
  lo = end
  while lo > start and not text[lo - 1].isspace():
    lo -= 1
  return text[lo:end]


def _is_sentence_end(text: str, start: int, end: int, m: re.Match) -> bool:
  """Whether the terminal punctuation matched by ``m`` ends a sentence."""
  punct = m.group(0)
  if punct[0] in "\u3002\uff01\uff1f":
    return True
  nxt = _WORD.search(text, m.end(), end)
  if nxt is None:
    return True
  first = nxt.group(0).lstrip("\"'\u201c\u2018([")[:1]
  if first and first.islower():  # "e.g. the", "approx. five"
    return False
  if punct.rstrip("\"'\u201d\u2019)]") != ".":  # "?", "!", "..." end sentences.
    return True
  word = _word_before(text, start, m.start())
  if not word:
    return True
  word = word.lstrip("\"'\u201c\u2018([")
  if (word + ".").lower() in ABBREVIATIONS:
    return False
  if len(word) == 1 and word.isupper():  # an initial: "J. Smith"
    return False
  if _DOTTED.fullmatch(word) and "." in word:  # "U.S." "J.R.R."
    return False
  return True


def split_sentences(text: str, start: int = 0, end: int | None = None
                    ) -> list[Span]:
  """Spans of the sentences of ``text[start:end]``, whitespace stripped."""
  end = len(text) if end is None else end
  spans, pos = [], start
  for m in _SENTENCE_END.finditer(text, start, end):
    if _is_sentence_end(text, start, end, m):
      span = _strip_span(text, pos, m.end())
      if span:
        spans.append(span)
      pos = m.end()
  span = _strip_span(text, pos, end)
  if span:
    spans.append(span)
  return spans


def _pack(units: Sequence[Span], fits: Callable[[int, int], bool]
          ) -> list[Span]:
  """Greedily merges consecutive spans while ``fits(start, end)``."""
  out: list[Span] = []
  for s, e in units:
    if out and fits(out[-1][0], e):
      out[-1] = (out[-1][0], e)
    else:
      out.append((s, e))
  return out


def _split_long_word(text: str, s: int, e: int,
                     fits: Callable[[int, int], bool]) -> list[Span]:
  """Cuts one over-long word into the longest fitting prefixes (binary search)."""
  out = []
  while s < e:
    lo, hi = s + 1, e  # the longest end in [s+1, e] that fits; at least 1 char.
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if fits(s, mid):
        lo = mid
      else:
        hi = mid - 1
    out.append((s, lo))
    s = lo
  return out


def split_spans(text: str, count_tokens: Callable[[str], int], max_tokens: int,
                stats: dict | None = None,
                counts: dict[Span, int] | None = None) -> list[Span]:
  """Token-bounded spans of ``text``: paragraphs, then sentences, then words.

  Args:
    text: the document text.
    count_tokens: text -> number of tokens (called once per distinct span).
    max_tokens: the most tokens a span may hold.
    stats: counts ``long_paragraphs`` / ``long_sentences`` / ``long_words``
      into this dict.
    counts: filled with ``(start, end) -> count_tokens(text[start:end])`` for
      every span counted, so a caller need not count the returned spans again
      (with a real tokenizer, counting is most of the time).
  """
  stats = {} if stats is None else stats
  counts = {} if counts is None else counts

  def fits(s: int, e: int) -> bool:
    n = counts.get((s, e))
    if n is None:
      n = counts[(s, e)] = count_tokens(text[s:e])
    return n <= max_tokens
  units: list[Span] = []
  for ps, pe in split_paragraphs(text):
    if fits(ps, pe):
      units.append((ps, pe))
      continue
    stats["long_paragraphs"] = stats.get("long_paragraphs", 0) + 1
    for ss, se in split_sentences(text, ps, pe):
      if fits(ss, se):
        units.append((ss, se))
        continue
      stats["long_sentences"] = stats.get("long_sentences", 0) + 1
      words: list[Span] = []
      for m in _WORD.finditer(text, ss, se):
        if fits(m.start(), m.end()):
          words.append((m.start(), m.end()))
        else:
          stats["long_words"] = stats.get("long_words", 0) + 1
          words.extend(_split_long_word(text, m.start(), m.end(), fits))
      units.extend(_pack(words, fits))
  return _pack(units, fits)


# ----------------------------------------------------------------------------
# Deduplication.


def normalize(text: str) -> str:
  """Case-folded text with whitespace runs collapsed: the exact-dup key."""
  return " ".join(text.casefold().split())


def shingles(text: str, n: int = 3) -> frozenset[str]:
  """Word n-grams of the case-folded word tokens (the whole text if shorter)."""
  words = _NORM_WORD.findall(text.casefold())
  if len(words) < n:
    return frozenset([" ".join(words) or normalize(text)])
  return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
  """|a & b| / |a | b| (1.0 for two empty sets)."""
  if not a and not b:
    return 1.0
  return len(a & b) / len(a | b)


class MinHashIndex:
  """MinHash LSH over shingle sets; candidates are verified exactly.

  ``num_perm = bands * rows`` hash functions ``(a * x + b) mod p`` over the
  CRC32 of each shingle, with ``a, b`` from a fixed seed: deterministic across
  runs and machines. With 16 bands of 8 rows, a pair at Jaccard 0.9 becomes a
  candidate with probability > 0.999.
  """

  _PRIME = (1 << 31) - 1

  def __init__(self, threshold: float, bands: int = 16, rows: int = 8,
               seed: int = 1234):
    rng = np.random.default_rng(seed)
    self.threshold = threshold
    self.bands, self.rows = bands, rows
    self._a = rng.integers(1, self._PRIME, bands * rows, dtype=np.uint64)
    self._b = rng.integers(0, self._PRIME, bands * rows, dtype=np.uint64)
    self._buckets: dict[tuple[int, bytes], list[int]] = {}
    self._sets: list[frozenset] = []

  def signature(self, sh: frozenset[str]) -> np.ndarray:
    x = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in sorted(sh)),
                    dtype=np.uint64, count=len(sh)) % np.uint64(self._PRIME)
    h = (self._a[:, None] * x[None, :] + self._b[:, None]) % np.uint64(self._PRIME)
    return h.min(axis=1)  # [bands * rows]

  def query_add(self, sh: frozenset[str]) -> bool:
    """True if ``sh`` is a near duplicate of an added set; else adds it."""
    sig = self.signature(sh).reshape(self.bands, self.rows)
    keys = [(i, sig[i].tobytes()) for i in range(self.bands)]
    seen = set()
    for key in keys:
      for j in self._buckets.get(key, ()):
        if j not in seen:
          seen.add(j)
          if jaccard(sh, self._sets[j]) >= self.threshold:
            return True
    idx = len(self._sets)
    self._sets.append(sh)
    for key in keys:
      self._buckets.setdefault(key, []).append(idx)
    return False


# ----------------------------------------------------------------------------
# Entry point.


def chunk_documents(docs: Sequence[Document] | ClientCorpus,
                    count_tokens: Callable[[str], int], max_tokens: int,
                    min_tokens: int = 1, *, client_id: int | None = None,
                    near_duplicate_threshold: float = 0.9,
                    source: str = "") -> tuple[list[Piece], dict]:
  """Splits documents into token-bounded pieces and filters them.

  Args:
    docs: documents, or a :class:`ClientCorpus` (its ``client_id`` and name
      are used).
    count_tokens: text -> number of tokens.
    max_tokens: the most tokens a piece may hold.
    min_tokens: pieces with fewer tokens are dropped (``too_short``).
    client_id: stored on each piece (default: the corpus's, else -1).
    near_duplicate_threshold: shingle Jaccard at or above which a piece is a
      near duplicate of an earlier one (> 1 disables the check).
    source: names the corpus in errors (default: the corpus name).

  Returns:
    (pieces, stats). Stats count ``documents``, ``empty`` (blank documents),
    ``pieces`` (before filtering), ``too_short``, ``exact_duplicates``,
    ``near_duplicates``, ``kept``, ``long_paragraphs`` / ``long_sentences`` /
    ``long_words`` (units split further), ``replacement_chars`` (U+FFFD in
    kept pieces) and ``pieces_with_replacement``.

  Raises:
    ValueError: bad limits, or documents were given but no piece survives
      (names the source and the counts).
  """
  if max_tokens <= 0 or min_tokens < 0 or min_tokens > max_tokens:
    raise ValueError(
        f"Need 0 <= min_tokens <= max_tokens and max_tokens > 0, got "
        f"min_tokens={min_tokens}, max_tokens={max_tokens}.")
  if isinstance(docs, ClientCorpus):
    origin = docs.stats.get("source")
    source = source or (f"{docs.name} from {origin}" if origin else docs.name)
    client_id = docs.client_id if client_id is None else client_id
    docs = docs.documents
  client_id = -1 if client_id is None else client_id
  stats = {k: 0 for k in (
      "documents", "empty", "pieces", "too_short", "exact_duplicates",
      "near_duplicates", "kept", "long_paragraphs", "long_sentences",
      "long_words", "replacement_chars", "pieces_with_replacement")}
  seen_exact: set[str] = set()
  near = MinHashIndex(near_duplicate_threshold)
  pieces = []
  for doc in docs:
    stats["documents"] += 1
    if not doc.text.strip():
      stats["empty"] += 1
      continue
    counts: dict[Span, int] = {}
    for index, (s, e) in enumerate(
        split_spans(doc.text, count_tokens, max_tokens, stats, counts)):
      stats["pieces"] += 1
      text = doc.text[s:e]
      tokens = counts[(s, e)] if (s, e) in counts else count_tokens(text)
      if tokens < min_tokens:
        stats["too_short"] += 1
        continue
      key = normalize(text)
      if key in seen_exact:
        stats["exact_duplicates"] += 1
        continue
      seen_exact.add(key)
      if near_duplicate_threshold <= 1.0 and near.query_add(shingles(text)):
        stats["near_duplicates"] += 1
        continue
      bad = text.count("\ufffd")
      stats["replacement_chars"] += bad
      stats["pieces_with_replacement"] += bool(bad)
      pieces.append(Piece(piece_id=f"{doc.doc_id}#{index}", client_id=client_id,
                          doc_id=doc.doc_id, text=text, start=s, end=e,
                          meta={**doc.meta, "tokens": tokens}))
  stats["kept"] = len(pieces)
  if stats["documents"] and not pieces:
    raise ValueError(
        f"Corpus {source or '(unnamed)'!r} yields no pieces: {stats}. Lower "
        "min_tokens, or check that the documents hold text.")
  return pieces, stats


def chunk_corpora(corpora: Iterable[ClientCorpus],
                  count_tokens: Callable[[str], int], max_tokens: int,
                  min_tokens: int = 1, **kwargs
                  ) -> list[tuple[list[Piece], dict]]:
  """:func:`chunk_documents` per client (dedup is within a client only)."""
  return [chunk_documents(c, count_tokens, max_tokens, min_tokens, **kwargs)
          for c in corpora]
