"""Flax NNX decoder models, Hugging Face checkpoint import/export, sampling."""
