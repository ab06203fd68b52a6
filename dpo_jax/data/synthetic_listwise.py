"""Listwise preference data from the synthetic world: K completions per prompt ranked by Plackett-Luce.

For a prompt x, K completions y_1..y_K are drawn iid from a policy (pi_ref by default) and ranked by
the Plackett-Luce model of the true reward: the best is drawn with probability proportional to
exp(r(x, y_k)), then the next among the rest, and so on,
  P(order) = prod_{i=1}^{K} exp(r_(i)) / sum_{j >= i} exp(r_(j)).
With K = 2 this is the Bradley-Terry label of `synthetic.sample_pairs` (sigmoid(r_1 - r_2)). Ranks
are drawn with the Gumbel trick: argsort of r_k + g_k, g_k ~ Gumbel(0, 1) iid, descending, has
exactly this law (Yellott 1977). The Plackett-Luce DPO loss of such lists, in expectation, is
minimized by the same pi*_beta as pairwise DPO (tests/losses/test_listwise.py checks it exactly).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from dpo_jax.data.synthetic import prompt_to_text, sample_completions, sample_prompts, tokens_to_text
from dpo_jax.data.synthetic_exact import TabularPolicy, World, reference_policy, sequence_reward


@dataclasses.dataclass(frozen=True, eq=False)
class RankedLists:
    """N lists of K completions in draw order, their true rewards and Plackett-Luce ranks.

    ranks_NxK[n, k] = 0 for the best completion of list n; scores_NxK = K - 1 - ranks (higher is better,
    the `scores` the listwise losses take).
    """

    prompts_NxP: np.ndarray
    completions_NxKxT: np.ndarray
    rewards_NxK: np.ndarray
    ranks_NxK: np.ndarray

    @property
    def scores_NxK(self) -> np.ndarray:
        return (self.ranks_NxK.shape[1] - 1 - self.ranks_NxK).astype(np.float32)

    @property
    def order_NxK(self) -> np.ndarray:
        """order[n, i] = the slot of the (i + 1)-th best completion of list n."""
        return np.argsort(self.ranks_NxK, axis=1)


def plackett_luce_ranks(logits_NxK: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ranks (0 = first drawn) of a Plackett-Luce draw with weights exp(logits), per row: int64 [N, K].

    -inf logits are never drawn before a finite one."""
    logits = np.asarray(logits_NxK, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits_NxK must be 2-D, got shape {logits.shape}")
    keys = logits + rng.gumbel(size=logits.shape)
    order = np.argsort(-keys, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(logits.shape[1])[None, :], axis=1)
    return ranks


def sample_lists(world: World, n: int, k: int, rng: np.random.Generator,
                 policy: TabularPolicy | None = None) -> RankedLists:
    """n prompts, K completions each from `policy` (default pi_ref), ranked by PL with weights exp(r).

    Draw order: prompts, then the K completion slots one after another (n each), then the Gumbel noise.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2:
        raise ValueError(f"k must be an int >= 2 (completions per list), got {k!r}")
    policy = reference_policy(world) if policy is None else policy
    prompts = sample_prompts(world, n, rng)
    last = prompts[:, -1]
    comps = np.stack([sample_completions(world, policy, last, rng) for _ in range(k)], axis=1)
    rewards = np.stack([sequence_reward(world, last, comps[:, j]) for j in range(k)], axis=1)
    return RankedLists(prompts_NxP=prompts, completions_NxKxT=comps, rewards_NxK=rewards,
                       ranks_NxK=plackett_luce_ranks(rewards, rng))


def list_rows(lists: RankedLists):
    """Text rows {"prompt", "responses", "scores", "rewards"} in the `scored` schema of
    `dpo_jax.data.listwise` (responses in draw order, scores K - 1 - rank), one per list."""
    for x, comps, scores, rewards in zip(lists.prompts_NxP, lists.completions_NxKxT, lists.scores_NxK,
                                         lists.rewards_NxK):
        yield {"prompt": prompt_to_text(x), "responses": [tokens_to_text(y) for y in comps],
               "scores": [float(v) for v in scores], "rewards": [float(v) for v in rewards]}


def lists_file_names(k: int) -> tuple[str, str]:
    """The file names of the train and eval lists of K responses in a world's data directory."""
    return f"lists_k{k}.jsonl", f"eval_lists_k{k}.jsonl"


def write_lists(world: World, out_dir: str, n_lists: int, n_eval: int, k: int, seed: int) -> tuple[str, str]:
    """Writes the train and eval lists (`list_rows` of `sample_lists` from pi_ref, K each) next to
    the world's pairs; returns their paths. They draw from the generator streams of pairs.jsonl and
    eval_pairs.jsonl (`synthetic.write_dataset`), in the same order (prompts, then completions), so
    list n has pair n's prompt and its first two completions: lists and pairs compare at equal
    prompts. Each file is written to a temporary name and renamed (a file that exists is complete)."""
    streams = np.random.SeedSequence(seed).spawn(3)[1:]
    out = []
    for name, n, stream in zip(lists_file_names(k), (n_lists, n_eval), streams):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for row in list_rows(sample_lists(world, n, k, np.random.default_rng(stream))):
                f.write(json.dumps(row) + "\n")
        os.replace(path + ".tmp", path)
        out.append(path)
    return out[0], out[1]
