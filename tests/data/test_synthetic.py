"""The synthetic world's data side (dpo_jax/data/synthetic.py): sampling statistics against the
chain, Bradley-Terry labels, determinism, and the text/tokenizer round trip."""

import itertools
import json

import numpy as np
import pytest

from dpo_jax.data import synthetic as S
from dpo_jax.data import synthetic_exact as SX
from tests.data.test_synthetic_exact import small_world

def test_sampling_matches_the_chain():
    world = SX.make_world(SX.WorldConfig(vocab_size=3, prompt_len=3, completion_len=2, initial="stationary", seed=2))
    rng = np.random.default_rng(0)
    n = 60_000
    prompts, comps = S.sample_sft(world, n, rng)
    assert prompts.shape == (n, 3) and comps.shape == (n, 2) and prompts.dtype == np.int64
    freq_last = np.bincount(prompts[:, -1], minlength=3) / n
    q = world.prompt_last_probs_V
    assert np.all(np.abs(freq_last - q) < 5 * np.sqrt(q * (1 - q) / n))
    ref = SX.reference_policy(world)
    for s in range(3):
        rows = comps[prompts[:, -1] == s]
        ys = np.array(list(itertools.product(range(3), repeat=2)))
        p = np.exp(SX.sequence_logprob(ref, np.full(len(ys), s), ys))
        freq = np.array([np.mean(np.all(rows == y, axis=1)) for y in ys])
        assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / len(rows)) + 1e-12)


def test_zero_probability_transitions_are_never_sampled():
    world = small_world(7)
    probs = SX.optimal_policy(world, 1.0).probs_TxVxV.copy()
    probs[:, :, 1] = 0.0
    probs /= probs.sum(-1, keepdims=True)
    ys = S.sample_completions(world, SX.TabularPolicy(probs), np.zeros(5000, dtype=np.int64), np.random.default_rng(0))
    assert not np.any(ys == 1)


def test_pair_labels_follow_bradley_terry():
    world = SX.make_world(SX.WorldConfig(vocab_size=4, prompt_len=2, completion_len=3, reward_scale=0.7, seed=3))
    pairs = S.sample_pairs(world, 40_000, np.random.default_rng(11))
    last = pairs.prompts_PxK[:, -1]
    np.testing.assert_allclose(pairs.reward_chosen_P, SX.sequence_reward(world, last, pairs.chosen_PxT), atol=1e-12)
    np.testing.assert_allclose(pairs.reward_rejected_P, SX.sequence_reward(world, last, pairs.rejected_PxT), atol=1e-12)
    d = pairs.reward_chosen_P - pairs.reward_rejected_P
    keep = np.abs(d) > 1e-12
    # The two completions are exchangeable, so P(the better one is chosen) = sigmoid(|r1 - r2|).
    p_better = 1.0 / (1.0 + np.exp(-np.abs(d[keep])))
    better = (d[keep] > 0).astype(float)
    z = np.sum(better - p_better) / np.sqrt(np.sum(p_better * (1 - p_better)))
    assert abs(z) < 4.5, f"label frequencies off Bradley-Terry by z = {z:.2f}"
    bins = np.quantile(np.abs(d[keep]), [0, 0.25, 0.5, 0.75, 1.0])
    for lo, hi in zip(bins[:-1], bins[1:]):
        m = (np.abs(d[keep]) >= lo) & (np.abs(d[keep]) <= hi)
        se = np.sqrt(np.sum(p_better[m] * (1 - p_better[m]))) / m.sum()
        assert abs(better[m].mean() - p_better[m].mean()) < 4.5 * se
    assert 0.55 < better.mean() < 0.95  # informative, but noisy, labels
    argmax = S.sample_pairs(world, 2000, np.random.default_rng(11), label="argmax")
    assert np.all(argmax.reward_chosen_P >= argmax.reward_rejected_P)
    with pytest.raises(ValueError, match="label"):
        S.sample_pairs(world, 10, np.random.default_rng(0), label="majority")


def test_determinism():
    a, b = SX.make_world(SX.WorldConfig(seed=9)), SX.make_world(SX.WorldConfig(seed=9))
    c = SX.make_world(SX.WorldConfig(seed=10))
    for name in ("ref_probs_VxV", "init_probs_V", "reward_VxV"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.reward_VxV, c.reward_VxV)
    pa, pb = S.sample_pairs(a, 500, np.random.default_rng(3)), S.sample_pairs(b, 500, np.random.default_rng(3))
    for name in ("prompts_PxK", "chosen_PxT", "rejected_PxT", "reward_chosen_P"):
        np.testing.assert_array_equal(getattr(pa, name), getattr(pb, name))


def test_written_files_round_trip(tmp_path):
    import datasets
    from transformers import AutoTokenizer

    world = SX.make_world(SX.WorldConfig(seed=4))
    paths = S.write_dataset(world, str(tmp_path / "d1"), n_sft=50, n_pairs=40, n_eval=10, seed=7)
    again = S.write_dataset(world, str(tmp_path / "d2"), n_sft=50, n_pairs=80, n_eval=10, seed=7)
    for name in ("sft", "eval_pairs"):  # independent streams: n_pairs does not move the other files
        assert open(paths[name]).read() == open(again[name]).read()
    assert len(open(again["pairs"]).read().splitlines()) == 80
    cache = str(tmp_path / "cache")
    sft = datasets.load_dataset("json", data_files=paths["sft"], split="train", cache_dir=cache)
    assert sft.column_names == ["prompt", "completion"] and len(sft) == 50
    pairs = datasets.load_dataset("json", data_files=paths["pairs"], split="train", cache_dir=cache)
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected", "reward_chosen", "reward_rejected"}
    assert len(pairs) == 40
    for row in pairs:
        assert row["prompt"].endswith(" ") and "</s>" not in row["chosen"] + row["rejected"]
        x, c, r = (S.text_to_tokens(row[k]) for k in ("prompt", "chosen", "rejected"))
        assert x.shape == (4,) and c.shape == r.shape == (8,)
        assert abs(SX.sequence_reward(world, x[-1], c) - row["reward_chosen"]) < 1e-9
        assert abs(SX.sequence_reward(world, x[-1], r) - row["reward_rejected"]) < 1e-9
    meta = json.load(open(paths["world"]))
    assert meta["token_offset"] == S.TOKEN_OFFSET == 4
    np.testing.assert_array_equal(S.load_world(str(tmp_path / "d1")).reward_VxV, world.reward_VxV)

    S.save_tokenizer(world, str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok("t3 t0")["input_ids"] == [7, 4]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    row = pairs[0]
    ids = tok(row["prompt"] + row["chosen"])["input_ids"]
    want = np.concatenate([S.text_to_tokens(row["prompt"]), S.text_to_tokens(row["chosen"])]) + S.TOKEN_OFFSET
    assert ids == want.tolist()
    assert len(tok) == world.vocab_size + S.TOKEN_OFFSET


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="not a content word"):
        S.text_to_tokens("t1 x2")
