"""Launchers: sweeps, TPU pods, GPU clusters, aggregation of runs."""
