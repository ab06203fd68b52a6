"""Experiment configurations (ml_collections `get_config(arg)` files)."""
