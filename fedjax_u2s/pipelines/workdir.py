"""A workdir that knows what made each stage.

Every stage of a job (generate, train, evaluate) is recorded in
``WORKDIR/stages/<stage>.inputs.json`` with what determines its output: the
config fields it reads and a content hash of every input file (model, corpus,
instruction data, demonstration pool). A rerun computes the same record from
its own config first, before loading anything:

* equal records: the run resumes exactly where it stopped;
* a record that differs: the run stops before doing or writing anything and
  lists each differing field or file with both values, and how to go on
  (the earlier config, a fresh ``--workdir``, or ``--redo=STAGE``);
* ``--redo=STAGE``: that stage and every later one start over with the new
  inputs; their old outputs are moved to ``WORKDIR/superseded/<time>/``,
  never deleted.

``config.json`` is written only after the check passes; an earlier one that
differs is kept beside it as ``config.<time>.json``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from fedjax_u2s import export
from fedjax_u2s.u2s import writer

STAGES_DIR = "stages"  # Records, stage markers and the file-hash cache.
INPUTS_SUFFIX = ".inputs.json"
HASH_CACHE = os.path.join(STAGES_DIR, "file_hashes.json")
SUPERSEDED = "superseded"


@dataclasses.dataclass(frozen=True)
class Stage:
  """What determines one stage's output, and what it writes.

  Attributes:
    name: the stage (``generate``, ``train``, ``evaluate``).
    fields: config paths (blocks or leaves) whose values the stage reads.
    ignore: paths under ``fields`` that do not change the output (e.g. the
      simulated preemption ``train.halt_after_round``).
    files: ``config -> {label: path}``: input files, folders or globs whose
      contents the stage reads ("" paths are skipped).
    outputs: globs, relative to the workdir, of what the stage writes; moved
      aside by ``--redo``.
  """
  name: str
  fields: tuple[str, ...]
  ignore: tuple[str, ...] = ()
  files: Callable[[ml_collections.ConfigDict], Mapping[str, str]] | None = None
  outputs: tuple[str, ...] = ()


class WorkdirMismatchError(ValueError):
  """The workdir was made by other inputs than this run's."""


# ----------------------------------------------------------------------------
# Fingerprints.


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
  if isinstance(value, Mapping):
    for k in sorted(value):
      _flatten(f"{prefix}.{k}", value[k], out)
  elif isinstance(value, (list, tuple)):
    out[prefix] = json.loads(json.dumps(list(value), default=str))
  else:
    out[prefix] = json.loads(json.dumps(value, default=str))


def config_fields(config: ml_collections.ConfigDict, paths: Sequence[str],
                  ignore: Sequence[str] = ()) -> dict[str, Any]:
  """``{"config.a.b": value}`` of every leaf under ``paths`` that exists."""
  resolved = config.copy_and_resolve_references().to_dict()
  out: dict[str, Any] = {}
  for path in paths:
    node: Any = resolved
    for part in path.split("."):
      if not isinstance(node, Mapping) or part not in node:
        node = _MISSING
        break
      node = node[part]
    if node is not _MISSING:
      _flatten("config." + path, node, out)
  skip = tuple("config." + p for p in ignore)
  return {k: v for k, v in out.items()
          if not any(k == s or k.startswith(s + ".") for s in skip)}


_MISSING = object()


def _files_under(path: str) -> list[str]:
  if os.path.isdir(path):
    found = []
    for root, dirs, files in os.walk(path):
      dirs.sort()
      found += [os.path.join(root, f) for f in sorted(files)]
    return found
  if glob.has_magic(path):
    return sorted(p for p in glob.glob(path) if os.path.isfile(p))
  return [path] if os.path.isfile(path) else []


class _HashCache:
  """sha256 of files, remembered by (size, mtime) so reruns hash nothing big."""

  def __init__(self, path: str | None):
    self.path = path
    self.entries: dict[str, list] = {}
    if path and os.path.exists(path):
      try:
        with open(path, encoding="utf-8") as f:
          self.entries = json.load(f)
      except (OSError, ValueError):
        self.entries = {}
    self.dirty = False

  def digest(self, file: str) -> str:
    st = os.stat(file)
    key = os.path.abspath(file)
    hit = self.entries.get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
      return hit[2]
    digest = export.file_sha256(file)
    self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
    self.dirty = True
    return digest

  def save(self) -> None:
    if self.path and self.dirty:
      writer.atomic_write_json(self.path, self.entries)


def file_hashes(files: Mapping[str, str], cache: _HashCache) -> dict[str, Any]:
  """``{"file.<label>": {relative path: sha256}}`` of every file under each path."""
  out = {}
  for label, path in sorted(files.items()):
    if not path:
      continue
    found = _files_under(path)
    if not found:
      out[f"file.{label}"] = {"missing": path}
      continue
    base = path if os.path.isdir(path) else os.path.dirname(path)
    out[f"file.{label}"] = {os.path.relpath(f, base): cache.digest(f) for f in found}
  return out


def fingerprint(config: ml_collections.ConfigDict, stage: Stage,
                cache: _HashCache) -> dict[str, Any]:
  """Everything that determines ``stage``'s output, as one JSON-able dict."""
  record = config_fields(config, stage.fields, stage.ignore)
  if stage.files is not None:
    record.update(file_hashes(stage.files(config), cache))
  return record


# ----------------------------------------------------------------------------
# Comparing and recording.


def _short(value: Any, limit: int = 160) -> str:
  """``value`` as JSON, cut in the middle when longer than ``limit``.

  The middle, not the end: two paths that differ usually differ in their
  last part (``.../batch_a.jsonl`` against ``.../batch_b.jsonl``).
  """
  text = json.dumps(value, ensure_ascii=False)
  if len(text) <= limit:
    return text
  head = (limit - 3) // 2
  return text[:head] + "..." + text[len(text) - (limit - 3 - head):]


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """One line per field or file that differs, with both values."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
    if a == b:
      continue
    if key.startswith("file.") and isinstance(a, dict) and isinstance(b, dict):
      changed = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
      shown = ", ".join(
          f"{f} ({'added' if f not in a else 'removed' if f not in b else 'changed'})"
          for f in changed[:8])
      more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
      out.append(f"{key}: contents differ: {shown}{more}")
    else:
      out.append(f"{key}: {_short(a)} (workdir) -> {_short(b)} (this run)")
  return out


def inputs_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, STAGES_DIR, stage + INPUTS_SUFFIX)


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _has_outputs(workdir: str, stage: Stage) -> bool:
  return any(glob.glob(os.path.join(workdir, p)) for p in stage.outputs)


def _move_aside(workdir: str, patterns: Sequence[str], stamp: str) -> list[str]:
  moved = []
  for pattern in patterns:
    for src in sorted(glob.glob(os.path.join(workdir, pattern))):
      rel = os.path.relpath(src, workdir)
      dst = os.path.join(workdir, SUPERSEDED, stamp, rel)
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
      moved.append(rel)
  return moved


def check_and_record(config: ml_collections.ConfigDict, workdir: str,
                     stages: Sequence[Stage], *, redo: Sequence[str] = (),
                     lead: bool = True) -> list[str]:
  """Checks this run's inputs against the workdir's; records them; writes config.json.

  Args:
    config: this run's config.
    workdir: the run directory.
    stages: the job's stages, in order.
    redo: stage names to start over (each with every later stage).
    lead: whether this process writes (multi-host: process 0 only).

  Returns:
    The workdir-relative paths moved aside by ``redo``.

  Raises:
    WorkdirMismatchError: the workdir holds a stage made with other inputs
      (and ``redo`` does not name it or an earlier stage); nothing was written.
    ValueError: ``redo`` names a stage the job does not have.
  """
  names = [s.name for s in stages]
  unknown = [r for r in redo if r not in names]
  if unknown:
    raise ValueError(f"--redo={','.join(redo)}: this job's stages are {names}; "
                     f"{unknown} is not one of them.")
  first_redo = min((names.index(r) for r in redo), default=len(names))
  cache = _HashCache(os.path.join(workdir, HASH_CACHE))
  records = {s.name: fingerprint(config, s, cache) for s in stages}

  mismatched, stale = [], []
  for i, s in enumerate(stages):
    old = _read(inputs_path(workdir, s.name))
    if old is None or i >= first_redo or old == records[s.name]:
      continue
    if _has_outputs(workdir, s):
      mismatched.append((s.name, differences(old, records[s.name])))
    else:  # Recorded, but nothing made yet (e.g. a run that failed early).
      stale.append(s.name)
  if mismatched:
    lines = [f"{workdir} was made with other inputs than this run's; nothing was "
             "run or written."]
    for name, diffs in mismatched:
      lines.append(f"  stage {name!r}:")
      lines += [f"    {d}" for d in diffs]
    first = mismatched[0][0]
    lines.append(
        f"To resume the earlier run, rerun with the config it was made with "
        f"({os.path.join(workdir, 'config.json')}). To start fresh, use another "
        f"--workdir. To redo {first!r} and the stages after it here with these "
        f"inputs, add --redo={first}: the old outputs are moved to "
        f"{os.path.join(workdir, SUPERSEDED)}/, not deleted.")
    raise WorkdirMismatchError("\n".join(lines))

  moved: list[str] = []
  if not lead:
    return moved
  stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
  if first_redo < len(stages):
    patterns = [p for s in stages[first_redo:] for p in s.outputs]
    patterns += [os.path.relpath(inputs_path(workdir, s.name), workdir)
                 for s in stages[first_redo:]]
    moved = _move_aside(workdir, patterns, stamp)
  os.makedirs(os.path.join(workdir, STAGES_DIR) if stages else workdir, exist_ok=True)
  for s in stages:
    if s.name in stale or _read(inputs_path(workdir, s.name)) is None:
      writer.atomic_write_json(inputs_path(workdir, s.name), records[s.name])
  cache.save()
  _write_config(config, workdir, stamp)
  return moved


def _write_config(config: ml_collections.ConfigDict, workdir: str, stamp: str) -> None:
  """``config.json``; an earlier, different one is kept as ``config.<stamp>.json``."""
  write_config(config, workdir, keep_earlier_as=f"config.{stamp}.json")


def write_config(config: ml_collections.ConfigDict, workdir: str,
                 keep_earlier_as: str | None = None) -> str:
  """Writes ``workdir/config.json`` atomically; returns its path.

  Args:
    config: the config.
    workdir: the directory (created if missing).
    keep_earlier_as: if given, an earlier ``config.json`` with other content
      is renamed to this file name instead of being overwritten.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return path
    if keep_earlier_as:
      os.replace(path, os.path.join(workdir, keep_earlier_as))
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return path
