"""Ranked lists of the synthetic world (dpo_jax/data/synthetic_listwise.py): the Plackett-Luce
sampler's law, lists ranked by the true reward, and rows the listwise parser reads back."""

import itertools
import math

import numpy as np
import pytest

from dpo_jax.data import listwise as LR
from dpo_jax.data import synthetic_exact as SX
from dpo_jax.data import synthetic_listwise as SL
from dpo_jax.data.synthetic import text_to_tokens


# ------------------------------------------------------------------------------------------------
# The Plackett-Luce sampler.

def pl_probability(logits, order):
    w = np.exp(np.asarray(logits, np.float64)[list(order)])
    return float(np.prod([w[i] / w[i:].sum() for i in range(len(w))]))


def chi_square(ranks_NxK, logits):
    k = ranks_NxK.shape[1]
    perms = list(itertools.permutations(range(k)))
    order = np.argsort(ranks_NxK, axis=1)
    codes = {p: i for i, p in enumerate(perms)}
    counts = np.bincount([codes[tuple(o)] for o in order], minlength=len(perms))
    expected = ranks_NxK.shape[0] * np.array([pl_probability(logits, p) for p in perms])
    return float(np.sum((counts - expected) ** 2 / expected))


def test_plackett_luce_ranks_have_the_plackett_luce_law():
    logits = np.array([0.5, -0.3, 1.2])
    n = 60_000
    ranks = SL.plackett_luce_ranks(np.tile(logits, (n, 1)), np.random.default_rng(0))
    assert sorted(ranks[0]) == [0, 1, 2]
    # 5 degrees of freedom: P(chi2 > 25.7) = 1e-4 under the PL law.
    assert chi_square(ranks, logits) < 25.7
    # The test has power: Thurstone ranks (Gaussian noise of the same scale) are not PL.
    rng = np.random.default_rng(0)
    keys = 0.5 * logits + rng.normal(size=(n, 3))
    thurstone = np.argsort(np.argsort(-keys, axis=1), axis=1)
    assert chi_square(thurstone, logits) > 100.0
    # A -inf weight is always drawn last.
    ranks = SL.plackett_luce_ranks(np.array([[0.0, -np.inf, 3.0]] * 100), np.random.default_rng(1))
    assert np.all(ranks[:, 1] == 2)


def test_sample_lists_ranks_by_the_true_reward_and_is_seeded():
    world = SX.make_world(SX.WorldConfig(vocab_size=4, prompt_len=2, completion_len=3, seed=2))
    lists = SL.sample_lists(world, 4000, 2, np.random.default_rng(5))
    again = SL.sample_lists(world, 4000, 2, np.random.default_rng(5))
    np.testing.assert_array_equal(lists.ranks_NxK, again.ranks_NxK)
    np.testing.assert_array_equal(lists.completions_NxKxT, again.completions_NxKxT)
    assert lists.completions_NxKxT.shape == (4000, 2, 3) and lists.prompts_NxP.shape == (4000, 2)
    for j in range(2):
        np.testing.assert_allclose(lists.rewards_NxK[:, j],
                                   SX.sequence_reward(world, lists.prompts_NxP[:, -1], lists.completions_NxKxT[:, j]))
    np.testing.assert_array_equal(lists.scores_NxK, 1 - lists.ranks_NxK)
    # K = 2 is the Bradley-Terry label: P(slot 0 first) = sigmoid(r_0 - r_1).
    p_first = 1.0 / (1.0 + np.exp(-(lists.rewards_NxK[:, 0] - lists.rewards_NxK[:, 1])))
    first = lists.ranks_NxK[:, 0] == 0
    se = math.sqrt(np.sum(p_first * (1 - p_first))) / 4000
    assert abs(first.mean() - p_first.mean()) < 4 * se
    # Better completions are ranked first more often (K = 4).
    lists4 = SL.sample_lists(world, 2000, 4, np.random.default_rng(6))
    top = lists4.order_NxK[:, 0]
    r_top = lists4.rewards_NxK[np.arange(2000), top]
    assert r_top.mean() > lists4.rewards_NxK.mean() + 0.3
    with pytest.raises(ValueError, match="k must be an int >= 2"):
        SL.sample_lists(world, 10, 1, np.random.default_rng(0))


def test_list_rows_parse_back():
    world = SX.make_world(SX.WorldConfig(vocab_size=4, prompt_len=2, completion_len=3, seed=2))
    lists = SL.sample_lists(world, 5, 3, np.random.default_rng(0))
    rows = list(SL.list_rows(lists))
    assert len(rows) == 5
    for i, row in enumerate(rows):
        parsed = LR.parse_listwise_row(row, i, "synthetic")
        assert parsed.scores == tuple(float(v) for v in lists.scores_NxK[i])
        for j, text in enumerate(parsed.responses):
            np.testing.assert_array_equal(text_to_tokens(text), lists.completions_NxKxT[i, j])
        np.testing.assert_array_equal(text_to_tokens(parsed.prompt), lists.prompts_NxP[i])


def test_written_lists_share_the_pairs_prompts_and_first_completions(tmp_path):
    import json

    from dpo_jax.data import synthetic, synthetic_exact
    from dpo_jax.data.synthetic_listwise import write_lists

    world = synthetic_exact.make_world(synthetic_exact.WorldConfig(vocab_size=6, prompt_len=3, completion_len=4))
    synthetic.write_dataset(world, str(tmp_path), 4, 20, 10, seed=7)
    for pairs_file, lists_file in zip(("pairs.jsonl", "eval_pairs.jsonl"), write_lists(world, str(tmp_path), 20, 10, 4, 7)):
        pairs = [json.loads(x) for x in (tmp_path / pairs_file).read_text().splitlines()]
        lists = [json.loads(x) for x in open(lists_file).read().splitlines()]
        assert len(lists) == len(pairs) and all(len(r["responses"]) == 4 for r in lists)
        for pair, row in zip(pairs, lists):
            assert row["prompt"] == pair["prompt"]
            assert sorted(row["responses"][:2]) == sorted([pair["chosen"], pair["rejected"]])
