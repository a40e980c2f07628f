"""U2S prompts: golden renderings, demonstration order, token budget."""

import dataclasses

import pytest

from fedjax_u2s.u2s import prompts


@dataclasses.dataclass(frozen=True)
class Demo:
  id: str
  text: str
  instruction: str
  response: str


# Most similar first, as a selector returns them.
DEMOS = [Demo("d1", "Bees make honey.", "What do bees make?", "Honey."),
         Demo("d2", "Tea is a drink.", "What is tea?", "A drink.")]
PIECE = "Cats sleep a lot."


class FakeChatTokenizer:
  """One token per character; a template that shows roles plainly."""
  bos_id = None

  def apply_chat_template(self, messages, add_generation_prompt=True):
    out = "".join(f"[{m['role']}]{m['content']}[end]" for m in messages)
    return out + ("[assistant]" if add_generation_prompt else "")

  def encode(self, text):
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
  from fedjax_u2s.tokenizer import Tokenizer
  return Tokenizer.from_gguf(smollm2_path)


def test_golden_multiturn_smollm2(smollm2_tokenizer):
  p = prompts.build_prompt(smollm2_tokenizer, PIECE, DEMOS, style="multiturn")
  assert p.text == (
      "<|im_start|>system\n" + prompts.SYSTEM_PROMPT + "<|im_end|>\n"
      "<|im_start|>user\nPassage:\nTea is a drink.<|im_end|>\n"
      "<|im_start|>assistant\nInstruction: What is tea?\nResponse: A drink.<|im_end|>\n"
      "<|im_start|>user\nPassage:\nBees make honey.<|im_end|>\n"
      "<|im_start|>assistant\nInstruction: What do bees make?\nResponse: Honey.<|im_end|>\n"
      "<|im_start|>user\nPassage:\nCats sleep a lot.<|im_end|>\n"
      "<|im_start|>assistant\nInstruction:")
  assert prompts.SYSTEM_PROMPT.endswith(
      "write nothing else:\nInstruction: <the instruction>\nResponse: <the response>")
  assert p.prefix == "Instruction:"
  assert p.demo_ids == ("d1", "d2") and p.num_dropped == 0 and p.fits
  assert p.token_ids == smollm2_tokenizer.encode(p.text)
  # The chat markers are single special tokens, not spelled out.
  im_start = smollm2_tokenizer.hf.token_to_id("<|im_start|>")
  assert p.token_ids[0] == im_start and p.token_ids.count(im_start) == 7


def test_golden_single_smollm2(smollm2_tokenizer):
  p = prompts.build_prompt(smollm2_tokenizer, PIECE, DEMOS, style="single",
                           prefill=False)
  assert p.text == (
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
      "Hugging Face<|im_end|>\n<|im_start|>user\n" + prompts.SYSTEM_PROMPT +
      "\n\nExamples:\n\n"
      "Passage:\nTea is a drink.\nInstruction: What is tea?\nResponse: A drink.\n\n"
      "Passage:\nBees make honey.\nInstruction: What do bees make?\nResponse: Honey.\n\n"
      "Now do the same for this passage.\nPassage:\nCats sleep a lot.<|im_end|>\n"
      "<|im_start|>assistant\n")
  assert p.prefix == ""


def test_messages_put_most_similar_last():
  msgs = prompts.build_messages(PIECE, DEMOS, "multiturn")
  assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user",
                                       "assistant", "user"]
  assert msgs[3]["content"] == "Passage:\nBees make honey."
  assert msgs[4]["content"] == "Instruction: What do bees make?\nResponse: Honey."
  assert msgs[5]["content"] == "Passage:\nCats sleep a lot."


def test_budget_drops_least_similar_first():
  tok = FakeChatTokenizer()
  full = prompts.build_prompt(tok, PIECE, DEMOS)
  one = prompts.build_prompt(tok, PIECE, DEMOS[:1])
  none = prompts.build_prompt(tok, PIECE, [])
  assert len(none.token_ids) < len(one.token_ids) < len(full.token_ids)
  # Exactly at each size: the budget is inclusive.
  p = prompts.build_prompt(tok, PIECE, DEMOS, max_prompt_tokens=len(full.token_ids))
  assert (p.demo_ids, p.num_dropped) == (("d1", "d2"), 0)
  p = prompts.build_prompt(tok, PIECE, DEMOS, max_prompt_tokens=len(full.token_ids) - 1)
  assert (p.demo_ids, p.num_dropped, p.fits) == (("d1",), 1, True)
  assert p.text == one.text
  p = prompts.build_prompt(tok, PIECE, DEMOS, max_prompt_tokens=len(none.token_ids))
  assert (p.demo_ids, p.num_dropped, p.fits) == ((), 2, True)
  p = prompts.build_prompt(tok, PIECE, DEMOS, max_prompt_tokens=len(none.token_ids) - 1)
  assert (p.demo_ids, p.num_dropped, p.fits) == ((), 2, False)


def test_fake_template_rendering_exact():
  p = prompts.build_prompt(FakeChatTokenizer(), "X.", DEMOS[:1], style="multiturn")
  assert p.text == (f"[system]{prompts.SYSTEM_PROMPT}[end][user]Passage:\nBees make "
                    "honey.[end][assistant]Instruction: What do bees make?\nResponse: "
                    "Honey.[end][user]Passage:\nX.[end][assistant]Instruction:")


def test_double_bos_is_removed():

  class BosTok(FakeChatTokenizer):
    bos_id = 1

    def apply_chat_template(self, messages, add_generation_prompt=True):
      return "^" + super().apply_chat_template(messages, add_generation_prompt)

    def encode(self, text):  # Adds BOS, and the template wrote one too.
      return [1] + [1 if c == "^" else ord(c) for c in text]

  p = prompts.build_prompt(BosTok(), PIECE, [])
  assert p.token_ids[:2] == [1, ord("[")]


def test_unknown_style_raises():
  with pytest.raises(ValueError, match="prompt_style"):
    prompts.build_messages(PIECE, DEMOS, "chat")
