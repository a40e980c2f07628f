"""Llama-family decoder, its configuration and checkpoint loaders."""
