"""Data: corpora, instruction data, tokenization, partitioning."""
