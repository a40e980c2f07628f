r"""Federated LoRA tuning on ready-made instruction data (FedIT / Shepherd).

  python -m fedjax_u2s.main --config=configs/fedit_instructions.py --workdir=/tmp/fedit
  python -m fedjax_u2s.main --config=configs/fedit_instructions.py:smoke --workdir=/tmp/s
  python -m fedjax_u2s.main --config=configs/fedit_instructions.py:gpu --workdir=/tmp/fedit_gpu

By default the instruction data are built from the packaged Wikipedia lead
paragraphs (``builtin:wiki``: Dolly-style rows whose category is the article
topic) and split over clients by a Dirichlet over categories, as Shepherd
splits Dolly. Point ``data.path`` at a local JSON/JSONL/Parquet/CSV file of
Alpaca, Dolly or chat-``messages`` rows to use your own. ``:gpu`` / ``:tpu``:
the same job with one accelerator's settings (``config_blocks.accelerator``).
"""

import ml_collections

from fedjax_u2s.config_blocks import ACCELERATORS, accelerator, base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.pipeline = "fedit"

  c.data = ml_collections.ConfigDict()
  c.data.path = "builtin:wiki"       # builtin:wiki or a local JSON/JSONL/Parquet/CSV file.
  c.data.format = "auto"             # auto | alpaca | dolly | chat (a "messages" list).
  # Your file's column for each role, when it is not the format's own name
  # (e.g. --config.data.fields.response=completion); "" = the format's name.
  c.data.fields = ml_collections.ConfigDict(
      {"instruction": "", "input": "", "response": "", "category": "", "messages": ""})
  c.data.topics = ("medicine", "math", "physics", "geography", "history", "technology")
  c.data.max_examples = 2000         # Cap on rows used (seeded sample); 0 = all.
  c.data.eval_fraction = 0.05        # Held out for the eval loss.
  c.data.system_prompt = ""          # Optional system turn for every example.

  c.partition = ml_collections.ConfigDict()
  c.partition.method = "dirichlet"   # iid | dirichlet | natural.
  c.partition.num_clients = 10       # For iid / dirichlet.
  c.partition.alpha = 0.5            # Dirichlet concentration (smaller = more skewed).
  c.partition.label_field = "category"  # Dirichlet label / natural client field.
  c.partition.min_size = 8           # Minimum examples per client.

  if arg == "smoke":
    c.data.max_examples = 96
    c.data.topics = ("medicine", "math", "physics")
    c.partition.num_clients = 4
    c.partition.min_size = 4
    c.federated.num_rounds = 2
    c.federated.clients_per_round = 2
    c.train.max_length = 128
    c.train.batch_size = 2
    c.train.local_steps = 2
    c.train_eval.every = 1
    c.train_eval.batch_size = 4
  elif arg in ACCELERATORS:
    accelerator(c, arg)
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config argument {arg!r}; use '', 'smoke', 'gpu' or 'tpu'.")
  return c
