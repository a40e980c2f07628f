r"""Does FedIT-U2S beat the base model, local-only tuning and random demonstrations?

  python -m fedjax_u2s.main --config=configs/experiments/u2s_claim.py --workdir=workdir/claim
  python -m fedjax_u2s.main --config=configs/experiments/u2s_claim.py:smoke --workdir=workdir/claim_smoke
  python -m fedjax_u2s.main --config=configs/experiments/u2s_claim.py:gpu --workdir=workdir/claim_gpu

The ``claim`` job (fedjax_u2s/pipelines/claim.py) runs, on the same
clients (Wikipedia lead paragraphs, one client per domain), the same
evaluation questions and a matched step budget, the arms ``base``,
``fedit_u2s`` (FedAvg on pairs generated with retrieved demonstrations),
``local_only`` (each client alone), ``centralized`` (pooled pairs, the
federated total of steps), ``raw_text`` (FedAvg on the clients' text itself
as causal-LM windows, matched in loss tokens per step) and the selection
ablation ``fedit_random`` / ``fedit_fixed``, each for every seed in
``experiment.seeds`` (the ablation: ``experiment.ablation_seeds`` if set); it writes
``results.json``, ``results.md`` and ``results.png``. Rerunning the same
command resumes: finished generations, arms and evaluations are skipped.

What each size costs, as measured, with the command: docs/RESULTS.md (the
CPU-sized default, end to end) and docs/benchmarks.md (per stage). The sizes
are chosen so that the default fits an afternoon on a 2-core CPU, ``:smoke``
is compile-dominated (a CI-sized check of every arm), and ``:gpu`` (9 clients,
3 seeds) is meant for one accelerator.
"""

import ml_collections

from fedjax_u2s.config_blocks import u2s_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = u2s_config()
  c.pipeline = "claim"
  c.seed = 0                           # Generation seed and held-out split seed.

  c.experiment = ml_collections.ConfigDict()
  c.experiment.arms = ("base", "fedit_u2s", "local_only", "centralized", "raw_text",
                       "fedit_random", "fedit_fixed")  # Subset/order of the arms run.
  c.experiment.seeds = (0, 1)          # Training seeds (init, sampling, order, dropout).
  c.experiment.ablation_seeds = ()     # fedit_random / fedit_fixed seeds; () = seeds.
  c.experiment.heldout_ppl = True      # Also score perplexity on held-out generated pairs.
  c.experiment.compilation_cache = True  # Persistent XLA cache in WORKDIR/jax_cache (runs share shapes).

  c.corpus.max_docs_per_client = 8     # Seeded sample of each client's articles.
  c.chunking.max_pieces_per_client = 10  # Cap per client; 0 = all.
  c.data.eval_fraction = 0.1           # Retrieval pairs held out (heldout_ppl, eval loss).

  c.federated.num_rounds = 6           # R: rounds of every trained arm.
  c.federated.clients_per_round = 2    # C: federated arms; centralized does C x L steps.
  c.train.local_steps = 2              # L: must be > 0 (compute is matched in steps).
  c.checkpoint.keep = 1                # Many runs: keep only the last checkpoint.
  c.train.tensorboard = False          # metrics.jsonl and curves.png are enough here.

  c.evaluate.num_wiki_questions = 40   # Per split (known / unseen).
  c.evaluate.num_math_questions = 20   # Arithmetic with exact answers.
  c.evaluate.decode = "scan"           # Few decode calls per eval: compile dominates (layer scan).

  if arg == "smoke":
    c.experiment.seeds = (0, 1)
    c.corpus.max_docs_per_client = 3
    c.chunking.max_pieces_per_client = 4
    c.u2s.max_new_tokens = 96
    c.u2s.batch_size = 4
    c.u2s.sampling.decode = "scan"      # Few calls: compile time dominates (layer scan).
    c.federated.num_rounds = 2
    c.train.max_length = 256
    c.train.local_steps = 1
    c.train.batch_size = 2
    c.train_eval.every = 1
    c.evaluate.num_wiki_questions = 8
    c.evaluate.num_math_questions = 4
    c.evaluate.math_max_new_tokens = 16
  elif arg == "gpu":
    c.corpus.num_clients = 9           # Three clients per domain.
    c.corpus.max_docs_per_client = 60
    c.chunking.max_pieces_per_client = 0
    c.u2s.batch_size = 32
    c.u2s.max_new_tokens = 192
    c.u2s.sampling.decode = "auto"      # Many calls: the fastest decode steps here.
    c.experiment.seeds = (0, 1, 2)
    c.federated.num_rounds = 30
    c.federated.clients_per_round = 3
    c.train.local_steps = 4
    c.train.batch_size = 8
    c.train.max_length = 384
    c.train_eval.every = 5
    c.evaluate.num_wiki_questions = 200
    c.evaluate.num_math_questions = 100
    c.evaluate.batch_size = 32
    c.evaluate.decode = "auto"         # Many calls: the fastest decode steps here.
    c.model.remat = True               # On a GPU: remat + chunked logits + all
    c.train.logits_chunk_size = 128    # clients in one step were fastest and
    c.federated.clients_per_chunk = 0  # lightest (docs/benchmarks.md).
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config argument {arg!r}; use '', 'smoke' or 'gpu'.")
  c.lock()
  return c
