"""Preference data: row formats, tokenization, the grain pipeline, the synthetic world."""
