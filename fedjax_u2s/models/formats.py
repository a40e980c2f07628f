"""Checkpoint formats we refuse: Python pickles.

Unpickling runs arbitrary code from the file, so ``.bin``/``.pt``/... weights
are never opened; both loaders refuse them with the same advice.
"""

from __future__ import annotations

import os

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

CONVERT_ADVICE = (
    "Pickles can run arbitrary code when loaded, so they are refused. Convert "
    "once, on a trusted machine with torch: "
    "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
    "safe_serialization=True)` for safetensors, or llama.cpp's "
    "convert_hf_to_gguf.py for GGUF, and load the output instead.")


def is_pickle(path: str | os.PathLike) -> bool:
  return os.path.splitext(os.fspath(path))[1].lower() in PICKLE_SUFFIXES


def reject_pickle(path: str | os.PathLike) -> None:
  """Raises ValueError naming ``path`` if its suffix is a pickle format."""
  if is_pickle(path):
    raise ValueError(f"{os.fspath(path)}: is a pickled checkpoint. {CONVERT_ADVICE}")
