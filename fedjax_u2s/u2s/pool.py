"""The demonstration pool: (text, instruction, response) examples for few-shot U2S.

For every client piece, U2S retrieves the k demonstrations whose ``text`` is
most similar to the piece and shows them to the LLM as examples of turning a
passage into a grounded instruction-response pair. The packaged pool
(``u2s/data/example_pool.json``) is hand-written: short factual passages in
medicine, general knowledge and math, with a task a reader would ask and a
response grounded in the passage. Calculation entries also carry an
``expression`` (plain arithmetic) and its numeric ``answer``, so tests can
check every number.

A user pool is a JSON list of objects or a JSONL file with one object a line::

    {"id": "...", "text": "...", "instruction": "...", "response": "...",
     "domain": "medicine", "task_type": "definition"}

``domain`` (default "general") and ``task_type`` (default "other") are
optional; unknown fields are errors (typos), except ``meta`` (free-form).

A pool may also be an instruction dataset with thousands of rows: Alpaca,
Dolly or chat records in a JSON, JSONL, Parquet or CSV file, read by
:func:`fedjax_u2s.data.instructions.read_instructions` (its drop report
counts rows without a response). Each row becomes a demonstration whose
``text`` (the passage retrieved against and shown) is the row's input or
context when it has one, else its response: a row without a context is an
answer that holds its own facts, so the demonstration teaches a response
taken from the passage. ``instruction`` is the instruction alone (chat: the
last user turn), ``id`` is ``<file name>:<row>``, ``domain`` the row's
category (default "general"). ``format="auto"`` reads a JSON/JSONL file whose
first entry has a ``text`` field as demonstrations, anything else as
instruction data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from fedjax_u2s.data import instructions

DEFAULT_POOL = os.path.join(os.path.dirname(__file__), "data",
                            "example_pool.json")
# config.pool.format: our demonstration files, or instruction data formats.
FORMATS = ("auto", "demonstrations") + tuple(instructions.FORMATS)
_INSTRUCTION_EXTS = (".json", ".jsonl", ".parquet", ".csv")
DOMAINS = ("medicine", "general", "math")
TASK_TYPES = ("definition", "explanation", "reasoning", "summary", "calculation",
              "comparison", "list", "other")
REQUIRED = ("id", "text", "instruction", "response")
OPTIONAL = ("domain", "task_type", "expression", "answer", "meta")


@dataclasses.dataclass(frozen=True)
class Demonstration:
  """One few-shot example.

  Attributes:
    id: stable unique id (e.g. ``"med-003"``).
    domain: subject area (the packaged pool uses :data:`DOMAINS`).
    task_type: one of :data:`TASK_TYPES`.
    text: the source passage.
    instruction: a task answerable from ``text`` alone.
    response: the grounded answer.
    expression: calculation entries: arithmetic whose value is ``answer``.
    answer: calculation entries: the final number.
    meta: free-form extra fields.
  """
  id: str
  domain: str
  task_type: str
  text: str
  instruction: str
  response: str
  expression: str | None = None
  answer: float | None = None
  meta: dict = dataclasses.field(default_factory=dict)


def _read_entries(path: str) -> list[Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Demonstration pool {path!r} not found; pass a JSON list or JSONL "
        "file, or None for the packaged pool.")
  with open(path, encoding="utf-8") as f:
    raw = f.read()
  if path.endswith(".jsonl"):
    entries = []
    for line_no, line in enumerate(raw.splitlines(), 1):
      if not line.strip():
        continue
      try:
        entries.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {line_no} is not valid JSON ({e}).") from e
    return entries
  try:
    data = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); a pool is a JSON list of "
                     "objects or a .jsonl file.") from e
  if isinstance(data, dict) and isinstance(data.get("demonstrations"), list):
    data = data["demonstrations"]
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of demonstrations (or an "
                     "object with a 'demonstrations' list).")
  return data


def parse_entry(entry: Any, where: str) -> Demonstration:
  """Validates one raw entry; ``where`` (file and index) prefixes errors."""
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: expected an object, got {type(entry).__name__}.")
  unknown = sorted(set(entry) - set(REQUIRED) - set(OPTIONAL))
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: "
                     f"{list(REQUIRED + OPTIONAL)} (put extras under 'meta').")
  for field in REQUIRED:
    value = entry.get(field)
    if not isinstance(value, str) or not value.strip():
      raise ValueError(f"{where}: field {field!r} must be a non-empty string, "
                       f"got {value!r}.")
  domain = entry.get("domain", "general")
  if not isinstance(domain, str) or not domain.strip():
    raise ValueError(f"{where}: field 'domain' must be a non-empty string.")
  task_type = entry.get("task_type", "other")
  if task_type not in TASK_TYPES:
    raise ValueError(f"{where}: field 'task_type' is {task_type!r}; use one of "
                     f"{list(TASK_TYPES)}.")
  expression, answer = entry.get("expression"), entry.get("answer")
  if (expression is None) != (answer is None):
    raise ValueError(f"{where}: fields 'expression' and 'answer' go together; "
                     "give both or neither.")
  if expression is not None:
    if not isinstance(expression, str) or not expression.strip():
      raise ValueError(f"{where}: field 'expression' must be a string.")
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
      raise ValueError(f"{where}: field 'answer' must be a number, got "
                       f"{answer!r}.")
  meta = entry.get("meta", {})
  if not isinstance(meta, dict):
    raise ValueError(f"{where}: field 'meta' must be an object.")
  return Demonstration(id=entry["id"], domain=domain, task_type=task_type,
                       text=entry["text"].strip(),
                       instruction=entry["instruction"].strip(),
                       response=entry["response"].strip(),
                       expression=expression, answer=answer, meta=meta)


def _first_entry(path: str) -> Any:
  """The first entry of a JSON list / JSONL file (None when there is none)."""
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      for line in f:
        if line.strip():
          try:
            return json.loads(line)
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}: the first line is not valid JSON ({e}).") from e
      return None
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from e
  if isinstance(data, dict) and isinstance(data.get("demonstrations"), list):
    data = data["demonstrations"]
  return data[0] if isinstance(data, list) and data else None


def detect_format(path: str) -> str:
  """``demonstrations`` for a JSON/JSONL file whose first entry has ``text``
  (or is no object, or is missing: errors worded for demonstrations); else
  ``auto``, the instruction-data format ``read_instructions`` detects."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Demonstration pool {path!r} not found (config.pool.path); pass a "
        "demonstration JSON/JSONL file, an Alpaca/Dolly/chat JSON, JSONL, "
        "Parquet or CSV file, or \"\" for the packaged pool.")
  if path.endswith((".json", ".jsonl")):
    first = _first_entry(path)
    # No entry, or not an object: the demonstration reader names the problem.
    if not isinstance(first, dict) or "text" in first:
      return "demonstrations"
  return "auto"


def _from_example(ex: "instructions.Example", path: str) -> Demonstration:
  """One instruction-data row as a demonstration (see the module docstring)."""
  response = ex.response.strip()
  if "instruction" in ex.meta:  # Alpaca / Dolly, read with parts=True.
    instruction, context = ex.meta["instruction"].strip(), ex.meta["input"].strip()
  else:  # Chat: the last user turn before the response.
    users = [m["content"] for m in ex.messages[:-1] if m["role"] == "user"]
    instruction, context = (users[-1] if users else "").strip(), ""
  if not instruction:  # An Alpaca row with only an input: that is the task.
    instruction, context = context, ""
  return Demonstration(
      id=f"{os.path.basename(path)}:{ex.meta['row']}",
      domain=str(ex.meta.get("category") or "general"), task_type="other",
      text=context or response, instruction=instruction, response=response,
      meta={"source": path, "row": ex.meta["row"]})


def _load_instruction_pool(path: str, fmt: str) -> list[Demonstration]:
  ext = os.path.splitext(path)[1].lower()
  if ext not in _INSTRUCTION_EXTS:
    raise ValueError(f"{path}: a demonstration pool file must end in one of "
                     f"{list(_INSTRUCTION_EXTS)} (config.pool.path).")
  data = instructions.read_instructions(path, format=fmt, parts=True)
  if not data.examples:
    raise ValueError(f"{path}: the demonstration pool is empty: "
                     f"{data.drops.note()}.")
  demos = [_from_example(ex, path) for ex in data.examples]
  empty = [d.id for d in demos if not d.instruction]
  if empty:
    raise ValueError(f"{path}: rows {empty[:5]} have no instruction (and no "
                     "user turn); a demonstration needs a task.")
  return demos


def load_pool(path: str | None = None, format: str = "auto"  # pylint: disable=redefined-builtin
              ) -> list[Demonstration]:
  """Reads and validates a demonstration pool.

  Args:
    path: a demonstration JSON list / JSONL file, or an Alpaca / Dolly / chat
      JSON, JSONL, Parquet or CSV file; None or "" for the packaged pool.
    format: one of :data:`FORMATS` (``config.pool.format``); ``auto`` picks
      by :func:`detect_format`.

  Returns:
    The demonstrations in file order.

  Raises:
    FileNotFoundError: no such file.
    ValueError: invalid JSON, a bad entry (naming file, entry index and
      field), a repeated id, an unknown format, or an empty pool.
  """
  path = path or DEFAULT_POOL
  if format not in FORMATS:
    raise ValueError(f"config.pool.format={format!r} is not one of {FORMATS}.")
  if format == "auto":
    format = detect_format(path)
  if format != "demonstrations":
    return _load_instruction_pool(path, format)
  entries = _read_entries(path)
  demos, first = [], {}
  for i, entry in enumerate(entries):
    demo = parse_entry(entry, f"{path}: entry {i}")
    if demo.id in first:
      raise ValueError(f"{path}: entry {i} field 'id' repeats {demo.id!r} "
                       f"(first at entry {first[demo.id]}); ids must be unique.")
    first[demo.id] = i
    demos.append(demo)
  if not demos:
    raise ValueError(f"{path}: the demonstration pool is empty.")
  return demos
