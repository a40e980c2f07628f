"""Federated instruction tuning: state, client updates, aggregation, algorithms."""
