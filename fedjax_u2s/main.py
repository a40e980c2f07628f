r"""Entry point: ``python -m fedjax_u2s.main --config=configs/NAME.py --workdir=DIR``.

Parses flags, lets :func:`fedjax_u2s.pipelines.prepare` check the config and
the workdir, points the INFO logs at ``WORKDIR/logs/``, and runs the job.
Override any field with ``--config.a.b=value``; append ``:smoke`` to the config
path for a run that finishes in minutes on a laptop CPU.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from fedjax_u2s import pipelines

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config(arg)).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for outputs and checkpoints; a rerun resumes.")
_REDO = flags.DEFINE_list(
    "redo", [], "Stages to start over in an existing workdir with this run's "
    "inputs (e.g. generate, train, evaluate; later stages follow); their old "
    "outputs are moved to WORKDIR/superseded/, not deleted.")
flags.mark_flags_as_required(["config", "workdir"])


def _log_to_workdir(workdir: str) -> str | None:
  """INFO lines (ours, JAX's, orbax's) go to WORKDIR/logs/; the terminal keeps
  warnings, progress bars and the stages' own lines. ``--logtostderr`` or
  ``--alsologtostderr`` keep everything on the terminal as usual."""
  if flags.FLAGS.logtostderr or flags.FLAGS.alsologtostderr:
    return None
  log_dir = os.path.join(workdir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  index = jax.process_index()  # Each host its own file (and INFO link).
  logging.get_absl_handler().use_absl_log_file(
      "fedjax_u2s" if index == 0 else f"fedjax_u2s_p{index}", log_dir)
  flags.FLAGS.stderrthreshold = "warning"
  return log_dir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  quiet = not (flags.FLAGS.logtostderr or flags.FLAGS.alsologtostderr)
  if quiet:  # Until the log file exists (after the checks): warnings only.
    logging.set_verbosity(logging.WARNING)
  job = pipelines.prepare(config, workdir, redo=_REDO.value)
  log_dir = _log_to_workdir(workdir)
  if quiet:
    logging.set_verbosity(logging.INFO)
  if log_dir and jax.process_index() == 0:
    print(f"Logs: {log_dir}/fedjax_u2s.INFO", flush=True)
  job.run(config, workdir)


if __name__ == "__main__":
  app.run(main)
