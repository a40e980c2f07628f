"""fedjax_u2s: federated instruction tuning of LLMs from unstructured text."""

__version__ = "0.1.0"
