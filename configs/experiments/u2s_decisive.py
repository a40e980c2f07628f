r"""The decisive FedIT-U2S experiment, sized to at most 3 hours on a 2-core CPU.

  python -m fedjax_u2s.main --config=configs/experiments/u2s_decisive.py --workdir=workdir/decisive
  python -m fedjax_u2s.main --config=configs/experiments/u2s_decisive.py:smoke --workdir=workdir/decisive_smoke

The ``claim`` job (fedjax_u2s/pipelines/claim.py) with every arm: ``base``,
``fedit_u2s`` (FedAvg on pairs generated with retrieved demonstrations),
``local_only``, ``centralized``, ``raw_text`` (FedAvg on the clients' own text
as causal-LM windows, matched in optimizer steps and loss tokens per step)
with training seeds 0 and 1, and the demonstration ablation ``fedit_random``
/ ``fedit_fixed`` with one seed (``experiment.ablation_seeds``: the budget
does not hold a second). Rerunning the command resumes.

What it is sized to show: a 95% paired interval of fedit_u2s minus base no
wider than +/-0.05 on each headline question set. ``wiki_known`` (titles the
clients hold) and ``wiki_unseen`` (titles nobody holds) are each 100
short-description questions plus 200 sentence-cloze questions
(``suites.wiki_cloze``, merged in: ``evaluate.cloze_merge``), 300 a set. The
claim run's per-question SD of paired differences was 0.28 (its 95% interval
on 40 ``wiki_unseen`` questions was 0.175 wide), which gives +/-0.032 at
n = 300 (1.96 x 0.28 / sqrt(300)); +/-0.05 holds up to an SD of 0.44, i.e.
up to about a fifth of the questions changing answer. Every ``results.md``
has the achieved half-width per set (``report.power_table``). Supply of
questions: the ``u2s_wiki.py:power`` corpus (144 held articles) gave 117
short-description and 218 cloze known questions; 180 held articles here give
about 146 and 272, so the caps (100 and 200) bind.

Budget (the arithmetic behind the sizes; per-unit costs from measured runs,
quiet 2-core machine unless said otherwise, see docs/RESULTS.md)::

  unit costs
    generation   2.54 s / piece   u2s_wiki.py default: 150 pieces in 6 min 21 s
    training     6.0 s / client step (batch 4, max_length 320)
                                   u2s_wiki.py default: 10 rounds x 3 clients
                                   x 4 steps = 120 steps in 12 min
    evaluation   0.26 s / short-description question (4 options)
                                   u2s_wiki.py default: 2 min 28 s for 2 models
                                   x (~170 such questions + 40 arithmetic)
                 0.52 s / cloze question (longer prompts): 1.03 CPU-s a
                                   question against 0.57 for the short ones
                                   (benchmarks/eval_cost.py), over 2 cores
  generation     3 selections x 187 pieces x 2.54 s               = 23.8 min
                 (3 clients x 60 articles, ~1.04 pieces an article)
  training       client steps per arm-seed run: R x C x L = 8 x 3 x 2 = 48
                 fedit_u2s 2 + centralized 2 + raw_text 2 + local_only 2
                 (3 clients x 16 steps = 48 a seed) + ablation 2 x 1
                 = 10 runs x 48 steps x 6.0 s                     = 48.0 min
  evaluation     15 models (base 1, fedit_u2s 2, centralized 2, raw_text 2,
                 local_only 2 seeds x 3 clients, ablation 2) x
                 (200 x 0.26 s + 400 x 0.52 s + heldout_ppl ~5 s)
                 = 15 x 265 s                                     = 66.2 min
  fixed          model and embedder loads, compiles, report       =  5.0 min
  total                                                           = 143 min
                                                          (2 h 23 min; 37 min
                                                           under 3 h)

:func:`budget` recomputes it from the config (tests/test_decisive.py checks
it against 180 min). Generation yield: the lexical grounding filter keeps
about 29% of the pieces (43 of the default run's 150), so ~54 pairs, ~16
training pairs a client after the 10% held out: 16 steps a client and run
at batch 4 are ~4 epochs. ``train.pack`` (the default) only makes steps
cheaper than the 6.0 s measured before it; the raw-text arm's steps are
cheaper still (no prompt tokens).

Math is its own run: configs/experiments/u2s_champ.py gives the clients
CHAMP's worked problems as text (``corpus.kind="champ"``) and asks the held
problems of the same concepts (``evaluate.num_champ_questions``); the
Wikipedia math client's encyclopedia paragraphs teach nothing a math
question here measures.
Arithmetic is left out: the base model gets 1 of 20 and no client text
teaches it.

``:smoke`` is the same job at test size (a few minutes with a tiny model;
tests/test_decisive.py runs it end to end on pre-generated pairs).
"""

import ml_collections

from fedjax_u2s.config_blocks import u2s_config

# Measured per-unit costs on the 2-core CPU (module docstring; docs/RESULTS.md).
SECONDS_PER_PIECE = 2.54
SECONDS_PER_CLIENT_STEP = 6.0
SECONDS_PER_WIKI_QUESTION = 0.26
SECONDS_PER_CLOZE_QUESTION = 0.52
SECONDS_HELDOUT_PPL = 5.0
PIECES_PER_ARTICLE = 1.04
FIXED_MINUTES = 5.0
BUDGET_MINUTES = 180.0


def budget(c: ml_collections.ConfigDict) -> dict[str, float]:
  """Estimated minutes per stage of a run of config ``c`` (docstring's sum)."""
  e = c.experiment
  arms = tuple(e.arms)
  seeds, abl = len(e.seeds), len(e.ablation_seeds or e.seeds)
  n = c.corpus.num_clients
  pieces = n * c.corpus.max_docs_per_client * PIECES_PER_ARTICLE
  if c.chunking.max_pieces_per_client:
    pieces = min(pieces, n * c.chunking.max_pieces_per_client)
  selections = 1 + sum(a in arms for a in ("fedit_random", "fedit_fixed"))
  per_run = c.federated.num_rounds * c.federated.clients_per_round * c.train.local_steps
  runs = sum(seeds for a in ("fedit_u2s", "centralized", "raw_text") if a in arms)
  runs += sum(abl for a in ("fedit_random", "fedit_fixed") if a in arms)
  # local_only: N clients x R x L steps a seed = N / C federated runs.
  local = seeds * n / c.federated.clients_per_round if "local_only" in arms else 0
  models = ("base" in arms) + runs + (seeds * n if "local_only" in arms else 0)
  ev = c.evaluate
  per_model = (2 * ev.num_wiki_questions * SECONDS_PER_WIKI_QUESTION
               + 2 * ev.num_cloze_questions * SECONDS_PER_CLOZE_QUESTION
               + (SECONDS_HELDOUT_PPL if e.heldout_ppl else 0.0))
  out = {"generation": selections * pieces * SECONDS_PER_PIECE / 60,
         "training": (runs + local) * per_run * SECONDS_PER_CLIENT_STEP / 60,
         "evaluation": models * per_model / 60,
         "fixed": FIXED_MINUTES}
  out["total"] = sum(out.values())
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = u2s_config()
  c.pipeline = "claim"
  c.seed = 0                           # Generation seed and held-out split seed.

  c.experiment = ml_collections.ConfigDict()
  c.experiment.arms = ("base", "fedit_u2s", "local_only", "centralized", "raw_text",
                       "fedit_random", "fedit_fixed")
  c.experiment.seeds = (0, 1)          # base vs fedit_u2s vs local vs central vs raw.
  c.experiment.ablation_seeds = (0,)   # fedit_random / fedit_fixed: one seed (budget).
  c.experiment.heldout_ppl = True      # Perplexity on the held-out generated pairs.
  c.experiment.compilation_cache = True  # Runs share shapes: compiles become lookups.

  c.corpus.num_clients = 3             # One client per domain (medicine, math, geography).
  c.corpus.max_docs_per_client = 60    # 180 held articles: ~187 pieces, >= 300 known questions.
  c.chunking.max_pieces_per_client = 0  # Every piece of those articles.
  c.data.eval_fraction = 0.1           # Retrieval pairs held out (heldout_ppl).

  c.federated.num_rounds = 8           # R.
  c.federated.clients_per_round = 3    # C: every client every round.
  c.train.local_steps = 2              # L: 48 client steps a federated run.
  c.checkpoint.keep = 1                # 14 training runs: keep the last checkpoint only.
  c.train.tensorboard = False
  c.train_eval.every = 0               # heldout_ppl measures it once, at the end.

  c.evaluate.num_wiki_questions = 100  # Short-description questions per split.
  c.evaluate.num_cloze_questions = 200  # Cloze questions per split, merged in: 300 a set.
  c.evaluate.cloze_per_article = 3
  c.evaluate.cloze_merge = True        # One headline set per split (wiki_known / wiki_unseen).
  c.evaluate.num_math_questions = 0    # Arithmetic: at the floor (1/20), nothing teaches it.
  c.evaluate.num_champ_questions = 0   # Math: configs/experiments/u2s_champ.py.

  if arg == "smoke":
    c.corpus.max_docs_per_client = 3
    c.chunking.max_pieces_per_client = 4
    c.u2s.max_new_tokens = 96
    c.u2s.batch_size = 4
    c.u2s.sampling.decode = "scan"     # Few calls: compile time dominates.
    c.federated.num_rounds = 2
    c.federated.clients_per_round = 2
    c.train.max_length = 256
    c.train.local_steps = 1
    c.train.batch_size = 2
    c.evaluate.num_wiki_questions = 2
    c.evaluate.num_cloze_questions = 4
    c.evaluate.cloze_per_article = 2
    c.evaluate.batch_size = 8
    c.evaluate.decode = "scan"
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config argument {arg!r}; use '' or 'smoke'.")
  c.lock()
  return c
