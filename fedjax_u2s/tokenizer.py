"""Tokenizer: a Hugging Face ``tokenizers.Tokenizer`` plus chat template.

Built from a ``tokenizer.json`` (:meth:`Tokenizer.from_file`), from a
sentencepiece ``tokenizer.model`` (:meth:`Tokenizer.from_sentencepiece`; what
older Llama and Gemma repositories ship instead), or from the vocabulary a GGUF
file carries in its metadata (:meth:`Tokenizer.from_gguf`):

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The vocabulary and merges
  are stored already in GPT-2's byte-to-unicode alphabet; the pre-tokenizer is
  chosen by ``tokenizer.ggml.pre`` to match the model's own ``tokenizer.json``
  (and llama.cpp's regexes for that name).
* ``tokenizer.ggml.model == "llama"``: sentencepiece BPE with byte fallback,
  rebuilt as in Llama-2's ``tokenizer.json`` (a normalizer turns spaces into
  ``▁`` and prepends one; merges come from the file or, if it has none, from
  the piece scores), which reproduces sentencepiece's ids.

A ``tokenizer.model`` is read with ``sentencepiece`` and rebuilt the same way
as a GGUF ``llama`` vocabulary (pieces, scores and piece types are exactly what
llama.cpp's converter copies into the GGUF), for BPE models with the identity
normalizer (Llama-2, Gemma); others are refused by name.

Gemma 3 GGUF files carry no chat template: :data:`GEMMA3_CHAT_TEMPLATE` (the
one in google/gemma-3-*'s tokenizer_config.json) is used for ``gemma3`` files
without one, so ``<start_of_turn>user ... <end_of_turn>`` prompts and the stop
at ``<end_of_turn>`` work as with Gemma's own tokenizer.

Tokens marked CONTROL in ``tokenizer.ggml.token_type`` become special added
tokens (matched whole, dropped by ``decode(skip_special_tokens=True)``), and
USER_DEFINED ones plain added tokens, as llama.cpp and transformers do.

Chat templates are rendered with jinja2 the way ``transformers`` renders them
(sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, a ``tojson``
that does not HTML-escape, special tokens as variables), so a prompt built here
is byte-identical to ``apply_chat_template(..., tokenize=False)``.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

# llama.cpp token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# End-of-turn markers: when the chat template writes one, generation must stop
# on it even if the file's EOS is another token.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
                       "<end_of_turn>", "<|end_of_turn|>")

# Gemma 3's chat template, as google/gemma-3-*'s tokenizer_config.json has
# it: BOS first, a system message folded into the first user turn, the
# assistant's role written "model", each turn closed by <end_of_turn>.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n")

# Split regexes of the byte-level pre-tokenizers, as in the models'
# tokenizer.json files (and llama.cpp's llama-vocab.cpp for the same names).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(split: str | None = None, digits: bool = False):
  steps = []
  if digits:
    steps.append(pre_tokenizers.Digits(individual_digits=True))
  if split is None:
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
  else:
    steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
  return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


# tokenizer.ggml.pre -> (pre-tokenizer factory, normalizer factory, BPE ignore_merges).
_BYTE_LEVEL_PRE = {
    # SmolLM/SmolLM2 and StarCoder: single digits, then GPT-2's regex.
    "smollm": (lambda: _byte_level(digits=True), None, False),
    "starcoder": (lambda: _byte_level(digits=True), None, False),
    # Qwen2/2.5: its own regex, NFC normalisation.
    "qwen2": (lambda: _byte_level(_QWEN2_SPLIT), normalizers.NFC, False),
    # Llama-3.x: whole words in the vocabulary skip the merges.
    "llama-bpe": (lambda: _byte_level(_LLAMA3_SPLIT), None, True),
    "llama3": (lambda: _byte_level(_LLAMA3_SPLIT), None, True),
    # GPT-2's own regex.
    "default": (lambda: _byte_level(), None, False),
    "gpt2": (lambda: _byte_level(), None, False),
}


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable unicode characters."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=None)
def _unicode_to_bytes() -> dict[str, int]:
  return {c: b for b, c in bytes_to_unicode().items()}


class Tokenizer:
  """A tokenizer with the ids, flags and chat template a model needs.

  Attributes:
    hf: the wrapped ``tokenizers.Tokenizer`` (it adds no special tokens by
      itself; BOS is added by :meth:`encode` according to ``add_bos``).
    bos_id: beginning-of-sequence id, or None.
    eos_ids: ids that end generation: the EOS token plus any end-of-turn
      token the chat template uses.
    pad_id: padding id (the file's, else the first EOS id, else 0).
    add_bos: whether :meth:`encode` prepends ``bos_id`` by default.
    chat_template: the jinja2 template source, or None.
  """

  def __init__(self, hf: tokenizers.Tokenizer, *, bos_token: str | None = None,
               eos_token: str | None = None, pad_token: str | None = None,
               unk_token: str | None = None, add_bos: bool = False,
               chat_template: str | None = None,
               extra_eos_ids: Iterable[int] = (), name: str = ""):
    self.hf = hf
    self.name = name
    self.bos_token, self.eos_token = bos_token, eos_token
    self.pad_token, self.unk_token = pad_token, unk_token
    self.bos_id = self._id(bos_token)
    self.eos_id = self._id(eos_token)
    self.add_bos = bool(add_bos) and self.bos_id is not None
    self.chat_template = chat_template
    eos = [] if self.eos_id is None else [self.eos_id]
    for i in extra_eos_ids:
      if i is not None and int(i) not in eos:
        eos.append(int(i))
    if chat_template:
      for t in _END_OF_TURN_TOKENS:
        i = hf.token_to_id(t)
        if t in chat_template and i is not None and i not in eos:
          eos.append(i)
    self.eos_ids: tuple[int, ...] = tuple(eos)
    pad = self._id(pad_token)
    self.pad_id: int = pad if pad is not None else (eos[0] if eos else 0)
    self._token_bytes: list[bytes] | None = None
    self._template = None

  def _id(self, token: str | None) -> int | None:
    if token is None:
      return None
    i = self.hf.token_to_id(token)
    if i is None:
      raise ValueError(f"{self.name or 'tokenizer'}: special token {token!r} is not "
                       "in the vocabulary.")
    return i

  def __repr__(self) -> str:
    return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, pad_id={self.pad_id}, add_bos={self.add_bos})")

  # --------------------------------------------------------------------------
  # Construction.

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
    """Loads ``tokenizer.json`` (a file, or a directory holding one).

    Beside it, ``tokenizer_config.json`` (optional) gives the chat template,
    the bos/eos/pad/unk tokens and ``add_bos_token``; a ``chat_template.jinja``
    file, if present, gives the template too. A directory without
    ``tokenizer.json`` but with a sentencepiece ``tokenizer.model`` is read
    with :meth:`from_sentencepiece`.

    Raises:
      FileNotFoundError: if there is neither tokenizer.json nor tokenizer.model.
      ValueError: naming the file, if it cannot be parsed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
      directory, file = path, os.path.join(path, "tokenizer.json")
      if not os.path.isfile(file) and os.path.isfile(os.path.join(path, SPM_FILE)):
        return cls.from_sentencepiece(os.path.join(path, SPM_FILE))
    else:
      directory, file = os.path.dirname(path) or ".", path
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{file} not found: a Hugging Face tokenizer needs a "
                              f"tokenizer.json (or a sentencepiece {SPM_FILE}).")
    try:
      hf = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON.
      raise ValueError(f"{file}: not a valid tokenizer.json: {e}") from e

    cfg, template = _tokenizer_config(directory)

    def token(key):
      v = cfg.get(key)
      return v.get("content") if isinstance(v, dict) else v

    bos = token("bos_token")
    add_bos = cfg.get("add_bos_token")
    if add_bos is None and bos is not None:
      # No flag: add BOS if the file's own post-processor would.
      bos_id = hf.token_to_id(bos)
      add_bos = bos_id is not None and (
          hf.encode("a", add_special_tokens=True).ids[:1] == [bos_id])
    return cls(hf, bos_token=bos, eos_token=token("eos_token"),
               pad_token=token("pad_token"), unk_token=token("unk_token"),
               add_bos=bool(add_bos), chat_template=template, name=file)

  @classmethod
  def from_sentencepiece(cls, path: str | os.PathLike) -> "Tokenizer":
    """Builds the tokenizer of a sentencepiece ``tokenizer.model``.

    The model is opened with ``sentencepiece`` (which validates it); its
    pieces, scores and piece types become a byte-fallback BPE exactly as a
    GGUF ``llama`` vocabulary does (:meth:`from_gguf`), giving
    sentencepiece's ids. ``tokenizer_config.json`` beside it, if present,
    gives the chat template, special tokens and ``add_bos_token`` (default:
    add BOS, as Llama and Gemma do).

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file, if sentencepiece cannot read it.
      NotImplementedError: for a unigram / word / char model, or a
        normalizer other than identity, or ``remove_extra_whitespaces``
        (this rebuild would give other ids than sentencepiece).
    """
    import sentencepiece  # Lazy: only directories without tokenizer.json need it.
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such sentencepiece model.")
    sp = sentencepiece.SentencePieceProcessor()
    try:
      sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path}: not a sentencepiece model ({e}).") from e
    spec = _read_spm_proto(sp.serialized_model_proto())
    if spec["model_type"] != 2:
      kinds = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
      raise NotImplementedError(
          f"{path}: a sentencepiece {kinds.get(spec['model_type'], spec['model_type'])}"
          " model; only BPE models (Llama, Gemma) are implemented.")
    if spec["normalizer"] not in ("identity", ""):
      raise NotImplementedError(
          f"{path}: normalizer_spec.name={spec['normalizer']!r}; only 'identity' "
          "is implemented (Llama and Gemma models use it).")
    if spec["remove_extra_whitespaces"]:
      raise NotImplementedError(
          f"{path}: normalizer_spec.remove_extra_whitespaces=true is not "
          "implemented (Llama and Gemma models set it false).")
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    md = {"tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
          "tokenizer.ggml.add_space_prefix": spec["add_dummy_prefix"],
          "tokenizer.ggml.unknown_token_id": sp.unk_id() if sp.unk_id() >= 0 else None}
    hf = _sentencepiece_bpe(md, tokens, spec["types"], path)
    cfg, template = _tokenizer_config(os.path.dirname(path) or ".")

    def token(key, spm_id):
      v = cfg.get(key)
      if v is not None:
        return v.get("content") if isinstance(v, dict) else v
      return tokens[spm_id] if 0 <= spm_id < n else None

    add_bos = cfg.get("add_bos_token", True)
    return cls(hf, bos_token=token("bos_token", sp.bos_id()),
               eos_token=token("eos_token", sp.eos_id()),
               pad_token=token("pad_token", sp.pad_id()),
               unk_token=token("unk_token", sp.unk_id()),
               add_bos=bool(add_bos), chat_template=template, name=path)

  @classmethod
  def from_gguf(cls, path_or_reader) -> "Tokenizer":
    """Builds the tokenizer a GGUF file describes in its metadata.

    Args:
      path_or_reader: a ``.gguf`` path, a ``gguf_loader.GGUFFile`` or a
        ``gguf.GGUFReader``.

    Raises:
      ValueError: naming the file, for a missing vocabulary or an unknown
        ``tokenizer.ggml.pre``.
      NotImplementedError: for tokenizer models other than ``gpt2`` and
        ``llama`` (e.g. ``t5`` unigram, ``bert`` WordPiece, RWKV).
    """
    from fedjax_u2s.models import gguf_loader  # Lazy: keeps jax out of plain use.
    gf = gguf_loader.as_gguf_file(path_or_reader)
    md, path = gf.metadata, gf.path
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
      raise ValueError(f"{path}: no tokenizer in the GGUF metadata "
                       "(tokenizer.ggml.model / tokenizer.ggml.tokens missing).")
    types = md.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
      raise ValueError(f"{path}: {len(tokens)} tokens but {len(types)} token types.")
    if kind == "gpt2":
      hf = _byte_level_bpe(md, tokens, types, path)
      add_bos_default = False
    elif kind == "llama":
      hf = _sentencepiece_bpe(md, tokens, types, path)
      add_bos_default = True  # llama.cpp's default for SPM vocabularies.
    else:
      raise NotImplementedError(
          f"{path}: tokenizer.ggml.model={kind!r} is not implemented (only 'gpt2' "
          "byte-level BPE and 'llama' sentencepiece BPE); load the model's "
          "tokenizer.json with Tokenizer.from_file instead.")

    def token(key):
      i = md.get(f"tokenizer.ggml.{key}")
      if i is None:
        return None
      if not 0 <= int(i) < len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.{key}={i} is outside the "
                         f"vocabulary of {len(tokens)}.")
      return tokens[int(i)]

    add_bos = md.get("tokenizer.ggml.add_bos_token", add_bos_default)
    extra = [md.get(f"tokenizer.ggml.{k}") for k in ("eot_token_id", "eom_token_id")]
    template = md.get("tokenizer.chat_template")
    if template is None and gf.architecture == "gemma3":
      template = GEMMA3_CHAT_TEMPLATE  # Gemma 3 files ship none; see above.
    return cls(hf, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
               pad_token=token("padding_token_id"), unk_token=token("unknown_token_id"),
               add_bos=bool(add_bos), chat_template=template,
               extra_eos_ids=[e for e in extra if e is not None], name=path)

  def save(self, directory: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` to ``directory``.

    :meth:`from_file` on the directory gives back an equivalent tokenizer.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    self.hf.save(os.path.join(directory, "tokenizer.json"))
    cfg = {"bos_token": self.bos_token, "eos_token": self.eos_token,
           "pad_token": self.pad_token, "unk_token": self.unk_token,
           "add_bos_token": self.add_bos, "chat_template": self.chat_template,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(directory, "tokenizer_config.json"), "w",
              encoding="utf-8") as f:
      json.dump({k: v for k, v in cfg.items() if v is not None}, f, indent=2,
                ensure_ascii=False)

  # --------------------------------------------------------------------------
  # Encoding and decoding.

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included."""
    return self.hf.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Text -> ids; prepends BOS when ``add_bos`` (default: ``self.add_bos``)
    unless the text already starts with it (a chat template that writes
    ``{{ bos_token }}``, as Gemma's does): one BOS, never two."""
    ids = self.hf.encode(text, add_special_tokens=False).ids
    return self._with_bos(ids, add_bos)

  def encode_batch(self, texts: Sequence[str],
                   add_bos: bool | None = None) -> list[list[int]]:
    """Several texts at once (in parallel inside ``tokenizers``)."""
    encs = self.hf.encode_batch(list(texts), add_special_tokens=False)
    return [self._with_bos(e.ids, add_bos) for e in encs]

  def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
    add = self.add_bos if add_bos is None else add_bos
    if add:
      if self.bos_id is None:
        raise ValueError(f"{self.name or 'tokenizer'}: add_bos=True but the "
                         "tokenizer has no BOS token.")
      if list(ids[:1]) == [self.bos_id]:
        return list(ids)
      return [self.bos_id] + list(ids)
    return list(ids)

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Ids -> text (special tokens dropped unless ``skip_special_tokens=False``)."""
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_bytes(self) -> list[bytes]:
    """The exact bytes each id stands for, indexed by id (cached).

    Byte-level BPE: the GPT-2 byte map of the token (a token with characters
    outside that alphabet, as some added tokens have, is its UTF-8, as the
    ``ByteLevel`` decoder does). Sentencepiece: ``<0xNN>`` byte tokens are that
    byte, ``▁`` is a space. Decoding a sequence of ids equals the (lossy)
    UTF-8 decoding of the concatenated bytes -- exactly for byte-level BPE;
    for sentencepiece up to the leading space the decoder strips.

    Raises:
      NotImplementedError: for a decoder this cannot mirror exactly.
    """
    if self._token_bytes is None:
      self._token_bytes = self._compute_token_bytes()
    return self._token_bytes

  def _compute_token_bytes(self) -> list[bytes]:
    spec = json.loads(self.hf.to_str())
    dec = spec.get("decoder") or {}
    steps = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
    types = [s.get("type") for s in steps]
    n = self.vocab_size
    tokens = [self.hf.id_to_token(i) for i in range(n)]
    if types == ["ByteLevel"]:
      rev = _unicode_to_bytes()
      out = []
      for t in tokens:
        t = t or ""
        try:
          out.append(bytes(rev[c] for c in t))
        except KeyError:  # Mirrors ByteLevel.decode: such tokens pass as UTF-8.
          out.append(t.encode("utf-8", "surrogateescape"))
      return out
    if "ByteFallback" in types and any(
        s.get("type") == "Replace" and s.get("content") == " " for s in steps):
      out = []
      for t in tokens:
        t = t or ""
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
          try:
            out.append(bytes([int(t[3:5], 16)]))
            continue
          except ValueError:
            pass
        out.append(t.replace("\u2581", " ").encode("utf-8", "surrogateescape"))
      return out
    raise NotImplementedError(
        f"{self.name or 'tokenizer'}: token_bytes() mirrors ByteLevel and "
        f"sentencepiece byte-fallback decoders only, not {types}.")

  # --------------------------------------------------------------------------
  # Chat template.

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True, **kwargs) -> str:
    """Renders a conversation as ``transformers`` would (``tokenize=False``).

    Args:
      messages: ``[{"role": ..., "content": ...}, ...]``.
      add_generation_prompt: end with the header of an assistant turn.
      **kwargs: extra template variables (``tools``, ``documents``, and any
        template-specific flag); they override the special-token variables.

    Returns:
      The prompt text. Encode it with ``encode(prompt, add_bos=False)`` when the
      template writes the BOS token itself.

    Raises:
      ValueError: if the tokenizer has no chat template or ``messages`` is empty.
      jinja2.TemplateError: from the template's own ``raise_exception``.
    """
    if not self.chat_template:
      raise ValueError(f"{self.name or 'tokenizer'} has no chat template.")
    if not messages:
      raise ValueError("apply_chat_template needs at least one message.")
    if self._template is None:
      self._template = _compile_template(self.chat_template)
    # transformers drops None-valued keys (e.g. content=None with tool calls).
    chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    variables = {k: v for k, v in (("bos_token", self.bos_token),
                                   ("eos_token", self.eos_token),
                                   ("unk_token", self.unk_token),
                                   ("pad_token", self.pad_token)) if v is not None}
    variables.update(kwargs)
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    return self._template.render(messages=chat,
                                 add_generation_prompt=add_generation_prompt,
                                 **variables)


SPM_FILE = "tokenizer.model"


def has_tokenizer(directory: str | os.PathLike) -> bool:
  """Whether a model directory holds a tokenizer :meth:`Tokenizer.from_file`
  reads (``tokenizer.json`` or a sentencepiece ``tokenizer.model``)."""
  directory = os.fspath(directory)
  return any(os.path.isfile(os.path.join(directory, f))
             for f in ("tokenizer.json", SPM_FILE))


def _tokenizer_config(directory: str) -> tuple[dict[str, Any], str | None]:
  """(tokenizer_config.json as a dict or {}, the chat template or None)."""
  cfg: dict[str, Any] = {}
  cfg_file = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(cfg_file):
    try:
      with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{cfg_file}: not valid JSON (line {e.lineno}): {e.msg}") from e
  template = _pick_template(cfg.get("chat_template"))
  jinja_file = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja_file):
    with open(jinja_file, encoding="utf-8") as f:
      template = f.read()
  return cfg, template


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    b = buf[pos]
    pos += 1
    value |= (b & 0x7F) << shift
    if b < 0x80:
      return value, pos
    shift += 7


def _proto_fields(buf: bytes):
  """(field number, wire type, value) of a protobuf message, in order.

  Just enough protobuf to read a sentencepiece ModelProto without the
  generated ``sentencepiece_model_pb2`` (which needs a matching protobuf
  runtime): varints, 32/64-bit words and length-delimited bytes.
  """
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 2:
      n, pos = _varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield field, wire, value


def _read_spm_proto(buf: bytes) -> dict[str, Any]:
  """The parts of a sentencepiece ModelProto the rebuild needs.

  ModelProto: 1 pieces {1 piece, 2 score, 3 type}, 2 trainer_spec
  {3 model_type}, 3 normalizer_spec {1 name, 3 add_dummy_prefix,
  4 remove_extra_whitespaces}; proto2 defaults where a field is absent.
  Piece types use the numbers llama.cpp's token_type copies (NORMAL 1 ...).
  """
  types: list[int] = []
  out = {"types": types, "model_type": 1, "normalizer": "",
         "add_dummy_prefix": True, "remove_extra_whitespaces": True}
  for field, _, value in _proto_fields(buf):
    if field == 1:
      kind = _NORMAL
      for f, _, v in _proto_fields(value):
        if f == 3:
          kind = v
      types.append(kind)
    elif field == 2:
      for f, _, v in _proto_fields(value):
        if f == 3:
          out["model_type"] = v
    elif field == 3:
      for f, _, v in _proto_fields(value):
        if f == 1:
          out["normalizer"] = v.decode("utf-8")
        elif f == 3:
          out["add_dummy_prefix"] = bool(v)
        elif f == 4:
          out["remove_extra_whitespaces"] = bool(v)
  return out


def _pick_template(template) -> str | None:
  """tokenizer_config's chat_template: a string, or a list of named ones."""
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template}
    return named.get("default") or next(iter(named.values()), None)
  return template


def _compile_template(source: str):
  """Compiles a chat template in a jinja2 environment like transformers'."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes, which a prompt must not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)


# ----------------------------------------------------------------------------
# Building tokenizers from GGUF metadata.


def _added_tokens(tokens: Sequence[str], types: Sequence[int],
                  alphabet: set[str] | None) -> tuple[list[AddedToken], list[AddedToken]]:
  """(special, plain) added tokens: CONTROL and USER_DEFINED entries."""
  special, plain = [], []
  for t, ty in zip(tokens, types):
    if ty == _CONTROL:
      # In a byte-level vocabulary a "control" token with characters outside
      # the byte alphabet is a converter mislabel (transformers skips it too).
      if alphabet is None or set(t) <= alphabet:
        special.append(AddedToken(t, special=True, normalized=False))
    elif ty == _USER_DEFINED:
      plain.append(AddedToken(t, special=False, normalized=False))
  return special, plain


def _finish(hf: tokenizers.Tokenizer, tokens, types, alphabet, path: str):
  special, plain = _added_tokens(tokens, types, alphabet)
  if special:
    hf.add_special_tokens(special)
  if plain:
    hf.add_tokens(plain)
  size = hf.get_vocab_size(with_added_tokens=True)
  if size != len(tokens):
    raise ValueError(f"{path}: rebuilt tokenizer has {size} ids but the file lists "
                     f"{len(tokens)} tokens (duplicate tokens in the vocabulary?).")
  return hf


def _vocab(tokens: Sequence[str], path: str) -> dict[str, int]:
  vocab: dict[str, int] = {}
  for i, t in enumerate(tokens):
    if t in vocab:
      raise ValueError(f"{path}: token {t!r} appears twice in tokenizer.ggml.tokens "
                       f"(ids {vocab[t]} and {i}); cannot build a BPE vocabulary.")
    vocab[t] = i
  return vocab


def _merges(raw: Sequence[str], path: str) -> list[tuple[str, str]]:
  out = []
  for m in raw:
    parts = m.split(" ")
    if len(parts) != 2:
      raise ValueError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges.")
    out.append((parts[0], parts[1]))
  return out


def _byte_level_bpe(md: Mapping[str, Any], tokens, types, path: str):
  pre = md.get("tokenizer.ggml.pre", "default")
  if pre not in _BYTE_LEVEL_PRE:
    raise ValueError(
        f"{path}: tokenizer.ggml.pre={pre!r} is not a known byte-level "
        f"pre-tokenizer (known: {sorted(_BYTE_LEVEL_PRE)}); its split regex "
        "decides the ids, so it is not guessed.")
  make_pre, make_norm, ignore_merges = _BYTE_LEVEL_PRE[pre]
  merges = md.get("tokenizer.ggml.merges")
  if merges is None:
    raise ValueError(f"{path}: byte-level BPE without tokenizer.ggml.merges.")
  hf = tokenizers.Tokenizer(models.BPE(
      vocab=_vocab(tokens, path), merges=_merges(merges, path), dropout=None,
      fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
  if make_norm is not None:
    hf.normalizer = make_norm()
  hf.pre_tokenizer = make_pre()
  hf.decoder = decoders.ByteLevel()
  return _finish(hf, tokens, types, set(bytes_to_unicode().values()), path)


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float],
                        vocab: Mapping[str, int]) -> list[tuple[str, str]]:
  """Sentencepiece BPE merges implied by the vocabulary, best piece first.

  The same reconstruction as transformers' ``generate_merges``: every split of
  a piece into two vocabulary pieces is a merge, ranked by the score of the
  piece it produces.
  """
  merges = []
  for piece, score in zip(tokens, scores):
    local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
             if piece[:i] in vocab and piece[i:] in vocab]
    local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.extend(local)
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(a, b) for a, b, _ in merges]


def _sentencepiece_bpe(md: Mapping[str, Any], tokens, types, path: str):
  vocab = _vocab(tokens, path)
  if md.get("tokenizer.ggml.merges") is not None:
    merges = _merges(md["tokenizer.ggml.merges"], path)
  else:
    scores = md.get("tokenizer.ggml.scores")
    if scores is None:
      raise ValueError(f"{path}: sentencepiece vocabulary with neither merges nor "
                       "scores.")
    merges = _merges_from_scores(tokens, scores, vocab)
  unk = md.get("tokenizer.ggml.unknown_token_id")
  hf = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True,
      unk_token=None if unk is None else tokens[int(unk)]))
  prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
  # Llama-2's own tokenizer.json layout: spaces become "▁" in a normalizer that
  # also prepends one, on every piece of text between added tokens. Unlike a
  # Metaspace pre-tokenizer (which skips the prefix when the text already
  # starts with a space) this gives sentencepiece's ids for "  x", and
  # llama.cpp's after special tokens.
  steps = [normalizers.Replace(" ", "\u2581")]
  if prefix:
    steps.insert(0, normalizers.Prepend("\u2581"))
  hf.normalizer = normalizers.Sequence(steps)
  hf.pre_tokenizer = None
  steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
  if prefix:
    steps.append(decoders.Strip(content=" ", left=1, right=0))
  hf.decoder = decoders.Sequence(steps)
  return _finish(hf, tokens, types, None, path)
