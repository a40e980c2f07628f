"""Per-round metrics: a JSONL log, TensorBoard event files and PNG plots.

One :class:`MetricWriter` per run, on the lead process only. Rows are appended
to ``metrics.jsonl`` (one JSON object per line, flushed each round, so a killed
run keeps what it measured); scalar fields also go to TensorBoard through
tensorboardX (no TensorFlow). On resume the rows of rounds that will be rerun
are dropped first, so the log never holds a round twice.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from absl import logging


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The rows of a JSONL file; a torn last line (killed writer) is dropped."""
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1 and any(l.strip() for l in lines[i + 1:]):
        raise ValueError(f"{path}:{i + 1}: not valid JSON.") from None
      logging.warning("%s: dropped a torn last line.", path)
  return rows


class MetricWriter:
  """Writes per-round scalars to ``<workdir>/metrics.jsonl`` and TensorBoard.

  Args:
    workdir: the run directory.
    resume_round: rounds ``> resume_round`` already in the log are dropped
      (they will be rerun from the checkpoint of ``resume_round``); 0 (no
      checkpoint: the run starts over, its round-0 evaluation included)
      drops every row.
    tensorboard: also write event files under ``<workdir>/tensorboard``.
  """

  def __init__(self, workdir: str, resume_round: int = 0, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    kept = [r for r in read_jsonl(self.path)
            if resume_round > 0 and r.get("round", 0) <= resume_round]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # Imported only when used.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, round_: int, scalars: Mapping[str, Any]) -> None:
    row = {"round": round_}
    for k, v in scalars.items():
      row[k] = v.item() if hasattr(v, "item") else v
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "round" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, round_)
      self._tb.flush()

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
