"""Exports a tuned adapter: PEFT-format LoRA files and a merged HF model.

``save_peft`` writes ``adapter_model.safetensors`` + ``adapter_config.json`` in
the layout of Hugging Face PEFT, so ``PeftModel.from_pretrained(base, dir)``
loads it on top of the base model (tensor names
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``, ``A`` as
``[r, in]`` and ``B`` as ``[out, r]``). ``load_peft`` reads such a directory
back into our LoRA pytree. ``save_merged`` folds the adapter into the base
weights and writes a plain HF safetensors model directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import safetensors.numpy

from fedjax_u2s import lora as lora_lib
from fedjax_u2s.models import hf_loader
from fedjax_u2s.models.config import ModelConfig

PyTree = Any

# Our projection names -> the Llama/Qwen2 module paths PEFT uses.
_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
            "down": "mlp.down_proj"}
_PREFIX = "base_model.model.model.layers"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def save_peft(path: str, lora: PyTree, lora_config: lora_lib.LoraConfig, *,
              base_model: str = "") -> None:
  """Writes ``lora`` (stacked layers, no client axis) as a PEFT adapter dir."""
  os.makedirs(path, exist_ok=True)
  tensors = {}
  for name, ab in lora.items():
    a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
    if a.ndim != 3:
      raise ValueError(f"save_peft wants one adapter [L, in, r]; {name}.a has "
                       f"shape {a.shape} (a stacked client axis?).")
    for i in range(a.shape[0]):
      key = f"{_PREFIX}.{i}.{_MODULES[name]}"
      tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [r, in]
      tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [out, r]
  safetensors.numpy.save_file(tensors, os.path.join(path, ADAPTER_FILE),
                              metadata={"format": "pt"})
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_config.rank,
      "lora_alpha": lora_config.alpha, "lora_dropout": lora_config.dropout,
      "target_modules": sorted(_MODULES[n].split(".")[1] for n in lora),
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
      "base_model_name_or_path": base_model,
  }
  with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)


def load_peft(path: str, config: ModelConfig
              ) -> tuple[PyTree, lora_lib.LoraConfig]:
  """Reads a PEFT LoRA directory into ``(lora pytree, LoraConfig)``.

  Raises:
    FileNotFoundError / ValueError naming the file and tensor on missing files,
    unsupported settings, missing layers or wrong shapes.
  """
  cfg_path = os.path.join(path, CONFIG_FILE)
  st_path = os.path.join(path, ADAPTER_FILE)
  for p in (cfg_path, st_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p} not found: a PEFT adapter directory holds "
                              f"{CONFIG_FILE} and {ADAPTER_FILE}.")
  with open(cfg_path, encoding="utf-8") as f:
    pc = json.load(f)
  if pc.get("peft_type") != "LORA":
    raise ValueError(f"{cfg_path}: peft_type={pc.get('peft_type')!r}; only LORA.")
  if pc.get("use_dora") or pc.get("use_rslora"):
    raise ValueError(f"{cfg_path}: DoRA / rsLoRA adapters are not supported.")
  by_module = {v.split(".")[1]: k for k, v in _MODULES.items()}
  targets = pc.get("target_modules") or []
  if isinstance(targets, str) or any(t not in by_module for t in targets):
    raise ValueError(f"{cfg_path}: target_modules={targets!r}; expected a list "
                     f"of {sorted(by_module)}.")
  names = [by_module[t] for t in targets]
  lcfg = lora_lib.LoraConfig(rank=int(pc["r"]), alpha=float(pc["lora_alpha"]),
                             targets=tuple(names),
                             dropout=float(pc.get("lora_dropout", 0.0)))
  tensors = safetensors.numpy.load_file(st_path)
  shapes = lora_lib._projection_shapes(config)  # pylint: disable=protected-access
  out = {}
  for name in lcfg.target_names:
    a_layers, b_layers = [], []
    d_in, d_out = shapes[name]
    for i in range(config.num_layers):
      key = f"{_PREFIX}.{i}.{_MODULES[name]}"
      for part, want in (("lora_A", (lcfg.rank, d_in)), ("lora_B", (d_out, lcfg.rank))):
        t = tensors.get(f"{key}.{part}.weight")
        if t is None:
          raise ValueError(f"{st_path}: tensor {key}.{part}.weight is missing.")
        if t.shape != want:
          raise ValueError(f"{st_path}: tensor {key}.{part}.weight has shape "
                           f"{t.shape}, expected {want} for this model.")
      a_layers.append(tensors[f"{key}.lora_A.weight"].T)
      b_layers.append(tensors[f"{key}.lora_B.weight"].T)
    out[name] = {"a": np.stack(a_layers).astype(np.float32),
                 "b": np.stack(b_layers).astype(np.float32)}
  return out, lcfg


def save_merged(path: str, config: ModelConfig, params: PyTree, lora: PyTree,
                lora_config: lora_lib.LoraConfig, tokenizer=None) -> None:
  """Writes base + adapter folded together as a HF safetensors model dir."""
  merged = lora_lib.merge(params, lora, lora_config)
  hf_loader.save_hf_dir(path, config, merged)
  if tokenizer is not None and hasattr(tokenizer, "save"):
    tokenizer.save(path)
