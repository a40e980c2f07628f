"""Compute kernels that XLA's own lowering does not provide fast enough."""
