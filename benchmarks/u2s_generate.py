r"""Throughput of the U2S generation stage: pieces per minute, by batch size.

Runs :func:`fedjax_u2s.u2s.generate.generate_client` exactly as the pipeline
does (``fedjax_u2s/u2s/stage.py``): real SmolLM2-135M-Instruct (fp32, CPU),
the packaged demonstration pool embedded with all-MiniLM-L6-v2, k retrieved
demonstrations per piece, top-p sampling, parsing, filters and the JSONL
writer, on real Wikipedia lead paragraphs of one topic chunked at
``--max_tokens`` generator tokens. Each measurement uses a fresh temporary
output directory (``generate_client`` skips pieces already written).

Compile time is separated from steady-state time without running anything
twice: the benchmark routes the sampler's jitted ``sample_tokens`` and the
embedder's jitted encoder through an ahead-of-time cache (``.lower().compile()``
the first time a shape is seen, timed as compile; the compiled executable is
then run, timed as execution). ``steady s = wall s - compile s``; a long run
approaches the steady rate, because prompt lengths are bucketed to
``--pad_multiple`` and so only a bounded number of shapes is ever compiled.
Compiled shapes are shared across the measurements of one process (a shape
compiled for batch 8 is not compiled again), so every compile is counted once.

  python benchmarks/u2s_generate.py --out=/tmp/u2s_generate.json
  python benchmarks/u2s_generate.py --retrieval      # + benchmarks/retrieval.py

Default workload (a documented choice): 8 pieces at batch 1, 16 at batch 8
(two sampler calls), 32 at batch 32 (one call) (``--num_pieces``, one entry per
batch size); every measurement starts from the same first pieces of the topic,
so the first 8 are common to all three. Prompts hold 3 demonstrations plus the
piece (~650-900 tokens), so prefill is a large share of the work. Measured
2026-11-23 on 2 shared CPU cores at load average 3-7: 16/32/64 pieces took 41
min of generation (12 s/piece at batch 1, 20 at batch 8, 25 at batch 32), so
these defaults take roughly 10-20 min there, depending on the load. Use more
pieces on a quiet machine for tighter numbers. ``--retrieval`` then shells out to
``benchmarks/retrieval.py`` (1k and 100k pools, ScaNN vs exact) and merges its
JSON into ours, so one command reports both.

Prints a markdown table and the exact command; ``--out`` writes JSON. The
machine's load average is recorded before and after every measurement: other
jobs on a shared machine slow everything down, compare rows of one run only.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import numpy as np

from fedjax_u2s import decoding
from fedjax_u2s import sampler as sampler_lib
from fedjax_u2s.models import bert
from fedjax_u2s.models import registry
from fedjax_u2s.u2s import chunking
from fedjax_u2s.u2s import corpus as corpus_lib
from fedjax_u2s.u2s import generate as generate_lib
from fedjax_u2s.u2s import pool as pool_lib

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Generator name or path.")
_EMBEDDER = flags.DEFINE_string("embedder", "all-minilm-l6-v2", "Embedder name or path.")
_TOPIC = flags.DEFINE_string("topic", "medicine", "Wiki topic (wiki.TOPICS name).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 200, "Chunking: max generator tokens.")
_MIN_TOKENS = flags.DEFINE_integer("min_tokens", 24, "Chunking: min generator tokens.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "config.batch_size values.")
_NUM_PIECES = flags.DEFINE_list("num_pieces", ["8", "16", "32"],
                                "Pieces per measurement, one per batch size.")
_NEW = flags.DEFINE_integer("max_new_tokens", 192, "config.max_new_tokens.")
_K = flags.DEFINE_integer("num_demonstrations", 3, "config.num_demonstrations (k).")
_SELECTION = flags.DEFINE_enum("selection", "retrieval", list(generate_lib.SELECTIONS),
                               "config.selection.")
_PAD = flags.DEFINE_integer("pad_multiple", 128, "Sampler prompt length bucket "
                            "(configs/u2s_wiki.py: 128).")
_DECODE = flags.DEFINE_enum("decode", "auto", list(decoding.DECODES), "Sampler "
                            "decode path (configs/u2s_wiki.py: auto).")
_SEED = flags.DEFINE_integer("seed", 0, "Base seed of generate_client.")
_KEEP = flags.DEFINE_string("keep_dir", "", "Keep each run's generated files under "
                            "this folder (default: temporary, deleted).")
_RETRIEVAL = flags.DEFINE_bool("retrieval", False, "Also run benchmarks/retrieval.py "
                               "(pool sizes 1k and 100k) and merge its results.")
_RETRIEVAL_FLAGS = flags.DEFINE_string(
    "retrieval_flags", "--pool_sizes=1000,100000",
    "Flags passed to benchmarks/retrieval.py with --retrieval.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")


class AotCache:
  """Runs a jitted function through per-shape AOT executables, timing both.

  The first call with a new (argument shapes, static keywords) key lowers and
  compiles (``compile_s``); every call then runs the compiled executable and
  blocks on its result (``run_s``). Keywords must be the function's static
  arguments (as in ``Sampler`` and ``Embedder``).
  """

  def __init__(self, fn: Callable[..., Any], name: str):
    self.fn = fn
    self.name = name
    self.compiled: dict[Any, Any] = {}
    self.compile_s = 0.0
    self.run_s = 0.0
    self.calls = 0

  def _key(self, args, kwargs):
    leaves, tree = jax.tree.flatten(args)
    shapes = tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)
    return tree, shapes, tuple(sorted(kwargs.items()))

  def __call__(self, *args, **kwargs):
    key = self._key(args, kwargs)
    if key not in self.compiled:
      start = time.perf_counter()
      self.compiled[key] = self.fn.lower(*args, **kwargs).compile()
      self.compile_s += time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(self.compiled[key](*args))
    self.run_s += time.perf_counter() - start
    self.calls += 1
    return out

  def snapshot(self) -> dict[str, float]:
    return dict(compile_s=self.compile_s, run_s=self.run_s, calls=self.calls,
                shapes=len(self.compiled))


class CountingSampler:
  """Wraps a ``Sampler``: counts new tokens, stop reasons and prompt lengths.

  Only real rows count: ``generate_client`` pads short batches with copies
  whose row seeds are ``>= batch_size``.
  """

  def __init__(self, sampler: sampler_lib.Sampler, batch_size: int):
    self.sampler = sampler
    self.batch_size = batch_size
    self.new_tokens: list[int] = []
    self.prompt_tokens: list[int] = []
    self.padded_lengths: list[int] = []
    self.reasons: dict[str, int] = {}

  def __call__(self, params, prompts, **kwargs):
    out = self.sampler(params, prompts, **kwargs)
    row_seeds = kwargs.get("row_seeds") or range(len(prompts))
    longest = max(len(p) for p in prompts)
    self.padded_lengths.append(-(-longest // self.sampler.pad_multiple)
                               * self.sampler.pad_multiple)
    for prompt, tokens, reason, rs in zip(prompts, out.tokens, out.stop_reasons,
                                          row_seeds):
      if rs < self.batch_size:
        self.new_tokens.append(len(tokens))
        self.prompt_tokens.append(len(prompt))
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
    return out


def load_pieces(tokenizer, n: int) -> tuple[list[chunking.Piece], dict]:
  """The first ``n`` pieces of the topic's client (one client, no holdout)."""
  clients, _ = corpus_lib.wiki_clients(topics=(_TOPIC.value,), partition="topic")
  count = lambda text: len(tokenizer.encode(text))
  pieces, stats = chunking.chunk_documents(clients[0], count, _MAX_TOKENS.value,
                                           _MIN_TOKENS.value)
  if len(pieces) < n:
    raise ValueError(f"wiki topic {_TOPIC.value!r} yields {len(pieces)} pieces at "
                     f"max_tokens={_MAX_TOKENS.value}; --num_pieces asks for {n}. "
                     "Lower --num_pieces or pick another --topic.")
  return pieces[:n], dict(stats, documents=len(clients[0].documents))


def make_config(batch_size: int):
  cfg = generate_lib.default_config()
  cfg.batch_size = batch_size
  cfg.max_new_tokens = _NEW.value
  cfg.num_demonstrations = _K.value
  cfg.selection = _SELECTION.value
  return cfg


def measure(batch: int, pieces, *, model, embedder, pool, pool_emb, select_fn,
            smp, sample_cache: AotCache, embed_cache: AotCache) -> dict:
  """One ``generate_client`` call at ``batch`` on a fresh output directory."""
  counting = CountingSampler(smp, batch)
  select_s = [0.0]

  def timed_select(*args):
    start = time.perf_counter()
    out = select_fn(*args)
    select_s[0] += time.perf_counter() - start
    return out

  if _KEEP.value:
    out_dir = os.path.join(_KEEP.value, f"batch_{batch}")
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.makedirs(out_dir)
  else:
    out_dir = tempfile.mkdtemp(prefix=f"u2s_bench_b{batch}_")
  before = dict(sample=sample_cache.snapshot(), embed=embed_cache.snapshot())
  load_before = os.getloadavg()
  start = time.perf_counter()
  try:
    stats = generate_lib.generate_client(
        pieces, client_id=0, pool=pool, pool_embeddings=pool_emb,
        select_fn=timed_select, embedder=embedder, sampler=counting,
        params=model.params, tokenizer=model.tokenizer, config=make_config(batch),
        out_dir=out_dir, generator_name=_MODEL.value, seed=_SEED.value)
  finally:
    wall = time.perf_counter() - start
    if not _KEEP.value:
      shutil.rmtree(out_dir, ignore_errors=True)
  delta = {name: {k: cache.snapshot()[k] - before[name][k]
                  for k in ("compile_s", "run_s", "calls", "shapes")}
           for name, cache in (("sample", sample_cache), ("embed", embed_cache))}
  compile_s = delta["sample"]["compile_s"] + delta["embed"]["compile_s"]
  steady = wall - compile_s
  processed = stats.generated
  new_tokens = int(sum(counting.new_tokens))
  return dict(
      batch=batch, pieces=len(pieces), processed=processed, kept=stats.kept,
      rejected=stats.rejected, rejected_by_reason=stats.rejected_by_reason,
      yield_=stats.kept / processed if processed else 0.0,
      wall_s=wall, compile_s=compile_s, steady_s=steady,
      pieces_per_min=60 * processed / steady,
      pieces_per_min_with_compile=60 * processed / wall,
      new_tokens=new_tokens,
      mean_new_tokens=new_tokens / max(1, len(counting.new_tokens)),
      tokens_per_s=new_tokens / steady,
      decode_tokens_per_s=new_tokens / max(delta["sample"]["run_s"], 1e-9),
      sampler_calls=delta["sample"]["calls"],
      sampler_run_s=delta["sample"]["run_s"],
      sampler_compile_s=delta["sample"]["compile_s"],
      sampler_shapes_compiled=delta["sample"]["shapes"],
      embed_run_s=delta["embed"]["run_s"], embed_compile_s=delta["embed"]["compile_s"],
      embed_shapes_compiled=delta["embed"]["shapes"],
      select_s=select_s[0],
      other_s=steady - delta["sample"]["run_s"] - delta["embed"]["run_s"] - select_s[0],
      mean_prompt_tokens=float(np.mean(counting.prompt_tokens)) if counting.prompt_tokens else 0.0,
      padded_prompt_lengths=sorted(set(counting.padded_lengths)),
      stop_reasons=counting.reasons, demos_dropped=stats.demos_dropped,
      load_before=[round(x, 2) for x in load_before],
      load_after=[round(x, 2) for x in os.getloadavg()])


def run_retrieval_benchmark() -> dict:
  """Shells out to benchmarks/retrieval.py (its flags would clash with ours)."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "retrieval.py")
  fd, path = tempfile.mkstemp(prefix="retrieval_", suffix=".json")
  os.close(fd)
  cmd = [sys.executable, script, *_RETRIEVAL_FLAGS.value.split(), f"--out={path}"]
  print(f"\n## Retrieval (`{' '.join(cmd[1:-1])}`)\n", flush=True)
  try:
    subprocess.run(cmd, check=True)
    with open(path) as f:
      return json.load(f)
  finally:
    os.remove(path)


def command() -> str:
  names = ("model", "embedder", "topic", "max_tokens", "min_tokens", "batch_sizes",
           "num_pieces", "max_new_tokens", "num_demonstrations", "selection",
           "pad_multiple", "decode", "seed", "retrieval")
  parts = []
  for name in names:
    v = flags.FLAGS[name].value
    v = ",".join(v) if isinstance(v, list) else v
    parts.append(f"--{name}={str(v).lower() if isinstance(v, bool) else v}")
  if _RETRIEVAL.value:
    parts.append(f"--retrieval_flags='{_RETRIEVAL_FLAGS.value}'")
  return "python benchmarks/u2s_generate.py " + " ".join(parts)


def print_table(results: dict) -> None:
  print(f"\n`{results['command']}`\n")
  print(f"{results['machine']}, {results['cpus']} CPUs, jax {results['jax']} "
        f"({results['backend']}); generator {results['model']} fp32, embedder "
        f"{results['embedder']}; wiki topic {results['topic']!r}, pieces of "
        f"{results['max_tokens']} tokens at most (mean {results['mean_piece_tokens']:.0f}); "
        f"k={results['num_demonstrations']} demos by {results['selection']} from "
        f"{results['pool_size']}; top-p sampling; max_new_tokens "
        f"{results['max_new_tokens']}; prompt bucket {results['pad_multiple']}, "
        f"decode {results['decode']}.\n")
  print("| batch | pieces | kept (yield) | mean new tok/piece | compile s | steady s "
        "| **pieces/min** (steady) | pieces/min incl. compile | new tok/s (stage) "
        "| tok/s (sampler only) | load avg before/after |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
  for r in results["runs"]:
    print(f"| {r['batch']} | {r['processed']} | {r['kept']} ({r['yield_']:.0%}) | "
          f"{r['mean_new_tokens']:.0f} | {r['compile_s']:.1f} | {r['steady_s']:.1f} | "
          f"**{r['pieces_per_min']:.1f}** | {r['pieces_per_min_with_compile']:.1f} | "
          f"{r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
          f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |")
  print("\n| batch | sampler calls | sampler shapes compiled (s) | embed shapes "
        "compiled (s) | sampler run s | embed run s | select s | other s "
        "| mean prompt tok | padded prompt lengths | stop reasons | rejected |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
  for r in results["runs"]:
    print(f"| {r['batch']} | {r['sampler_calls']} | {r['sampler_shapes_compiled']} "
          f"({r['sampler_compile_s']:.1f}) | {r['embed_shapes_compiled']} "
          f"({r['embed_compile_s']:.1f}) | {r['sampler_run_s']:.1f} | "
          f"{r['embed_run_s']:.2f} | {r['select_s']:.3f} | {r['other_s']:.2f} | "
          f"{r['mean_prompt_tokens']:.0f} | {r['padded_prompt_lengths']} | "
          f"{r['stop_reasons']} | {r['rejected_by_reason']} |")
  print(f"\nLoad: model {results['model_load_s']:.1f} s, embedder "
        f"{results['embedder_load_s']:.1f} s, pieces (wiki + chunking) "
        f"{results['pieces_s']:.1f} s, pool embeddings + index "
        f"{results['pool_s']:.1f} s, stop-string tables {results['stop_tables_s']:.1f} s "
        "(all one-off, not in the table). Load average at start "
        f"{results['load_start']} (1/5/15 min) on {results['cpus']} CPUs.")


def main(argv):
  del argv
  batches = [int(b) for b in _BATCHES.value]
  counts = [int(n) for n in _NUM_PIECES.value]
  if len(counts) != len(batches):
    raise ValueError(f"--num_pieces has {len(counts)} entries for {len(batches)} "
                     "--batch_sizes; give one piece count per batch size.")
  results = dict(command=command(), machine=platform.machine(), cpus=os.cpu_count(),
                 jax=jax.__version__, backend=jax.default_backend(),
                 model=_MODEL.value, embedder=_EMBEDDER.value, topic=_TOPIC.value,
                 max_tokens=_MAX_TOKENS.value, min_tokens=_MIN_TOKENS.value,
                 max_new_tokens=_NEW.value, num_demonstrations=_K.value,
                 selection=_SELECTION.value, pad_multiple=_PAD.value,
                 decode=_DECODE.value, seed=_SEED.value,
                 load_start=[round(x, 2) for x in os.getloadavg()], runs=[])
  start = time.perf_counter()
  model = registry.load(_MODEL.value)
  jax.block_until_ready(model.params)
  results["model_load_s"] = time.perf_counter() - start
  start = time.perf_counter()
  embedder = bert.Embedder.load(_EMBEDDER.value)
  results["embedder_load_s"] = time.perf_counter() - start
  embed_cache = AotCache(embedder._embed, "embed")  # pylint: disable=protected-access
  embedder._embed = embed_cache  # pylint: disable=protected-access

  start = time.perf_counter()
  pieces, chunk_stats = load_pieces(model.tokenizer, max(counts))
  results["pieces_s"] = time.perf_counter() - start
  results["chunking"] = chunk_stats
  results["mean_piece_tokens"] = float(np.mean([p.meta["tokens"] for p in pieces]))

  start = time.perf_counter()
  pool = pool_lib.load_pool()
  pool_emb = embedder.embed([d.text for d in pool])
  select_fn = generate_lib.make_select_fn(_SELECTION.value, pool_emb)
  results["pool_s"] = time.perf_counter() - start
  results["pool_size"] = len(pool)
  print(f"model {results['model_load_s']:.1f}s, embedder "
        f"{results['embedder_load_s']:.1f}s, {len(pieces)} pieces "
        f"(mean {results['mean_piece_tokens']:.0f} tokens), pool of {len(pool)}; "
        f"load average {results['load_start']}", flush=True)

  smp = sampler_lib.Sampler(model.config, model.tokenizer, pad_multiple=_PAD.value,
                            decode=_DECODE.value)
  start = time.perf_counter()  # One-off: stop-string automata over the vocabulary.
  smp.stop_tables(tuple(make_config(1).stop_strings))
  results["stop_tables_s"] = time.perf_counter() - start
  sample_cache = AotCache(sampler_lib.sample_tokens, "sample")
  original = sampler_lib.sample_tokens
  sampler_lib.sample_tokens = sample_cache  # Sampler looks it up per call.
  try:
    for batch, n in zip(batches, counts):
      r = measure(batch, pieces[:n], model=model, embedder=embedder, pool=pool,
                  pool_emb=pool_emb, select_fn=select_fn, smp=smp,
                  sample_cache=sample_cache, embed_cache=embed_cache)
      results["runs"].append(r)
      if _OUT.value:  # After every measurement: a cut-short run keeps its rows.
        with open(_OUT.value, "w") as f:
          json.dump(results, f, indent=1)
      print(f"batch {batch:3d}: {r['processed']} pieces, {r['kept']} kept, "
            f"{r['pieces_per_min']:.1f} pieces/min steady ({r['steady_s']:.0f}s + "
            f"compile {r['compile_s']:.0f}s), {r['tokens_per_s']:.1f} new tok/s, "
            f"load {r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}", flush=True)
  finally:
    sampler_lib.sample_tokens = original
  print_table(results)
  if _RETRIEVAL.value:
    results["retrieval"] = run_retrieval_benchmark()
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
