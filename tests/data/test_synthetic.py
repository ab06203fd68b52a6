"""The synthetic Markov world: exact optimum and statistics against brute-force enumeration,
the frontier, sampling statistics, determinism and the text/tokenizer round trip."""

import itertools
import json

import numpy as np
import pytest

from dpo_jax.data import synthetic as S
from dpo_jax.data import synthetic_exact as SX

BETAS = (0.3, 1.0, 4.0)


def small_world(seed=1, alpha=1.0, initial="uniform"):
    return SX.make_world(SX.WorldConfig(vocab_size=3, prompt_len=2, completion_len=4, dirichlet_alpha=alpha,
                                        reward_scale=1.5, initial=initial, seed=seed))


def enumerate_world(world, s):
    """All V^T completions from start state s: (ys [V^T, T], log pi_ref(y|s), r(s, y)), computed by loops."""
    ys = np.array(list(itertools.product(range(world.vocab_size), repeat=world.completion_len)))
    logp_ref, reward = np.zeros(len(ys)), np.zeros(len(ys))
    for i, y in enumerate(ys):
        prev = s
        for a in y:
            logp_ref[i] += np.log(world.ref_probs_VxV[prev, a])
            reward[i] += world.reward_VxV[prev, a]
            prev = a
    return ys, logp_ref, reward


def brute_prompt_last_probs(world):
    q = np.zeros(world.vocab_size)
    for x in itertools.product(range(world.vocab_size), repeat=world.prompt_len):
        p = world.init_probs_V[x[0]] * np.prod([world.ref_probs_VxV[a, b] for a, b in zip(x[:-1], x[1:])])
        q[x[-1]] += p
    return q


@pytest.mark.parametrize("seed,alpha,initial", [(1, 1.0, "uniform"), (2, 0.3, "stationary"), (3, 5.0, "uniform")])
def test_optimum_and_statistics_match_enumeration(seed, alpha, initial):
    world = small_world(seed, alpha, initial)
    q = brute_prompt_last_probs(world)
    np.testing.assert_allclose(world.prompt_last_probs_V, q, atol=1e-12)
    rng = np.random.default_rng(seed)
    other = SX.TabularPolicy.from_logits(rng.normal(size=(4, 3, 3)))  # any tabular policy, not an optimum
    for beta in BETAS:
        opt = SX.optimal_policy(world, beta)
        log_z = SX.log_partition(world, beta)
        r_opt, kl_opt = SX.expected_reward_per_state(world, opt), SX.kl_to_ref_per_state(world, opt)
        for s in range(3):
            ys, logp_ref, reward = enumerate_world(world, s)
            logits = logp_ref + reward / beta
            lz = np.log(np.sum(np.exp(logits)))
            logp_opt = logits - lz  # pi* = pi_ref exp(r / beta) / Z, normalized over all V^T completions
            p_opt = np.exp(logp_opt)
            last = np.full(len(ys), s)
            np.testing.assert_allclose(SX.sequence_logprob(opt, last, ys), logp_opt, atol=1e-9)
            np.testing.assert_allclose(SX.sequence_logprob(SX.reference_policy(world), last, ys), logp_ref, atol=1e-12)
            np.testing.assert_allclose(SX.sequence_reward(world, last, ys), reward, atol=1e-12)
            assert abs(log_z[s] - lz) < 1e-9
            assert abs(r_opt[s] - p_opt @ reward) < 1e-9
            assert abs(kl_opt[s] - p_opt @ (logp_opt - logp_ref)) < 1e-9
            assert abs(r_opt[s] - beta * kl_opt[s] - beta * lz) < 1e-9  # E[r] - beta KL = beta log Z
            logp_other = SX.sequence_logprob(other, last, ys)
            p_other = np.exp(logp_other)
            assert abs(p_other.sum() - 1) < 1e-12
            assert abs(SX.expected_reward_per_state(world, other)[s] - p_other @ reward) < 1e-9
            assert abs(SX.kl_to_ref_per_state(world, other)[s] - p_other @ (logp_other - logp_ref)) < 1e-9
        # Averaged forms: over the prompt distribution, and over a given set of prompts.
        assert abs(SX.expected_reward(world, opt) - q @ r_opt) < 1e-9
        assert abs(SX.kl_to_ref(world, opt) - q @ kl_opt) < 1e-9
        prompts = np.array([[0, 2], [1, 2], [2, 0], [0, 1]])
        assert abs(SX.expected_reward(world, opt, prompts) - np.mean(r_opt[prompts[:, -1]])) < 1e-12
        assert abs(SX.kl_to_ref(world, opt, prompts) - np.mean(kl_opt[prompts[:, -1]])) < 1e-12


def test_max_reward_policy_is_the_zero_beta_limit():
    world = small_world(4)
    pol = SX.max_reward_policy(world)
    for s in range(3):
        ys, logp_ref, reward = enumerate_world(world, s)
        best = np.argmax(reward)
        assert abs(SX.expected_reward_per_state(world, pol)[s] - reward[best]) < 1e-9
        assert abs(SX.kl_to_ref_per_state(world, pol)[s] + logp_ref[best]) < 1e-9
    kl_small, r_small = SX.frontier(world, [1e-4])
    assert (abs(kl_small[0] - SX.kl_to_ref(world, pol)) < 1e-6
            and abs(r_small[0] - SX.expected_reward(world, pol)) < 1e-6)


def test_reference_policy_has_zero_kl_and_is_pi_star_at_large_beta():
    world = SX.make_world(SX.WorldConfig())
    ref = SX.reference_policy(world)
    np.testing.assert_array_equal(SX.kl_to_ref_per_state(world, ref), np.zeros(world.vocab_size))
    assert SX.kl_to_ref(world, ref) == 0.0
    np.testing.assert_allclose(SX.optimal_policy(world, 1e9).probs_TxVxV, ref.probs_TxVxV, atol=1e-8)


def test_frontier_is_monotone_and_inverted_exactly():
    world = SX.make_world(SX.WorldConfig(seed=5))
    betas = np.geomspace(50.0, 0.05, 40)  # decreasing beta
    kl, reward = SX.frontier(world, betas)
    assert np.all(np.diff(kl) > 0) and np.all(np.diff(reward) > 0)
    r_ref = SX.expected_reward(world, SX.reference_policy(world))
    r_max = SX.expected_reward(world, SX.max_reward_policy(world))
    k_max = SX.kl_to_ref(world, SX.max_reward_policy(world))
    assert r_ref < reward[0] and reward[-1] < r_max and kl[-1] < k_max
    # beta_for_kl inverts KL(pi*_beta); frontier_reward_at_kl lands on the curve, not on a chord.
    np.testing.assert_allclose(SX.beta_for_kl(world, kl), betas, rtol=1e-7)
    np.testing.assert_allclose(SX.frontier_reward_at_kl(world, kl), reward, rtol=1e-9, atol=1e-9)
    grid = np.linspace(0.0, 1.2 * k_max, 200)
    at = SX.frontier_reward_at_kl(world, grid)
    assert np.all(np.diff(at) >= -1e-12)
    assert np.all(np.diff(at, 2)[grid[1:-1] < k_max - grid[1]] <= 1e-9)  # concave below K_max
    assert abs(at[0] - r_ref) < 1e-12 and np.allclose(at[grid >= k_max], r_max)
    with pytest.raises(ValueError, match="kl"):
        SX.frontier_reward_at_kl(world, -1.0)


def test_pi_star_beats_perturbations_and_no_policy_beats_the_frontier():
    world = small_world(6)
    rng = np.random.default_rng(0)
    for beta in BETAS:
        opt = SX.optimal_policy(world, beta)
        best = SX.expected_reward(world, opt) - beta * SX.kl_to_ref(world, opt)
        assert abs(best - beta * (SX.log_partition(world, beta) @ world.prompt_last_probs_V)) < 1e-9
        for scale in (1e-3, 0.1, 1.0):
            for _ in range(20):
                noise = scale * rng.normal(size=opt.probs_TxVxV.shape)
                pert = SX.TabularPolicy.from_logits(np.log(opt.probs_TxVxV) + noise)
                kl, reward = SX.kl_to_ref(world, pert), SX.expected_reward(world, pert)
                assert reward - beta * kl < best
                assert reward <= SX.frontier_reward_at_kl(world, kl)[0] + 1e-9


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
    with pytest.raises(ValueError, match="vocab_size"):
        SX.WorldConfig(vocab_size=1)
    with pytest.raises(ValueError, match="dirichlet_alpha"):
        SX.WorldConfig(dirichlet_alpha=0.0)
    with pytest.raises(ValueError, match="initial"):
        SX.WorldConfig(initial="random")
    with pytest.raises(ValueError, match="rows must sum to 1"):
        SX.TabularPolicy(np.full((2, 3, 3), 0.5))
    world = small_world()
    pol = SX.reference_policy(world)
    with pytest.raises(ValueError, match="completions_NxT"):
        SX.sequence_logprob(pol, [0], [[0, 1]])
    with pytest.raises(ValueError, match="last_tokens_N"):
        SX.sequence_logprob(pol, [0, 1], [[0, 1, 2, 0]])
    with pytest.raises(ValueError, match="completions_NxT holds tokens"):
        SX.sequence_reward(world, [0], [[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="policy.probs_TxVxV"):
        SX.expected_reward(world, SX.TabularPolicy(np.full((2, 3, 3), 1 / 3)))
    with pytest.raises(ValueError, match="beta"):
        SX.optimal_policy(world, 0.0)
    with pytest.raises(ValueError, match="not a content word"):
        S.text_to_tokens("t1 x2")
