"""Filters on generated pairs: each keeps or rejects with a reason, and scores.

Order (the first failing filter names the reason):

1. parse: the parser's reason code (``no_response_marker``, ...).
2. length: ``instruction_too_short`` / ``instruction_too_long`` /
   ``response_too_short`` / ``response_too_long`` (characters and words).
3. repetition: ``repetitive`` -- the fraction of repeated word n-grams in the
   instruction or the response is above a threshold (degenerate loops).
4. demonstration copy: ``copied_demonstration`` -- the instruction equals a
   demonstration's after normalisation, or their word Jaccard is high.
5. grounding: ``ungrounded`` -- any of three checks fails:

   a. embedding: cosine(embed(response), embed(piece)) is below a threshold
      (embeddings are L2-normalised, so cosine is a dot product). It measures
      topic, and cannot see an invented number: "the largest ant weighs 1.2
      grams" about a passage on ants scores as high as a true sentence.
   b. facts (lexical): every number and named span (a run of capitalised
      words, or one mid-sentence) of the response, and of the instruction
      where it asserts one, must occur in the piece; see :func:`facts`.
   c. support (lexical): the share of the response's distinct content words
      (stopwords and numbers left out, lightly stemmed) found in the piece
      must reach a threshold; see :func:`support_ratio`.

   The lexical checks run when the caller gives the pieces' texts; their
   scores (``support``, ``unsupported_facts``) go into provenance, and a
   rejected pair lists the facts the piece does not hold (``unsupported``).
6. duplicates: ``duplicate`` -- the pair equals (normalised) or nearly equals
   (word-shingle Jaccard) a pair already kept for this client.

Scores computed on the way (``demo_jaccard``, ``repetition``, ``grounding``,
``support``, ``unsupported_facts``, ``duplicate_jaccard``) are returned so
they can go into provenance.
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
  c.max_unsupported_facts = 0       # Numbers/named spans absent from the piece allowed (-1: off).
  c.min_support = 0.5               # Min share of response content words in the piece (0.0: off).
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
    unsupported: the response's (and instruction's) numbers and named spans
      that the piece does not hold, when the lexical checks ran.
  """
  kept: bool
  reason: str
  scores: dict[str, float]
  unsupported: tuple[str, ...] = ()


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


# ----------------------------------------------------------------------------
# Lexical grounding: the facts and words of a pair against its source piece.

# English function words, and the words answers use to talk about a subject
# ("refers to", "a type of", "is known as"): they carry no fact, so the
# support ratio skips them.
STOPWORDS = frozenset("""
a about above after again against all also although am among an and another any
are as at be because been before being below between both but by can cannot could
did do does doing done down during each either else etc even ever every few for
from further had has have having he her here hers herself him himself his how
however i if in into is it its itself just least less many may me might more most
much must my myself neither no nor not now of off often on once one only onto or
other others otherwise our ours ourselves out over own per rather same shall she
should since so some such than that the their theirs them themselves then there
therefore these they this those though through thus to too toward towards under
until up upon us usually very via was we well were what whatever when whenever
where whereas wherever whether which while who whom whose why will with within
without would yet you your yours yourself yourselves
refer refers referred referring term terms known call called example examples
include includes included including type types kind kinds various specific
particular certain use used uses using
""".split())
# Digits the source may spell out ("six species" holds the fact "6").
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve "
    "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update({w: str(10 * i) for i, w in enumerate(
    "thirty forty fifty sixty seventy eighty ninety".split(), start=3)})
NUMBER_WORDS.update(hundred="100", thousand="1000", million="1000000",
                    billion="1000000000")
# Integers up to this in an instruction are task counts ("List 3 ..."), not
# facts about the passage.
MAX_TASK_COUNT = 10

# A number: digits, thousands groups of exactly three ("22,000"), decimals.
_NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?")
# List markers at a line start ("1. ", "2) ") number items, they assert nothing.
_LIST_MARKER = re.compile(r"(?m)^[ \t]*\(?\d{1,2}[.)](?=\s)")
# Words (letters first; inner apostrophes and hyphens kept), sentence ends and
# list bullets, and the punctuation that ends a span without ending a sentence.
_WORD_OR_END = re.compile(r"[^\W\d_](?:[\w'’-]*\w)?|[.!?:;\n]|[-*•#]|[,()\[\]\"“”]")


_RUN_BREAKS = frozenset(',()[]"“”')


def stem(word: str) -> str:
  """A light, deterministic stem: plurals, -ing, -ed, -ly and a final e go.

  Applied to both sides of every comparison, so "evolved", "evolves" and
  "evolve" meet at "evolv"; it need not be a dictionary word.
  """
  w = word.lower()
  for suffix in ("'s", "’s"):
    if w.endswith(suffix):
      w = w[:-2]
  if len(w) > 4 and w.endswith("ies"):
    w = w[:-3] + "y"
  elif w.endswith("sses"):
    w = w[:-2]
  elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
    w = w[:-1]
  if len(w) > 5 and w.endswith("ing"):
    w = w[:-3]
  elif len(w) > 4 and w.endswith("ed"):
    w = w[:-2]
  elif len(w) > 5 and w.endswith("ly"):
    w = w[:-2]
  if len(w) > 3 and w.endswith("e"):
    w = w[:-1]
  return w


def _canonical_number(text: str) -> str:
  """``"22,000"`` -> ``"22000"``, ``"1.50"`` -> ``"1.5"``, ``"007"`` -> ``"7"``."""
  text = text.replace(",", "")
  if "." in text:
    whole, frac = text.split(".", 1)
    frac = frac.rstrip("0")
    return str(int(whole)) + ("." + frac if frac else "")
  return str(int(text))


def numbers(text: str, *, skip_list_markers: bool = True) -> list[str]:
  """The digit numbers of ``text``, canonical, in order (list markers left out)."""
  text = unicodedata.normalize("NFKC", text)
  if skip_list_markers:
    text = _LIST_MARKER.sub(" ", text)
  return [_canonical_number(m.group()) for m in _NUMBER.finditer(text)]


def named_spans(text: str) -> list[str]:
  """Runs of capitalised words that name something, as written.

  A run is a maximal sequence of words starting with a capital letter. The
  first word of a sentence (or of a list item) is capitalised by grammar,
  not because it names something, so it is left out of its run; stopwords
  at either end of a run ("The", "In") are left out too.
  """
  text = unicodedata.normalize("NFKC", text)
  spans: list[str] = []
  run: list[str] = []
  sentence_start = True

  def close():
    while run and run[0].lower() in STOPWORDS:
      run.pop(0)
    while run and run[-1].lower() in STOPWORDS:
      run.pop()
    if run:
      spans.append(" ".join(run))
    run.clear()

  for m in _WORD_OR_END.finditer(text):
    tok = m.group()
    if tok in _RUN_BREAKS:  # Commas, brackets, quotes: a span ends here.
      close()
      continue
    if not tok[0].isalpha():  # A sentence end or a list bullet.
      close()
      sentence_start = True
      continue
    if tok[0].isupper():
      if not sentence_start:
        run.append(re.sub(r"['’]s$", "", tok))  # "Sicily's": the name is "Sicily".
    else:
      close()
    sentence_start = False
  close()
  return spans


def _source_index(source: str) -> tuple[set[str], list[str]]:
  """The piece's numbers (digits and spelled out) and its stemmed words."""
  stems = [stem(w) for w in words(source)]
  nums = set(numbers(source, skip_list_markers=False))
  nums.update(NUMBER_WORDS[w] for w in words(source) if w in NUMBER_WORDS)
  return nums, stems


def _same_name(a: str, b: str) -> bool:
  """Stems of one name: equal, or one a prefix (4+ letters, a final y aside)
  of the other, so a demonym meets its place ("Indian" / "India", "European"
  / "Europe", "Italian" / "Italy")."""
  if a == b:
    return True
  short, long_ = sorted((a[:-1] if a.endswith("y") else a,
                         b[:-1] if b.endswith("y") else b), key=len)
  return len(short) >= 4 and long_.startswith(short)


def _contains(seq: Sequence[str], sub: Sequence[str]) -> bool:
  """Whether ``sub`` occurs in ``seq`` as consecutive words (:func:`_same_name`)."""
  n = len(sub)
  return any(all(_same_name(x, y) for x, y in zip(seq[i:i + n], sub))
             for i in range(len(seq) - n + 1))


def unsupported_facts(instruction: str, response: str, source: str) -> list[str]:
  """The numbers and named spans of a pair that ``source`` does not hold.

  Response: every digit number (list markers aside) must be a number of the
  source, written in digits or as a word up to twenty, or a round ten,
  hundred, thousand, million or billion (``22,000`` and ``22000`` are one
  number); every named span (:func:`named_spans`) must occur in the source
  as consecutive words, compared stemmed and case-folded, a word also
  matching one its stem is a prefix of (4+ letters: "Indian" is grounded by
  "India"). Instruction: the
  same, except integers up to :data:`MAX_TASK_COUNT` ("List 3 uses"): an
  instruction asking about "the 22,000 species" or "Marie Curie" asserts
  that they exist in the passage.

  Returns:
    The unsupported numbers and spans, in order of appearance, each once.
  """
  nums, stems = _source_index(source)
  out: list[str] = []
  for side, text in (("instruction", instruction), ("response", response)):
    for num in numbers(text):
      if side == "instruction" and "." not in num and int(num) <= MAX_TASK_COUNT:
        continue
      if num not in nums and num not in out:
        out.append(num)
    for span in named_spans(text):
      if not _contains(stems, [stem(w) for w in words(span)]) and span not in out:
        out.append(span)
  return out


def content_words(text: str) -> set[str]:
  """The distinct stemmed words of ``text`` that are not stopwords or numbers."""
  return {stem(w) for w in words(text)
          if w not in STOPWORDS and not w.isdigit() and len(w) > 1}


def support_ratio(response: str, source: str) -> float:
  """Share of the response's distinct content words that occur in ``source``.

  Both sides go through :func:`content_words` (normalised, stopwords,
  numbers and one-letter words out, stemmed). A response with no content
  word has nothing unsupported: 1.0.
  """
  resp = content_words(response)
  if not resp:
    return 1.0
  return len(resp & set(stem(w) for w in words(source))) / len(resp)


def check_lexical_grounding(instruction: str, response: str, source: str,
                            cfg: ml_collections.ConfigDict
                            ) -> tuple[str | None, float, list[str]]:
  """``(reason or None, support ratio, unsupported facts)`` of one pair.

  ``cfg.max_unsupported_facts`` < 0 turns the facts check off (the facts
  are still listed); ``cfg.min_support`` 0 turns the ratio check off.
  """
  facts = unsupported_facts(instruction, response, source)
  support = support_ratio(response, source)
  too_many = 0 <= cfg.max_unsupported_facts < len(facts)
  return (UNGROUNDED if too_many or support < cfg.min_support else None,
          support, facts)


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
                  cfg: ml_collections.ConfigDict,
                  piece_texts: Sequence[str] | None = None) -> list[FilterResult]:
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
    piece_texts: the pieces' texts, for the lexical grounding checks (facts
      and support); None skips them.

  Returns:
    One :class:`FilterResult` per piece.
  """
  n = len(parsed)
  if len(piece_embeddings) != n or len(demo_instructions) != n or (
      piece_texts is not None and len(piece_texts) != n):
    raise ValueError(f"apply_filters: {n} parsed pairs, {len(piece_embeddings)} "
                     f"piece embeddings, {len(demo_instructions)} demo lists"
                     + ("" if piece_texts is None else
                        f", {len(piece_texts)} piece texts") + ".")
  verdicts: list[str | None] = [None] * n
  scores: list[dict[str, float]] = [{} for _ in range(n)]
  unsupported: list[tuple[str, ...]] = [()] * n
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
      if piece_texts is not None:
        lexical, support, facts = check_lexical_grounding(
            parsed[i].instruction, parsed[i].response, piece_texts[i], cfg)
        scores[i]["support"] = support
        scores[i]["unsupported_facts"] = float(len(facts))
        unsupported[i] = tuple(facts)
        verdicts[i] = verdicts[i] or lexical
  out = []
  for i, p in enumerate(parsed):
    if verdicts[i] is None:
      verdicts[i], scores[i]["duplicate_jaccard"] = tracker.check(p.instruction,
                                                                 p.response)
      if verdicts[i] is None:
        tracker.add(p.instruction, p.response)
    reason = verdicts[i]
    out.append(FilterResult(kept=reason is None, reason=reason or KEPT,
                            scores=scores[i], unsupported=unsupported[i]))
  return out
