r"""One federated round of LoRA tuning: our jitted FedAvg vs a PyTorch+PEFT loop.

The round the issue specifies: ``--clients`` clients x ``--local_steps`` local
AdamW steps (lr 2e-4) x ``--batch_size`` sequences of ``--seq_len`` tokens on
SmolLM2-135M-Instruct with LoRA r=16, alpha=32 on q, k, v, o, then FedAvg.
Data are random token ids (seed 0) with every position counted in the loss;
speed does not depend on the token values. Both sides start from the same
adapter (``a`` from :func:`fedjax_u2s.lora.init`, ``b`` = 0) and see the same
batches.

Each measurement runs in its own subprocess, so its peak RSS (``os.wait4``'s
``ru_maxrss``) belongs to that side alone:

* ours, once per ``--variants`` entry ``clients_per_chunk:remat:logits_chunk``:
  a large ``jnp.dot`` first (the machine's peak FLOP/s, same process), then the
  round built as in :mod:`fedjax_u2s.train` (``parallel.build`` over all
  devices, ``objectives.causal_lm_loss``), its AOT compile timed apart from the
  ``--rounds`` timed rounds (median reported);
* the peer (``benchmarks/federated_peer.py``, run by ``--peer_python``):
  transformers' LlamaForCausalLM + PEFT, clients trained one after another,
  adapters averaged (as OpenFedLLM does).

Model FLOP utilisation is ``4 x base params x tokens / seconds / peak`` (the
issue's convention for LoRA: forward 2, backward through activations 2, no
weight gradients); ``mfu6`` uses the dense-training ``6 x``. With the GGUF
weights, the averaged adapters of the first round (first variant) are
compared between the two sides (``adapter_vs_peer``: relative L2 distance of
the updates); with ``--random_weights`` the two bases differ, so they are not.

  python benchmarks/federated_round.py --out=/tmp/fed_round.json
  python benchmarks/federated_round.py --clients=2 --local_steps=2 \
      --variants=1:1:128,2:1:128

On a GPU (``--random_weights``: SmolLM2's exact shapes, random values, both
sides), ``--dtype=bfloat16`` runs both sides with bf16 base weights.
"""

from __future__ import annotations

import json
import os
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
from common import SMOLLM2_135M, peak_flops  # noqa: E402  (benchmarks/ is not a package)

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Model name or GGUF path.")
_CLIENTS = flags.DEFINE_integer("clients", 8, "Clients in the round.")
_STEPS = flags.DEFINE_integer("local_steps", 4, "Local steps per client.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Sequences per local step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Timed rounds per side (median reported).")
_VARIANTS = flags.DEFINE_list(
    "variants", ["8:1:128", "1:1:128", "8:0:128", "8:1:0"],
    "Our variants, each clients_per_chunk:remat(0/1):logits_chunk_size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute and base-weight dtype (adapters stay fp32).")
_RANDOM = flags.DEFINE_bool("random_weights", False,
                            "Random weights of SmolLM2-135M's shapes instead of the GGUF.")
_PEER = flags.DEFINE_bool("peer", True, "Also run the PyTorch + PEFT peer.")
_PEER_PY = flags.DEFINE_string(
    "peer_python", "", "Python with torch, transformers, peft (default: .venv-ref "
    "next to this checkout if present, else this interpreter).")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "Peer torch threads (0: default).")
_TF32 = flags.DEFINE_bool(
    "peer_tf32", True, "GPU fp32: let the peer's matmuls use TF32, as XLA's "
    "default precision does for ours (the peak dot too).")
_PEAK_N = flags.DEFINE_integer("peak_n", 2048, "Size of the peak-FLOP/s jnp.dot.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
# Internal: run one of our variants in this process.
_SIDE = flags.DEFINE_string("side", "", "Internal: 'ours' runs one variant.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Internal: the shared data directory.")
_VARIANT = flags.DEFINE_string("variant", "", "Internal: the variant to run.")

LORA = dict(rank=16, alpha=32.0, targets=("q", "k", "v", "o"))
LR = 2e-4


def parse_variant(v: str) -> dict:
  try:
    cpc, remat, chunk = (int(x) for x in v.split(":"))
  except ValueError:
    raise ValueError(f"--variants entry {v!r}: expected "
                     "clients_per_chunk:remat:logits_chunk_size, e.g. 8:1:128.") from None
  return dict(clients_per_chunk=cpc, remat=bool(remat), logits_chunk_size=chunk)


def run_ours(workdir: str, variant: dict) -> dict:
  """One of our variants in this process: peak dot, compile, timed rounds."""
  import jax
  import jax.numpy as jnp

  from fedjax_u2s import lora as lora_lib
  from fedjax_u2s.federated import algorithms
  from fedjax_u2s.federated import objectives
  from fedjax_u2s.federated import parallel
  from fedjax_u2s.federated.state import ClientBatches
  from fedjax_u2s.models import llama
  from fedjax_u2s.models import registry
  from fedjax_u2s.models.config import ModelConfig

  with open(os.path.join(workdir, "spec.json"), encoding="utf-8") as f:
    spec = json.load(f)
  data = np.load(os.path.join(workdir, "data.npz"))
  dtype = spec["dtype"]
  peak = peak_flops(_PEAK_N.value, jnp.dtype(dtype))

  start = time.perf_counter()
  if spec.get("gguf"):
    model = registry.load(spec["gguf"], dtype=dtype, param_dtype=dtype,
                          remat=variant["remat"])
    config, base = model.config, model.params
  else:
    config = ModelConfig.from_hf_config(spec["hf_config"], dtype=dtype,
                                        param_dtype=dtype, remat=variant["remat"])
    base = llama.init_params(jax.random.key(0), config)
  jax.block_until_ready(base)
  load_s = time.perf_counter() - start

  lcfg = lora_lib.LoraConfig(rank=spec["rank"], alpha=spec["alpha"],
                             targets=tuple(spec["targets"]))
  init_lora = {n: {"a": jnp.asarray(data[f"{n}_a"]), "b": jnp.asarray(data[f"{n}_b"])}
               for n in lcfg.target_names}
  tokens = data["tokens"]  # [C, S, B, T]
  c, s, b, t = tokens.shape
  ones = np.ones((c, s, 1, b, t), bool)
  host = ClientBatches(
      batch={"tokens": tokens[:, :, None].astype(np.int32), "input_mask": ones,
             "loss_mask": ones},
      step_mask=np.ones((c, s), bool),
      num_examples=np.full((c,), float(s * b), np.float32),
      client_ids=np.arange(c, dtype=np.int32))

  loss_fn = objectives.make_causal_lm_loss(
      config, lcfg, logits_chunk_size=variant["logits_chunk_size"])
  # No clipping and a constant lr, as in the runs docs/benchmarks.md records.
  fed = algorithms.AlgorithmConfig(algorithm="fedavg", client_optimizer="adamw",
                                   client_lr=spec["lr"], grad_clip=0.0,
                                   lr_schedule="constant", warmup_rounds=0,
                                   clients_per_chunk=variant["clients_per_chunk"])
  mesh = parallel.make_mesh()
  algo = parallel.build(fed, loss_fn, mesh)
  frozen = parallel.replicate(base, mesh)
  batches = parallel.shard_clients(
      parallel.pad_clients(host, parallel.client_multiple(algo, mesh)), mesh)

  def fresh_state():
    return parallel.replicate(algo.init(init_lora, jax.random.key(1), c), mesh)

  state = fresh_state()
  start = time.perf_counter()
  compiled = algo.apply.lower(state, frozen, batches).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()

  times, first = [], None
  for r in range(spec["rounds"]):
    state = fresh_state()  # Every timed round is the same first round.
    jax.block_until_ready(state)
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, batches)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    print(f"ours {variant} round {r}: {times[-1]:.1f}s loss "
          f"{float(metrics['loss']):.4f}", flush=True)
    if first is None:
      first = (jax.tree.map(np.asarray, state.params), float(metrics["loss"]))
  params, loss = first
  np.savez(os.path.join(workdir, "ours_adapter.npz"),
           **{f"{n}_{p}": params[n][p] for n in params for p in ("a", "b")})
  med = statistics.median(times)
  num_tokens = c * s * b * t
  n_params = config.num_params
  out = dict(
      variant=variant, seconds=med, round_seconds=times,
      tokens_per_s=num_tokens / med, compile_s=compile_s, load_s=load_s,
      loss=loss, peak_flops=peak, base_params=n_params,
      mfu=4.0 * n_params * num_tokens / med / peak,
      mfu6=6.0 * n_params * num_tokens / med / peak,
      devices=len(jax.devices()), backend=jax.default_backend(),
      device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
      self_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  if mem is not None:
    out["xla_temp_mb"] = getattr(mem, "temp_size_in_bytes", 0) / 2**20
  if jax.default_backend() != "cpu":
    stats = jax.devices()[0].memory_stats() or {}
    out["peak_device_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
  return out


def _spawn(cmd: list[str], out_path: str) -> dict:
  """Runs ``cmd``; returns its JSON result plus its own wall time and peak RSS."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    return dict(error=f"exit status {proc.returncode}: {' '.join(cmd)}")
  with open(out_path, encoding="utf-8") as f:
    result = json.load(f)
  result.update(peak_rss_mb=usage.ru_maxrss / 1024, wall_s=wall)
  return result


def _adapter_diff(workdir: str) -> dict:
  """How far apart the two sides' averaged adapters are, relative to the update.

  AdamW's first steps move every entry by about ``lr`` whatever the size of
  its gradient, so entries with near-zero gradients differ by up to ``lr``
  between two correct implementations; the relative L2 distance of the
  updates is the meaningful number.
  """
  ours = np.load(os.path.join(workdir, "ours_adapter.npz"))
  peer = np.load(os.path.join(workdir, "peer_adapter.npz"))
  init = np.load(os.path.join(workdir, "data.npz"))
  out = {}
  for part in ("a", "b"):
    keys = sorted(k for k in ours.files if k.endswith("_" + part))
    d_ours = np.concatenate([(ours[k] - init[k]).ravel() for k in keys])
    d_peer = np.concatenate([(peer[k] - init[k]).ravel() for k in keys])
    out[part] = dict(update_norm=float(np.linalg.norm(d_ours)),
                     peer_update_norm=float(np.linalg.norm(d_peer)),
                     rel_diff=float(np.linalg.norm(d_ours - d_peer)
                                    / max(np.linalg.norm(d_ours), 1e-30)),
                     max_abs_diff=float(np.max(np.abs(d_ours - d_peer))))
  return out


def main(argv):
  del argv
  if _SIDE.value == "ours":
    result = run_ours(_WORKDIR.value, parse_variant(_VARIANT.value))
    with open(os.path.join(_WORKDIR.value, "ours.json"), "w", encoding="utf-8") as f:
      json.dump(result, f)
    return

  variants = [parse_variant(v) for v in _VARIANTS.value]  # Fail early on typos.
  workdir = tempfile.mkdtemp(prefix="fed_round_")
  spec = dict(dtype=_DTYPE.value, lr=LR, rounds=_ROUNDS.value, hf_config=SMOLLM2_135M,
              rank=LORA["rank"], alpha=LORA["alpha"], targets=list(LORA["targets"]))
  if not _RANDOM.value:
    from fedjax_u2s.models import registry
    spec["gguf"] = registry.resolve(_MODEL.value)

  # Shared data and initial adapter (numpy, drawn here for both sides).
  rng = np.random.default_rng(0)
  shape = (_CLIENTS.value, _STEPS.value, _BATCH.value, _SEQ.value)
  arrays = {"tokens": rng.integers(0, SMOLLM2_135M["vocab_size"], shape, np.int32)}
  d, layers, r = SMOLLM2_135M["hidden_size"], SMOLLM2_135M["num_hidden_layers"], LORA["rank"]
  q = SMOLLM2_135M["num_attention_heads"] * SMOLLM2_135M["head_dim"]
  kv = SMOLLM2_135M["num_key_value_heads"] * SMOLLM2_135M["head_dim"]
  dims = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d)}
  for n in LORA["targets"]:
    d_in, d_out = dims[n]
    bound = (1.0 / d_in) ** 0.5  # PEFT's kaiming_uniform(a=sqrt(5)) on [r, in].
    arrays[f"{n}_a"] = rng.uniform(-bound, bound, (layers, d_in, r)).astype(np.float32)
    arrays[f"{n}_b"] = np.zeros((layers, r, d_out), np.float32)
  np.savez(os.path.join(workdir, "data.npz"), **arrays)

  # The parent never starts a JAX backend (on a GPU it would hold memory the
  # children need); the peer trains on CUDA when an NVIDIA device is present.
  backend = "gpu" if os.path.exists("/dev/nvidia0") else "cpu"
  spec["device"] = "cuda" if backend == "gpu" else "cpu"
  spec["tf32"] = _TF32.value
  with open(os.path.join(workdir, "spec.json"), "w", encoding="utf-8") as f:
    json.dump(spec, f)

  num_tokens = int(np.prod(shape))
  results = dict(machine=platform.machine(), cpus=os.cpu_count(), backend=backend,
                 load_avg_before=os.getloadavg(), clients=_CLIENTS.value,
                 local_steps=_STEPS.value, batch_size=_BATCH.value,
                 seq_len=_SEQ.value, tokens_per_round=num_tokens, dtype=_DTYPE.value,
                 weights="random" if _RANDOM.value else spec["gguf"],
                 rounds=_ROUNDS.value, ours=[])
  print(f"round: {shape} = {num_tokens} tokens, dtype {_DTYPE.value}, "
        f"load {os.getloadavg()}", flush=True)

  peer_py = _PEER_PY.value
  if not peer_py:
    ref = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       ".venv-ref", "bin", "python")
    peer_py = ref if os.path.exists(ref) else sys.executable
  if _PEER.value:
    cmd = [peer_py, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "federated_peer.py"),
           f"--workdir={workdir}", f"--out={workdir}/peer.json"]
    if _THREADS.value:
      cmd.append(f"--threads={_THREADS.value}")
    results["peer"] = _spawn(cmd, f"{workdir}/peer.json")
    results["load_avg_after_peer"] = os.getloadavg()
    print("peer:", json.dumps(results["peer"]), flush=True)

  for i, (v, v_str) in enumerate(zip(variants, _VARIANTS.value)):
    cmd = [sys.executable, os.path.abspath(__file__), "--side=ours",
           f"--workdir={workdir}", f"--variant={v_str}", f"--peak_n={_PEAK_N.value}"]
    row = _spawn(cmd, f"{workdir}/ours.json")
    row["load_avg_after"] = os.getloadavg()
    if "error" not in row and _PEER.value and "error" not in results["peer"]:
      peer = results["peer"]
      row["speedup_vs_peer"] = row["tokens_per_s"] / peer["tokens_per_s"]
      row["rss_vs_peer"] = row["peak_rss_mb"] / peer["peak_rss_mb"]
      row["peer_mfu"] = 4.0 * row["base_params"] * num_tokens / peer["seconds"] / row["peak_flops"]
      if i == 0 and not _RANDOM.value:  # Random bases differ between the sides.
        row["adapter_vs_peer"] = _adapter_diff(workdir)
    results["ours"].append(row)
    print(f"ours {v_str}:", json.dumps(row), flush=True)

  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
