"""Offline evaluation: log-likelihood multiple choice, exact match, perplexity.

Modules:
  scoring: pure functions (log-probs, batching, normalisation, answer extraction).
  tasks: question / task types, prompt formatting, the run function of each kind.
  suites: built-in suites (wiki_mc, math, heldout_ppl), the suite registry and
    the suites an ``evaluate`` config block asks for.
  loaders: MMLU / PubMedQA / MedQA / GSM8K-style local files.
  runner: evaluate() a model on suites.
  stats: per-question paired bootstrap, Holm adjustment, verdicts.
  privacy_audit: training-data extraction and membership inference against a model.
  report: every markdown table, report file and plot.
"""
