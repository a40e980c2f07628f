"""The steps every job shares.

Loading the model a config names, stage markers in the workdir, "do it on the
lead process, then let every process continue", generated records as training
examples, tokenize -> federated training -> export, and evaluation cached per
model. A job module (``fedit.py``, ``u2s.py``, ``claim.py``) is the order in
which it calls these, plus what is its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
import ml_collections

from fedjax_u2s import export
from fedjax_u2s import train
from fedjax_u2s.data import champ
from fedjax_u2s.data import instructions
from fedjax_u2s.data import wiki
from fedjax_u2s.evaluation import report
from fedjax_u2s.evaluation import runner
from fedjax_u2s.federated import parallel
from fedjax_u2s.models import bert
from fedjax_u2s.models import registry
from fedjax_u2s.pipelines import workdir as workdir_lib
from fedjax_u2s.pipelines.workdir import Stage
from fedjax_u2s.u2s import pool as pool_lib
from fedjax_u2s.u2s import writer

STAGES_DIR = workdir_lib.STAGES_DIR


# ----------------------------------------------------------------------------
# What determines each stage (see workdir.py), shared by the jobs.

MODEL_FIELDS = ("seed", "model.name", "model.dtype", "model.param_dtype")
TRAIN_FIELDS = MODEL_FIELDS + ("lora", "federated", "train", "train_eval", "data",
                               "partition")
# Do not change what training computes: the simulated preemption, TensorBoard.
TRAIN_IGNORE = ("train.halt_after_round", "train.tensorboard")
TRAIN_OUTPUTS = ("checkpoints", "checkpoints_corrupt", "metrics.jsonl", "tensorboard",
                 "curves.png", "adapter", "merged", "data_stats.json")


def model_file(config: ml_collections.ConfigDict) -> dict[str, str]:
  return {"model": registry.resolve(config.model.name)}


def generation_files(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Model, generator, corpus and demonstration pool files of U2S generation."""
  files = model_file(config)
  if config.generator.name:
    files["generator"] = registry.resolve(config.generator.name)
  files["embedder"] = bert.resolve(config.embedder.name)
  builtin = {"wiki": wiki.resolve_path, "champ": champ.resolve_path}.get(config.corpus.kind)
  files["corpus"] = config.corpus.path or (builtin() if builtin else "")
  files["pool"] = config.pool.path or pool_lib.DEFAULT_POOL
  return files


def generation_stage(outputs: tuple[str, ...]) -> Stage:
  return Stage("generate", fields=MODEL_FIELDS + (
      "generator", "embedder", "corpus", "chunking", "pool", "retrieval", "u2s"),
               files=generation_files, outputs=outputs)


def train_stage(outputs: tuple[str, ...] = TRAIN_OUTPUTS, files=model_file) -> Stage:
  return Stage("train", fields=TRAIN_FIELDS, ignore=TRAIN_IGNORE, files=files,
               outputs=outputs)


def evaluate_stage(outputs: tuple[str, ...], extra: tuple[str, ...] = ()) -> Stage:
  return Stage("evaluate", fields=("seed", "evaluate") + extra, outputs=outputs)


# ----------------------------------------------------------------------------
# Model and workdir.


def load_model(config: ml_collections.ConfigDict, name: str | None = None
               ) -> registry.LoadedModel:
  """The model ``config.model`` describes (or ``name``, with its dtypes).

  With ``config.mesh.model_parallel`` > 1 in a single process the weights
  are read into host memory and split over the mesh's model axis
  (``parallel.shard_base``) once, here: generation, training, evaluation and
  export then share that one split copy and no device ever holds the whole
  base. With several processes, generation and evaluation run on the lead
  alone, so the loaded copy stays as it is and training splits its own.
  """
  m = config.model
  load = lambda: registry.load(name or m.name, dtype=m.dtype,
                               param_dtype=m.param_dtype, remat=m.get("remat", False))
  mesh_cfg = config.get("mesh")
  model_parallel = mesh_cfg.get("model_parallel", 1) if mesh_cfg else 1
  if model_parallel <= 1 or jax.process_count() > 1:
    return load()
  mesh = parallel.make_mesh(mesh_cfg.num_devices or None, model_parallel=model_parallel)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    model = load()
  return dataclasses.replace(model, params=parallel.shard_base(model.params, mesh))


def load_generator(config: ml_collections.ConfigDict, model: registry.LoadedModel
                   ) -> registry.LoadedModel:
  """The U2S generator: ``config.generator.name``, else the model being tuned."""
  name = config.generator.name
  return load_model(config, name) if name and name != config.model.name else model


def stage_done(workdir: str, stage: str) -> dict | None:
  """The summary a finished ``stage`` left in ``workdir/stages/``, or None."""
  path = os.path.join(workdir, STAGES_DIR, f"{stage}.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  return None


def mark_done(workdir: str, stage: str, summary: dict) -> None:
  """Records ``stage`` as finished with ``summary`` (atomically)."""
  os.makedirs(os.path.join(workdir, STAGES_DIR), exist_ok=True)
  writer.atomic_write_json(os.path.join(workdir, STAGES_DIR, f"{stage}.json"), summary)


def format_seconds(seconds: float) -> str:
  """``"42s"``, ``"3m 05s"``, ``"1h 02m"``."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m {seconds % 60:02d}s"
  return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


@contextlib.contextmanager
def stage(name: str, what: str = ""):
  """Prints one line when a stage starts and one with its wall time when it ends."""
  if is_lead():
    print(f"\n== {name}" + (f": {what}" if what else "") + " ==", flush=True)
  start = time.perf_counter()
  yield
  if is_lead():
    print(f"== {name}: done in {format_seconds(time.perf_counter() - start)} ==",
          flush=True)


def is_lead() -> bool:
  """Whether this process writes reports and runs the host-only stages."""
  return jax.process_index() == 0


def lead_then_sync(fn: Callable[[], Any], tag: str) -> None:
  """Runs ``fn`` on the lead process; every process waits until it is done.

  Generation and other stages that write files once run on process 0 only;
  the barrier keeps the others from reading those files early.
  """
  if is_lead():
    fn()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(tag)


def run_stage(workdir: str, stage: str, fn: Callable[[], dict]) -> dict:
  """``fn()``'s summary, computed once (on the lead process) and then read back.

  A finished stage is skipped on a rerun: its marker in ``workdir/stages/``
  holds what ``fn`` returned. Only the lead decides whether to run it, and
  every process meets at the barrier either way (a process that looked at the
  marker after the lead wrote it would otherwise skip the barrier the lead
  waits at).
  """
  def run():
    if stage_done(workdir, stage) is None:
      mark_done(workdir, stage, fn())
  lead_then_sync(run, f"stage_{stage}_{workdir}")
  return stage_done(workdir, stage)


# ----------------------------------------------------------------------------
# Data.


def record_to_example(record: dict, client_id: int) -> instructions.Example:
  """A generated ``{instruction, response, piece_id}`` record as a training example."""
  return instructions.Example(
      messages=({"role": "user", "content": record["instruction"]},
                {"role": "assistant", "content": record["response"]}),
      meta={"client": client_id, "piece_id": record.get("piece_id")})


def _tokenize_stats(s) -> dict:
  return {k: int(v) for k, v in s.stats.items()} if hasattr(s, "stats") else {}


# ----------------------------------------------------------------------------
# Training and evaluation.


def tune_and_export(config: ml_collections.ConfigDict, workdir: str,
                    model: registry.LoadedModel, client_examples: Sequence[list],
                    eval_examples: list, read: instructions.DropReport | None = None,
                    client_sets: Sequence[instructions.TokenizedSet] | None = None
                    ) -> tuple[train.TrainResult, dict]:
  """Tokenizes client data, runs federated training, exports the adapter.

  ``client_sets`` given (already tokenized, e.g. the claim experiment's
  raw-text windows), they are trained on as they are and ``client_examples``
  only names what each set came from (its length is reported).

  Writes ``data_stats.json`` before training: what the reader dropped
  (``read``), and per client and for the held-out set the examples
  tokenized, kept and dropped by reason (a warning when over 10% are
  dropped); and ``adapter/`` (PEFT) and ``merged/`` (HF safetensors) as
  ``config.export`` asks, on the lead process.

  Returns:
    ``(training result, data stats)``.
  """
  system = config.data.system_prompt or None
  tok = lambda exs, name: instructions.tokenize(
      exs, model.tokenizer, config.train.max_length, system_prompt=system, name=name)
  if client_sets is None:
    client_sets = [tok(exs, f"client {i}") for i, exs in enumerate(client_examples)]
  eval_set = tok(eval_examples, "held-out pairs") if eval_examples else None
  stats: dict[str, Any] = {}
  if read is not None:
    stats["read"] = read.as_dict()
  stats["clients"] = [dict(client=i, examples=len(exs), **_tokenize_stats(s))
                      for i, (exs, s) in enumerate(zip(client_examples, client_sets))]
  reports = [s.drops for s in client_sets if s.drops is not None]
  if reports:
    # Each set's tokenize() logged its own counts; the console gets the total.
    print("Training examples: " + sum(reports[1:], reports[0]).summary())
  if eval_set is not None:
    stats["eval"] = _tokenize_stats(eval_set)
  if is_lead():
    writer.atomic_write_json(os.path.join(workdir, "data_stats.json"), stats)
  result = train.train(config, workdir, model_config=model.config,
                       base_params=model.params, client_sets=client_sets,
                       eval_set=eval_set)
  if is_lead():
    if config.export.peft:
      export.save_peft(os.path.join(workdir, "adapter"), result.lora,
                       result.lora_config, base_model=config.model.name)
    if config.export.merged:
      export.save_merged(os.path.join(workdir, "merged"), model.config, model.params,
                         result.lora, result.lora_config, model.tokenizer,
                         base_model=config.model.name)
  return result, stats


def evaluate_cached(config: ml_collections.ConfigDict, model: registry.LoadedModel,
                    suites: list, directory: str, name: str, lora=None,
                    lora_config=None) -> dict:
  """Scores one model on ``suites``; cached as ``directory/<name>.json``.

  A rerun reads the file instead of scoring again (``<name>.md`` beside it is
  the same results as a table).
  """
  path = os.path.join(directory, f"{name}.json")
  if not os.path.exists(path):
    res = runner.evaluate(model.config, model.params, model.tokenizer, suites,
                          lora=lora, lora_config=lora_config,
                          batch_size=config.evaluate.batch_size, seed=config.seed,
                          decode=config.evaluate.decode)
    report.write_results(res, directory, name)
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@contextlib.contextmanager
def persistent_compilation_cache(path: str | None):
  """JAX's persistent compilation cache in ``path`` for the block (None: as is).

  Jobs that build the same jitted round many times (every arm and seed of an
  experiment) turn most compiles into lookups; the previous settings are
  restored afterwards.
  """
  if path is None:
    yield
    return
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  for n, v in zip(names, (path, 0.0, -1)):
    jax.config.update(n, v)
  compilation_cache.reset_cache()  # Re-initialized from the new settings at the next compile.
  try:
    yield
  finally:
    for n, v in old.items():
      jax.config.update(n, v)
    compilation_cache.reset_cache()
