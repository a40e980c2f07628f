"""Shared fixtures."""

import gc

import jax
import pytest

from fedjax_u2s.models import registry


@pytest.fixture(scope="session")
def smollm2_path() -> str:
  """The real SmolLM2-135M-Instruct GGUF, or a skip saying how to install it."""
  try:
    return registry.resolve("smollm2-135m-instruct")
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module", autouse=True)
def _drop_caches_between_modules():
  """Each test file starts with JAX's caches empty and the rest frozen.

  A pytest process (the one, or each xdist worker of ``launch/test.sh``)
  runs many files in turn. JAX keeps every traced and compiled
  program (its jaxprs, lowerings and executables, millions of Python objects
  after a few hundred tests), and Python's cyclic collector walks all of them
  on each full collection: eager op-by-op tests late in the run (a forward
  pass without jit compiles every op) spent most of their time in the
  collector, 14x their time alone. Clearing JAX's caches after each file
  drops what no later file reuses, and ``gc.freeze`` takes what is left (the
  imported modules, session fixtures) out of the collector's walks.
  """
  yield
  jax.clear_caches()
  gc.collect()
  gc.freeze()
