"""Rows for listwise examples: one prompt shared by K completions (branches 1..K).

    list segment  [x_0 .. x_{n-2}] [x_{n-1} c1_0 .. c1_{a1-1}] ... [x_{n-1} cK_0 .. cK_{aK-1}]
                  branch 0         branch 1                        branch K
                  positions 0..n-2, then n-1 .. n-1+a_k for each branch (each restarts)

the K-branch form of `layouts.prefix_segment` (K = 2 is that segment): every target is the next
token of the same branch, so `logprobs.branch_logps` over the loss-masked positions gives each
completion's summed log-prob, the prompt encoded once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dpo_jax.data.layouts import PROMPT, Segment


def list_segment(prompt: np.ndarray, completions: Sequence[np.ndarray]) -> Segment:
    """The K-branch segment of a prompt and its K >= 1 completions (see the module docstring)."""
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 1 or prompt.size == 0 or not completions:
        raise ValueError("a list segment needs a non-empty 1-D prompt and at least one completion")
    n, last = len(prompt), prompt[-1:]
    tokens, positions, branches, targets, mask = [prompt[:-1]], [np.arange(n - 1)], [np.full(n - 1, PROMPT)], \
        [prompt[1:]], [np.zeros(n - 1)]
    for k, completion in enumerate(completions, start=1):
        c = np.asarray(completion, np.int32)
        if c.ndim != 1 or c.size == 0:
            raise ValueError(f"completion {k} of a list segment must be a non-empty 1-D array")
        tokens.append(np.concatenate([last, c]))
        positions.append(np.arange(n - 1, n + len(c)))
        branches.append(np.full(len(c) + 1, k))
        targets.append(np.concatenate([c, [0]]))
        mask.append(np.concatenate([np.ones(len(c)), [0.0]]))
    cat = lambda parts, dt: np.concatenate(parts).astype(dt)  # noqa: E731
    return Segment(cat(tokens, np.int32), cat(positions, np.int32), cat(branches, np.int32),
                   cat(targets, np.int32), cat(mask, np.float32))
