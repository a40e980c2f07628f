r"""Packed vs padded training rounds on real U2S pairs, and the PyTorch + PEFT peer.

The rounds of the default main job (``configs/u2s_wiki.py``: SmolLM2-135M-
Instruct, LoRA r=16 alpha 32 on q, k, v, o, 6 clients, 3 per round, 4 local
steps of 4 examples of up to 320 tokens, response-only loss), on the pairs a
run wrote to ``--workdir/generated/client_*.jsonl``, tokenized and split as
``pipelines/u2s.py`` does, batched as ``train.py`` does for rounds
``0 .. --rounds-1`` (sampled clients and cursors included). Three sides, each
in its own subprocess so that its peak RSS (``os.wait4``) is its own:

* ``padded``: our round (``parallel.build`` over ``objectives.causal_lm_loss``,
  one client per vmapped step, no remat, full logits: the CPU defaults) on
  ``batching.round_batches(pack=False)``, [C, S, 1, 4, 320];
* ``packed``: the same round on ``round_batches(pack=True)``: every step
  holds the same examples, several per row;
* ``peer``: transformers' LlamaForCausalLM + PEFT, clients one after another
  with a fresh AdamW each, adapters averaged (OpenFedLLM's loop), every step
  padded to its longest example (what HF's ``DataCollatorForSeq2Seq`` does),
  labels -100 outside the responses.

Each side compiles (ours: ahead of time, per batch shape, timed apart) or
warms up (the peer: one step), then times its round ``--repeats`` times;
every timed round starts from the same fresh adapter. Each (round, side) is
one process, the sides alternating within each round, so that a shared
machine's changing load hits every side alike. Reported: useful
tokens/s (non-padding input tokens of the round over its seconds), loss
tokens/s, and their medians over the timed rounds. The comparison that
counts is packed vs padded and packed vs peer within one run::

  .venv/bin/python benchmarks/packing.py --workdir=/tmp/demo --rounds=3 \
      --clients_per_round=1 --out=/tmp/packing.json
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SMOLLM2_135M  # noqa: E402  (benchmarks/ is not a package)

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/demo",
                               "A U2S run's workdir (its generated/ pairs).")
_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Model name or GGUF path.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of the run to time (0 .. N-1).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timings of each round per side.")
_SIDES = flags.DEFINE_list(
    "sides", ["peer", "padded", "packed"],
    "Sides to run, in order: peer, padded, packed, or ab (padded and packed in "
    "one process, timed alternately --repeats times each).")
_CLIENTS = flags.DEFINE_integer("num_clients", 6, "Clients of the run.")
_PER_ROUND = flags.DEFINE_integer("clients_per_round", 3, "Clients per round.")
_STEPS = flags.DEFINE_integer("local_steps", 4, "Local steps per client.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Examples per step.")
_MAXLEN = flags.DEFINE_integer("max_length", 320, "Tokens per example.")
_PACK_LENGTH = flags.DEFINE_integer("pack_length", 0, "Packed row length (0: B x T).")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.1, "As config.data.eval_fraction.")
_SEED = flags.DEFINE_integer("seed", 0, "The run's seed.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_SIDE = flags.DEFINE_string("side", "", "Internal: run one side in this process.")
_DATA = flags.DEFINE_string("data", "", "Internal: the shared data directory.")
_ROUND = flags.DEFINE_integer("round", 0, "Internal: the round a side runs.")

LORA = dict(rank=16, alpha=32.0, targets=("q", "k", "v", "o"))
LR = 3e-4  # configs/u2s_wiki.py's client_lr.


def build_rounds(data_dir: str) -> dict:
  """Tokenizes the run's pairs and writes every timed round's batches."""
  from fedjax_u2s import lora as lora_lib
  from fedjax_u2s import tokenizer as tokenizer_lib
  from fedjax_u2s.data import batching
  from fedjax_u2s.data import instructions
  from fedjax_u2s.federated import sampling
  from fedjax_u2s.models import registry
  from fedjax_u2s.models.config import ModelConfig
  from fedjax_u2s.pipelines import common
  from fedjax_u2s.u2s import stage
  import jax

  gguf = registry.resolve(_MODEL.value)
  tok = tokenizer_lib.Tokenizer.from_gguf(gguf)
  sets = []
  for cid, recs in enumerate(stage.load_pairs(_WORKDIR.value, _CLIENTS.value)):
    train, _ = stage.split_eval(recs, _EVAL_FRACTION.value, _SEED.value, cid)
    sets.append(instructions.tokenize(
        [common.record_to_example(r, cid) for r in train], tok, _MAXLEN.value,
        name=f"client {cid}"))
  cursors = np.zeros(len(sets), np.int64)
  rounds = []
  for r in range(_ROUNDS.value):
    ids = sampling.sample_clients(_SEED.value, r, len(sets), _PER_ROUND.value)
    kw = dict(batch_size=_BATCH.value, grad_accum=1, local_steps=_STEPS.value,
              seed=_SEED.value)
    picked = [sets[i] for i in ids]
    padded, new = batching.round_batches(picked, ids, cursors[ids], **kw)
    packed, _ = batching.round_batches(picked, ids, cursors[ids], pack=True,
                                       pack_length=_PACK_LENGTH.value, **kw)
    cursors[ids] = new
    # Plain dicts of numpy arrays: the peer unpickles them without JAX.
    rounds.append(dict(ids=[int(i) for i in ids], padded=_plain(padded),
                       packed=_plain(packed)))
  with open(os.path.join(data_dir, "rounds.pkl"), "wb") as f:
    pickle.dump(rounds, f)

  # The initial adapter, shared by all sides (ours: a [L, in, r], b [L, r, out]).
  config = ModelConfig.from_hf_config(SMOLLM2_135M)
  lcfg = lora_lib.LoraConfig(**LORA)
  init = lora_lib.init(jax.random.key(0), config, lcfg)
  np.savez(os.path.join(data_dir, "adapter.npz"),
           **{f"{n}_{p}": np.asarray(init[n][p]) for n in init for p in ("a", "b")})
  spec = dict(gguf=gguf, lr=LR, repeats=_REPEATS.value, **LORA)
  spec["targets"] = list(LORA["targets"])
  with open(os.path.join(data_dir, "spec.json"), "w", encoding="utf-8") as f:
    json.dump(spec, f)
  return dict(examples_per_client=[len(s) for s in sets],
              length_percentiles={str(q): float(np.percentile(
                  np.concatenate([s.input_mask.sum(1) for s in sets]), q))
                  for q in (0, 25, 50, 75, 100)})


def _plain(b) -> dict:
  return dict(batch={k: np.asarray(v) for k, v in b.batch.items()},
              step_mask=np.asarray(b.step_mask), num_examples=np.asarray(b.num_examples),
              client_ids=np.asarray(b.client_ids))


def _round_stats(b: dict) -> dict:
  m = b["batch"]["input_mask"]
  return dict(useful=int(m.sum()), positions=int(m.size),
              loss_tokens=int(b["batch"]["loss_mask"][..., 1:].sum()),
              shape=list(b["batch"]["tokens"].shape))


def run_ours(data_dir: str, side: str, which: int) -> dict:
  """Our round ``which`` on its padded or packed batches."""
  import jax
  import jax.numpy as jnp

  from fedjax_u2s import lora as lora_lib
  from fedjax_u2s.federated import algorithms
  from fedjax_u2s.federated import objectives
  from fedjax_u2s.federated import parallel
  from fedjax_u2s.federated.state import ClientBatches
  from fedjax_u2s.models import registry

  with open(os.path.join(data_dir, "spec.json"), encoding="utf-8") as f:
    spec = json.load(f)
  with open(os.path.join(data_dir, "rounds.pkl"), "rb") as f:
    rounds = pickle.load(f)
  data = np.load(os.path.join(data_dir, "adapter.npz"))
  model = registry.load(spec["gguf"])
  config, base = model.config, model.params
  lcfg = lora_lib.LoraConfig(rank=spec["rank"], alpha=spec["alpha"],
                             targets=tuple(spec["targets"]))
  init_lora = {n: {"a": jnp.asarray(data[f"{n}_a"]), "b": jnp.asarray(data[f"{n}_b"])}
               for n in lcfg.target_names}
  loss_fn = objectives.make_causal_lm_loss(config, lcfg)
  # The main job's federated settings that affect the work, a constant lr.
  fed = algorithms.AlgorithmConfig(algorithm="fedavg", client_optimizer="adamw",
                                   client_lr=spec["lr"], grad_clip=1.0,
                                   lr_schedule="constant", warmup_rounds=0,
                                   clients_per_chunk=1)
  mesh = parallel.make_mesh()
  algo = parallel.build(fed, loss_fn, mesh)
  frozen = parallel.replicate(base, mesh)
  def prepare(layout):
    """The round's batches in ``layout``, its compiled round, a state maker."""
    host = ClientBatches(**rounds[which][layout])
    batches = parallel.shard_clients(
        parallel.pad_clients(host, parallel.client_multiple(algo, mesh)), mesh)

    def fresh():
      state = parallel.replicate(algo.init(init_lora, jax.random.key(1),
                                           len(host.client_ids)), mesh)
      return jax.block_until_ready(state)

    start = time.perf_counter()
    compiled = algo.apply.lower(fresh(), frozen, batches).compile()
    return batches, compiled, fresh, time.perf_counter() - start

  def timed(prepared):
    batches, compiled, fresh, _ = prepared
    state = fresh()
    start = time.perf_counter()
    _, metrics = compiled(state, frozen, batches)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start, metrics

  # "ab": both layouts in this process, timed alternately (padded, packed,
  # padded, ...), so that load drift hits both alike.
  layouts = ["padded", "packed"] if side == "ab" else [side]
  prepared = {name: prepare(name) for name in layouts}
  times = {name: [] for name in layouts}
  metrics = {}
  for _ in range(spec["repeats"]):
    for name in layouts:
      t, metrics[name] = timed(prepared[name])
      times[name].append(t)
      print(f"{name} round {which}: {t:.1f}s loss {float(metrics[name]['loss']):.4f}",
            flush=True)
  rows = []
  for name in layouts:
    stats = _round_stats(rounds[which][name])
    assert int(metrics[name]["num_tokens"]) == stats["loss_tokens"], (metrics, stats)
    rows.append(dict(round=which, layout=name, seconds=times[name],
                     loss=float(metrics[name]["loss"]), **stats))
  return dict(side=side, rounds=rows,
              compile_s=[prepared[n][3] for n in layouts], jax=jax.__version__,
              self_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def run_peer(data_dir: str, which: int) -> dict:
  """PyTorch + PEFT: clients in sequence, each step padded to its longest."""
  import peft
  import torch
  import transformers

  with open(os.path.join(data_dir, "spec.json"), encoding="utf-8") as f:
    spec = json.load(f)
  with open(os.path.join(data_dir, "rounds.pkl"), "rb") as f:
    rounds = pickle.load(f)
  data = np.load(os.path.join(data_dir, "adapter.npz"))
  d, f = os.path.split(spec["gguf"])
  model = transformers.AutoModelForCausalLM.from_pretrained(
      d, gguf_file=f, torch_dtype=torch.float32)
  model.config.use_cache = False
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
      target_modules=[_MODULES[n] for n in spec["targets"]], bias="none",
      task_type="CAUSAL_LM"))
  model.train()
  init = {}
  for name, module in model.named_modules():
    if hasattr(module, "lora_A") and name.endswith(tuple(_MODULES.values())):
      layer = int(name.split(".layers.")[1].split(".")[0])
      short = [k for k, v in _MODULES.items() if name.endswith(v)][0]
      init[module.lora_A["default"].weight] = torch.from_numpy(
          data[f"{short}_a"][layer].T.copy())
      init[module.lora_B["default"].weight] = torch.from_numpy(
          data[f"{short}_b"][layer].T.copy())
  trainable = [p for p in model.parameters() if p.requires_grad]
  assert len(init) == len(trainable), (len(init), len(trainable))

  def reset():
    with torch.no_grad():
      for p in trainable:
        p.copy_(init[p])

  def step_batch(batch, c, s):
    """Client c's step s, padded to its longest example (the collator's way)."""
    m = batch["input_mask"][c, s, 0]  # [B, T]
    real = m.any(-1)
    n = int(m.sum(-1).max())
    tok = torch.from_numpy(batch["tokens"][c, s, 0][real, :n].astype(np.int64))
    att = torch.from_numpy(m[real, :n].astype(np.int64))
    labels = torch.where(torch.from_numpy(batch["loss_mask"][c, s, 0][real, :n]),
                         tok, torch.full_like(tok, -100))
    return tok, att, labels

  def one_round(b):
    total = {p: torch.zeros_like(p) for p in trainable}
    losses = []
    step_mask = b["step_mask"]
    for c in range(step_mask.shape[0]):
      reset()
      opt = torch.optim.AdamW(trainable, lr=spec["lr"], betas=(0.9, 0.999),
                              eps=1e-8, weight_decay=0.0)
      for s in range(step_mask.shape[1]):
        if not step_mask[c, s]:
          continue
        tok, att, labels = step_batch(b["batch"], c, s)
        out = model(input_ids=tok, attention_mask=att, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
      with torch.no_grad():
        for p in trainable:
          total[p] += p
    return float(np.mean(losses))

  # Warm-up: one step (allocator, kernels).
  reset()
  tok, att, labels = step_batch(rounds[which]["padded"]["batch"], 0, 0)
  model(input_ids=tok, attention_mask=att, labels=labels).loss.backward()
  model.zero_grad(set_to_none=True)
  rows = []
  for r, rnd in [(which, rounds[which])]:
    b = rnd["padded"]
    times = []
    for _ in range(spec["repeats"]):
      start = time.perf_counter()
      loss = one_round(b)
      times.append(time.perf_counter() - start)
    stats = _round_stats(b)
    m = b["batch"]["input_mask"][:, :, 0]  # [C, S, B, T]
    stats["positions"] = int(sum(int(m[c, s].any(-1).sum()) * int(m[c, s].sum(-1).max())
                                 for c in range(m.shape[0]) for s in range(m.shape[1])
                                 if m[c, s].any()))
    rows.append(dict(round=r, seconds=times, loss=loss, **stats))
    print(f"peer round {r}: {min(times):.1f}s loss {loss:.4f}", flush=True)
  return dict(side="peer", rounds=rows, torch=torch.__version__, peft=peft.__version__,
              torch_threads=torch.get_num_threads(),
              self_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _spawn(cmd: list[str], out_path: str) -> dict:
  start = time.perf_counter()
  proc = subprocess.Popen(cmd)
  _, status, usage = os.wait4(proc.pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    return dict(error=f"exit status {os.waitstatus_to_exitcode(status)}: {' '.join(cmd)}")
  with open(out_path, encoding="utf-8") as f:
    result = json.load(f)
  result.update(peak_rss_mb=usage.ru_maxrss / 1024, wall_s=time.perf_counter() - start)
  return result


def _summarize(result: dict) -> None:
  """Adds per-round and median useful / loss tokens per second."""
  per = []
  for row in result["rounds"]:
    sec = statistics.median(row["seconds"])
    row["useful_tokens_per_s"] = row["useful"] / sec
    row["loss_tokens_per_s"] = row["loss_tokens"] / sec
    row["padding_efficiency"] = row["useful"] / row["positions"]
    per.append(row)
  result["median_useful_tokens_per_s"] = statistics.median(
      r["useful_tokens_per_s"] for r in per)
  result["median_loss_tokens_per_s"] = statistics.median(r["loss_tokens_per_s"] for r in per)
  result["total_seconds"] = sum(statistics.median(r["seconds"]) for r in per)


def main(argv):
  del argv
  if _SIDE.value:
    result = (run_peer(_DATA.value, _ROUND.value) if _SIDE.value == "peer"
              else run_ours(_DATA.value, _SIDE.value, _ROUND.value))
    with open(os.path.join(_DATA.value, f"{_SIDE.value}.json"), "w", encoding="utf-8") as f:
      json.dump(result, f)
    return
  data_dir = tempfile.mkdtemp(prefix="packing_")
  results = dict(machine=platform.machine(), cpus=os.cpu_count(),
                 load_avg_before=os.getloadavg(), workdir=_WORKDIR.value,
                 rounds=_ROUNDS.value, repeats=_REPEATS.value,
                 clients_per_round=_PER_ROUND.value,
                 data=build_rounds(data_dir), sides={})
  print(json.dumps(results), flush=True)
  # One process per (round, side), the sides alternating within each round,
  # so that a shared machine's changing load hits all sides alike.
  for r in range(_ROUNDS.value):
    for side in _SIDES.value:
      cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}",
             f"--data={data_dir}", f"--round={r}"]
      one = _spawn(cmd, os.path.join(data_dir, f"{side}.json"))
      one["load_avg_after"] = os.getloadavg()
      res = results["sides"].setdefault(side, dict(rounds=[], runs=[]))
      if "error" in one:
        res["error"] = one["error"]
        continue
      res["rounds"] += one.pop("rounds")
      res["runs"].append(one)
      print(side, r, json.dumps(res["rounds"][-1]), json.dumps(one), flush=True)
  for side, res in results["sides"].items():
    if "error" not in res:
      res["peak_rss_mb"] = max(run["peak_rss_mb"] for run in res["runs"])
      _summarize(res)
  ok = {k: v for k, v in results["sides"].items() if "error" not in v}
  if "packed" in ok:
    for other in ("padded", "peer"):
      if other in ok:
        results[f"packed_vs_{other}"] = (ok["packed"]["median_useful_tokens_per_s"]
                                         / ok[other]["median_useful_tokens_per_s"])
        results[f"packed_vs_{other}_per_round"] = [
            a["useful_tokens_per_s"] / b["useful_tokens_per_s"]
            for a, b in zip(ok["packed"]["rounds"], ok[other]["rounds"])]
  if "ab" in ok:  # Same process: the ratio of paired times is the speedup.
    rows = ok["ab"]["rounds"]
    pairs = [(a, b) for a in rows if a["layout"] == "padded"
             for b in rows if b["layout"] == "packed" and b["round"] == a["round"]]
    results["ab_packed_vs_padded_each"] = [
        x / y for a, b in pairs for x, y in zip(a["seconds"], b["seconds"])]
    results["ab_packed_vs_padded"] = statistics.median(
        results["ab_packed_vs_padded_each"])
  results["load_avg_after"] = os.getloadavg()
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  summary = {k: v for k, v in results.items() if k != "sides"}
  summary["sides"] = {k: {m: v.get(m) for m in (
      "median_useful_tokens_per_s", "median_loss_tokens_per_s", "total_seconds",
      "peak_rss_mb", "error")} for k, v in results["sides"].items()}
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
