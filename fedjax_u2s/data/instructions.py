"""Instruction data: readers for local files and chat-template tokenization.

Readers
-------
:func:`read_instructions` loads LOCAL JSON, JSONL, Parquet or CSV files with
Hugging Face ``datasets`` (the packaged ``json``/``parquet``/``csv`` builders;
never the hub) and normalises every row to an :class:`Example`: a tuple of chat
messages whose last one is the assistant response, plus a ``meta`` dict.

Formats (canonical field names; a ``fields`` mapping -- ``config.data.fields``
-- names the columns that play them in odd files, e.g.
``{"instruction": "prompt", "response": "completion"}``):

* ``alpaca``: ``instruction``, optional ``input``, ``output``, optional
  ``category``.
* ``dolly``: ``instruction``, optional ``context``, ``response``, optional
  ``category``.
* ``chat``: ``messages`` (a list of ``{"role", "content"}``, the last one from
  the assistant), optional ``category``.
* ``auto``: the first of chat, dolly, alpaca whose required columns are all
  present.

``fields`` keys are the roles ``instruction``, ``input``, ``response``,
``category``, ``messages`` (``output`` and ``context`` are the Alpaca / Dolly
spellings of ``response`` and ``input`` and work as aliases); empty values mean
"the canonical name".

Alpaca and Dolly rows become one user turn and one assistant turn. The user
turn is the instruction alone, or ``instruction + "\\n\\n" + input`` (Alpaca)
/ ``instruction + "\\n\\n" + context`` (Dolly) when the input/context is
non-empty (after stripping whitespace). Rows whose response is missing or
blank are skipped, never silently: :attr:`InstructionData.drops` (a
:class:`DropReport`) counts them by reason, and :func:`log_drops` logs the
count, with a warning when more than :data:`DROP_WARNING_FRACTION` of the rows
went.

Tokenization
------------
:func:`tokenize` renders each example with the tokenizer's chat template. The
prompt (all messages but the last, with the assistant generation header) and
the full conversation are rendered; the full text must start with the prompt
text. The prompt and the remainder are encoded separately, so the boundary
between "context" and "target" is exact, and ``loss_mask`` is True on the
remainder's tokens up to and including the last end-of-turn token
(``tokenizer.eos_ids``, e.g. ``<|im_end|>``) -- whatever the template writes
after it (SmolLM2: a newline) stays in the input but is not a target, since
generation stops at the end-of-turn token. ``loss_mask[t]`` means "``tokens[t]``
is a target predicted from ``tokens[:t]``". Examples left without a target
(prompt of ``max_length`` tokens or more, or a response that encodes to
nothing) are dropped and counted by reason in ``TokenizedSet.drops``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import tempfile
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import numpy as np

# Canonical fields of each format: (required, optional).
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "alpaca": (("instruction", "output"), ("input", "category")),
    "dolly": (("instruction", "response"), ("context", "category")),
    "chat": (("messages",), ("category",)),
}
# Order in which ``auto`` tries the formats.
_AUTO_ORDER = ("chat", "dolly", "alpaca")
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet",
             ".csv": "csv"}
_ROLES = ("system", "user", "assistant", "tool")
# Roles ``fields`` may map (the keys of ``config.data.fields``) and the
# spellings of the same role in the other formats.
FIELD_ROLES = ("instruction", "input", "response", "category", "messages")
_ALIASES = {"output": "response", "context": "input"}

# Drop reasons (the keys of ``DropReport.dropped``).
MISSING_RESPONSE = "missing_response"    # reader: no value in the response column
EMPTY_RESPONSE = "empty_response"        # reader: blank response; tokenize: no tokens
PROMPT_TOO_LONG = "prompt_too_long"      # tokenize: prompt >= max_length tokens
# What to do about each reason (said in warnings and errors).
_HINTS = {
    MISSING_RESPONSE: "is the response in another column? map it with "
                      "config.data.fields (fields=), e.g. response=<column>",
    EMPTY_RESPONSE: "fill in or remove those rows",
    PROMPT_TOO_LONG: "raise config.train.max_length or shorten the prompts",
}
# More than this share of rows dropped -> logging.warning, not info.
DROP_WARNING_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class DropReport:
  """How many rows a reader or tokenizer read, kept, and dropped, by reason.

  Attributes:
    what: what was read, for messages ("rows of data.jsonl", "examples
      tokenized with max_length=512").
    read: rows (examples, files) in.
    kept: rows out.
    dropped: reason -> count, reasons with a zero count included, so the
      shape is stable; ``read == kept + sum(dropped.values())``.
  """
  what: str
  read: int
  kept: int
  dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)

  @property
  def num_dropped(self) -> int:
    return int(sum(self.dropped.values()))

  @property
  def fraction_dropped(self) -> float:
    return self.num_dropped / self.read if self.read else 0.0

  def as_dict(self) -> dict:
    """``{"read": int, "kept": int, "dropped": {reason: int}}`` (JSON-ready)."""
    return {"read": int(self.read), "kept": int(self.kept),
            "dropped": {k: int(v) for k, v in self.dropped.items()}}

  def flat(self, prefix: str = "") -> dict[str, int]:
    """Flat ints: ``read``, ``kept``, ``dropped_<reason>`` (for stats dicts
    whose values must all be ints)."""
    out = {f"{prefix}read": int(self.read), f"{prefix}kept": int(self.kept)}
    out.update({f"{prefix}dropped_{k}": int(v) for k, v in self.dropped.items()})
    return out

  def reasons(self) -> str:
    """The non-zero reasons: ``"30 missing_response, 2 empty_response"``."""
    return ", ".join(f"{v} {k}" for k, v in self.dropped.items() if v)

  def summary(self) -> str:
    """One console line: "read 40 rows of x.jsonl, kept 10; dropped 30
    (75.0%): 30 missing_response"."""
    line = f"read {self.read} {self.what}, kept {self.kept}"
    if self.num_dropped:
      line += (f"; dropped {self.num_dropped} ({100 * self.fraction_dropped:.1f}%)"
               f": {self.reasons()}")
    return line

  def note(self) -> str:
    """For error messages: what was dropped and what to do about it ("" when
    nothing was)."""
    if not self.num_dropped:
      return ""
    hints = "; ".join(f"{k}: {_HINTS[k]}" for k, v in self.dropped.items()
                      if v and k in _HINTS)
    return (f"{self.num_dropped} of {self.read} {self.what} were dropped "
            f"({self.reasons()})" + (f" -- {hints}" if hints else ""))

  def __add__(self, other: "DropReport") -> "DropReport":
    dropped = dict(self.dropped)
    for k, v in other.dropped.items():
      dropped[k] = dropped.get(k, 0) + v
    what = self.what if self.what == other.what else f"{self.what} + {other.what}"
    return DropReport(what, self.read + other.read, self.kept + other.kept,
                      dropped)


def log_drops(report: DropReport, *, context: str = "",
              threshold: float = DROP_WARNING_FRACTION) -> str:
  """Logs ``report`` (a warning above ``threshold`` dropped) and returns its
  :meth:`DropReport.summary` line for the console.

  Args:
    report: the counts.
    context: prefixed to the message ("client 3").
    threshold: share of dropped rows above which the message is a
      ``logging.warning`` (with the percentage and what to do) instead of
      ``logging.info``.
  """
  line = (f"{context}: " if context else "") + report.summary()
  if report.fraction_dropped > threshold:
    logging.warning("%.1f%% DROPPED: %s. %s.", 100 * report.fraction_dropped,
                    line, report.note())
  else:
    logging.info("%s.", line)
  return line


@dataclasses.dataclass(frozen=True)
class Example:
  """One conversation to train on.

  Attributes:
    messages: ``({"role": ..., "content": ...}, ...)``; the last message is the
      assistant response (the training target).
    meta: provenance and labels: ``source`` (file), ``row`` (0-based row in
      that file), ``category`` when the data has one, and any requested
      ``meta_fields``.
  """
  messages: tuple[dict, ...]
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def response(self) -> str:
    """The content of the last (assistant) message."""
    return self.messages[-1]["content"]


@dataclasses.dataclass(frozen=True)
class InstructionData:
  """Examples read from one or more files, with what was skipped.

  Attributes:
    examples: the kept examples, file by file in row order.
    sources: the files read.
    formats: the format used for each file (``auto`` resolved).
    num_rows: rows read in all.
    num_skipped: rows skipped because their response was missing or blank.
    drops: the same counts by reason (:data:`MISSING_RESPONSE`,
      :data:`EMPTY_RESPONSE`).
  """
  examples: tuple[Example, ...]
  sources: tuple[str, ...]
  formats: tuple[str, ...]
  num_rows: int
  num_skipped: int
  drops: DropReport | None = None

  def __len__(self) -> int:
    return len(self.examples)

  def __iter__(self):
    return iter(self.examples)

  def __getitem__(self, i):
    return self.examples[i]


def default_cache_dir() -> str:
  """Where ``datasets`` keeps its Arrow cache for local files (not ~/.cache)."""
  return os.environ.get("FEDJAX_U2S_DATASETS_CACHE") or os.path.join(
      tempfile.gettempdir(), "fedjax_u2s_datasets_cache")


def _blank(path: str, binary: bool) -> bool:
  """Whether a file is empty (text files: only whitespace)."""
  if binary:
    return os.path.getsize(path) == 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 16):
      if chunk.strip():
        return False
  return True


def _load_rows(path: str, cache_dir: str | None) -> list[dict]:
  """Rows of a local file as dicts, through ``datasets``' packaged builders."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in _BUILDERS:
    raise ValueError(f"{path}: unsupported file type {ext!r}; use one of "
                     f"{sorted(_BUILDERS)}.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Instruction file {path} does not exist.")
  if _blank(path, binary=_BUILDERS[ext] == "parquet"):
    raise ValueError(f"Instruction file {path} is empty.")
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import datasets  # pylint: disable=g-import-not-at-top  (slow import)
  try:
    ds = datasets.load_dataset(_BUILDERS[ext], data_files=os.path.abspath(path),
                               split="train",
                               cache_dir=cache_dir or default_cache_dir())
  except StopIteration:  # The json builder on a file with no records.
    raise ValueError(f"Instruction file {path} has no rows.") from None
  except Exception as e:  # pylint: disable=broad-except  (name the file)
    raise ValueError(f"{path}: datasets' {_BUILDERS[ext]!r} builder could not "
                     f"read it: {type(e).__name__}: {e}") from e
  if len(ds) == 0:
    raise ValueError(f"Instruction file {path} has no rows.")
  return ds.to_list()


def _missing(v: Any) -> bool:
  return v is None or (isinstance(v, float) and math.isnan(v))


def _text(v: Any) -> str:
  """A cell as text: missing (None, CSV's NaN) -> ''."""
  return "" if _missing(v) else str(v)


def _normalize_fields(fields: Any) -> dict[str, str]:
  """``fields`` (a dict or ConfigDict) without empty values, roles checked."""
  if fields is None:
    return {}
  if hasattr(fields, "to_dict"):
    fields = fields.to_dict()
  fields = {str(k): str(v) for k, v in dict(fields).items() if v}
  known = set(FIELD_ROLES) | set(_ALIASES)
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.data.fields (fields=) maps unknown role(s) "
                     f"{unknown}; the roles are {list(FIELD_ROLES)} (aliases "
                     f"{sorted(_ALIASES)}), each mapped to a column name.")
  return fields


def _spellings(f: str) -> tuple[str, ...]:
  """``f`` and the other formats' names of its role ("output" <-> "response")."""
  role = _ALIASES.get(f, f)
  return (f,) + tuple(x for x in (role, *[a for a, r in _ALIASES.items()
                                         if r == role]) if x != f)


def _column(fields: Mapping[str, str], f: str,
            present: Iterable[str] = ()) -> str:
  """The column that plays canonical field ``f``: the ``fields`` mapping of
  any spelling of its role; else ``f`` itself, or (given the ``present``
  columns; used for optional fields) another spelling of the role that is a
  column (an Alpaca file's ``input`` read as Dolly's ``context``)."""
  names = _spellings(f)
  for name in names:
    if name in fields:
      return fields[name]
  present = set(present)
  return next((name for name in names if name in present), f)


_FIELDS_HINT = ("Set config.data.format and map the columns with "
                "config.data.fields (fields= in load_examples), e.g. "
                "--config.data.fields.instruction=prompt "
                "--config.data.fields.response=completion")


def detect_format(columns: Iterable[str],
                  fields: Mapping[str, str] | None = None) -> str:
  """The first of chat, dolly, alpaca whose required columns are present.

  Raises:
    ValueError: none matches; lists the columns and what each format needs.
  """
  cols = set(columns)
  fields = _normalize_fields(fields)
  # Mapping Alpaca's spelling "output" asks for Alpaca first.
  order = ("chat", "alpaca", "dolly") if "output" in fields else _AUTO_ORDER
  for fmt in order:
    if all(_column(fields, f) in cols for f in FORMATS[fmt][0]):
      return fmt
  need = "; ".join(f"{fmt}: {[_column(fields, f) for f in FORMATS[fmt][0]]}"
                   for fmt in _AUTO_ORDER)
  raise ValueError(f"Cannot detect the instruction format from columns "
                   f"{sorted(cols)}; each format needs ({need}). "
                   f"{_FIELDS_HINT}.")


def _row_example(fmt: str, row: dict, col: Mapping[str, str], path: str,
                 i: int, present: list[str], parts: bool = False) -> Example | str:
  """One row -> Example, or the drop reason when its response is missing or
  blank. ``parts``: Alpaca / Dolly rows also keep ``meta["instruction"]`` and
  ``meta["input"]`` (the input or context, "" when none) apart."""

  def get(field, required):
    v = row.get(col[field])
    if required and _missing(v):
      raise ValueError(f"{path}, row {i}: field {col[field]!r} is missing "
                       f"(format {fmt!r}; columns present: {present}).")
    return v

  meta: dict[str, Any] = {"source": path, "row": i}
  if "category" in col and not _missing(row.get(col["category"])):
    meta["category"] = _text(row[col["category"]])
  if fmt == "chat":
    msgs = get("messages", True)
    if not isinstance(msgs, (list, tuple)) or not msgs:
      raise ValueError(f"{path}, row {i}: field {col['messages']!r} must be a "
                       f"non-empty list of {{role, content}} messages.")
    out = []
    for j, m in enumerate(msgs):
      if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
        raise ValueError(f"{path}, row {i}: message {j} of {col['messages']!r} "
                         "needs 'role' and 'content'.")
      if m["role"] not in _ROLES:
        raise ValueError(f"{path}, row {i}: message {j} has role {m['role']!r}; "
                         f"expected one of {_ROLES}.")
      out.append({"role": m["role"], "content": _text(m["content"])})
    if out[-1]["role"] != "assistant":
      raise ValueError(f"{path}, row {i}: the last message must be the "
                       f"assistant's response, not {out[-1]['role']!r}.")
    if len(out) < 2:
      raise ValueError(f"{path}, row {i}: a conversation needs a prompt before "
                       "the assistant's response.")
    if _missing(msgs[-1]["content"]):
      return MISSING_RESPONSE
    if not out[-1]["content"].strip():
      return EMPTY_RESPONSE
    return Example(tuple(out), meta)
  resp_field, extra_field = (("output", "input") if fmt == "alpaca"
                             else ("response", "context"))
  instruction = _text(get("instruction", True)).strip()
  extra = _text(get(extra_field, False) if extra_field in col else None).strip()
  raw_response = get(resp_field, False)
  if _missing(raw_response):
    return MISSING_RESPONSE
  response = _text(raw_response)
  if not response.strip():
    return EMPTY_RESPONSE
  user = instruction + "\n\n" + extra if (instruction and extra) else (
      instruction or extra)
  if not user:
    raise ValueError(f"{path}, row {i}: field {col['instruction']!r} is empty "
                     "(and there is no input/context): nothing to prompt with.")
  if parts:
    meta["instruction"], meta["input"] = instruction, extra
  return Example(({"role": "user", "content": user},
                  {"role": "assistant", "content": response}), meta)


def read_instructions(paths: str | os.PathLike | Sequence[str | os.PathLike],
                      format: str = "auto",  # pylint: disable=redefined-builtin
                      fields: Mapping[str, str] | None = None,
                      meta_fields: Sequence[str] = (),
                      cache_dir: str | None = None,
                      parts: bool = False) -> InstructionData:
  """Reads instruction data from local files.

  Args:
    paths: one file or several (``.json``, ``.jsonl``, ``.parquet``, ``.csv``).
    format: ``alpaca``, ``dolly``, ``chat`` or ``auto`` (per file).
    fields: role -> column name in the files, e.g. ``{"instruction":
      "prompt", "response": "completion"}`` (``config.data.fields``; roles
      :data:`FIELD_ROLES`, with ``output``/``context`` as aliases of
      ``response``/``input``; empty values are ignored).
    meta_fields: more columns to copy into ``Example.meta`` (e.g. a client id
      column for natural partitioning); each must exist in every file.
    cache_dir: ``datasets``' cache; defaults to :func:`default_cache_dir`.
    parts: Alpaca and Dolly rows also keep the instruction and the
      input/context apart, as ``meta["instruction"]`` and ``meta["input"]``
      ("" when none): the U2S demonstration pool shows the context as the
      source passage (:func:`fedjax_u2s.u2s.pool.load_pool`).

  Returns:
    The examples and the counts of rows read and skipped
    (:attr:`InstructionData.drops`, also logged by :func:`log_drops`: a
    warning when more than :data:`DROP_WARNING_FRACTION` of the rows went).

  Raises:
    FileNotFoundError: a file does not exist.
    ValueError: unsupported file type; empty file; a required or requested
      column missing from the file (names the field, the file and the columns
      present) or from a row (also names the 0-based row); a format that
      cannot be detected.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [os.fspath(p) for p in paths]
  if not paths:
    raise ValueError("read_instructions needs at least one file.")
  if format != "auto" and format not in FORMATS:
    raise ValueError(f"Unknown instruction format {format!r}; use one of "
                     f"{sorted(FORMATS) + ['auto']}.")
  fields = _normalize_fields(fields)
  examples, formats, num_rows = [], [], 0
  dropped = {MISSING_RESPONSE: 0, EMPTY_RESPONSE: 0}
  for path in paths:
    rows = _load_rows(path, cache_dir)
    present = list(rows[0].keys())
    try:
      fmt = detect_format(present, fields) if format == "auto" else format
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
    required, optional = FORMATS[fmt]
    for f in required:
      if _column(fields, f) not in present:
        role = _ALIASES.get(f, f)
        raise ValueError(f"{path}: field {_column(fields, f)!r} (the {fmt} "
                         f"format's {f!r}) is not a column; columns present: "
                         f"{present}. Map it with config.data.fields (fields= "
                         f"in load_examples), e.g. "
                         f"--config.data.fields.{role}=<column>.")
    for f in meta_fields:
      if f not in present:
        raise ValueError(f"{path}: meta field {f!r} is not a column; columns "
                         f"present: {present}.")
    col = {f: _column(fields, f) for f in required}
    col.update({f: _column(fields, f, present) for f in optional
                if _column(fields, f, present) in present})
    for i, row in enumerate(rows):
      ex = _row_example(fmt, row, col, path, i, present, parts)
      if isinstance(ex, str):
        dropped[ex] += 1
        continue
      for f in meta_fields:
        ex.meta[f] = None if _missing(row.get(f)) else row.get(f)
      examples.append(ex)
    formats.append(fmt)
    num_rows += len(rows)
  what = "rows of " + (paths[0] if len(paths) == 1 else f"{len(paths)} files")
  drops = DropReport(what, num_rows, len(examples), dropped)
  log_drops(drops)
  return InstructionData(tuple(examples), tuple(paths), tuple(formats),
                         num_rows, drops.num_dropped, drops)


class Examples(list):
  """A list of :class:`Example` with the reader's :class:`DropReport` as
  ``.drops`` (a plain list otherwise; slicing or copying drops the report)."""

  def __init__(self, examples: Iterable[Example] = (),
               drops: DropReport | None = None):
    super().__init__(examples)
    self.drops = drops


def load_examples(paths: str | os.PathLike | Sequence[str | os.PathLike],
                  format: str = "auto",  # pylint: disable=redefined-builtin
                  fields: Mapping[str, str] | None = None,
                  meta_fields: Sequence[str] = (),
                  cache_dir: str | None = None) -> Examples:
  """:func:`read_instructions`, returning the examples as a list.

  The list is an :class:`Examples`: ``load_examples(...).drops`` is the
  :class:`DropReport` (rows read, kept, dropped by reason).
  """
  data = read_instructions(paths, format=format, fields=fields,
                           meta_fields=meta_fields, cache_dir=cache_dir)
  return Examples(data.examples, data.drops)


# ----------------------------------------------------------------------------
# Tokenization.


@dataclasses.dataclass(frozen=True)
class TokenizedSet:
  """Tokenized examples, right-padded to one length.

  Attributes:
    tokens: int32 [N, T]; ``pad_id`` after each sequence.
    input_mask: bool [N, T]; True on real tokens.
    loss_mask: bool [N, T]; True where ``tokens[t]`` is a target predicted
      from ``tokens[:t]`` (the response and its end-of-turn token).
    pad_id: the padding id.
    source_index: int64 [N]; index of each row in the examples given to
      :func:`tokenize` (dropped examples leave gaps).
    num_truncated: examples cut at ``max_length`` (kept or dropped).
    num_dropped: examples with no response token left after truncation.
    num_response_tokens: ``loss_mask.sum()``.
    drops: examples in, kept, and dropped by reason
      (:data:`PROMPT_TOO_LONG`, :data:`EMPTY_RESPONSE`); None for a subset.
  """
  tokens: np.ndarray
  input_mask: np.ndarray
  loss_mask: np.ndarray
  pad_id: int
  source_index: np.ndarray
  num_truncated: int = 0
  num_dropped: int = 0
  num_response_tokens: int = 0
  drops: DropReport | None = None

  @property
  def num_examples(self) -> int:
    """Number of kept examples (N)."""
    return int(self.tokens.shape[0])

  @property
  def max_length(self) -> int:
    return int(self.tokens.shape[1])

  @property
  def stats(self) -> dict[str, int]:
    """Flat ints: ``num_examples``, ``num_truncated``, ``num_dropped``,
    ``num_response_tokens``, and from :attr:`drops` ``read``, ``kept`` and
    ``dropped_<reason>`` for every reason (0 included)."""
    out = {"num_examples": self.num_examples,
           "num_truncated": self.num_truncated,
           "num_dropped": self.num_dropped,
           "num_response_tokens": self.num_response_tokens}
    if self.drops is not None:
      out.update(self.drops.flat())
    return out

  def __len__(self) -> int:
    return self.num_examples

  def subset(self, indices: Sequence[int] | np.ndarray) -> "TokenizedSet":
    """The rows ``indices`` (e.g. one client's partition), stats recomputed.

    ``num_truncated``/``num_dropped`` describe the whole set and become 0.
    """
    idx = np.asarray(indices, dtype=np.int64)
    loss = self.loss_mask[idx]
    return TokenizedSet(self.tokens[idx], self.input_mask[idx], loss,
                        self.pad_id, self.source_index[idx],
                        num_response_tokens=int(loss.sum()))


def _encoder(tokenizer):
  """``text -> ids`` without an automatic BOS, for any tokenizer object."""
  params = inspect.signature(tokenizer.encode).parameters
  batch = getattr(tokenizer, "encode_batch", None)
  if "add_bos" in params:
    if batch is not None:
      return lambda texts: batch(list(texts), add_bos=False)
    return lambda texts: [tokenizer.encode(t, add_bos=False) for t in texts]
  return lambda texts: [list(tokenizer.encode(t)) for t in texts]


def _template_name(tokenizer) -> str:
  return getattr(tokenizer, "name", "") or type(tokenizer).__name__


def render(example: Example | Sequence[Mapping[str, str]], tokenizer,
           system_prompt: str | None = None) -> tuple[str, str]:
  """The prompt text and the response text (the rest of the conversation).

  Args:
    example: an :class:`Example` or a message list ending with the response.
    tokenizer: anything with ``apply_chat_template(messages,
      add_generation_prompt=...)``.
    system_prompt: prepended as a system message when the conversation has
      none.

  Raises:
    ValueError: the full rendering does not start with the prompt rendering
      (a template that rewrites earlier turns); names the template.
  """
  msgs = list(example.messages if isinstance(example, Example) else example)
  if len(msgs) < 2 or msgs[-1].get("role") != "assistant":
    raise ValueError("An example needs a prompt and then the assistant's "
                     f"response as its last message; got roles "
                     f"{[m.get('role') for m in msgs]}.")
  if system_prompt is not None and msgs[0]["role"] != "system":
    msgs.insert(0, {"role": "system", "content": system_prompt})
  prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True)
  full = tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
  if not full.startswith(prompt):
    raise ValueError(
        f"The chat template of {_template_name(tokenizer)} renders a "
        "conversation that does not start with its own prompt (all messages "
        "but the last, with add_generation_prompt=True), so the response "
        f"boundary is ambiguous. Prompt: {prompt[-80:]!r}; full: "
        f"{full[:len(prompt) + 40][-120:]!r}.")
  return prompt, full[len(prompt):]


def tokenize(examples: Sequence[Example], tokenizer, max_length: int,
             system_prompt: str | None = None, *, name: str = "",
             log: bool = True) -> TokenizedSet:
  """Tokenizes examples through the chat template, with response-only loss.

  Args:
    examples: the examples (see :func:`read_instructions`).
    tokenizer: a :class:`fedjax_u2s.tokenizer.Tokenizer` (or anything with
      ``apply_chat_template``, ``encode``, ``pad_id`` and ``eos_ids``).
    max_length: T; longer sequences are cut from the right.
    system_prompt: a system message for conversations without one.
    name: names the set in the log line ("client 3", "eval").
    log: log the :class:`DropReport` (:func:`log_drops`: a warning when more
      than :data:`DROP_WARNING_FRACTION` of the examples were dropped).

  Returns:
    A :class:`TokenizedSet`; examples with no response token left after
    truncation are dropped (counted in ``num_dropped`` and, by reason, in
    ``drops``).
  """
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2, got {max_length}.")
  rendered = [render(ex, tokenizer, system_prompt) for ex in examples]
  encode = _encoder(tokenizer)
  prompt_ids = encode([p for p, _ in rendered])
  resp_ids = encode([r for _, r in rendered])
  eos = set(int(i) for i in getattr(tokenizer, "eos_ids", ()) or ())
  bos_id = getattr(tokenizer, "bos_id", None)
  bos_token = getattr(tokenizer, "bos_token", None)
  add_bos = bool(getattr(tokenizer, "add_bos", False)) and bos_id is not None
  pad_id = int(tokenizer.pad_id)

  n = len(examples)
  tokens = np.full((n, max_length), pad_id, np.int32)
  input_mask = np.zeros((n, max_length), bool)
  loss_mask = np.zeros((n, max_length), bool)
  keep, truncated = [], 0
  reasons = {PROMPT_TOO_LONG: 0, EMPTY_RESPONSE: 0}
  for i, ((prompt, _), p, r) in enumerate(zip(rendered, prompt_ids, resp_ids)):
    p, r = list(p), list(r)
    # The template usually writes BOS itself; add it only if it did not.
    if add_bos and not (bos_token and prompt.startswith(bos_token)) and (
        not p or p[0] != bos_id):
      p = [bos_id] + p
    # Targets: the response up to and including its last end-of-turn token.
    last = max((j for j, t in enumerate(r) if t in eos), default=len(r) - 1)
    seq = p + r
    target = [False] * len(p) + [j <= last for j in range(len(r))]
    if len(seq) > max_length:
      truncated += 1
      seq, target = seq[:max_length], target[:max_length]
    if not any(target):
      # Only two ways: the prompt fills max_length, or no response tokens.
      reasons[PROMPT_TOO_LONG if len(p) >= max_length else EMPTY_RESPONSE] += 1
      continue
    k = len(keep)
    tokens[k, :len(seq)] = seq
    input_mask[k, :len(seq)] = True
    loss_mask[k, :len(seq)] = target
    keep.append(i)
  m = len(keep)
  drops = DropReport(f"examples tokenized with max_length={max_length}", n, m,
                     reasons)
  if log and n:
    log_drops(drops, context=name)
  return TokenizedSet(tokens[:m], input_mask[:m], loss_mask[:m], pad_id,
                      np.asarray(keep, np.int64), num_truncated=truncated,
                      num_dropped=drops.num_dropped,
                      num_response_tokens=int(loss_mask[:m].sum()),
                      drops=drops)
