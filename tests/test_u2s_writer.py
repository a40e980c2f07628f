"""Crash-safe per-client writer: torn lines, resume, stats."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fedjax_u2s.u2s import writer


def rec(i, **kw):
  return {"piece_id": f"p{i}", "instruction": f"Question {i}?", "response": f"Answer {i}.",
          **kw}


def rej(i, reason):
  return {"piece_id": f"p{i}", "reason": reason}


def test_paths():
  assert writer.generated_dir("/w") == "/w/generated"
  assert writer.client_path("/w/generated", 7) == "/w/generated/client_0007.jsonl"
  assert writer.rejected_path("/w/generated", 12) == (
      "/w/generated/client_0012.rejected.jsonl")


def test_append_then_reopen(tmp_path):
  w = writer.ClientWriter(str(tmp_path), 3)
  assert w.done_ids() == set()
  w.append([rec(0), rec(1, note="é")], [rej(2, "duplicate")])
  with open(w.path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  assert lines[-1] == "" and len(lines) == 3
  assert json.loads(lines[1]) == rec(1, note="é")
  assert '"é"' in lines[1]  # UTF-8 kept, not escaped.
  w2 = writer.ClientWriter(str(tmp_path), 3)
  assert w2.kept == [rec(0), rec(1, note="é")]
  assert w2.rejected == [rej(2, "duplicate")]
  assert w2.done_ids() == {"p0", "p1", "p2"}
  assert list(writer.iter_pairs(str(tmp_path), 3)) == [
      ("Question 0?", "Answer 0."), ("Question 1?", "Answer 1.")]


@pytest.mark.parametrize("tail", [
    b'{"piece_id": "p2", "instr',                   # Torn mid-line.
    b'{"piece_id": "p2"}',                          # Valid JSON, newline missing.
    b'{"piece_id": "p2", "instr\n',                 # Garbage with a newline.
])
def test_torn_last_line_is_cut(tmp_path, tail):
  w = writer.ClientWriter(str(tmp_path), 0)
  w.append([rec(0), rec(1)], [])
  with open(w.path, "rb") as f:
    good = f.read()
  with open(w.path, "ab") as f:
    f.write(tail)
  w2 = writer.ClientWriter(str(tmp_path), 0)
  assert w2.done_ids() == {"p0", "p1"}
  with open(w.path, "rb") as f:
    assert f.read() == good  # Truncated in place, ready for clean appends.
  w2.append([rec(2)], [])
  assert [r["piece_id"] for r in writer.read_records(w.path)] == ["p0", "p1", "p2"]


def test_read_without_repair_leaves_file(tmp_path):
  path = str(tmp_path / "x.jsonl")
  with open(path, "wb") as f:
    f.write(b'{"piece_id": "a"}\n{"pie')
  assert writer.read_records(path) == [{"piece_id": "a"}]
  assert os.path.getsize(path) == len(b'{"piece_id": "a"}\n{"pie')


def test_corrupt_middle_line_raises(tmp_path):
  path = str(tmp_path / "client_0000.jsonl")
  with open(path, "wb") as f:
    f.write(b'{"piece_id": "a"}\nnot json\n{"piece_id": "b"}\n')
  with pytest.raises(ValueError, match=r"client_0000.jsonl:2: corrupt line"):
    writer.ClientWriter(str(tmp_path), 0)


def test_stats_update_and_rebuild(tmp_path):
  out = str(tmp_path)
  a = writer.ClientWriter(out, 1)
  a.append([rec(0, num_demos_dropped=1), rec(1)],
           [rej(2, "duplicate"), rej(3, "ungrounded"), rej(4, "duplicate")])
  b = writer.ClientWriter(out, 12)
  b.append([], [rej(0, "no_response_marker")])
  writer.update_stats(out, 1, a.counts())
  stats = writer.update_stats(out, 12, b.counts())
  assert stats["clients"]["0001"] == {
      "processed": 5, "kept": 2, "rejected": 3, "yield": 0.4,
      "rejected_by_reason": {"duplicate": 2, "ungrounded": 1}, "demos_dropped": 1}
  assert stats["clients"]["0012"]["yield"] == 0.0
  assert stats["totals"] == {
      "processed": 6, "kept": 2, "rejected": 4, "yield": round(2 / 6, 6),
      "rejected_by_reason": {"duplicate": 2, "no_response_marker": 1,
                             "ungrounded": 1},
      "demos_dropped": 1, "num_clients": 2}
  with open(writer.stats_path(out)) as f:
    assert json.load(f) == stats
  assert not [n for n in os.listdir(out) if ".tmp" in n]
  os.remove(writer.stats_path(out))
  assert writer.rebuild_stats(out) == stats


def test_mean_support_per_client_totals_and_report_row(tmp_path):
  """Kept pairs' support ratios: a mean per client, kept-weighted in the totals."""
  from fedjax_u2s.evaluation import report
  out = str(tmp_path)
  a = writer.ClientWriter(out, 0)
  a.append([rec(0, support=0.5), rec(1, support=1.0)], [rej(2, "ungrounded")])
  b = writer.ClientWriter(out, 1)
  b.append([rec(0, support=0.2)], [rej(1, "ungrounded"), rej(2, "duplicate"),
                                   rej(3, "ungrounded")])
  writer.update_stats(out, 0, a.counts())
  stats = writer.update_stats(out, 1, b.counts())
  assert stats["clients"]["0000"]["mean_support"] == 0.75
  assert stats["clients"]["0001"]["mean_support"] == 0.2
  assert stats["totals"]["mean_support"] == round((0.5 + 1.0 + 0.2) / 3, 6)
  corpus = {"clients": [{"client_id": 0, "name": "med", "pieces": 3},
                        {"client_id": 1, "name": "geo", "pieces": 4}]}
  table = report.generation_table(stats, corpus).splitlines()
  assert "| ungrounded | mean support (kept) |" in table[0]
  assert table[2] == "| 0 | med | 3 | 2 | 1 | 67% | 33% | 0.75 | ungrounded 1 |"
  assert table[3] == ("| 1 | geo | 4 | 1 | 3 | 25% | 50% | 0.20 | "
                      "ungrounded 2, duplicate 1 |")


# A child process that writes 6 batches, skipping those already done; with
# CRASH_AT=b it dies (os._exit, no cleanup) halfway through the write of batch
# b's kept lines, leaving a torn line on disk.
_CHILD = textwrap.dedent("""
    import os, sys
    from fedjax_u2s.u2s import writer
    out, crash_at = sys.argv[1], int(sys.argv[2])
    w = writer.ClientWriter(out, 5)
    done = w.done_ids()
    real_write = os.write
    for b in range(6):
      kept = [{"piece_id": f"p{b}_{j}", "text": "x" * (40 * j + 1)} for j in range(3)
              if (b + j) % 4]
      rejected = [{"piece_id": f"p{b}_{j}", "reason": "duplicate"} for j in range(3)
                  if not (b + j) % 4]
      kept = [r for r in kept if r["piece_id"] not in done]
      rejected = [r for r in rejected if r["piece_id"] not in done]
      if b == crash_at:
        def torn_write(fd, data):
          if len(data) > 60:  # The kept batch: write half of it, then die.
            real_write(fd, bytes(data[:len(data) // 2]))
            os._exit(17)
          return real_write(fd, data)
        os.write = torn_write
      w.append(kept, rejected)
    writer.update_stats(out, 5, w.counts())
    """)


def _run_child(out, crash_at):
  return subprocess.run([sys.executable, "-c", _CHILD, out, str(crash_at)],
                        capture_output=True, text=True, timeout=60)


def test_killed_mid_write_then_rerun_equals_uninterrupted(tmp_path):
  clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
  assert _run_child(clean, -1).returncode == 0
  r = _run_child(crashed, 3)
  assert r.returncode == 17, r.stderr
  with open(writer.client_path(crashed, 5), "rb") as f:
    assert not f.read().endswith(b"\n")  # The crash left a torn line.
  assert _run_child(crashed, -1).returncode == 0
  for name in ("client_0005.jsonl", "client_0005.rejected.jsonl", "stats.json"):
    with open(os.path.join(clean, name), "rb") as f1, \
        open(os.path.join(crashed, name), "rb") as f2:
      assert f1.read() == f2.read(), name
  ids = [r["piece_id"] for r in writer.read_records(writer.client_path(crashed, 5))]
  assert len(ids) == len(set(ids)) == 14  # 18 pieces, 4 rejected.
  assert len(writer.read_records(writer.rejected_path(crashed, 5))) == 4
