"""Offline evaluation: log-likelihood multiple choice, exact match, perplexity.

Modules:
  scoring: pure functions (log-probs, batching, normalisation, answer extraction).
  tasks: question / task types, prompt formatting, the run function of each kind.
  suites: built-in suites (wiki_mc, math, heldout_ppl) and the suite registry.
  loaders: MMLU / PubMedQA / MedQA / GSM8K-style local files.
  runner: evaluate(), write_results(), compare_table().
"""

from fedjax_u2s.evaluation.runner import compare_table
from fedjax_u2s.evaluation.runner import evaluate
from fedjax_u2s.evaluation.runner import write_results
from fedjax_u2s.evaluation.suites import build_suite
from fedjax_u2s.evaluation.suites import SUITES
