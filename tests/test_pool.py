"""The demonstration pool: packaged entries valid, every number checked."""

from __future__ import annotations

import ast
import collections
import json
import math
import operator
import os
import re

import pytest

from fedjax_u2s.u2s import pool

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "ceil": math.ceil, "floor": math.floor}


def evaluate(expression: str) -> float:
  """Evaluates plain arithmetic (+ - * / **, sqrt, ceil, floor, pi) safely."""
  def ev(node):
    if isinstance(node, ast.Expression):
      return ev(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
      return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
      return _OPS[type(node.op)](ev(node.left), ev(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
      return _OPS[type(node.op)](ev(node.operand))
    if isinstance(node, ast.Name) and node.id == "pi":
      return math.pi
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCS and len(node.args) == 1):
      return _FUNCS[node.func.id](ev(node.args[0]))
    raise ValueError(f"unsupported expression node {ast.dump(node)}")
  return ev(ast.parse(expression, mode="eval"))


def _decimals(x: float) -> int:
  s = repr(float(x))
  return 0 if float(x).is_integer() else len(s.split(".")[1])


def _renderings(x: float) -> set[str]:
  """Ways the answer may be written in the response: 2058, 2,058, 2163.2..."""
  if float(x).is_integer():
    n = int(x)
    return {str(n), f"{n:,}"}
  return {repr(float(x)), f"{x:,}"}


@pytest.fixture(scope="module")
def demos():
  return pool.load_pool()


def test_evaluator():
  assert evaluate("ceil((148+12)/45)") == 4
  assert evaluate("sqrt(5**2-3**2)") == 4.0
  assert evaluate("-2+3*4") == 10
  with pytest.raises(ValueError):
    evaluate("__import__('os')")


def test_pool_size_domains_and_task_types(demos):
  assert len(demos) >= 36
  by_domain = collections.Counter(d.domain for d in demos)
  assert set(by_domain) == {"medicine", "general", "math"}
  assert all(n >= 12 for n in by_domain.values()), by_domain
  used = {d.task_type for d in demos}
  assert used == set(pool.TASK_TYPES) - {"other"}
  for domain in by_domain:  # variety inside each domain too
    assert len({d.task_type for d in demos if d.domain == domain}) >= 5
  assert len({d.id for d in demos}) == len(demos)
  assert len({d.text for d in demos}) == len(demos)
  assert len({d.instruction for d in demos}) == len(demos)


def test_entries_are_well_formed(demos):
  for d in demos:
    n_sentences = len(re.findall(r"[.!?](?:\s|$)", d.text))
    assert 2 <= n_sentences <= 5, (d.id, n_sentences)
    assert re.fullmatch(r"(med|gen|math)-\d{3}", d.id), d.id
    assert d.id.split("-")[0] == {"medicine": "med", "general": "gen",
                                  "math": "math"}[d.domain]
    low = d.instruction.lower()
    assert "the text" not in low and "the passage" not in low, d.id
    assert len(d.response) >= 40, d.id


def test_every_calculation_number_checks_out(demos):
  checked = 0
  for d in demos:
    if d.task_type == "calculation":
      assert d.expression is not None, f"{d.id}: calculation without expression"
    if d.expression is None:
      continue
    value = evaluate(d.expression)
    tol = 0.5 * 10 ** -_decimals(d.answer) + 1e-9
    assert abs(value - d.answer) <= tol, (d.id, value, d.answer)
    assert any(r in d.response for r in _renderings(d.answer)), (
        d.id, d.answer, d.response)
    checked += 1
  assert checked >= 12
  assert sum(d.domain == "math" and d.expression is not None for d in demos) >= 10


def test_worked_steps_in_responses_are_correct(demos):
  """Every 'a op b = c' with plain numbers in a math response is right."""
  pattern = re.compile(
      r"(\d[\d,]*(?:\.\d+)?) ([×÷+−-]) (\d[\d,]*(?:\.\d+)?) = \$?(\d[\d,]*(?:\.\d+)?)")
  ops = {"×": operator.mul, "÷": operator.truediv, "+": operator.add,
         "−": operator.sub, "-": operator.sub}
  num = lambda s: float(s.replace(",", ""))
  seen = 0
  for d in demos:
    for m in pattern.finditer(d.response):
      a, op, b, c = m.groups()
      before = d.response[:m.start()].rstrip()
      if before and before[-1] in "(+×÷−-0123456789":
        continue  # the tail of a longer chain ("3 × 6 + 7 = 25"): not one step
      got = ops[op](num(a), num(b))
      assert abs(got - num(c)) <= 0.5 * 10 ** -_decimals(num(c)) + 1e-9, (
          d.id, m.group(0))
      seen += 1
  assert seen >= 15


def _write(path, entries):
  path.write_text(json.dumps(entries), encoding="utf-8")
  return str(path)


GOOD = {"id": "x-1", "text": "Water boils at 100 C at sea level. It freezes at 0 C.",
        "instruction": "At what temperature does water boil at sea level?",
        "response": "At 100 degrees Celsius."}


def test_user_pool_json_and_jsonl(tmp_path):
  demos = pool.load_pool(_write(tmp_path / "p.json", [GOOD]))
  assert demos[0].domain == "general" and demos[0].task_type == "other"
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(
      dict(GOOD, id="x-2", task_type="definition")) + "\n", encoding="utf-8")
  assert [d.id for d in pool.load_pool(str(jsonl))] == ["x-1", "x-2"]


@pytest.mark.parametrize("entry, message", [
    (dict(GOOD, response=""), r"entry 1: field 'response' must be a non-empty"),
    ({k: v for k, v in GOOD.items() if k != "text"}, r"entry 1: field 'text'"),
    (dict(GOOD, task_type="essay"), r"entry 1: field 'task_type' is 'essay'"),
    (dict(GOOD, instrution="typo"), r"entry 1: unknown field\(s\) \['instrution'\]"),
    (dict(GOOD, expression="1+1"), r"entry 1: fields 'expression' and 'answer'"),
    (dict(GOOD, expression="1+1", answer="2"), r"entry 1: field 'answer' must be"),
    (dict(GOOD), r"entry 1 field 'id' repeats 'x-1'"),
    ("just a string", r"entry 1: expected an object"),
])
def test_invalid_entries_name_file_index_and_field(tmp_path, entry, message):
  path = _write(tmp_path / "bad.json", [GOOD, entry])
  with pytest.raises(ValueError, match=r"bad\.json: " + message):
    pool.load_pool(path)


def test_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    pool.load_pool(str(tmp_path / "nope.json"))
  (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
  with pytest.raises(ValueError, match="broken.json: not valid JSON"):
    pool.load_pool(str(tmp_path / "broken.json"))
  with pytest.raises(ValueError, match="empty"):
    pool.load_pool(_write(tmp_path / "e.json", []))
  (tmp_path / "b.jsonl").write_text(json.dumps(GOOD) + "\n{oops\n")
  with pytest.raises(ValueError, match="b.jsonl: line 2"):
    pool.load_pool(str(tmp_path / "b.jsonl"))


# ----------------------------------------------------------------------------
# Instruction datasets as pools (config.pool.path / config.pool.format).

INSTRUCTIONS = os.path.join(os.path.dirname(__file__), "testdata", "instructions")


def _inst(name):
  return os.path.join(INSTRUCTIONS, name)


def test_dolly_rows_become_demonstrations_with_context_as_text(tmp_path):
  demos = pool.load_pool(_inst("dolly.jsonl"))
  # Row 2 (blank response) is dropped by the reader, and counted there.
  assert [(d.id, d.domain, d.text, d.instruction, d.response) for d in demos] == [
      ("dolly.jsonl:0", "open_qa", "4", "What is 2+2?", "4"),
      ("dolly.jsonl:1", "closed_qa", "Hamlet is a play by Shakespeare.",
       "Who wrote it?", "Shakespeare.")]
  assert pool.load_pool(_inst("dolly.csv"), "dolly") == pool.load_pool(
      _inst("dolly.csv"))
  assert [d.text for d in pool.load_pool(_inst("dolly.csv"))] == [d.text for d in demos]


@pytest.mark.parametrize("name", ["alpaca.json", "alpaca.jsonl", "alpaca.parquet"])
def test_alpaca_rows_keep_instruction_and_input_apart(name):
  demos = pool.load_pool(_inst(name))
  assert [(d.text, d.instruction, d.response) for d in demos[:2]] == [
      ("Red.", "Name a primary color.", "Red."),       # No input: the response.
      ("cat", "Translate to French.", "chat")]          # The input is the passage.
  assert demos[0].id == f"{name}:0" and demos[0].task_type == "other"


def test_chat_rows_use_the_last_user_turn():
  demos = pool.load_pool(_inst("chat.jsonl"))
  assert [(d.instruction, d.response, d.domain) for d in demos[:2]] == [
      ("Hi", "Hello!", "greeting"), ("times 2?", "10", "math")]
  assert pool.detect_format(_inst("chat.jsonl")) == "auto"


def test_format_detection_and_errors(tmp_path):
  assert pool.detect_format(_write(tmp_path / "d.json", [GOOD])) == "demonstrations"
  assert pool.detect_format(_inst("dolly.jsonl")) == "auto"
  assert pool.detect_format(_inst("dolly.csv")) == "auto"
  with pytest.raises(ValueError, match="config.pool.format='xml'"):
    pool.load_pool(_inst("dolly.jsonl"), "xml")
  with pytest.raises(FileNotFoundError, match="config.pool.path"):
    pool.load_pool(str(tmp_path / "nope.csv"))
  (tmp_path / "p.txt").write_text("hello", encoding="utf-8")
  with pytest.raises(ValueError, match=r"p\.txt: a demonstration pool file must end"):
    pool.load_pool(str(tmp_path / "p.txt"))
  # Every row dropped by the reader: the pool is empty, and the reason named.
  with pytest.raises(ValueError, match="pool is empty: 1 of 1 rows .* missing_response"):
    pool.load_pool(_write(tmp_path / "x.json", [dict(GOOD, response=None)]), "dolly")
