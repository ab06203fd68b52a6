"""Listwise rows (dpo_jax/data/listwise.py) and ranked lists of the synthetic world
(dpo_jax/data/synthetic_listwise.py): parsing and its errors, the Plackett-Luce sampler's law."""

import itertools
import math

import numpy as np
import pytest

from dpo_jax.data import listwise as LR
from dpo_jax.data import synthetic_exact as SX
from dpo_jax.data import synthetic_listwise as SL
from dpo_jax.data.formats import FormatError
from dpo_jax.data.synthetic import text_to_tokens


def uf_row(**over):
    row = {"instruction": "Name a colour.", "source": "evol_instruct",
           "completions": [{"response": "Red.", "overall_score": 7.5, "fine-grained_score": 4.25, "model": "a"},
                           {"response": "Blue.", "overall_score": 9, "fine-grained_score": 3.5, "model": "b"},
                           {"response": "Green", "overall_score": "6", "fine-grained_score": 4.75, "model": "c"}]}
    row.update(over)
    return row


def test_ultrafeedback_rows_default_to_overall_score():
    got = LR.parse_listwise_row(uf_row(), 0, "uf.jsonl")
    assert got == LR.ListRow("Name a colour.", ("Red.", "Blue.", "Green"), (7.5, 9.0, 6.0))
    fine = LR.parse_listwise_row(uf_row(), 0, "uf.jsonl", score_field="fine-grained_score")
    assert fine.scores == (4.25, 3.5, 4.75)
    # A completion without overall_score falls back to fine-grained_score.
    row = uf_row()
    del row["completions"][1]["overall_score"]
    assert LR.parse_listwise_row(row).scores == (7.5, 3.5, 6.0)


def test_scored_and_ranking_rows():
    got = LR.parse_listwise_row({"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 3.5, np.float32(1)]})
    assert got == LR.ListRow("p", ("a", "b", "c"), (1.0, 3.5, 1.0))
    got = LR.parse_listwise_row({"prompt": "p", "ranking": ["best", "mid", "worst"]})
    assert got == LR.ListRow("p", ("best", "mid", "worst"), (2.0, 1.0, 0.0))


@pytest.mark.parametrize("row,kw,field,what", [
    (uf_row(completions=[{"response": "Red.", "overall_score": 7}]), {}, "completions", "at least 2"),
    (uf_row(completions=[{"response": "Red.", "overall_score": 7},
                         {"response": "Blue.", "overall_score": "N/A"}]), {}, "completions[1].overall_score", "number"),
    (uf_row(completions=[{"response": "Red.", "overall_score": 7},
                         {"response": "Blue.", "overall_score": True}]), {}, "completions[1].overall_score", "number"),
    (uf_row(completions=[{"response": "Red.", "overall_score": 7}, {"overall_score": 8}]), {},
     "completions[1].response", "missing"),
    (uf_row(completions=[{"response": "Red.", "overall_score": 7}, {"response": "Blue."}]), {},
     "completions[1]", "no score"),
    (uf_row(), {"score_field": "helpfulness"}, "completions[0]", "no score"),
    ({"completions": uf_row()["completions"]}, {}, "instruction", "missing"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0]}, {}, "scores", "2 responses"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0, float("nan")]}, {}, "scores[1]", "finite"),
    ({"prompt": "p", "responses": ["a", "b"]}, {}, "scores", "missing"),
    ({"prompt": "p", "responses": ["a", ""], "scores": [1, 2]}, {}, "responses[1]", "empty"),
    ({"prompt": "p", "responses": "ab", "scores": [1, 2]}, {}, "responses", "list"),
    ({"prompt": 3, "ranking": ["a", "b"]}, {}, "prompt", "string"),
    ({"prompt": "p", "ranking": ["a"]}, {}, "ranking", "at least 2"),
])
def test_malformed_rows_name_source_row_and_field(row, kw, field, what):
    with pytest.raises(FormatError, match=what) as info:
        LR.parse_listwise_row(row, 17, "lists.jsonl", **kw)
    msg = str(info.value)
    assert msg.startswith("lists.jsonl row 17: ") and f"field {field!r}" in msg, msg
    assert info.value.row == 17 and info.value.source == "lists.jsonl" and info.value.field == field


def test_rows_of_no_schema():
    with pytest.raises(FormatError, match="lists.jsonl row 2: fits no listwise schema.*'chosen'"):
        LR.parse_listwise_row({"prompt": "p", "chosen": "a", "rejected": "b"}, 2, "lists.jsonl")
    with pytest.raises(FormatError, match="not a mapping"):
        LR.parse_listwise_row(["p", "a"], 0, "x")


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
