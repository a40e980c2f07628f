r"""The PyTorch + PEFT peer of benchmarks/federated_round.py (one FedAvg round).

Trains the clients one after another, as OpenFedLLM does: every client starts
from the same global LoRA adapter with a fresh ``torch.optim.AdamW``, runs its
local steps on its own batches, and the server averages the adapters
(equal weights: every client holds the same number of examples). Reads the
shared data and initial adapter that ``federated_round.py`` wrote to
``<workdir>/data.npz`` and ``<workdir>/spec.json``; writes its timings to
``--out``. Imports nothing from fedjax_u2s and no JAX, so it runs in the
reference environment (torch, transformers, peft)::

  python benchmarks/federated_peer.py --workdir=/tmp/x --out=/tmp/x/peer.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import numpy as np

_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
            "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def build_model(spec, device, dtype):
  """LlamaForCausalLM from the GGUF (CPU) or random weights of its shapes."""
  import torch
  import transformers
  if spec.get("gguf"):
    d, f = os.path.split(spec["gguf"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, torch_dtype=torch.float32)
  else:
    torch.manual_seed(0)
    hf = {k: v for k, v in spec["hf_config"].items() if k != "model_type"}
    cfg = transformers.LlamaConfig(**hf)
    model = transformers.LlamaForCausalLM(cfg)
  return model.to(device=device, dtype=dtype)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--threads", type=int, default=0)
  args = parser.parse_args()

  import peft
  import torch
  if args.threads:
    torch.set_num_threads(args.threads)
  with open(os.path.join(args.workdir, "spec.json"), encoding="utf-8") as f:
    spec = json.load(f)
  data = np.load(os.path.join(args.workdir, "data.npz"))
  device = spec["device"]
  if device.startswith("cuda") and spec.get("tf32"):
    torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default fp32 dot on GPU.
    torch.backends.cudnn.allow_tf32 = True
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
  tokens = torch.from_numpy(data["tokens"].astype(np.int64))  # [C, S, B, T]
  num_clients, num_steps, batch, seq = tokens.shape

  start = time.perf_counter()
  model = build_model(spec, device, dtype)
  load_s = time.perf_counter() - start
  model.config.use_cache = False
  lcfg = peft.LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                         target_modules=[_MODULES[n] for n in spec["targets"]],
                         bias="none", task_type="CAUSAL_LM")
  model = peft.get_peft_model(model, lcfg)
  model.train()

  # The shared initial adapter: ours stores a as [L, in, r] and b as [L, r, out];
  # PEFT's lora_A.weight is [r, in] and lora_B.weight is [out, r].
  init = {}
  for name, module in model.named_modules():
    if not name.endswith(tuple(_MODULES[n] for n in spec["targets"])):
      continue
    if not hasattr(module, "lora_A"):
      continue
    layer = int(name.split(".layers.")[1].split(".")[0])
    short = [k for k, v in _MODULES.items() if name.endswith(v)][0]
    a = module.lora_A["default"].weight
    b = module.lora_B["default"].weight
    init[a] = torch.from_numpy(data[f"{short}_a"][layer].T.copy())
    init[b] = torch.from_numpy(data[f"{short}_b"][layer].T.copy())
  trainable = [p for p in model.parameters() if p.requires_grad]
  if len(init) != len(trainable):
    raise RuntimeError(f"federated_peer: {len(init)} adapter tensors matched, "
                       f"{len(trainable)} trainable; the module names changed?")
  trainable_names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}

  def sync():
    if device.startswith("cuda"):
      torch.cuda.synchronize()

  def reset(values):
    with torch.no_grad():
      for p in trainable:
        p.copy_(values[p].to(device=p.device, dtype=p.dtype))

  def train_client(c, steps):
    opt = torch.optim.AdamW(trainable, lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    losses = []
    for s in range(steps):
      x = tokens[c, s].to(device)
      out = model(input_ids=x, labels=x)  # Mean over the B * (T - 1) targets.
      out.loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
      losses.append(out.loss.detach())
    return [float(l) for l in losses]

  def one_round():
    total = {p: torch.zeros_like(p, dtype=torch.float32) for p in trainable}
    losses = []
    for c in range(num_clients):
      reset(init)
      losses += train_client(c, num_steps)
      with torch.no_grad():
        for p in trainable:
          total[p] += p.float()
    sync()
    return {p: t / num_clients for p, t in total.items()}, losses

  # Warm-up: one step of client 0 (allocator, kernels), then back to the start.
  reset(init)
  train_client(0, 1)
  sync()
  times, first = [], None
  for r in range(spec["rounds"]):
    start = time.perf_counter()
    avg, losses = one_round()
    times.append(time.perf_counter() - start)
    if first is None:
      first = (avg, losses)
    print(f"peer round {r}: {times[-1]:.1f}s loss {np.mean(losses):.4f}", flush=True)
  avg, losses = first
  out = {}
  for p, t in avg.items():
    name = trainable_names[id(p)]
    layer = int(name.split(".layers.")[1].split(".")[0])
    short = [k for k, v in _MODULES.items() if f".{v}." in name][0]
    part = "a" if "lora_A" in name else "b"
    out.setdefault(f"{short}_{part}", {})[layer] = t.cpu().numpy().T
  np.savez(os.path.join(args.workdir, "peer_adapter.npz"),
           **{k: np.stack([v[i] for i in sorted(v)]) for k, v in out.items()})
  med = statistics.median(times)
  num_tokens = num_clients * num_steps * batch * seq
  result = dict(
      seconds=med, round_seconds=times, tokens_per_s=num_tokens / med,
      load_s=load_s, loss=float(np.mean(losses)),
      torch=torch.__version__, peft=peft.__version__,
      torch_threads=torch.get_num_threads(), device=device,
      tf32=bool(device.startswith("cuda") and spec.get("tf32")),
      self_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  if device.startswith("cuda"):
    result["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
