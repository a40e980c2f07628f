"""The jobs a config can name, and the one way to run them.

``config.pipeline`` picks a module from :data:`PIPELINES`; each has
``run(config, workdir)`` and ``STAGES``, what determines each of its stages
(:mod:`fedjax_u2s.pipelines.workdir`). The table is explicit and resolved by import name
(big_vision picks its models the same way), so a job's dependencies load only
when a config names it and nothing registers itself as an import side effect.
A new job is a module here plus one line in the table.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections

from fedjax_u2s import train
from fedjax_u2s.pipelines import validate
from fedjax_u2s.pipelines import workdir as workdir_lib

PIPELINES: dict[str, str] = {
    "generate": "fedjax_u2s.pipelines.generate",  # Answer prompts (configs/generate.py).
    "fedit": "fedjax_u2s.pipelines.fedit",        # FedIT on instruction data.
    "u2s": "fedjax_u2s.pipelines.u2s",            # FedIT-U2S: generate -> tune -> evaluate.
    "claim": "fedjax_u2s.pipelines.claim",        # Every arm x seed (configs/experiments/).
    "fedpit": "fedjax_u2s.pipelines.fedpit",      # FedPIT: self-generation, local + global adapters, audit.
}


def get(name: str | None) -> ModuleType:
  """The module of the job called ``name``."""
  if name not in PIPELINES:
    raise ValueError(f"config.pipeline={name!r} is not one of {sorted(PIPELINES)}.")
  return importlib.import_module(PIPELINES[name])


def prepare(config: ml_collections.ConfigDict, workdir: str,
            redo: Sequence[str] = ()) -> ModuleType:
  """Everything before the job's own work; returns the job's module.

  Every config field is validated, ``jax.distributed`` is initialized (when
  ``config.multihost`` asks) before anything touches the backend, and the
  workdir's record of what made each stage is compared with this run's (a
  rerun with other inputs stops here, naming them, with nothing written;
  ``redo`` names stages to start over, their old outputs moved to
  ``workdir/superseded/``). Then ``config.json`` is written.
  """
  job = get(config.get("pipeline"))
  validate.validate(config)
  if "multihost" in config:
    train.maybe_initialize_distributed(config.multihost)
  moved = workdir_lib.check_and_record(config, workdir, job.STAGES, redo=tuple(redo),
                                       lead=jax.process_index() == 0)
  if moved:
    logging.warning("--redo=%s: moved %s to %s/%s/", ",".join(redo), ", ".join(moved),
                    workdir, workdir_lib.SUPERSEDED)
  if jax.process_count() > 1:  # The lead moved and recorded; all see it now.
    multihost_utils.sync_global_devices(f"prepare_{workdir}")
  return job


def run(config: ml_collections.ConfigDict, workdir: str,
        redo: Sequence[str] = ()) -> None:
  """Runs the job ``config.pipeline`` names in ``workdir`` (:func:`prepare` first).

  Args:
    config: the job's config.
    workdir: where it writes; a rerun resumes.
    redo: stages to start over with this run's inputs (each with every later
      stage).
  """
  prepare(config, workdir, redo).run(config, workdir)
