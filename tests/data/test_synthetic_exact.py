"""The synthetic world's exact side (dpo_jax/data/synthetic_exact.py): the optimum and its statistics
against brute-force enumeration, the zero- and large-beta limits, the frontier, and input checks."""

import itertools

import numpy as np
import pytest

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
