"""Chunking: exact pieces on hand-made documents, offsets, dedup, filters."""

from __future__ import annotations

import pytest

from fedjax_u2s.u2s import chunking
from fedjax_u2s.u2s.corpus import ClientCorpus, Document


def words(text: str) -> int:
  return len(text.split())


def chunk(texts, max_tokens, min_tokens=1, **kwargs):
  docs = [Document(f"d{i}", t) for i, t in enumerate(texts)]
  return chunking.chunk_documents(docs, words, max_tokens, min_tokens, **kwargs)


def texts_of(pieces):
  return [p.text for p in pieces]


def assert_offsets(pieces, docs_by_id):
  for p in pieces:
    doc_text = docs_by_id[p.doc_id]
    assert doc_text[p.start:p.end] == p.text
    assert p.text == p.text.strip() and p.text


def test_paragraphs_merged_up_to_the_limit():
  text = ("Alpha beta gamma.\n\nDelta epsilon.\n  \n\nZeta eta theta iota kappa."
          "\n\nLambda mu.")
  pieces, stats = chunk([text], max_tokens=5)
  assert texts_of(pieces) == ["Alpha beta gamma.\n\nDelta epsilon.",
                              "Zeta eta theta iota kappa.", "Lambda mu."]
  assert [p.piece_id for p in pieces] == ["d0#0", "d0#1", "d0#2"]
  assert [(p.start, p.end) for p in pieces] == [(0, 33), (38, 64), (66, 76)]
  assert_offsets(pieces, {"d0": text})
  assert stats["kept"] == 3 and stats["long_paragraphs"] == 0


def test_sentence_splitter_keeps_abbreviations_decimals_initials():
  text = ("Dr. Smith measured 3.14 grams, e.g. of salt. J. R. Tolkien wrote it in "
          "the U.S. during the war. Prices rose 2.5 percent! Did they? Yes.")
  spans = chunking.split_sentences(text)
  assert [text[s:e] for s, e in spans] == [
      "Dr. Smith measured 3.14 grams, e.g. of salt.",
      "J. R. Tolkien wrote it in the U.S. during the war.",
      "Prices rose 2.5 percent!", "Did they?", "Yes."]


def test_sentence_splitter_quotes_and_cjk():
  text = ('He said "Stop." Then he left... 東京は大きい。ここです。 Wait… '
          "Done.")
  assert [text[s:e] for s, e in chunking.split_sentences(text)] == [
      'He said "Stop."', "Then he left...", "東京は大きい。", "ここです。",
      "Wait…", "Done."]


def test_long_paragraph_split_on_sentences():
  text = ("Dr. Smith measured 3.14 grams, e.g. of salt. J. R. Tolkien wrote it. "
          "Prices rose 2.5 percent!")
  pieces, stats = chunk([text], max_tokens=8)
  # 8 + 5 + 4 words: the first fills a piece, the last two (9 words) do not fit
  # together.
  assert texts_of(pieces) == ["Dr. Smith measured 3.14 grams, e.g. of salt.",
                              "J. R. Tolkien wrote it.", "Prices rose 2.5 percent!"]
  assert stats["long_paragraphs"] == 1 and stats["long_sentences"] == 0
  assert_offsets(pieces, {"d0": text})
  # With room for 9 words, the last two sentences merge.
  pieces, _ = chunk([text], max_tokens=9)
  assert texts_of(pieces)[1] == "J. R. Tolkien wrote it. Prices rose 2.5 percent!"


def test_monster_sentence_split_on_words():
  monster = " ".join(f"w{i}" for i in range(25))
  text = f"Short one.\n\n{monster}"
  pieces, stats = chunk([text], max_tokens=10)
  assert texts_of(pieces) == [
      "Short one.", " ".join(f"w{i}" for i in range(10)),
      " ".join(f"w{i}" for i in range(10, 20)),
      " ".join(f"w{i}" for i in range(20, 25))]
  assert stats["long_sentences"] == 1
  assert_offsets(pieces, {"d0": text})


def test_single_word_over_the_limit_split_on_characters():
  text = "ab abcdefghijklmnopqrstuvw"
  pieces, stats = chunking.chunk_documents([Document("d", text)], len, 10, 1)
  assert texts_of(pieces) == ["ab", "abcdefghij", "klmnopqrst", "uvw"]
  assert stats["long_words"] == 1
  assert_offsets(pieces, {"d": text})


def test_offsets_round_trip_with_unicode_and_whitespace():
  texts = ["\n\n  Café au lait coûte 3.50 €. Très bon! 🙂 Encore?\n\n\n  Ünïcödé "
           "text here.  \n", "\t東京は大きい。ここです。 And English too. "]
  pieces, _ = chunk(texts, max_tokens=3)
  assert_offsets(pieces, {f"d{i}": t for i, t in enumerate(texts)})
  assert texts_of(pieces) == ["Café au lait", "coûte 3.50 €.", "Très bon!",
                              "🙂 Encore?", "Ünïcödé text here.",
                              "東京は大きい。ここです。", "And English too."]


def test_exact_duplicates_normalised_whitespace_and_case():
  pieces, stats = chunk(["The heart pumps blood.", "the  HEART pumps\nblood.",
                         "The lungs exchange gases."], max_tokens=50)
  assert texts_of(pieces) == ["The heart pumps blood.", "The lungs exchange gases."]
  assert stats["exact_duplicates"] == 1 and stats["near_duplicates"] == 0


def test_near_duplicates_by_shingle_jaccard():
  base = [f"t{i}" for i in range(30)]
  end_changed = base[:-1] + ["zzz"]  # 1 of 28 shingles differs: J = 27/29
  middle_changed = base[:15] + ["zzz"] + base[16:]  # 3 differ: J = 25/31
  sh = lambda ws: chunking.shingles(" ".join(ws))
  assert chunking.jaccard(sh(base), sh(end_changed)) == pytest.approx(27 / 29)
  assert chunking.jaccard(sh(base), sh(middle_changed)) == pytest.approx(25 / 31)
  pieces, stats = chunk([" ".join(base), " ".join(end_changed),
                         " ".join(middle_changed)], max_tokens=100)
  assert [p.doc_id for p in pieces] == ["d0", "d2"]
  assert stats["near_duplicates"] == 1 and stats["exact_duplicates"] == 0
  # A threshold above 1 disables the check; 0.8 also catches the middle change.
  assert len(chunk([" ".join(base), " ".join(end_changed)], 100,
                   near_duplicate_threshold=1.1)[0]) == 2
  assert [p.doc_id for p in chunk(
      [" ".join(base), " ".join(end_changed), " ".join(middle_changed)], 100,
      near_duplicate_threshold=0.8)[0]] == ["d0"]


def test_near_dedup_matches_brute_force():
  import random
  rng = random.Random(0)
  vocab = [f"v{i}" for i in range(40)]
  texts = []
  for _ in range(60):
    if texts and rng.random() < 0.5:
      ws = rng.choice(texts).split()
      ws[rng.randrange(len(ws))] = rng.choice(vocab)  # one substitution
    else:
      ws = [rng.choice(vocab) for _ in range(rng.randint(20, 40))]
    texts.append(" ".join(ws))
  pieces, _ = chunk(texts, max_tokens=100)
  kept, expected = [], []
  for i, t in enumerate(texts):
    key = chunking.normalize(t)
    if any(chunking.normalize(texts[j]) == key for j in kept):
      continue
    if any(chunking.jaccard(chunking.shingles(t), chunking.shingles(texts[j]))
           >= 0.9 for j in kept):
      continue
    kept.append(i)
    expected.append(f"d{i}")
  assert [p.doc_id for p in pieces] == expected
  assert len(expected) < len(texts)  # the check did something


def test_empty_and_tiny_dropped_and_counted():
  pieces, stats = chunk(["", "  \n\n ", "Hi there.", "One two three four."],
                        max_tokens=10, min_tokens=3)
  assert texts_of(pieces) == ["One two three four."]
  assert stats["empty"] == 2 and stats["too_short"] == 1
  assert stats["documents"] == 4 and stats["pieces"] == 2 and stats["kept"] == 1


def test_no_pieces_is_an_error_naming_the_source():
  corpus = ClientCorpus(3, "tiny-client", [Document("a", "Hi."), Document("b", "")],
                        stats={"source": "/data/notes"})
  with pytest.raises(ValueError, match="'tiny-client from /data/notes' yields no "
                     r"pieces.*'too_short': 1"):
    chunking.chunk_documents(corpus, words, 10, 5)


def test_client_id_meta_and_replacement_chars():
  corpus = ClientCorpus(7, "c", [Document("doc", "Bad \ufffd byte here.\n\nFine text.",
                                          {"topic": "x"})])
  pieces, stats = chunking.chunk_documents(corpus, words, 4, 1)
  assert [p.client_id for p in pieces] == [7, 7]
  assert pieces[0].meta == {"topic": "x", "tokens": 4}
  assert stats["replacement_chars"] == 1 and stats["pieces_with_replacement"] == 1


def test_bad_limits():
  with pytest.raises(ValueError, match="min_tokens"):
    chunk(["a b"], max_tokens=2, min_tokens=3)


# ----------------------------------------------------------------------------
# Linear-time sentence splitting: same output as the quadratic original.


def _reference_is_sentence_end(text, start, end, m):
  """``_is_sentence_end`` as it was before the linear-time rewrite."""
  import re
  punct = m.group(0)
  if punct[0] in "\u3002\uff01\uff1f":
    return True
  nxt = chunking._WORD.search(text, m.end(), end)
  if nxt is None:
    return True
  first = nxt.group(0).lstrip("\"'\u201c\u2018([")[:1]
  if first and first.islower():
    return False
  if punct.rstrip("\"'\u201d\u2019)]") != ".":
    return True
  prev = re.search(r"(\S+)$", text[start:m.start()])  # O(paragraph) per call
  if prev is None:
    return True
  word = prev.group(1).lstrip("\"'\u201c\u2018([")
  if (word + ".").lower() in chunking.ABBREVIATIONS:
    return False
  if len(word) == 1 and word.isupper():
    return False
  if chunking._DOTTED.fullmatch(word) and "." in word:
    return False
  return True


# Tokens chosen to hit every branch: abbreviations, initials, dotted words,
# punctuation after a newline or an opening bracket, odd whitespace (NBSP,
# U+2028, ideographic space, CR), CJK stops, quotes.
_TRICKY = ("Dr.", "e.g.", "U.S.", "J.", "R.", "3.14", "the", "Heart", "pumps",
           "blood.", "(", "(.", "\".", "end.", "Yes!", "why?", "...", "\u2026",
           "\u3002", "\u201cQuote.\u201d", "x.y.", "A.", "etc.", "approx.",
           "\n", "\n.", ".", "\n\n", "\r\n", "\u00a0", "\u2028", "\u3000",
           "\t", "Mr.", "no.", "i.e.", "Z", "caf\u00e9.", "\ufffd")


def _generated_text(rng, n_tokens, single_line):
  toks = [rng.choice(_TRICKY) for _ in range(n_tokens)]
  if single_line:
    toks = [t for t in toks if "\n" not in t and "\u2028" not in t]
  return "".join(t + rng.choice((" ", " ", "", "  ")) for t in toks)


def _chunk_all(texts, max_tokens):
  docs = [Document(f"d{i}", t) for i, t in enumerate(texts)]
  pieces, stats = chunking.chunk_documents(docs, words, max_tokens, 1,
                                           near_duplicate_threshold=1.1)
  return [(p.piece_id, p.text, p.start, p.end) for p in pieces], stats


def test_word_before_matches_the_regex():
  import random
  import re
  rng = random.Random(1)
  text = _generated_text(rng, 400, single_line=False)
  for _ in range(3000):
    s = rng.randrange(len(text) + 1)
    e = rng.randrange(s, len(text) + 1)
    m = re.search(r"(\S+)$", text[s:e])
    assert chunking._word_before(text, s, e) == (m.group(1) if m else "")


@pytest.mark.parametrize("single_line", [False, True])
def test_sentence_split_identical_to_reference(monkeypatch, single_line):
  import random
  rng = random.Random(int(single_line))
  texts = [_generated_text(rng, rng.randint(1, 300), single_line)
           for _ in range(40)]
  sentences = [chunking.split_sentences(t) for t in texts]
  new = _chunk_all(texts, max_tokens=7)
  monkeypatch.setattr(chunking, "_is_sentence_end", _reference_is_sentence_end)
  assert [chunking.split_sentences(t) for t in texts] == sentences
  assert _chunk_all(texts, max_tokens=7) == new


def test_long_single_line_identical_to_reference(monkeypatch):
  """A long one-line document (the shape that used to take minutes at 5 MB),
  small enough for the quadratic reference."""
  import random
  rng = random.Random(5)
  vocab = ("The", "heart", "pumps", "blood", "Dr.", "e.g.", "U.S.", "J.",
           "3.14", "cells", "divide")
  sentences = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 30)))
               + rng.choice(".!?") for _ in range(500)]
  text = " ".join(sentences)
  assert len(text) > 15_000 and "\n" not in text
  new = _chunk_all([text], max_tokens=64)
  monkeypatch.setattr(chunking, "_is_sentence_end", _reference_is_sentence_end)
  assert _chunk_all([text], max_tokens=64) == new
  assert len(new[0]) > 30


def test_each_span_counted_once_and_piece_tokens_exact():
  import random
  rng = random.Random(3)
  texts = [_generated_text(rng, rng.randint(50, 300), single_line=False)
           for _ in range(10)]
  calls = []

  def counting(text):
    calls.append(text)
    return words(text)

  docs = [Document(f"d{i}", t) for i, t in enumerate(texts)]
  pieces, _ = chunking.chunk_documents(docs, counting, 7, 1,
                                       near_duplicate_threshold=1.1)
  assert pieces and all(p.meta["tokens"] == words(p.text) for p in pieces)
  # Per document, no span is counted twice (the pieces are not recounted).
  per_doc = []
  for t in texts:
    calls.clear()
    chunking.split_spans(t, counting, 7)
    per_doc.append(len(calls))
  calls.clear()
  chunking.chunk_documents(docs, counting, 7, 1, near_duplicate_threshold=1.1)
  assert len(calls) == sum(per_doc)
