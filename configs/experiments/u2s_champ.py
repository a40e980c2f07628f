r"""FedIT-U2S on mathematics: clients whose text can teach what the evaluation measures.

  python -m fedjax_u2s.main --config=configs/experiments/u2s_champ.py --workdir=workdir/champ
  python -m fedjax_u2s.main --config=configs/experiments/u2s_champ.py:smoke --workdir=workdir/champ_smoke

The math leg of the decisive experiment (issue 16), as its own ``claim`` run.
In the Wikipedia setting the math client holds encyclopedia paragraphs about
mathematics, and nothing a multiple-choice question about arithmetic or
competition problems measures can be learnt from them. Here the clients hold
CHAMP (``champ-dataset``: 270 competition problems written by people, each
with a worked solution, its final answer and the named concepts it uses):

- ``corpus.kind="champ"`` (:func:`fedjax_u2s.u2s.corpus.champ_clients`):
  three clients, the five categories dealt in order (combinatorics +
  polynomials, inequalities + sequences, number theory), each holding the
  statements of the concepts its problems use and its kept problems with
  solution and answer;
- ``corpus.holdout_fraction``: the share of each category's single-number
  problems held out such that every concept of a held problem still appears,
  worked, in some kept problem (:func:`fedjax_u2s.data.champ.split`); at 0.9
  that is 58 problems;
- ``evaluate.num_champ_questions``: those held problems as 4-option multiple
  choice (the right answer against single-number answers of other CHAMP
  problems of the same shape), scored by log-likelihood like every other set
  (``suites.champ_heldout``). Generation-form scoring is at the floor for a
  135M model.

Why this and not ``mathematics-dataset``: its modules are generated
exercises with no prose to learn from; CHAMP's text is solutions written in
words, the kind of unstructured text the clients of this project hold, and
its concept annotations let the split guarantee that the text covers what is
asked. The limit is size: 58 held problems give a 95% paired interval of
about +/-0.07-0.10, not the +/-0.05 of the Wikipedia sets; ``results.md``'s
power table says what was reached.

Arms: ``base``, ``fedit_u2s``, ``local_only``, ``centralized``, ``raw_text``
(two seeds each), matched in client steps as in the decisive run.
"""

import ml_collections

from fedjax_u2s.config_blocks import u2s_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = u2s_config()
  c.pipeline = "claim"
  c.seed = 0

  c.experiment = ml_collections.ConfigDict()
  c.experiment.arms = ("base", "fedit_u2s", "local_only", "centralized", "raw_text")
  c.experiment.seeds = (0, 1)
  c.experiment.ablation_seeds = ()
  c.experiment.heldout_ppl = True
  c.experiment.compilation_cache = True

  c.corpus.kind = "champ"
  c.corpus.num_clients = 3             # Five categories over three clients.
  c.corpus.holdout_fraction = 0.9      # As many held problems as the concept rule allows.
  c.corpus.max_docs_per_client = 0
  c.chunking.max_pieces_per_client = 36  # ~108 pieces: generation in budget.
  c.data.eval_fraction = 0.1

  c.federated.num_rounds = 8
  c.federated.clients_per_round = 3
  c.train.local_steps = 2
  c.checkpoint.keep = 1
  c.train.tensorboard = False
  c.train_eval.every = 0

  c.evaluate.num_wiki_questions = 0    # No Wikipedia text in this run.
  c.evaluate.num_cloze_questions = 0
  c.evaluate.num_math_questions = 0
  c.evaluate.num_champ_questions = 58  # Every held problem.

  if arg == "smoke":
    c.corpus.max_docs_per_client = 3
    c.chunking.max_pieces_per_client = 3
    c.u2s.max_new_tokens = 96
    c.u2s.batch_size = 4
    c.u2s.sampling.decode = "scan"
    c.federated.num_rounds = 2
    c.federated.clients_per_round = 2
    c.train.max_length = 256
    c.train.local_steps = 1
    c.train.batch_size = 2
    c.evaluate.num_champ_questions = 6
    c.evaluate.batch_size = 8
    c.evaluate.decode = "scan"
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config argument {arg!r}; use '' or 'smoke'.")
  c.lock()
  return c
