"""Parsing a generation into an (instruction, response) pair.

Accepted layout: an instruction marker, the instruction, a response marker, the
response. Markers are matched at the start of a line (the response marker may
also follow the instruction on the same line), case-insensitively, with
optional markdown around them: ``Instruction:``, ``**Instruction:**``,
``**Instruction**:``, ``### Instruction:``, ``- Instruction:``.

Aliases: ``Question:`` counts as an instruction marker and ``Answer:`` as a
response marker (small models drift to Q/A wording, and the pair means the
same); ``Question:`` is only looked for when no ``Instruction:`` is present,
and ``Answer:`` only when no response marker proper follows the instruction.

Text before the first instruction marker ("Sure! Here it is:") is ignored, and
so is a marker repeated right after it (the model restating a prefilled
``Instruction:``). The response ends at the first line that starts a new
instruction, response or passage (a stop string the sampler missed), at a chat
end-of-turn marker left in the text, or at the end. Surrounding whitespace and
quotes are stripped.
"""

from __future__ import annotations

import dataclasses
import re

OK = "ok"
EMPTY_GENERATION = "empty_generation"
NO_INSTRUCTION_MARKER = "no_instruction_marker"
NO_RESPONSE_MARKER = "no_response_marker"
EMPTY_INSTRUCTION = "empty_instruction"
EMPTY_RESPONSE = "empty_response"
REASONS = (EMPTY_GENERATION, NO_INSTRUCTION_MARKER, NO_RESPONSE_MARKER,
           EMPTY_INSTRUCTION, EMPTY_RESPONSE)

# Markdown decoration that may surround a marker word.
_DECOR = r"[ \t]*(?:[#>*_\-][ \t]*)*"
_TAIL = r"[ \t]*[*_]*[ \t]*:[ \t]*[*_]*[ \t]*"


def _marker(words: str, line_start: bool = True) -> re.Pattern:
  start = r"(?:^|\n)" if line_start else r""
  return re.compile(start + _DECOR + r"\b(?:" + words + r")\b" + _TAIL,
                    re.IGNORECASE)


_INSTRUCTION = _marker("instruction")
_QUESTION = _marker("question")
_RESPONSE = _marker("response")
_ANSWER = _marker("answer")
_INSTRUCTION_AGAIN = re.compile(r"\s*" + _DECOR + r"\b(?:instruction|question)\b"
                                + _TAIL, re.IGNORECASE)
_RESPONSE_INLINE = _marker("response", line_start=False)
_ANSWER_INLINE = _marker("answer", line_start=False)
# Where a response ends: a line opening another section.
_END = re.compile(r"\n" + _DECOR + r"(?:instruction|question|response|answer|passage)\b"
                  + _TAIL + r"|<\|im_end\|>|<\|im_start\|>|<\|eot_id\|>|<end_of_turn>",
                  re.IGNORECASE)
_QUOTES = "\"'`\u201c\u201d"


@dataclasses.dataclass(frozen=True)
class ParseResult:
  """A parsed generation.

  Attributes:
    instruction: the instruction ("" when unparseable).
    response: the response ("" when unparseable).
    reason: :data:`OK` or one of :data:`REASONS`.
  """
  instruction: str
  response: str
  reason: str

  @property
  def ok(self) -> bool:
    return self.reason == OK


def _clean(s: str) -> str:
  s = s.strip()
  s = re.sub(r"^[*_]+|[*_]+$", "", s).strip()  # Leftover bold around content.
  if len(s) >= 2 and s[0] in _QUOTES and s[-1] in _QUOTES:
    s = s[1:-1].strip()
  return s


def _fail(reason: str) -> ParseResult:
  return ParseResult("", "", reason)


def parse_pair(text: str) -> ParseResult:
  """Parses one generation (prefilled prefix put back in front).

  Args:
    text: the generated text.

  Returns:
    A :class:`ParseResult`; ``reason`` says why when it is not ``"ok"``.
  """
  if not text or not text.strip():
    return _fail(EMPTY_GENERATION)
  text = text.replace("\r\n", "\n")
  m = _INSTRUCTION.search(text) or _QUESTION.search(text)
  if m is None:
    return _fail(NO_INSTRUCTION_MARKER)
  rest = text[m.end():]
  again = _INSTRUCTION_AGAIN.match(rest)  # "Instruction: Instruction: ..." (the
  if again is not None:                   # model repeating a prefilled marker).
    rest = rest[again.end():]
  r = None
  for pattern in (_RESPONSE, _RESPONSE_INLINE, _ANSWER, _ANSWER_INLINE):
    r = pattern.search(rest)
    if r is not None:
      break
  if r is None:
    return _fail(NO_RESPONSE_MARKER)
  instruction = _clean(rest[:r.start()])
  body = rest[r.end():]
  end = _END.search(body)
  response = _clean(body[:end.start()] if end else body)
  if not instruction:
    return _fail(EMPTY_INSTRUCTION)
  if not response:
    return _fail(EMPTY_RESPONSE)
  return ParseResult(instruction, response, OK)
