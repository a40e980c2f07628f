"""Crash-safe, resumable per-client output of U2S generation.

Layout, under a ``generated/`` directory (:func:`generated_dir`)::

    client_0007.jsonl            kept pairs with provenance, one JSON per line
    client_0007.rejected.jsonl   processed-but-rejected pieces, with the reason
    stats.json                   yield and rejection counts per client + totals

Every append writes whole lines in a single ``os.write`` on an ``O_APPEND``
descriptor, then ``fsync``. A crash can therefore only leave a torn *last*
line (no trailing newline, or not valid JSON); :meth:`ClientWriter.recover`
cuts it off (truncating the file) and reports which piece ids are done -- kept
or rejected -- so a restarted run skips them and neither duplicates nor loses
lines. ``stats.json`` is replaced atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Iterable, Mapping, Sequence


def generated_dir(workdir: str) -> str:
  """``WORKDIR/generated``."""
  return os.path.join(workdir, "generated")


def client_path(out_dir: str, client_id: int) -> str:
  return os.path.join(out_dir, f"client_{int(client_id):04d}.jsonl")


def rejected_path(out_dir: str, client_id: int) -> str:
  return os.path.join(out_dir, f"client_{int(client_id):04d}.rejected.jsonl")


def stats_path(out_dir: str) -> str:
  return os.path.join(out_dir, "stats.json")


def dumps(record: Mapping[str, Any]) -> str:
  """One JSON line (no newline); keys in insertion order, UTF-8 kept."""
  return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def read_records(path: str, repair: bool = False) -> list[dict[str, Any]]:
  """Reads a JSONL file written by :class:`ClientWriter`.

  Args:
    path: the file; a missing file reads as empty.
    repair: truncate the file to drop a torn last line (else just skip it).

  Returns:
    The complete records, in file order.

  Raises:
    ValueError: naming the file and line, for a corrupt line before the last
      (appends cannot produce one: the file was edited or the disk is bad).
  """
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  records, offset, good_end = [], 0, 0
  lines = data.split(b"\n")
  for lineno, line in enumerate(lines, 1):
    last = lineno == len(lines)
    if last:  # After the final newline: b"" or a torn line without newline.
      break
    try:
      rec = json.loads(line.decode("utf-8"))
      if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
      if lineno == len(lines) - 1 and lines[-1] == b"":
        # Corrupt final line (complete newline, garbage content): a torn
        # write that happened to contain a newline. Drop it too.
        break
      raise ValueError(f"{path}:{lineno}: corrupt line ({e}); only a torn last "
                       "line can be repaired. Fix or delete the file.") from e
    records.append(rec)
    offset += len(line) + 1
    good_end = offset
  if repair and good_end != len(data):
    with open(path, "r+b") as f:
      f.truncate(good_end)
      f.flush()
      os.fsync(f.fileno())
  return records


def _append_lines(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  if not records:
    return
  payload = "".join(dumps(r) + "\n" for r in records).encode("utf-8")
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    view = memoryview(payload)
    while view:  # os.write may write less than asked (rare, but allowed).
      n = os.write(fd, view)
      view = view[n:]
    os.fsync(fd)
  finally:
    os.close(fd)


class ClientWriter:
  """Appends one client's kept and rejected records.

  Args:
    out_dir: the ``generated/`` directory (created if missing).
    client_id: the client.

  Attributes:
    kept: kept records read back on open plus those appended since.
    rejected: the same for rejected records.
  """

  def __init__(self, out_dir: str, client_id: int):
    os.makedirs(out_dir, exist_ok=True)
    self.out_dir = out_dir
    self.client_id = int(client_id)
    self.path = client_path(out_dir, client_id)
    self.rejected_path = rejected_path(out_dir, client_id)
    self.kept: list[dict[str, Any]] = []
    self.rejected: list[dict[str, Any]] = []
    self.recover()

  def recover(self) -> set[str]:
    """Re-reads both files, cutting a torn last line; returns done piece ids."""
    self.kept = read_records(self.path, repair=True)
    self.rejected = read_records(self.rejected_path, repair=True)
    return self.done_ids()

  def done_ids(self) -> set[str]:
    return {r["piece_id"] for r in self.kept} | {r["piece_id"] for r in self.rejected}

  def append(self, kept: Sequence[Mapping[str, Any]],
             rejected: Sequence[Mapping[str, Any]]) -> None:
    """Appends one batch: rejected records first, then kept ones.

    Rejected first: if a crash falls between the two writes, the rerun
    regenerates only the batch's kept pieces, and checks them for duplicates
    against exactly the pairs an uninterrupted run would have.
    """
    _append_lines(self.rejected_path, rejected)
    self.rejected.extend(dict(r) for r in rejected)
    _append_lines(self.path, kept)
    self.kept.extend(dict(r) for r in kept)

  def counts(self) -> dict[str, Any]:
    """File-derived counts: what :func:`update_stats` records."""
    reasons = collections.Counter(r["reason"] for r in self.rejected)
    support = [r["support"] for r in self.kept if r.get("support") is not None]
    return client_counts(len(self.kept), dict(reasons),
                         sum(int(r.get("num_demos_dropped", 0))
                             for r in self.kept + self.rejected),
                         sum(support) / len(support) if support else None)


def client_counts(kept: int, rejected_by_reason: Mapping[str, int],
                  demos_dropped: int = 0,
                  mean_support: float | None = None) -> dict[str, Any]:
  """One client's (or the totals') counts; ``mean_support`` when measured.

  ``mean_support`` is the mean over kept pairs of the share of the
  response's content words found in the source piece (see
  :func:`fedjax_u2s.u2s.filters.support_ratio`); absent when no kept record
  carries a ``support`` score (files written before it existed).
  """
  rejected = sum(rejected_by_reason.values())
  processed = kept + rejected
  out = {"processed": processed, "kept": kept, "rejected": rejected,
         "yield": round(kept / processed, 6) if processed else 0.0,
         "rejected_by_reason": dict(sorted(rejected_by_reason.items())),
         "demos_dropped": demos_dropped}
  if mean_support is not None:
    out["mean_support"] = round(float(mean_support), 6)
  return out


def atomic_write_json(path: str, obj: Any) -> None:
  """Writes JSON to a temp file, fsyncs, then ``os.replace``s it into place."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _totals(clients: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  reasons: collections.Counter = collections.Counter()
  kept = dropped = 0
  for c in clients.values():
    kept += c["kept"]
    dropped += c.get("demos_dropped", 0)
    reasons.update(c["rejected_by_reason"])
  # Kept-weighted mean over the clients that measured support.
  weighted = [(c["mean_support"], c["kept"]) for c in clients.values()
              if "mean_support" in c]
  n_support = sum(k for _, k in weighted)
  out = client_counts(kept, dict(reasons), dropped,
                      sum(m * k for m, k in weighted) / n_support if n_support
                      else None)
  out["num_clients"] = len(clients)
  return out


def update_stats(out_dir: str, client_id: int, counts: Mapping[str, Any]) -> dict:
  """Sets one client's entry in ``stats.json`` and recomputes the totals.

  Read-modify-replace: safe against crashes, not against two processes
  updating the same file at once (use :func:`rebuild_stats` afterwards then).
  """
  path = stats_path(out_dir)
  stats = {"clients": {}}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      stats = json.load(f)
  clients = dict(stats.get("clients", {}))
  clients[f"{int(client_id):04d}"] = dict(counts)
  stats = {"clients": dict(sorted(clients.items())), "totals": _totals(clients)}
  atomic_write_json(path, stats)
  return stats


def rebuild_stats(out_dir: str) -> dict:
  """Recounts ``stats.json`` from every client's files."""
  clients = {}
  for name in sorted(os.listdir(out_dir)):
    if name.startswith("client_") and name.endswith(".jsonl") and ".rejected" not in name:
      cid = int(name[len("client_"):-len(".jsonl")])
      clients[f"{cid:04d}"] = ClientWriter(out_dir, cid).counts()
  for name in sorted(os.listdir(out_dir)):  # Clients with only rejections.
    if name.endswith(".rejected.jsonl"):
      cid = int(name[len("client_"):-len(".rejected.jsonl")])
      if f"{cid:04d}" not in clients:
        clients[f"{cid:04d}"] = ClientWriter(out_dir, cid).counts()
  stats = {"clients": dict(sorted(clients.items())), "totals": _totals(clients)}
  atomic_write_json(stats_path(out_dir), stats)
  return stats


def iter_pairs(out_dir: str, client_id: int) -> Iterable[tuple[str, str]]:
  """(instruction, response) of a client's kept records, in file order."""
  for r in read_records(client_path(out_dir, client_id)):
    yield r["instruction"], r["response"]
