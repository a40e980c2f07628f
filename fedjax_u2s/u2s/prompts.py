"""Few-shot U2S prompts rendered through the model's chat template.

A prompt asks the model to write ONE instruction a user could ask about a
passage, and its response, answerable from the passage alone. The k
demonstrations (text, instruction, response) come first, then the new passage.
Two layouts (``style``):

* ``"multiturn"``: each demonstration is a user turn (``Passage:`` + text) and
  an assistant turn (``Instruction: ...`` / ``Response: ...``); the task
  description is the system message. Small chat models follow a format best
  when they have seen themselves answer in it, so this is the default.
* ``"single"``: the task description, the demonstrations and the new passage
  all in one user message; the assistant answers once.

Demonstrations are given most similar first (the order a selector returns);
they are rendered in reverse, so the most similar one sits right before the
new passage. When the prompt exceeds its token budget, demonstrations are
dropped from the least similar end, one at a time, and the drops counted.

With ``prefill=True`` the assistant turn is opened with ``"Instruction:"``
after the generation prompt, so the first tokens are forced into the format;
:attr:`Prompt.prefix` must then be put back in front of the generated text
before parsing (:func:`fedjax_u2s.u2s.generate.generate_client` does). A
second ``Instruction:`` or a new ``Passage:`` then means the answer is over,
hence :data:`STOP_STRINGS`; the chat template's end-of-turn token stops
generation as EOS.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

STYLES = ("multiturn", "single")

SYSTEM_PROMPT = (
    "You turn passages of text into training data for an assistant. Read the "
    "passage and write ONE instruction that a user could ask about it, and the "
    "response a helpful assistant would give. The instruction must be "
    "answerable from the passage alone; the response must answer it "
    "correctly, using only facts from the passage. Do not mention \"the "
    "passage\" or \"the text\" in the instruction. Answer in exactly this "
    "format and write nothing else:\n"
    "Instruction: <the instruction>\n"
    "Response: <the response>")

INSTRUCTION_MARKER = "Instruction:"
RESPONSE_MARKER = "Response:"
PASSAGE_MARKER = "Passage:"

# Generation ends at a second instruction (the first one is prefilled or at the
# very start, without a newline before it), a new passage, or a markdown
# variant of either; the end-of-turn token is EOS.
STOP_STRINGS = ("\nInstruction:", "\nPassage:", "\n**Instruction", "\n**Passage")


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A rendered prompt.

  Attributes:
    text: the full prompt string (chat template applied, prefix included).
    token_ids: ``text`` encoded.
    prefix: text the prompt already wrote of the assistant's answer
      (``"Instruction:"`` when prefilled, else ``""``).
    demo_ids: ids of the demonstrations kept, most similar first.
    num_dropped: demonstrations dropped to fit ``max_prompt_tokens``.
    fits: False when even zero demonstrations exceed the budget.
  """
  text: str
  token_ids: list[int]
  prefix: str
  demo_ids: tuple[str, ...]
  num_dropped: int
  fits: bool


def passage_text(text: str) -> str:
  """A passage as a user would paste it."""
  return f"{PASSAGE_MARKER}\n{text.strip()}"


def pair_text(instruction: str, response: str) -> str:
  """An instruction-response pair in the output format."""
  return f"{INSTRUCTION_MARKER} {instruction.strip()}\n{RESPONSE_MARKER} {response.strip()}"


def build_messages(piece_text: str, demos: Sequence[Any],
                   style: str = "multiturn") -> list[dict[str, str]]:
  """Chat messages for one piece.

  Args:
    piece_text: the new passage.
    demos: demonstrations (``.text``, ``.instruction``, ``.response``), most
      similar first.
    style: ``"multiturn"`` or ``"single"``.

  Returns:
    ``[{"role": ..., "content": ...}, ...]`` ending with a user turn.
  """
  if style not in STYLES:
    raise ValueError(f"prompt style {style!r} is not one of {STYLES} "
                     "(config field prompt_style).")
  ordered = list(demos)[::-1]  # Most similar last, next to the new passage.
  if style == "multiturn":
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for d in ordered:
      messages.append({"role": "user", "content": passage_text(d.text)})
      messages.append({"role": "assistant",
                       "content": pair_text(d.instruction, d.response)})
    messages.append({"role": "user", "content": passage_text(piece_text)})
    return messages
  parts = [SYSTEM_PROMPT]
  if ordered:
    parts.append("Examples:")
  for d in ordered:
    parts.append(passage_text(d.text) + "\n" + pair_text(d.instruction, d.response))
  parts.append("Now do the same for this passage.\n" + passage_text(piece_text))
  return [{"role": "user", "content": "\n\n".join(parts)}]


def render(tokenizer, piece_text: str, demos: Sequence[Any], *,
           style: str = "multiturn", prefill: bool = True) -> tuple[str, str]:
  """The prompt string and the prefilled prefix of the answer."""
  messages = build_messages(piece_text, demos, style)
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  prefix = INSTRUCTION_MARKER if prefill else ""
  return text + prefix, prefix


def encode_prompt(tokenizer, text: str) -> list[int]:
  """Encodes a rendered prompt without doubling a BOS the template wrote."""
  ids = list(tokenizer.encode(text))
  bos = getattr(tokenizer, "bos_id", None)
  if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
    ids = ids[1:]
  return ids


def build_prompt(tokenizer, piece_text: str, demos: Sequence[Any], *,
                 style: str = "multiturn", prefill: bool = True,
                 max_prompt_tokens: int = 0) -> Prompt:
  """Renders and encodes a prompt, dropping demonstrations to fit a budget.

  Args:
    tokenizer: has ``apply_chat_template(messages, add_generation_prompt=True)``
      and ``encode(text)``.
    piece_text: the new passage.
    demos: demonstrations with ``.id``, most similar first.
    style: ``"multiturn"`` or ``"single"``.
    prefill: open the answer with ``"Instruction:"``.
    max_prompt_tokens: token budget of the prompt; 0 means no budget.

  Returns:
    The :class:`Prompt`; with ``fits=False`` (zero demonstrations and still
    too long) the caller should skip the piece.
  """
  demos = list(demos)
  for keep in range(len(demos), -1, -1):
    text, prefix = render(tokenizer, piece_text, demos[:keep], style=style,
                          prefill=prefill)
    ids = encode_prompt(tokenizer, text)
    if not max_prompt_tokens or len(ids) <= max_prompt_tokens:
      return Prompt(text=text, token_ids=ids, prefix=prefix,
                    demo_ids=tuple(str(d.id) for d in demos[:keep]),
                    num_dropped=len(demos) - keep, fits=True)
  return Prompt(text=text, token_ids=ids, prefix=prefix, demo_ids=(),
                num_dropped=len(demos), fits=False)
