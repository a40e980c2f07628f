r"""FedPIT: few-shot federated instruction tuning with self-generated data.

  python -m fedjax_u2s.main --config=configs/fedpit.py --workdir=/tmp/fedpit
  python -m fedjax_u2s.main --config=configs/fedpit.py:smoke --workdir=/tmp/s

Each client holds a few real examples (the built-in Wikipedia rows of the
medicine articles it holds: "Summarize what Wikipedia says about X" and
"Describe X in a few words"), split by a Dirichlet over sub-topics. Every
round the sampled clients prompt the current global model with their own
examples to write synthetic pairs, train the global adapter on those and a
private local adapter on real + synthetic ones; then every model is scored
on the task and audited for extraction and membership
(``pipelines/fedpit.py``). Other arms: ``--config.fedpit.variant=
no_isolation|fedit|local``; client-level DP: ``--config.federated.dp.enabled=True
--config.federated.dp.noise_multiplier=1.0``.
"""

import ml_collections

from fedjax_u2s.config_blocks import base_config
from fedjax_u2s.u2s import selfgen


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.pipeline = "fedpit"

  c.data = ml_collections.ConfigDict()
  c.data.topics = ("medicine",)        # Domain of the real examples (wiki.TOPICS).
  c.data.templates = ("summary", "description")  # builtin.TEMPLATES each article gives.
  c.data.articles_per_client = 6       # Articles a client holds (x templates = its examples).
  c.data.num_non_member_articles = 16  # Articles nobody trains on: MIA non-members, held-out loss.
  c.data.system_prompt = ""            # Optional system turn for training examples.

  c.partition = ml_collections.ConfigDict()
  c.partition.num_clients = 4          # Clients.
  c.partition.alpha = 0.5              # Dirichlet over sub-topics (smaller = more skewed).
  c.partition.min_size = 3             # Minimum articles per client.

  c.fedpit = ml_collections.ConfigDict()
  c.fedpit.variant = "fedpit"          # fedpit | no_isolation | fedit | local (pipelines/fedpit.py).
  c.fedpit.selfgen = selfgen.default_config()
  c.fedpit.selfgen.every = 2           # Fresh synthetic pairs every 2 rounds.
  c.fedpit.selfgen.per_client = 6      # Generations per client per refresh.
  c.fedpit.selfgen.max_new_tokens = 128

  c.federated.num_rounds = 4
  c.federated.clients_per_round = 4
  c.federated.client_lr = 3e-4
  c.train.max_length = 192
  c.train.batch_size = 4
  c.train.local_steps = 2
  c.train_eval.every = 1
  c.train_eval.batch_size = 8

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.num_questions = 80        # task_unseen: articles nobody holds.
  c.evaluate.batch_size = 8            # Rows per forward / sampler call.
  c.evaluate.seed = 0                  # Question sampling seed.
  c.evaluate.decode = "auto"           # Sampler decode path (decoding.DECODES).

  c.audit = ml_collections.ConfigDict()
  c.audit.prefix_tokens = 0            # Response tokens given after the instruction.
  c.audit.min_tokens = 20              # Verbatim: this many reference tokens exactly.
  c.audit.max_new_tokens = 0           # Decoding window; 0 = min_tokens.
  c.audit.near_threshold = 0.9         # Near-verbatim: ROUGE-L F1 at least this.

  if arg == "smoke":
    c.data.articles_per_client = 3
    c.data.num_non_member_articles = 4
    c.partition.num_clients = 2
    c.partition.min_size = 2
    c.fedpit.selfgen.per_client = 2
    c.fedpit.selfgen.max_new_tokens = 48
    c.federated.num_rounds = 2
    c.federated.clients_per_round = 2
    c.train.max_length = 128
    c.train.batch_size = 2
    c.train.local_steps = 1
    c.evaluate.num_questions = 8
    c.audit.min_tokens = 8
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config argument {arg!r}; use '' or 'smoke'.")
  return c
