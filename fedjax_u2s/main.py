r"""Entry point: ``python -m fedjax_u2s.main --config=configs/NAME.py --workdir=DIR``.

Parses flags and hands the config to the job it names; nothing else.
Override any field with ``--config.a.b=value``; append ``:smoke`` to the config
path for a run that finishes in minutes on a laptop CPU.
"""

from absl import app
from absl import flags
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  pipelines.run(_CONFIG.value, _WORKDIR.value, redo=_REDO.value)


if __name__ == "__main__":
  app.run(main)
