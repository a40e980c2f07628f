"""Parsing generations into (instruction, response) with reason codes."""

import pytest

from fedjax_u2s.u2s import parse


@pytest.mark.parametrize("text, instruction, response", [
    # The prefilled marker put back in front, as generate_client does.
    ("Instruction: What do bees make?\nResponse: Honey.", "What do bees make?",
     "Honey."),
    ("  \n Instruction:  What do bees make? \n\nResponse:\n Honey. \n",
     "What do bees make?", "Honey."),
    ("**Instruction:** What do bees make?\n**Response:** Honey.",
     "What do bees make?", "Honey."),
    ("**Instruction**: What do bees make?\n**Response**: Honey.",
     "What do bees make?", "Honey."),
    ("### INSTRUCTION: What do bees make?\n### response: Honey.",
     "What do bees make?", "Honey."),
    ("Sure! Here it is.\nInstruction: What do bees make?\nResponse: Honey.",
     "What do bees make?", "Honey."),
    # The model restating the prefilled marker.
    ("Instruction: Instruction: What do bees make?\nResponse: Honey.",
     "What do bees make?", "Honey."),
    ("Instruction:\n**Instruction:** What do bees make?\nResponse: Honey.",
     "What do bees make?", "Honey."),
    # Aliases.
    ("Question: What do bees make?\nAnswer: Honey.", "What do bees make?", "Honey."),
    ("Instruction: What do bees make?\nAnswer: Honey.", "What do bees make?",
     "Honey."),
    # Response marker on the same line as the instruction.
    ("Instruction: What do bees make? Response: Honey.", "What do bees make?",
     "Honey."),
    # Multi-paragraph responses are kept whole.
    ("Instruction: List two facts.\nResponse: Bees fly.\n\nBees make honey.",
     "List two facts.", "Bees fly.\n\nBees make honey."),
    # Trailing junk: a second pair, a new passage, an end-of-turn marker.
    ("Instruction: A?\nResponse: B.\nInstruction: C?\nResponse: D.", "A?", "B."),
    ("Instruction: A?\nResponse: B.\n\nPassage:\nMore text.", "A?", "B."),
    ("Instruction: A?\nResponse: B.<|im_end|>\n<|im_start|>user", "A?", "B."),
    # Quotes around the content.
    ('Instruction: "What is tea?"\nResponse: "A drink."', "What is tea?", "A drink."),
    # The word inside the text is not a marker.
    ("Instruction: Describe the immune response: how does it work?\n"
     "Response: It fights germs.",
     "Describe the immune response: how does it work?", "It fights germs."),
])
def test_parses(text, instruction, response):
  r = parse.parse_pair(text)
  assert r == parse.ParseResult(instruction, response, parse.OK)
  assert r.ok


@pytest.mark.parametrize("text, reason", [
    ("", parse.EMPTY_GENERATION),
    ("   \n ", parse.EMPTY_GENERATION),
    ("Bees make honey, and that is all.", parse.NO_INSTRUCTION_MARKER),
    ("Instruction: What do bees make?", parse.NO_RESPONSE_MARKER),
    ("Instruction: What do bees make? Bees make honey.", parse.NO_RESPONSE_MARKER),
    ("Instruction:\nResponse: Honey.", parse.EMPTY_INSTRUCTION),
    ("Instruction: **  **\nResponse: Honey.", parse.EMPTY_INSTRUCTION),
    ("Instruction: What do bees make?\nResponse:   ", parse.EMPTY_RESPONSE),
    ("Instruction: What?\nResponse:\nInstruction: Again?", parse.EMPTY_RESPONSE),
])
def test_reason_codes(text, reason):
  r = parse.parse_pair(text)
  assert r == parse.ParseResult("", "", reason)
  assert not r.ok
  assert reason in parse.REASONS


def test_fake_sampler_outputs_with_prefix():
  prefix = "Instruction:"
  outputs = [" Why do cats purr?\nResponse: They are content.",
             " Why do cats purr?",
             "\n"]
  got = [parse.parse_pair(prefix + o).reason for o in outputs]
  assert got == [parse.OK, parse.NO_RESPONSE_MARKER, parse.NO_RESPONSE_MARKER]


def test_long_decoration_line_is_fast():
  # Nested quantifiers would make this exponential.
  r = parse.parse_pair("*" * 5000 + "\n" + "-" * 5000)
  assert r.reason == parse.NO_INSTRUCTION_MARKER
