"""Instruction readers, chat-template tokenization and the built-in wiki set."""

import os

import numpy as np
import pytest

from fedjax_u2s import testing
from fedjax_u2s.data import builtin
from fedjax_u2s.data import instructions as I
from fedjax_u2s.data import wiki
from fedjax_u2s.tokenizer import Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "testdata", "instructions")


def _f(name):
  return os.path.join(DATA, name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf_cache"))


def _user_assistant(user, assistant):
  return ({"role": "user", "content": user},
          {"role": "assistant", "content": assistant})


# ----------------------------------------------------------------------------
# Readers.

ALPACA = [_user_assistant("Name a primary color.", "Red."),
          _user_assistant("Translate to French.\n\ncat", "chat")]
DOLLY = [_user_assistant("What is 2+2?", "4"),
         _user_assistant("Who wrote it?\n\nHamlet is a play by Shakespeare.",
                         "Shakespeare.")]
CHAT = [({"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}),
        ({"role": "user", "content": "2+3?"},
         {"role": "assistant", "content": "5"},
         {"role": "user", "content": "times 2?"},
         {"role": "assistant", "content": "10"})]


@pytest.mark.parametrize("name", ["alpaca.json", "alpaca.jsonl",
                                  "alpaca.parquet"])
def test_alpaca_files_auto(name, cache):
  data = I.read_instructions(_f(name), cache_dir=cache)
  assert data.formats == ("alpaca",)
  assert [e.messages for e in data] == ALPACA
  assert [e.meta for e in data] == [{"source": _f(name), "row": 0},
                                    {"source": _f(name), "row": 1}]
  assert (data.num_rows, data.num_skipped, len(data)) == (3, 1, 2)


@pytest.mark.parametrize("name", ["dolly.jsonl", "dolly.csv"])
def test_dolly_files_auto(name, cache):
  data = I.read_instructions(_f(name), cache_dir=cache)
  assert data.formats == ("dolly",)
  assert [e.messages for e in data] == DOLLY
  assert [e.meta["category"] for e in data] == ["open_qa", "closed_qa"]
  assert [e.meta["row"] for e in data] == [0, 1]
  assert (data.num_rows, data.num_skipped) == (3, 1)  # whitespace response


@pytest.mark.parametrize("name", ["chat.jsonl", "chat.parquet"])
def test_chat_files_auto(name, cache):
  data = I.read_instructions(_f(name), meta_fields=("user_id",), cache_dir=cache)
  assert data.formats == ("chat",)
  assert [e.messages for e in data] == CHAT
  assert [e.response for e in data] == ["Hello!", "10"]
  assert [(e.meta["category"], e.meta["user_id"]) for e in data] == [
      ("greeting", "u1"), ("math", "u2")]


def test_field_mapping_and_several_files(cache):
  # The second file lacks the mapped columns.
  with pytest.raises(ValueError, match=r"alpaca.jsonl: field 'prompt' \(the "
                     r"alpaca format's 'instruction'\) is not a column"):
    I.read_instructions(
        [_f("odd.jsonl"), _f("alpaca.jsonl")], format="alpaca",
        fields={"instruction": "prompt", "output": "completion"},
        cache_dir=cache)
  data = I.read_instructions(
      _f("odd.jsonl"), fields={"instruction": "prompt", "output": "completion"},
      meta_fields=["author"], cache_dir=cache)
  assert data.formats == ("alpaca",)
  assert [e.messages for e in data] == [
      _user_assistant("Capital of Italy?", "Rome."),
      _user_assistant("Capital of Spain?", "Madrid.")]
  assert [e.meta["author"] for e in data] == ["a", "b"]
  assert I.load_examples(_f("alpaca.json"), cache_dir=cache) == list(
      I.read_instructions(_f("alpaca.json"), cache_dir=cache).examples)
  both = I.read_instructions([_f("alpaca.jsonl"), _f("dolly.jsonl")],
                             cache_dir=cache)
  assert both.formats == ("alpaca", "dolly")
  assert [e.messages for e in both] == ALPACA + DOLLY
  assert [e.meta["source"] for e in both] == [_f("alpaca.jsonl")] * 2 + [
      _f("dolly.jsonl")] * 2
  assert (both.num_rows, both.num_skipped) == (6, 2)


def test_reader_errors(cache):
  with pytest.raises(ValueError) as e:
    I.read_instructions(_f("alpaca.jsonl"), format="dolly", cache_dir=cache)
  msg = str(e.value)
  assert "'response'" in msg and _f("alpaca.jsonl") in msg
  assert "['instruction', 'input', 'output']" in msg
  with pytest.raises(ValueError) as e:
    I.read_instructions(_f("missing_row.jsonl"), cache_dir=cache)
  msg = str(e.value)
  assert f"{_f('missing_row.jsonl')}, row 2: field 'instruction' is missing" in msg
  assert "['instruction', 'output']" in msg
  with pytest.raises(ValueError, match=r"Cannot detect .*\['author', "
                     r"'completion', 'prompt'\]"):
    I.read_instructions(_f("odd.jsonl"), cache_dir=cache)
  with pytest.raises(ValueError, match="meta field 'user' is not a column"):
    I.read_instructions(_f("alpaca.jsonl"), meta_fields=["user"],
                        cache_dir=cache)
  with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
    I.read_instructions(_f("nope.jsonl"), cache_dir=cache)
  with pytest.raises(ValueError, match="empty.jsonl is empty"):
    I.read_instructions(_f("empty.jsonl"), cache_dir=cache)
  with pytest.raises(ValueError, match="unsupported file type '.txt'"):
    I.read_instructions(_f("notes.txt"), cache_dir=cache)
  with pytest.raises(ValueError, match="Unknown instruction format 'sharegpt'"):
    I.read_instructions(_f("alpaca.jsonl"), format="sharegpt", cache_dir=cache)


def test_empty_records_file(tmp_path, cache):
  p = tmp_path / "blank.jsonl"
  p.write_text("\n\n")
  with pytest.raises(ValueError, match="blank.jsonl is empty"):
    I.read_instructions(str(p), cache_dir=cache)
  p = tmp_path / "list.json"
  p.write_text("[]")
  with pytest.raises(ValueError, match="list.json"):
    I.read_instructions(str(p), cache_dir=cache)


def test_chat_last_message_must_be_assistant(tmp_path, cache):
  p = tmp_path / "c.jsonl"
  p.write_text('{"messages": [{"role": "user", "content": "a"}, '
               '{"role": "assistant", "content": "b"}]}\n'
               '{"messages": [{"role": "user", "content": "a"}]}\n')
  with pytest.raises(ValueError, match=r"c.jsonl, row 1: the last message "
                     "must be the assistant's"):
    I.read_instructions(str(p), cache_dir=cache)


# ----------------------------------------------------------------------------
# Tokenization with the real SmolLM2 tokenizer.

SMOL_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
               "trained by Hugging Face<|im_end|>\n")


@pytest.fixture(scope="module")
def smol(smollm2_path):
  return Tokenizer.from_gguf(smollm2_path)


def _decode(tok, ids):
  return tok.decode(ids, skip_special_tokens=False)


def test_tokenize_smollm2_masks(smol):
  ex = I.Example(DOLLY[1], {})
  ts = I.tokenize([ex, I.Example(DOLLY[0], {})], smol, max_length=64)
  prompt = (SMOL_SYSTEM + "<|im_start|>user\nWho wrote it?\n\nHamlet is a play "
            "by Shakespeare.<|im_end|>\n<|im_start|>assistant\n")
  row, loss, inp = ts.tokens[0], ts.loss_mask[0], ts.input_mask[0]
  assert _decode(smol, row[loss]) == "Shakespeare.<|im_end|>"
  # The prompt is unmasked and exact; the template's trailing newline after
  # <|im_end|> is input but not a target.
  p = smol.encode(prompt, add_bos=False)
  np.testing.assert_array_equal(row[:len(p)], p)
  assert not loss[:len(p)].any()
  assert _decode(smol, row[inp & ~loss]) == prompt + "\n"
  n = int(inp.sum())
  np.testing.assert_array_equal(
      row[:n], p + smol.encode("Shakespeare.<|im_end|>\n", add_bos=False))
  assert loss[len(p):n - 1].all() and not loss[n - 1]
  assert row[n - 2] == smol.hf.token_to_id("<|im_end|>")
  # Padding.
  assert not inp[n:].any() and not loss[n:].any()
  assert (row[n:] == smol.pad_id).all()
  assert ts.tokens.dtype == np.int32 and ts.loss_mask.dtype == bool
  assert ts.tokens.shape == (2, 64)
  assert _decode(smol, ts.tokens[1][ts.loss_mask[1]]) == "4<|im_end|>"
  assert ts.stats == {"num_examples": 2, "num_truncated": 0, "num_dropped": 0,
                      "num_response_tokens": int(ts.loss_mask.sum()),
                      "read": 2, "kept": 2, "dropped_prompt_too_long": 0,
                      "dropped_empty_response": 0}
  assert ts.num_response_tokens == len(smol.encode("Shakespeare.<|im_end|>")) + 2
  np.testing.assert_array_equal(ts.source_index, [0, 1])


def test_tokenize_smollm2_multiturn_and_system(smol):
  ts = I.tokenize([I.Example(CHAT[1], {}), I.Example(CHAT[0], {})], smol, 96,
                  system_prompt="Answer in numbers.")
  # Only the last assistant turn is a target.
  assert _decode(smol, ts.tokens[0][ts.loss_mask[0]]) == "10<|im_end|>"
  text = _decode(smol, ts.tokens[0][ts.input_mask[0]])
  assert text == ("<|im_start|>system\nAnswer in numbers.<|im_end|>\n"
                  "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n5"
                  "<|im_end|>\n<|im_start|>user\ntimes 2?<|im_end|>\n"
                  "<|im_start|>assistant\n10<|im_end|>\n")
  # A conversation with its own system message keeps it.
  assert _decode(smol, ts.tokens[1][ts.input_mask[1]]).startswith(
      "<|im_start|>system\nBe brief.<|im_end|>")
  assert _decode(smol, ts.tokens[1][ts.loss_mask[1]]) == "Hello!<|im_end|>"


def test_tokenize_smollm2_truncation(smol):
  ex = I.Example(_user_assistant(
      "Who wrote the play called Hamlet, and in which year was it first "
      "performed?", "Shakespeare wrote Hamlet."), {})
  prompt, rest = I.render(ex, smol)
  lp = len(smol.encode(prompt, add_bos=False))
  resp = smol.encode(rest, add_bos=False)
  ts = I.tokenize([ex, ex, ex], smol, max_length=lp + 2)
  assert (ts.num_examples, ts.num_truncated, ts.num_dropped) == (3, 3, 0)
  np.testing.assert_array_equal(ts.tokens[0][ts.loss_mask[0]], resp[:2])
  assert ts.num_response_tokens == 6
  ts = I.tokenize([ex, I.Example(DOLLY[0], {})], smol, max_length=lp)
  assert (ts.num_examples, ts.num_truncated, ts.num_dropped) == (1, 1, 1)
  np.testing.assert_array_equal(ts.source_index, [1])  # "What is 2+2?" fits
  assert _decode(smol, ts.tokens[0][ts.loss_mask[0]]) == "4<|im_end|>"


# ----------------------------------------------------------------------------
# Tokenization with a byte-level fake, checked by hand.


class ChatBytes(testing.ByteTokenizer):
  """ByteTokenizer with a toy chat template; "<E>" is the end-of-turn id 258."""
  name = "chat-bytes"
  add_bos = True
  bos_token = None

  def __init__(self, template_ok=True):
    self.template_ok = template_ok

  def apply_chat_template(self, messages, add_generation_prompt=True):
    s = "".join(f"[{m['role']}]{m['content']}<E>" for m in messages)
    if not self.template_ok and not add_generation_prompt:
      s = s.upper()
    return s + ("[assistant]" if add_generation_prompt else "")

  def encode(self, text):
    out = []
    for j, part in enumerate(text.split("<E>")):
      if j:
        out.append(258)
      out.extend(part.encode("latin-1"))
    return out


def _b(s):
  return list(s.encode("latin-1"))


def test_tokenize_fake_by_hand():
  tok = ChatBytes()
  ex = I.Example(_user_assistant("hi", "yo"), {})
  ts = I.tokenize([ex], tok, max_length=26)
  expect = [257] + _b("[user]hi") + [258] + _b("[assistant]") + _b("yo") + [258]
  assert len(expect) == 24
  np.testing.assert_array_equal(ts.tokens[0], expect + [256, 256])
  np.testing.assert_array_equal(ts.input_mask[0], [True] * 24 + [False] * 2)
  np.testing.assert_array_equal(ts.loss_mask[0],
                                [False] * 21 + [True] * 3 + [False] * 2)
  assert ts.num_response_tokens == 3
  ts = I.tokenize([ex], tok, max_length=22)
  np.testing.assert_array_equal(ts.tokens[0], expect[:22])
  np.testing.assert_array_equal(ts.loss_mask[0], [False] * 21 + [True])
  assert (ts.num_truncated, ts.num_dropped) == (1, 0)
  ts = I.tokenize([ex], tok, max_length=21)
  assert ts.tokens.shape == (0, 21)
  assert (ts.num_truncated, ts.num_dropped, ts.num_response_tokens) == (1, 1, 0)
  sub = I.tokenize([ex, ex], tok, 26).subset([1])
  assert sub.num_examples == 1 and sub.num_response_tokens == 3


def test_template_must_extend_prompt():
  with pytest.raises(ValueError, match="chat template of chat-bytes renders"):
    I.tokenize([I.Example(_user_assistant("hi", "yo"), {})],
               ChatBytes(template_ok=False), 32)


# ----------------------------------------------------------------------------
# The built-in wiki instruction set.


@pytest.fixture(scope="module")
def articles():
  try:
    return wiki.load_articles()
  except FileNotFoundError as e:
    pytest.skip(str(e))


def test_wiki_instructions(articles, tmp_path, cache):
  math = [a for a in articles if a.topic == "Mathematics"]
  exs = builtin.wiki_instructions(topics=["math"])
  assert len(exs) == len(math) + sum(bool(a.description.strip()) for a in math)
  assert {e.meta["category"] for e in exs} == {"Mathematics"}
  a = math[0]
  assert exs[0].messages == _user_assistant(
      f"Summarize what Wikipedia says about {a.title}.", a.text.strip())
  assert exs[0].meta == {"source": "wiki", "category": "Mathematics",
                         "title": a.title, "article_id": a.id,
                         "template": "summary"}
  assert exs[1].messages == _user_assistant(
      f"Describe {a.title} in a few words.", a.description.strip())
  sub = builtin.wiki_instructions(topics=["math", "Mathematics", "medicine"],
                                  max_per_topic=5, seed=1)
  assert [e.meta["category"] for e in sub] == (
      ["Mathematics"] * 5 + ["Biology and health sciences"] * 5)
  assert sub == builtin.wiki_instructions(topics=["math", "medicine"],
                                          max_per_topic=5, seed=1)
  assert sub != builtin.wiki_instructions(topics=["math", "medicine"],
                                          max_per_topic=5, seed=2)
  assert all(e in exs for e in sub[:5])
  with pytest.raises(ValueError, match="Unknown wiki topic 'cooking'"):
    builtin.wiki_instructions(topics=["cooking"])
  # Round trip through a file.
  for fmt in ("chat", "dolly"):
    path = str(tmp_path / f"wiki_{fmt}.jsonl")
    builtin.write_jsonl(sub, path, format=fmt)
    back = I.read_instructions(path, meta_fields=["title", "article_id"],
                               cache_dir=cache)
    assert back.formats == (fmt,)
    assert [e.messages for e in back] == [e.messages for e in sub]
    assert [(e.meta["category"], e.meta["title"], e.meta["article_id"])
            for e in back] == [(e.meta["category"], e.meta["title"],
                                e.meta["article_id"]) for e in sub]
  with pytest.raises(ValueError, match="roles"):
    builtin.write_jsonl([I.Example(CHAT[0], {})], str(tmp_path / "x.jsonl"),
                        format="dolly")


# ----------------------------------------------------------------------------
# Nothing dropped silently: drop reports, warnings, fields.


def _write_jsonl(path, rows):
  import json
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_rows_without_a_response_counted_and_warned(tmp_path, cache, caplog):
  rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
  rows += [{"instruction": f"q{i}"} for i in range(10, 38)]  # no response
  rows += [{"instruction": "q38", "output": "  "}, {"instruction": "q39",
                                                  "output": None}]
  path = _write_jsonl(tmp_path / "half.jsonl", rows)
  caplog.set_level("INFO")
  data = I.read_instructions(path, cache_dir=cache)
  assert data.drops.as_dict() == {
      "read": 40, "kept": 10,
      "dropped": {"missing_response": 29, "empty_response": 1}}
  assert (data.num_rows, data.num_skipped, len(data)) == (40, 30, 10)
  warned = _warnings(caplog)
  assert len(warned) == 1
  assert "75.0% DROPPED" in warned[0] and "half.jsonl" in warned[0]
  assert "29 missing_response, 1 empty_response" in warned[0]
  assert "config.data.fields" in warned[0]  # what to do about it
  examples = I.load_examples(path, cache_dir=cache)
  assert len(examples) == 10 and examples.drops == data.drops
  assert examples.drops.summary() == (
      f"read 40 rows of {path}, kept 10; dropped 30 (75.0%): "
      "29 missing_response, 1 empty_response")
  assert examples.drops.flat() == {"read": 40, "kept": 10,
                                   "dropped_missing_response": 29,
                                   "dropped_empty_response": 1}


def test_few_drops_only_logged_as_info(cache, caplog):
  caplog.set_level("INFO")
  data = I.read_instructions(_f("alpaca.jsonl"), cache_dir=cache)  # 1 of 3 blank
  assert data.drops.dropped == {"missing_response": 0, "empty_response": 1}
  assert len(_warnings(caplog)) == 1  # 33% > 10%
  caplog.clear()
  report = I.DropReport("rows of x", 20, 18, {"missing_response": 2})
  assert I.log_drops(report) == "read 20 rows of x, kept 18; dropped 2 (10.0%): " \
                                "2 missing_response"
  assert not _warnings(caplog)  # exactly 10% is not "more than 10%"
  assert (report + report).as_dict() == {"read": 40, "kept": 36,
                                         "dropped": {"missing_response": 4}}
  assert I.DropReport("rows", 3, 3, {"x": 0}).note() == ""


def test_fields_map_roles_and_errors_name_the_config_field(tmp_path, cache):
  path = _write_jsonl(tmp_path / "odd2.jsonl", [
      {"question": "Capital of Italy?", "extra": "Europe", "answer": "Rome.",
       "kind": "geo"}])
  # The shape of config.data.fields: every role, "" = the canonical name.
  fields = {"instruction": "question", "input": "extra", "response": "answer",
            "category": "kind", "messages": ""}
  (ex,) = I.load_examples(path, fields=fields, cache_dir=cache)
  assert ex.messages == _user_assistant("Capital of Italy?\n\nEurope", "Rome.")
  assert ex.meta["category"] == "geo"
  import ml_collections
  (ex2,) = I.load_examples(path, fields=ml_collections.ConfigDict(fields),
                           cache_dir=cache)
  assert ex2 == ex
  # Alpaca spellings work as aliases, and pick the Alpaca format.
  data = I.read_instructions(path, fields={"instruction": "question",
                                           "output": "answer"}, cache_dir=cache)
  assert data.formats == ("alpaca",) and data[0].response == "Rome."
  with pytest.raises(ValueError, match=r"config\.data\.fields.*"
                     r"--config\.data\.fields\.response=completion"):
    I.load_examples(path, cache_dir=cache)
  with pytest.raises(ValueError, match=r"is not a column.*config\.data\.fields"
                     r".*--config\.data\.fields\.response=<column>"):
    I.load_examples(path, format="alpaca", fields={"instruction": "question"},
                    cache_dir=cache)
  with pytest.raises(ValueError, match=r"unknown role\(s\) \['prompt'\]"):
    I.load_examples(path, fields={"prompt": "question"}, cache_dir=cache)


def test_tokenize_counts_prompts_longer_than_max_length(caplog):
  caplog.set_level("INFO")
  tok = ChatBytes()
  short = I.Example(_user_assistant("hi", "yo"), {})      # prompt: 21 tokens
  long = I.Example(_user_assistant("x" * 40, "yo"), {})   # prompt: 59 tokens
  ts = I.tokenize([short, long, long, long], tok, max_length=30, name="client 3")
  assert ts.num_examples == 1 and ts.num_dropped == 3
  assert ts.drops.as_dict() == {"read": 4, "kept": 1, "dropped": {
      "prompt_too_long": 3, "empty_response": 0}}
  assert ts.stats["dropped_prompt_too_long"] == 3 and ts.stats["read"] == 4
  (warned,) = _warnings(caplog)
  assert warned.startswith("75.0% DROPPED: client 3: read 4 examples tokenized "
                           "with max_length=30, kept 1")
  assert "raise config.train.max_length" in warned
  # All values of .stats stay ints (data_stats.json casts each with int()).
  assert all(isinstance(v, int) for v in ts.stats.values())
  assert ts.subset([0]).drops is None
