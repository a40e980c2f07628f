"""Chunking throughput: seconds and MB/s of ``chunk_documents`` on one big file.

The text is real prose: the packaged Wikipedia lead paragraphs
(:mod:`fedjax_u2s.data.wiki`), concatenated in article order until the size is
reached, either on **one line** (articles joined by a space: one paragraph,
the shape that used to take minutes) or **paragraphed** (joined by a blank
line). Each size and shape is chunked ``--repeats`` times after one untimed
warm-up; the median is reported.

``--tokenizer=words`` counts whitespace words (as the tests do);
``--tokenizer=smollm2-135m-instruct`` (or any registry name / .gguf path)
counts with that model's tokenizer, as the U2S stage does.

``--baseline=REV`` also times ``fedjax_u2s/u2s/chunking.py`` as it was at git
revision REV (read with ``git show``), on the sizes up to
``--baseline_max_bytes``, and checks that both give the same pieces.

Usage::

    uptime   # the load average: other jobs on the 2 cores skew the numbers
    .venv/bin/python benchmarks/chunking.py \\
        --sizes=75K,300K,1.2M,5M --repeats=3 --baseline=18aee82^
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from fedjax_u2s.data import wiki
from fedjax_u2s.u2s import chunking
from fedjax_u2s.u2s.corpus import Document

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time  # noqa: E402  (benchmarks/ is not a package)

_SIZES = flags.DEFINE_list("sizes", ["75K", "300K", "1.2M", "5M"],
                           "Text sizes in bytes (K = 1e3, M = 1e6).")
_SHAPES = flags.DEFINE_list("shapes", ["single-line", "paragraphed"],
                            "single-line and/or paragraphed.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 200, "chunk_documents max_tokens.")
_MIN_TOKENS = flags.DEFINE_integer("min_tokens", 24, "chunk_documents min_tokens.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "words", "'words' (whitespace count) or a model registry "
    "name / .gguf path whose tokenizer counts tokens.")
_BASELINE = flags.DEFINE_string(
    "baseline", "", "Also time chunking.py at this git revision (e.g. 18aee82^).")
_BASELINE_MAX = flags.DEFINE_string(
    "baseline_max_bytes", "300K", "Largest size the baseline is timed on.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")


def _bytes(size: str) -> int:
  size = size.strip().upper()
  scale = {"K": 10 ** 3, "M": 10 ** 6}.get(size[-1:], 1)
  return int(float(size.rstrip("KM")) * scale)


def make_text(num_bytes: int, shape: str) -> str:
  """Wiki prose of about ``num_bytes`` UTF-8 bytes, on one line or paragraphed."""
  sep = " " if shape == "single-line" else "\n\n"
  parts, total, arts = [], 0, wiki.load_articles()
  i = 0
  while total < num_bytes:
    a = arts[i % len(arts)]
    t = " ".join(a.text.split())  # one line per article
    parts.append(t)
    total += len(t.encode("utf-8")) + len(sep)
    i += 1
  text = sep.join(parts)
  return text.encode("utf-8")[:num_bytes].decode("utf-8", errors="ignore")


def _counter(name: str):
  if name == "words":
    return lambda text: len(text.split())
  from fedjax_u2s import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from fedjax_u2s.models import registry  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.Tokenizer.from_gguf(registry.resolve(name))
  return lambda text: len(tok.encode(text, add_bos=False))


def _baseline_module(rev: str):
  """``fedjax_u2s/u2s/chunking.py`` at git revision ``rev``, as a module."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  src = subprocess.run(["git", "show", f"{rev}:fedjax_u2s/u2s/chunking.py"],
                       cwd=root, check=True, capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(prefix="chunking_baseline_"), "chunking_old.py")
  with open(path, "w", encoding="utf-8") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location("chunking_old", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["chunking_old"] = mod  # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


def _run(mod, text: str, count) -> tuple[list, dict]:
  pieces, stats = mod.chunk_documents([Document("doc", text)], count,
                                      _MAX_TOKENS.value, _MIN_TOKENS.value)
  return [(p.text, p.start, p.end) for p in pieces], stats


def main(argv):
  del argv
  load = os.getloadavg()
  print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"tokenizer={_TOKENIZER.value}, max_tokens={_MAX_TOKENS.value}, "
        f"repeats={_REPEATS.value}")
  count = _counter(_TOKENIZER.value)
  old = _baseline_module(_BASELINE.value) if _BASELINE.value else None
  old_max = _bytes(_BASELINE_MAX.value)
  rows = []
  print("| shape | size | pieces | seconds | MB/s | baseline s | speed-up |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for shape in _SHAPES.value:
    for size in _SIZES.value:
      n = _bytes(size)
      text = make_text(n, shape)
      mb = len(text.encode("utf-8")) / 1e6
      result = {}
      seconds, times = median_time(
          lambda: result.update(out=_run(chunking, text, count)), _REPEATS.value)
      row = dict(shape=shape, size=size, bytes=int(mb * 1e6),
                 pieces=len(result["out"][0]), seconds=seconds, times=times,
                 mb_per_s=mb / seconds)
      if old is not None and n <= old_max:
        old_seconds, old_times = median_time(
            lambda: result.update(old=_run(old, text, count)), _REPEATS.value)
        if result["old"] != result["out"]:
          raise SystemExit(f"{shape} {size}: the baseline's pieces differ.")
        row.update(baseline_seconds=old_seconds, baseline_times=old_times)
      rows.append(row)
      base = (f"{row['baseline_seconds']:.2f} | "
              f"{row['baseline_seconds'] / seconds:.1f}x"
              if "baseline_seconds" in row else "— | —")
      print(f"| {shape} | {size} | {row['pieces']} | {seconds:.2f} | "
            f"{row['mb_per_s']:.2f} | {base} |", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump({"load_average": load, "tokenizer": _TOKENIZER.value,
                 "max_tokens": _MAX_TOKENS.value, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
