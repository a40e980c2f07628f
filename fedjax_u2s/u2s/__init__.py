"""U2S: unstructured text -> instruction-response pairs, on each client.

Inputs for the generation stage live here:

* :mod:`fedjax_u2s.u2s.corpus`: client corpora (local files, or the built-in
  ``wiki`` corpus split by topic / Dirichlet, with a held-out set of titles).
* :mod:`fedjax_u2s.u2s.chunking`: documents -> token-bounded pieces with exact
  character offsets, deduplicated.
* :mod:`fedjax_u2s.u2s.pool`: the hand-written demonstration pool that
  few-shot prompts retrieve from.
"""
