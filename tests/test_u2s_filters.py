"""U2S filters: each on hand-made cases, with its exact reason and score."""

import numpy as np
import pytest

from fedjax_u2s.u2s import filters
from fedjax_u2s.u2s import parse


@pytest.fixture
def cfg():
  return filters.default_filter_config()


def ok(instruction, response):
  return parse.ParseResult(instruction, response, parse.OK)


class TableEmbedder:
  """Looks texts up in a table of (unnormalised) vectors, L2-normalises them."""

  def __init__(self, table):
    self.table = table
    self.calls = []

  def embed(self, texts):
    self.calls.append(list(texts))
    v = np.asarray([self.table[t] for t in texts], np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_config_is_locked_and_commented_defaults(cfg):
  assert cfg.min_grounding == 0.3 and cfg.max_duplicate_jaccard == 0.8
  with pytest.raises(AttributeError):
    cfg.min_grounding_typo = 0.1


def test_text_helpers():
  assert filters.normalize("  What IS   tea?!  ") == "what is tea"
  assert filters.jaccard("abc", "bcd") == 2 / 4
  assert filters.shingles("a b c d", 3) == {("a", "b", "c"), ("b", "c", "d")}
  assert filters.shingles("a b", 3) == {("a", "b")}
  # 6 bigrams: (a b) (b a) (a b) (b a) (a b) (b c); 3 repeat earlier ones.
  assert filters.repeated_ngram_fraction("a b a b a b c", 2) == 3 / 6
  assert filters.repeated_ngram_fraction("one two", 3) == 0.0


@pytest.mark.parametrize("instruction, response, reason", [
    ("What is tea?", "A hot drink.", None),
    ("What is?", "A hot drink.", "instruction_too_short"),       # 8 chars < 10.
    ("What is it now", "A hot drink.", None),
    ("Tell me more", "A hot drink.", None),
    ("Tell meeeeeeeee", "A hot drink.", "instruction_too_short"),  # 2 words < 3.
    ("What is tea?", "Hot drink", "response_too_short"),          # 9 chars < 10.
    ("What is tea?", "Hotdrinks!!", "response_too_short"),        # 1 word < 2.
    ("What is tea? " * 50, "A hot drink.", "instruction_too_long"),  # 650 chars.
    ("What is tea?", "word " * 601, "response_too_long"),         # 601 words.
])
def test_length(cfg, instruction, response, reason):
  assert filters.check_length(instruction, response, cfg) == reason


def test_length_zero_max_means_unbounded(cfg):
  cfg.max_response_words = 0
  cfg.max_response_chars = 0
  assert filters.check_length("What is tea?", "word " * 5000, cfg) is None


def test_repetition(cfg):
  reason, score = filters.check_repetition(
      "What is tea?", "tea is hot tea is hot tea is hot tea is hot", cfg)
  # 10 trigrams, 3 distinct -> 7/10 repeated.
  assert (reason, score) == ("repetitive", 0.7)
  reason, score = filters.check_repetition(
      "What is tea?", "Tea is a hot drink made from leaves.", cfg)
  assert (reason, score) == (None, 0.0)


def test_demo_copy_exact_and_near(cfg):
  demos = ["What do bees make?", "Name three kinds of tea."]
  assert filters.check_demo_copy("what do BEES make", demos, cfg) == (
      "copied_demonstration", 1.0)
  # {name, three, kinds, of, tea} vs {name, three, kinds, of, coffee}: 4/6.
  assert filters.check_demo_copy("Name three kinds of coffee.", demos, cfg) == (
      None, 4 / 6)
  # {name, three, kinds, of, tea, please} vs demo 2: 5/6 > 0.7.
  assert filters.check_demo_copy("Name three kinds of tea, please.", demos, cfg) == (
      "copied_demonstration", 5 / 6)
  assert filters.check_demo_copy("Why is the sky blue?", [], cfg) == (None, 0.0)


def test_grounding_threshold(cfg):
  assert filters.check_grounding(0.3, cfg) is None
  assert filters.check_grounding(0.2999, cfg) == "ungrounded"


def test_duplicate_tracker(cfg):
  t = filters.DuplicateTracker(cfg, [("What is tea?", "Tea is a hot drink.")])
  assert len(t) == 1
  assert t.check("what is TEA", "Tea is a hot drink!") == ("duplicate", 1.0)
  # Shingles of "what is tea tea is a hot drink" vs "... hot drink today":
  # 6 shared trigrams of 7 in the union.
  assert t.check("What is tea?", "Tea is a hot drink today.") == ("duplicate", 6 / 7)
  reason, score = t.check("Why do cats purr?", "Cats purr when content.")
  assert reason is None and score == 0.0


def test_apply_filters_order_scores_and_batch_dedup(cfg):
  table = {"Tea is a hot drink.": [1, 0, 0], "Bees buzz around.": [0, 1, 0],
           "Tea grows on bushes.": [1, 0.1, 0]}
  emb = TableEmbedder(table)
  pieces = np.asarray([[1, 0, 0]] * 5, np.float32)
  parsed = [
      parse.ParseResult("", "", parse.NO_RESPONSE_MARKER),
      ok("What is tea?", "Tea is a hot drink."),
      ok("What is tea?", "Tea is a hot drink."),              # Duplicate of row 1.
      ok("What do bees do?", "Bees buzz around."),            # Ungrounded.
      ok("What do bees make?", "Tea grows on bushes."),       # Copies its demo.
  ]
  demos = [[], [], [], [], ["What do bees make?"]]
  tracker = filters.DuplicateTracker(cfg)
  out = filters.apply_filters(parsed, pieces, demos, tracker, emb, cfg)
  assert [r.reason for r in out] == ["no_response_marker", "kept", "duplicate",
                                     "ungrounded", "copied_demonstration"]
  assert [r.kept for r in out] == [False, True, False, False, False]
  assert out[0].scores == {}
  assert out[1].scores == {"repetition": 0.0, "demo_jaccard": 0.0,
                           "grounding": pytest.approx(1.0),
                           "duplicate_jaccard": 0.0}
  assert out[2].scores["duplicate_jaccard"] == 1.0
  assert out[3].scores["grounding"] == 0.0 and "duplicate_jaccard" not in out[3].scores
  assert out[4].scores == {"repetition": 0.0, "demo_jaccard": 1.0}
  # One embedder call, only for pairs that reached the grounding filter.
  assert emb.calls == [["Tea is a hot drink.", "Tea is a hot drink.",
                        "Bees buzz around."]]
  assert len(tracker) == 1


def test_apply_filters_checks_lengths(cfg):
  with pytest.raises(ValueError, match="2 parsed pairs"):
    filters.apply_filters([ok("a", "b")] * 2, np.zeros((1, 3)), [[], []],
                          filters.DuplicateTracker(cfg), TableEmbedder({}), cfg)


# ----------------------------------------------------------------------------
# Lexical grounding: hand-written pieces whose answers are known.

ANTS = ("Ants are eusocial insects of the family Formicidae. More than 13,800 of "
        "an estimated total of 22,000 species have been described. Six species "
        "live in Iceland.")


def test_stem_meets_inflections():
  assert {filters.stem(w) for w in ("evolve", "evolved", "evolves", "evolving")} == {
      "evolv"}
  assert filters.stem("species") == filters.stem("species") == "specy"
  assert filters.stem("classes") == filters.stem("class") == "class"
  assert filters.stem("Curie's") == "curi"


def test_numbers_are_canonical_and_list_markers_skipped():
  assert filters.numbers("22,000 ants, 1.50 g, 007 and 1990s") == [
      "22000", "1.5", "7", "1990"]
  assert filters.numbers("1. Ants\n2) Bees\n  3. Wasps: 4 kinds") == ["4"]
  # "1,2,3" is a list of three numbers, not one thousands-grouped number.
  assert filters.numbers("1,2,3") == ["1", "2", "3"]


def test_named_spans_skip_sentence_starts_and_stopwords():
  text = ('Ants were studied by Carl Linnaeus in Sweden. The Royal Society, '
          'London (UK) agreed.\n- Bees "Apis" too.')
  # "Ants", "The", "Bees": capitalised by grammar; "The" also a stopword.
  assert filters.named_spans(text) == ["Carl Linnaeus", "Sweden", "Royal Society",
                                       "London", "UK", "Apis"]


def test_possessives_and_demonyms_meet_their_names():
  assert filters.named_spans("It is Sicily's capital.") == ["Sicily"]
  source = "Sicily is an island of Italy, south of India and Europe."
  assert filters.unsupported_facts(
      "What is Sicily's capital?",
      "An Italian island; Indian and European visitors come to Sicily's coast.",
      source) == []
  # "Ind" is too short a prefix to stand for a name.
  assert filters.unsupported_facts("Where?", "It lies near Indus.", "Ind is big.") == [
      "Indus"]


def test_an_invented_number_is_rejected():
  facts = filters.unsupported_facts(
      "How heavy is the largest ant?", "The largest ant weighs 1.2 grams.", ANTS)
  assert facts == ["1.2"]
  reason, _, listed = filters.check_lexical_grounding(
      "How heavy is the largest ant?", "The largest ant weighs 1.2 grams.", ANTS,
      filters.default_filter_config())
  assert (reason, listed) == ("ungrounded", ["1.2"])


def test_invented_names_and_instruction_facts_are_rejected():
  assert filters.unsupported_facts(
      "Who described ants?", "Ants were described by Carl Linnaeus.", ANTS) == [
          "Carl Linnaeus"]
  # An instruction that asserts a number the piece lacks; small task counts
  # ("List 3") are not facts.
  assert filters.unsupported_facts(
      "Why did 40,000 species of Formicidae die out?", "They did not.", ANTS) == [
          "40000"]
  assert filters.unsupported_facts(
      "List 3 facts about the 22,000 species.", "Ants are insects.", ANTS) == []


def test_a_paraphrase_with_the_sources_facts_is_kept():
  instruction = "How many ant species are there?"
  response = ("Formicidae, the ant family, has an estimated 22000 tiny species; "
              "more than 13,800 were described, and 6 live in Iceland.")
  assert filters.unsupported_facts(instruction, response, ANTS) == []
  # Content words (stopwords, numbers out; stemmed): formicidae, ant, family,
  # estimated, tiny, species, described, live, iceland = 9; all but "tiny" are
  # in the piece: 8 / 9.
  assert filters.content_words(response) == {
      "formicida", "ant", "fami", "estimat", "tiny", "specy", "describ", "liv",
      "iceland"}
  assert filters.support_ratio(response, ANTS) == 8 / 9
  reason, support, facts = filters.check_lexical_grounding(
      instruction, response, ANTS, filters.default_filter_config())
  assert (reason, support, facts) == (None, 8 / 9, [])


def test_support_ratio_by_hand_and_its_threshold(cfg):
  # bees, make, sweet, honey, daily -> 3 of 5 (bee, make, honey) in the piece.
  assert filters.support_ratio("Bees make sweet honey daily.", "Bees make honey.") == 3 / 5
  assert filters.support_ratio("It is what it is.", "Bees make honey.") == 1.0
  cfg.min_support = 0.7
  assert filters.check_lexical_grounding(
      "What do bees make?", "Bees make sweet honey daily.", "Bees make honey.",
      cfg) == ("ungrounded", 0.6, [])
  cfg.min_support = 0.0
  cfg.max_unsupported_facts = 0
  assert filters.check_lexical_grounding(
      "What do bees make?", "Bees make 3 kinds of honey.", "Bees make honey.",
      cfg)[0] == "ungrounded"
  cfg.max_unsupported_facts = -1  # Off: the facts are still listed.
  assert filters.check_lexical_grounding(
      "What do bees make?", "Bees make 3 kinds of honey.", "Bees make honey.",
      cfg) == (None, 1.0, ["3"])


def test_apply_filters_runs_the_lexical_checks_with_piece_texts(cfg):
  table = {"The largest ant weighs 1.2 grams.": [1, 0, 0],
           "An estimated 22,000 ant species exist.": [1, 0, 0]}
  emb = TableEmbedder(table)
  pieces = np.asarray([[1, 0, 0]] * 2, np.float32)
  parsed = [ok("How heavy is the largest ant?", "The largest ant weighs 1.2 grams."),
            ok("How many ant species exist?", "An estimated 22,000 ant species exist.")]
  out = filters.apply_filters(parsed, pieces, [[], []], filters.DuplicateTracker(cfg),
                              emb, cfg, piece_texts=[ANTS, ANTS])
  # The embedding check passes both (cosine 1): only the lexical one sees 1.2.
  assert [r.reason for r in out] == ["ungrounded", "kept"]
  assert out[0].unsupported == ("1.2",) and out[0].scores["unsupported_facts"] == 1.0
  # largest, ant, weigh, gram: only "ant" is in the piece.
  assert out[0].scores["support"] == 1 / 4
  # estimated, ant, species, exist: "exist" is not in the piece.
  assert out[1].scores["support"] == 3 / 4 and out[1].unsupported == ()
  with pytest.raises(ValueError, match="1 piece texts"):
    filters.apply_filters(parsed, pieces, [[], []], filters.DuplicateTracker(cfg),
                          emb, cfg, piece_texts=[ANTS])
