"""Exports a tuned adapter: PEFT-format LoRA files and a merged HF model.

``save_peft`` writes ``adapter_model.safetensors`` + ``adapter_config.json`` in
the layout of Hugging Face PEFT, so ``PeftModel.from_pretrained(base, dir)``
loads it on top of the base model (tensor names
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``, ``A`` as
``[r, in]`` and ``B`` as ``[out, r]``). ``load_peft`` reads such a directory
back into our LoRA pytree. ``save_merged`` folds the adapter into the base
weights and writes a plain HF safetensors model directory.

Both record their base in ``base_model.json`` (:func:`describe_base`): the
file(s) the base was read from with their sha256, and for a GGUF base its
quantization (SmolLM2 here is Q4_1, dequantized to float32 before training).
``adapter_config.json``'s ``base_model_name_or_path`` is what a user can
resolve: the hub id of a registered model (``HuggingFaceTB/SmolLM2-135M-Instruct``)
or the path of a file or directory. tests/test_interop.py checks that
transformers and PEFT read these exports and give our logits.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import gguf
import numpy as np
import safetensors.numpy

from fedjax_u2s import lora as lora_lib
from fedjax_u2s.models import gguf_loader
from fedjax_u2s.models import hf_loader
from fedjax_u2s.models import registry
from fedjax_u2s.models.config import ModelConfig

PyTree = Any

# Our projection names -> the Llama/Qwen2 module paths PEFT uses.
_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
            "down": "mlp.down_proj"}
_PREFIX = "base_model.model.model.layers"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
BASE_FILE = "base_model.json"


file_sha256 = registry.file_sha256  # Provenance hashes of exported files.


def _file_entry(path: str) -> dict[str, Any]:
  return {"path": os.path.abspath(path), "bytes": os.path.getsize(path),
          "sha256": file_sha256(path)}


def describe_base(name_or_path: str) -> dict[str, Any]:
  """Where a base model comes from, so that a user can find and check it.

  Args:
    name_or_path: a registered name (:data:`registry.NAMED_MODELS`), a GGUF
      file or a HF directory; any other string is kept as given.
  Returns:
    ``base_model_name_or_path``: the hub id of a registered model, else the
    absolute path of an existing file/dir, else the string as given;
    ``name``: the argument; ``format``: "gguf" / "hf" (absent when nothing is
    found); ``files``: ``[{path, bytes, sha256}]`` of the weights read;
    for a GGUF file ``quantization`` (its file type, e.g. "Q4_1"),
    ``tensor_types`` (count per stored type) and ``dequantized_to``
    ("float32": the loader dequantizes every tensor before use); for a HF dir
    ``dtype`` (config.json's torch_dtype / dtype).
  """
  info: dict[str, Any] = {"base_model_name_or_path": name_or_path,
                          "name": name_or_path}
  named = registry.NAMED_MODELS.get(name_or_path)
  try:
    path = registry.resolve(name_or_path)
  except FileNotFoundError:
    path = None
  if named is not None and named.hf_hub_id:
    info["base_model_name_or_path"] = named.hf_hub_id
    info["hf_hub_id"] = named.hf_hub_id
    info["package"] = named.pip_name
  elif path is not None:
    info["base_model_name_or_path"] = os.path.abspath(path)
  if path is None:
    return info
  if os.path.isdir(path):
    info["format"] = "hf"
    names = sorted(n for n in os.listdir(path) if n == "config.json" or
                   n.endswith(".safetensors") or n == "model.safetensors.index.json")
    info["files"] = [_file_entry(os.path.join(path, n)) for n in names]
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path, encoding="utf-8") as f:
        hf = json.load(f)
      info["dtype"] = hf.get("dtype") or hf.get("torch_dtype")
  else:
    info["format"] = "gguf"
    info["files"] = [_file_entry(path)]
    gf = gguf_loader.read_gguf(path)
    types = collections.Counter(t.ggml_type.name for t in gf.tensors.values())
    file_type = gf.metadata.get("general.file_type")
    try:
      quant = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):  # No or an unknown file type: the most common.
      quant = types.most_common(1)[0][0] if types else "unknown"
    info["quantization"] = quant
    info["tensor_types"] = dict(sorted(types.items()))
    info["dequantized_to"] = "float32"
    if named is not None and named.hf_hub_id:
      info["note"] = (
          f"Trained on {os.path.basename(path)} ({quant}, dequantized to "
          f"float32), not on the full-precision weights of {named.hf_hub_id}; "
          "for the exact base, load that file (transformers: "
          "from_pretrained(dir, gguf_file=...)) or use the merged export.")
  return info


def _write_base(path: str, base_model: str) -> dict[str, Any]:
  info = describe_base(base_model)
  with open(os.path.join(path, BASE_FILE), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  return info


def save_peft(path: str, lora: PyTree, lora_config: lora_lib.LoraConfig, *,
              base_model: str = "") -> None:
  """Writes ``lora`` (stacked layers, no client axis) as a PEFT adapter dir.

  Args:
    base_model: the base's registered name or path (see :func:`describe_base`);
      with it, ``base_model.json`` records the base and its hash, and
      ``base_model_name_or_path`` names it as a user can load it.
  """
  os.makedirs(path, exist_ok=True)
  base_name = _write_base(path, base_model)["base_model_name_or_path"] if (
      base_model) else ""
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
      "base_model_name_or_path": base_name,
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
  # Settings that change what the tensors mean; reading past them would give
  # a different model than PEFT's, silently.
  unsupported = {"rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                 "modules_to_save": None, "lora_bias": False, "fan_in_fan_out": False,
                 "bias": "none", "trainable_token_indices": None,
                 "layer_replication": None, "target_parameters": None,
                 "alora_invocation_tokens": None, "use_qalora": False}
  for key, default in unsupported.items():
    value = pc.get(key)
    # Compared by type as well: 0 == False, and layers_to_transform=0 is a layer.
    if value is not None and not (type(value) is type(default) and value == default
                                  ) and value not in ([], {}):
      raise ValueError(f"{cfg_path}: {key}={pc[key]!r} is not supported (only "
                       f"{default!r}).")
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
                lora_config: lora_lib.LoraConfig, tokenizer=None, *,
                base_model: str = "") -> None:
  """Writes base + adapter folded together as a HF safetensors model dir.

  With ``base_model`` (as in :func:`save_peft`), ``base_model.json`` records
  the base the adapter was folded into.
  """
  merged = lora_lib.merge(params, lora, lora_config)
  hf_loader.save_hf_dir(path, config, merged)
  if base_model:
    _write_base(path, base_model)
  if tokenizer is not None and hasattr(tokenizer, "save"):
    tokenizer.save(path)
