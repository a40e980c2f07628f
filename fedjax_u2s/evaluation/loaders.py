"""Standard benchmarks from local files (nothing is downloaded).

* MMLU-style CSV: ``question, A, B, C, D, answer-letter`` per row, no header.
* PubMedQA-style JSON: ``{id: {"QUESTION", "CONTEXTS": [...],
  "final_decision": "yes"|"no"|"maybe"}}``.
* MedQA-style JSONL: ``{"question", "options": {"A": ..., ...}, "answer_idx"}``.
* GSM8K JSONL: ``{"question", "answer": "... #### 42"}``.
* Held-out pairs JSONL: ``{"instruction", "response"}``.

Multiple-choice prompts list the lettered choices after the question, and the
options scored are the choice *texts* (cloze style, as the assistant would
answer), not the letters. Errors name the file, the row (1-based line) and
the field.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from fedjax_u2s.evaluation import scoring
from fedjax_u2s.evaluation import tasks

LETTERS = "ABCDEFGHIJ"


def _name(path: str, name: str | None) -> str:
  return name or os.path.splitext(os.path.basename(path))[0]


def _listed(question: str, options) -> str:
  lines = [question.strip()] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
  return "\n".join(lines)


def _jsonl(path: str) -> list[tuple[int, dict]]:
  """Non-empty lines as ``(line_number, object)``."""
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}).") from e
      if not isinstance(obj, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}.")
      out.append((n, obj))
  if not out:
    raise ValueError(f"{path}: no records.")
  return out


def _field(path: str, n: int, obj: dict, field: str, types=(str,)) -> Any:
  if field not in obj:
    raise ValueError(f"{path}:{n}: missing field {field!r}.")
  value = obj[field]
  if not isinstance(value, types) or (isinstance(value, str) and not value.strip()):
    raise ValueError(f"{path}:{n}: field {field!r} must be a non-empty "
                     f"{'/'.join(t.__name__ for t in types)}, got {value!r}.")
  return value


def load_mmlu_csv(path: str, *, name: str | None = None,
                  subject: str | None = None) -> tasks.MultipleChoiceTask:
  """An MMLU-style CSV (no header): question, 4 choices, answer letter."""
  subject = subject or _name(path, None).replace("_test", "").replace("_", " ")
  questions = []
  with open(path, encoding="utf-8", newline="") as f:
    for n, row in enumerate(csv.reader(f), 1):
      if not row or all(not c.strip() for c in row):
        continue
      if len(row) != 6:
        raise ValueError(f"{path}:{n}: expected 6 columns (question, A, B, C, D, "
                         f"answer), got {len(row)}.")
      question, *options, letter = [c.strip() for c in row]
      letter = letter.upper()
      if letter not in LETTERS[:4]:
        raise ValueError(f"{path}:{n}: answer must be one of A-D, got {row[5]!r}.")
      if not question or any(not o for o in options):
        raise ValueError(f"{path}:{n}: empty question or option.")
      questions.append(tasks.MCQuestion(
          id=f"{_name(path, name)}:{n}", prompt=_listed(question, options),
          options=tuple(options), answer=LETTERS.index(letter),
          meta=dict(source=path, line=n, subject=subject)))
  if not questions:
    raise ValueError(f"{path}: no questions.")
  return tasks.MultipleChoiceTask(name=_name(path, name), questions=tuple(questions),
                                  description=f"MMLU-style {subject}")


PUBMEDQA_DECISIONS = ("yes", "no", "maybe")


def load_pubmedqa_json(path: str, *, name: str | None = None,
                       with_context: bool = True) -> tasks.MultipleChoiceTask:
  """PubMedQA-style JSON; options yes / no / maybe."""
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}).") from e
  if not isinstance(raw, dict) or not raw:
    raise ValueError(f"{path}: expected a non-empty object mapping ids to records.")
  questions = []
  for pid in sorted(raw):
    rec = raw[pid]
    where = f"{path}: record {pid!r}"
    if not isinstance(rec, dict):
      raise ValueError(f"{where}: expected an object.")
    for field in ("QUESTION", "final_decision"):
      if not isinstance(rec.get(field), str):
        raise ValueError(f"{where}: missing or non-string field {field!r}.")
    decision = rec["final_decision"].strip().lower()
    if decision not in PUBMEDQA_DECISIONS:
      raise ValueError(f"{where}: final_decision must be yes/no/maybe, got "
                       f"{rec['final_decision']!r}.")
    contexts = rec.get("CONTEXTS", [])
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
      raise ValueError(f"{where}: field 'CONTEXTS' must be a list of strings.")
    prompt = rec["QUESTION"].strip()
    if with_context and contexts:
      prompt = "Context: " + " ".join(c.strip() for c in contexts) + "\n" + prompt
    prompt += "\nAnswer yes, no or maybe."
    questions.append(tasks.MCQuestion(
        id=f"{_name(path, name)}:{pid}", prompt=prompt, options=PUBMEDQA_DECISIONS,
        answer=PUBMEDQA_DECISIONS.index(decision), meta=dict(source=path, pubid=pid)))
  return tasks.MultipleChoiceTask(name=_name(path, name), questions=tuple(questions),
                                  description="PubMedQA-style yes/no/maybe")


def load_medqa_jsonl(path: str, *, name: str | None = None) -> tasks.MultipleChoiceTask:
  """MedQA-style JSONL: question, options {letter: text}, answer_idx letter."""
  questions = []
  for n, obj in _jsonl(path):
    question = _field(path, n, obj, "question")
    options = _field(path, n, obj, "options", (dict,))
    letter = _field(path, n, obj, "answer_idx").strip().upper()
    letters = sorted(options)
    if len(letters) < 2 or any(l not in LETTERS for l in letters) or \
        letters != list(LETTERS[:len(letters)]):
      raise ValueError(f"{path}:{n}: field 'options' must have keys A, B, C, ... "
                       f"in sequence, got {letters}.")
    if any(not isinstance(options[l], str) or not options[l].strip() for l in letters):
      raise ValueError(f"{path}:{n}: field 'options' has an empty or non-string option.")
    if letter not in letters:
      raise ValueError(f"{path}:{n}: field 'answer_idx' is {letter!r}, not one of "
                       f"{letters}.")
    texts = tuple(options[l].strip() for l in letters)
    questions.append(tasks.MCQuestion(
        id=f"{_name(path, name)}:{n}", prompt=_listed(question, texts), options=texts,
        answer=letters.index(letter), meta=dict(source=path, line=n)))
  return tasks.MultipleChoiceTask(name=_name(path, name), questions=tuple(questions),
                                  description="MedQA-style multiple choice")


def gsm8k_final_answer(answer: str) -> str | None:
  """The number after ``####`` in a GSM8K solution, canonicalised, or None."""
  if "####" not in answer:
    return None
  value = scoring.parse_number(answer.rsplit("####", 1)[1])
  return None if value is None else scoring.format_number(value)


def load_gsm8k_jsonl(path: str, *, name: str | None = None, max_new_tokens: int = 256,
                     template: str = "{question}\nEnd with 'The answer is N'.",
                     ) -> tasks.GenerationTask:
  """GSM8K JSONL; the gold answer is the number after ``####``."""
  questions = []
  for n, obj in _jsonl(path):
    question = _field(path, n, obj, "question")
    answer = _field(path, n, obj, "answer")
    final = gsm8k_final_answer(answer)
    if final is None:
      raise ValueError(f"{path}:{n}: field 'answer' has no '#### <number>' final "
                       f"answer: {answer[-60:]!r}.")
    questions.append(tasks.GenQuestion(
        id=f"{_name(path, name)}:{n}", prompt=template.format(question=question.strip()),
        answer=final, kind="number", meta=dict(source=path, line=n)))
  return tasks.GenerationTask(name=_name(path, name), questions=tuple(questions),
                              max_new_tokens=max_new_tokens, stop_strings=("\n\n\n",),
                              description="GSM8K-style exact match")


def load_pairs_jsonl(path: str) -> tuple[tasks.PPLExample, ...]:
  """Held-out ``{"instruction", "response"}`` pairs (an ``id`` field is kept)."""
  out = []
  for n, obj in _jsonl(path):
    out.append(tasks.PPLExample(
        id=str(obj.get("id", n)), instruction=_field(path, n, obj, "instruction"),
        response=_field(path, n, obj, "response"), meta=dict(source=path, line=n)))
  return tuple(out)
