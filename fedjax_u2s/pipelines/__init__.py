"""The jobs a config can name, and the one way to run them.

``config.pipeline`` picks a module from :data:`PIPELINES`; each has
``run(config, workdir)``. The table is explicit and resolved by import name
(big_vision picks its models the same way), so a job's dependencies load only
when a config names it and nothing registers itself as an import side effect.
A new job is a module here plus one line in the table.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import ml_collections

from fedjax_u2s import train
from fedjax_u2s.pipelines import common

PIPELINES: dict[str, str] = {
    "generate": "fedjax_u2s.pipelines.generate",  # Answer prompts (configs/generate.py).
    "fedit": "fedjax_u2s.pipelines.fedit",        # FedIT on instruction data.
    "u2s": "fedjax_u2s.pipelines.u2s",            # FedIT-U2S: generate -> tune -> evaluate.
    "claim": "fedjax_u2s.pipelines.claim",        # Every arm x seed (configs/experiments/).
}


def get(name: str | None) -> ModuleType:
  """The module of the job called ``name``."""
  if name not in PIPELINES:
    raise ValueError(f"config.pipeline={name!r} is not one of {sorted(PIPELINES)}.")
  return importlib.import_module(PIPELINES[name])


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs the job ``config.pipeline`` names in ``workdir``.

  ``jax.distributed`` is initialized first (when ``config.multihost`` asks),
  before anything touches the backend.
  """
  job = get(config.get("pipeline"))
  if "multihost" in config:
    train.maybe_initialize_distributed(config.multihost)
  common.write_config(config, workdir)
  job.run(config, workdir)
