"""Tokenizer: GGUF-built vocabularies against transformers and sentencepiece."""

import io
import os
import random
import sys
import types

import gguf
import pytest

from fedjax_u2s.tokenizer import Tokenizer, bytes_to_unicode

TRICKY = [
    "The capital of France is",
    "12345",
    " 12345 x1y22 3.14159 1,000,000",
    "naïve café 東京 🙂",
    "👩‍👩‍👧 e\u0301 Ωmega ß ﬁ",
    "a  b   c\t\td    ",
    "\n\n",
    "line one\r\nline two\n\n\nthree",
    "   leading and trailing   ",
    "don't I'll we're THEY'VE",
    "def f(x):\n    return x**2  # square\n\tpass",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "foo<|im_end|>bar<|endoftext|>",
    "<|im_start|> spaced <|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
  return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def reference(smollm2_path):
  """transformers' own GGUF tokenizer for SmolLM2, built without torch.

  ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` needs torch twice in
  transformers 5.x: its GGUF metadata reader module imports torch at the top
  (for dtype tables it does not use when reading metadata), and for a 'llama'
  file AutoTokenizer first rebuilds the model config through the torch-only
  ``load_gguf_checkpoint``. So this goes through the tokenizer class directly
  (``PreTrainedTokenizerFast``, the generic backend AutoTokenizer would
  configure from the same GGUF kwargs), and swaps in a metadata reader backed
  by ``gguf.GGUFReader`` for the torch-importing module, only while building.
  Everything else (vocabulary, merges, special tokens, pre-tokenizer, chat
  template, bos/eos) is transformers' own conversion code.
  """
  path = smollm2_path
  from transformers import PreTrainedTokenizerFast
  reader = gguf.GGUFReader(path)
  metadata = {k: f.contents() for k, f in reader.fields.items()}
  names = tuple(t.name for t in reader.tensors)
  shim = types.ModuleType("transformers.integrations.gguf.reader")
  shim.read_gguf_metadata = lambda gguf_path, string_arrays=(): (metadata, names)
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(sys.modules, shim.__name__, shim)
    return PreTrainedTokenizerFast.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path))


# ---------------------------------------------------------------------------
# SmolLM2 (the GGUF's own vocabulary).


def test_smollm2_special_ids(smollm2):
  tok = smollm2
  assert tok.vocab_size == 49152
  assert tok.hf.id_to_token(2) == "<|im_end|>" and tok.hf.id_to_token(1) == "<|im_start|>"
  assert tok.bos_id == 1 and tok.pad_id == 2 and not tok.add_bos
  # The instruct model ends its turns with <|im_end|>, which is also the EOS.
  assert tok.eos_ids == (2,)
  assert tok.encode("hi", add_bos=True)[0] == 1


def test_smollm2_ids_match_transformers(smollm2, reference):
  for text in TRICKY:
    want = reference(text, add_special_tokens=False)["input_ids"]
    assert smollm2.encode(text) == want, text
  assert smollm2.encode_batch(TRICKY) == [smollm2.encode(t) for t in TRICKY]
  assert smollm2.bos_id == reference.bos_token_id
  assert smollm2.eos_ids[0] == reference.eos_token_id
  assert smollm2.pad_id == reference.pad_token_id


def test_smollm2_digits_split_one_by_one(smollm2):
  # SmolLM2's tokenizer.json pre-tokenizes with Digits(individual_digits=True).
  ids = smollm2.encode("2024 and 12345")
  pieces = [smollm2.decode([i]) for i in ids]
  assert [p for p in pieces if any(c.isdigit() for c in p)] == list("2024") + list("12345")


def test_smollm2_decode_round_trip(smollm2, reference):
  for text in TRICKY:
    ids = smollm2.encode(text)
    assert smollm2.decode(ids, skip_special_tokens=False) == text
    assert smollm2.decode(ids) == reference.decode(ids, skip_special_tokens=True)
  assert smollm2.decode(smollm2.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_smollm2_chat_template_matches_transformers(smollm2, reference):
  conversations = [
      [{"role": "system", "content": "You are terse."},
       {"role": "user", "content": "What is 2+2?"},
       {"role": "assistant", "content": "4."},
       {"role": "user", "content": "And 3+3?"}],
      [{"role": "user", "content": "Hello! ünïcode 🙂\nsecond line"}],
  ]
  for messages in conversations:
    for gen in (True, False):
      want = reference.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=gen)
      assert smollm2.apply_chat_template(messages, add_generation_prompt=gen) == want
  user_only = smollm2.apply_chat_template(conversations[1])
  assert user_only.startswith("<|im_start|>system\nYou are a helpful AI assistant named "
                              "SmolLM, trained by Hugging Face<|im_end|>\n")
  assert user_only.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_token_bytes_are_exact(smollm2):
  tb = smollm2.token_bytes()
  assert len(tb) == smollm2.vocab_size and tb is smollm2.token_bytes()  # cached
  assert tb[2] == b"<|im_end|>" and tb[216] == b" " and tb[33] == b"1"
  rng = random.Random(0)
  specials = list(range(17))
  for n in range(400):
    length = rng.randint(1, 10)
    ids = [rng.randrange(smollm2.vocab_size) for _ in range(length)]
    if n % 4 == 0:
      ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
    want = smollm2.decode(ids, skip_special_tokens=False)
    assert b"".join(tb[i] for i in ids).decode("utf-8", "replace") == want, ids
  # Splitting a multi-byte character across tokens: bytes, not characters.
  ids = smollm2.encode("🙂")
  assert b"".join(tb[i] for i in ids) == "🙂".encode()


def test_token_bytes_mirror_byte_level_decoder():
  # Added tokens go through the ByteLevel decoder too: in-alphabet characters
  # become their bytes ("Ġ" a space, "é" the lone byte 0xE9), anything else
  # leaves the token as UTF-8.
  import tokenizers
  from tokenizers import AddedToken, decoders, models, pre_tokenizers
  alphabet = [bytes_to_unicode()[b] for b in range(256)]
  hf = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet)},
                                       merges=[]))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.add_special_tokens([AddedToken("<a b>", special=True),
                         AddedToken("<x\u0120y>", special=True)])
  hf.add_tokens([AddedToken("\u00e9!", special=False)])
  tok = Tokenizer(hf)
  tb = tok.token_bytes()
  assert tb[256:] == [b"<a b>", b"<x y>", b"\xe9!"]
  for ids in ([256], [257], [258], [0x41, 256, 0xC3], [0xC3, 257, 0xA9],
              [0xC3, 0xA9, 258], [0xF0, 0x9F, 258, 0x99, 0x82]):
    assert (b"".join(tb[i] for i in ids).decode("utf-8", "replace")
            == tok.decode(ids, skip_special_tokens=False)), ids


def test_tokenizer_json_round_trip(smollm2, tmp_path):
  smollm2.save(tmp_path)
  again = Tokenizer.from_file(tmp_path)
  file_only = Tokenizer.from_file(tmp_path / "tokenizer.json")
  for text in TRICKY:
    assert again.encode(text) == smollm2.encode(text) == file_only.encode(text), text
  assert (again.bos_id, again.eos_ids, again.pad_id, again.add_bos) == (
      smollm2.bos_id, smollm2.eos_ids, smollm2.pad_id, smollm2.add_bos)
  assert again.vocab_size == smollm2.vocab_size
  assert again.token_bytes() == smollm2.token_bytes()
  messages = [{"role": "user", "content": "hi"}]
  assert again.apply_chat_template(messages) == smollm2.apply_chat_template(messages)


# ---------------------------------------------------------------------------
# Small vocabularies written here.


def write_vocab_gguf(path, model, tokens, *, pre=None, merges=None, scores=None,
                     token_types=None, bos=None, eos=None, unk=None, template=None,
                     extra=None):
  w = gguf.GGUFWriter(os.fspath(path), "llama")
  w.add_tokenizer_model(model)
  if pre is not None:
    w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  if merges is not None:
    w.add_token_merges(merges)
  if scores is not None:
    w.add_token_scores(scores)
  w.add_token_types(token_types or [1] * len(tokens))
  for fn, v in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos),
                (w.add_unk_token_id, unk)):
    if v is not None:
      fn(v)
  if template is not None:
    w.add_chat_template(template)
  for k, v in (extra or {}).items():
    w.add_bool(k, v)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def byte_vocab_with_digit_merges():
  alphabet = [bytes_to_unicode()[b] for b in range(256)]
  merges = ["1 2", "12 3", "123 4", "4 5", "Ġ 1"]
  tokens = alphabet + ["12", "123", "1234", "45", "Ġ1", "<|im_end|>", "<|user|>"]
  types = [1] * (len(tokens) - 2) + [3, 4]
  return tokens, merges, types


@pytest.mark.parametrize("pre,want", [
    ("default", ["1234", "5"]),   # GPT-2 regex: the digit run is one word
    ("smollm", list("12345")),    # individual digits
    ("qwen2", list("12345")),     # \p{N}: one digit at a time
    ("llama-bpe", ["123", "45"]), # \p{N}{1,3}
])
def test_byte_level_pre_tokenizer_by_name(tmp_path, pre, want):
  tokens, merges, types = byte_vocab_with_digit_merges()
  path = write_vocab_gguf(tmp_path / "v.gguf", "gpt2", tokens, pre=pre, merges=merges,
                          token_types=types, eos=len(tokens) - 2)
  tok = Tokenizer.from_gguf(path)
  assert [tok.hf.id_to_token(i) for i in tok.encode("12345")] == want
  ids = tok.encode("a<|im_end|>b<|user|>")
  assert tok.hf.id_to_token(ids[1]) == "<|im_end|>" and tok.hf.id_to_token(ids[3]) == "<|user|>"
  assert tok.decode(ids) == "ab<|user|>"  # control tokens are skipped, user ones kept
  assert tok.eos_ids == (len(tokens) - 2,) and tok.bos_id is None and not tok.add_bos
  assert tok.pad_id == tok.eos_ids[0]
  tb = tok.token_bytes()
  assert tb[tokens.index("Ġ1")] == b" 1" and tb[0] == b"\x00"


def test_from_gguf_reader(tmp_path):
  tokens, merges, types = byte_vocab_with_digit_merges()
  path = write_vocab_gguf(tmp_path / "v.gguf", "gpt2", tokens, pre="smollm",
                          merges=merges, token_types=types, bos=len(tokens) - 2,
                          extra={"tokenizer.ggml.add_bos_token": True})
  tok = Tokenizer.from_gguf(gguf.GGUFReader(path))
  assert tok.add_bos and tok.encode("12") == [len(tokens) - 2] + [tokens.index("1"), tokens.index("2")]
  assert tok.encode("12", add_bos=False) == Tokenizer.from_gguf(path).encode("12", add_bos=False)


def test_end_of_turn_from_template(tmp_path):
  tokens, merges, types = byte_vocab_with_digit_merges()
  template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
  path = write_vocab_gguf(tmp_path / "v.gguf", "gpt2", tokens, pre="default",
                          merges=merges, token_types=types, eos=ord("!") - 33,
                          template=template)
  tok = Tokenizer.from_gguf(path)
  assert tok.eos_ids == (0, tokens.index("<|im_end|>"))


def test_unknown_pre_tokenizer_and_model(tmp_path):
  tokens, merges, types = byte_vocab_with_digit_merges()
  path = write_vocab_gguf(tmp_path / "weird.gguf", "gpt2", tokens, pre="falcon",
                          merges=merges, token_types=types)
  with pytest.raises(ValueError, match=r"weird\.gguf.*'falcon'"):
    Tokenizer.from_gguf(path)
  path = write_vocab_gguf(tmp_path / "t5.gguf", "t5", ["<pad>", "a"], scores=[0.0, -1.0])
  with pytest.raises(NotImplementedError, match=r"t5\.gguf.*'t5'"):
    Tokenizer.from_gguf(path)


def test_chat_template_rendering_details(tmp_path):
  tokens, merges, types = byte_vocab_with_digit_merges()
  template = (
      "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}"
      "{%- endif %}\n"
      "{% for m in messages %}\n"
      "  {% if m['role'] %}[{{ m['role'] }}] {{ m['content'] | tojson }}{% endif %}\n"
      "{% endfor %}\n"
      "{{ eos_token }}{% if add_generation_prompt %}>{% endif %}{{ extra | default('') }}")
  path = write_vocab_gguf(tmp_path / "v.gguf", "gpt2", tokens, pre="default",
                          merges=merges, token_types=types, eos=len(tokens) - 2,
                          template=template)
  tok = Tokenizer.from_gguf(path)
  out = tok.apply_chat_template([{"role": "user", "content": "<é>", "name": None}],
                                extra="!")
  # trim_blocks/lstrip_blocks; tojson neither escapes HTML nor non-ASCII.
  assert out == '[user] "<é>"<|im_end|>>!'
  from transformers.utils.chat_template_utils import render_jinja_template
  want, _ = render_jinja_template(
      [[{"role": "user", "content": "<é>"}]], chat_template=template,
      add_generation_prompt=True, eos_token="<|im_end|>", extra="!")
  assert out == want[0]
  import jinja2
  with pytest.raises(jinja2.TemplateError, match="no system"):
    tok.apply_chat_template([{"role": "system", "content": "x"}])
  with pytest.raises(ValueError, match="at least one message"):
    tok.apply_chat_template([])


def train_sentencepiece():
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  rng = random.Random(0)
  words = ("the quick brown fox jumps over the lazy dog naïve café 東京 hello world "
           "tokenization byte fallback sentence piece model training data 2024 "
           "rather longer words like internationalization appear too").split()
  lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=500,
      model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, character_coverage=1.0, unk_id=0, bos_id=1,
      eos_id=2, pad_id=-1, minloglevel=2)
  return spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_sentencepiece_vocabulary_matches_sentencepiece(tmp_path):
  sp = train_sentencepiece()
  n = sp.get_piece_size()
  tokens = [sp.id_to_piece(i) for i in range(n)]
  scores = [sp.get_score(i) for i in range(n)]
  # As llama.cpp's converter types them.
  types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
           else 5 if sp.is_unused(i) else 1 for i in range(n)]
  path = write_vocab_gguf(tmp_path / "spm.gguf", "llama", tokens, pre="default",
                          scores=scores, token_types=types, bos=1, eos=2, unk=0)
  tok = Tokenizer.from_gguf(path)
  assert tok.add_bos and tok.bos_id == 1 and tok.eos_ids == (2,)
  texts = ["the quick fox", "  two  spaces", "東京 🙂 x", "naïve café", "hello\nworld",
           "internationalization rather", "x", "2024 ünseen ƒ", " ", ""]
  for text in texts:
    assert tok.encode(text, add_bos=False) == sp.encode(text), text
    assert tok.encode(text) == [1] + sp.encode(text)
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)) == text
  # After a special token the text gets its own "▁" prefix, as in llama.cpp.
  assert [tok.hf.id_to_token(i) for i in tok.encode("a</s> b", add_bos=False)] == (
      [sp.id_to_piece(i) for i in sp.encode("a")] + ["</s>"]
      + [sp.id_to_piece(i) for i in sp.encode(" b")])
  tb = tok.token_bytes()
  assert tb[tokens.index("<0xF0>")] == b"\xf0"
  for text in texts:
    ids = tok.encode(text, add_bos=False)
    # The decoder strips the one space the Metaspace prefix added.
    assert b"".join(tb[i] for i in ids).decode("utf-8", "replace")[1:] == tok.decode(ids)
