"""Shared fixtures."""

import pytest

from fedjax_u2s.models import registry


@pytest.fixture(scope="session")
def smollm2_path() -> str:
  """The real SmolLM2-135M-Instruct GGUF, or a skip saying how to install it."""
  try:
    return registry.resolve("smollm2-135m-instruct")
  except FileNotFoundError as e:
    pytest.skip(str(e))
