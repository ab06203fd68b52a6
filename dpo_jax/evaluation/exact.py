"""Exact evaluation in the synthetic world: the optimum pi*_beta, the reward-KL frontier, and the
exact KL and reward of a trained transformer by enumeration.

All exact values average the start state x_k over the EVAL PROMPTS (its empirical law), so they
are comparable with the sampled numbers of `sampled` on the same prompts. Figures of the problem
(pi*_beta and the world's pi_ref, not of the trained policy):
  optimum/reward, optimum/kl = E[r], KL(pi*_beta || pi_ref) of the exact optimum at the run's beta;
  optimum/reward_ref = E_{pi_ref}[r], the reward of the world's reference (the frontier at KL 0).
A policy's point (KL, E[r]) against the frontier F(kl) = max{E[r]: KL(pi || pi_ref) <= kl}
(`frontier_point`; the sampled report names it frontier/* at sample/kl, projected/* at projected/kl):
  reward_at_kl = F(KL);  regret = F(KL) - E[r];
  regret_frac = regret / (F(KL) - optimum/reward_ref), the share of the reachable gain that is lost.
`exact_model_report` computes the trained transformer's exact KL and E[r] over the whole tree of
completions the sampler can draw (exact_model/*, small worlds only), to validate the sampled
estimates.
"""

from __future__ import annotations

import numpy as np

from dpo_jax.data import synthetic, synthetic_exact
from dpo_jax.evaluation.policies import Policy, Prompts


def _start_states(last_tokens_B: np.ndarray) -> np.ndarray:
    return np.asarray(last_tokens_B, np.int64)[:, None]


def optimum_report(world: synthetic_exact.World, beta: float, last_tokens_B: np.ndarray) -> dict[str, float]:
    """optimum/reward, optimum/kl of pi*_beta, with x_k weighted as in the eval prompts."""
    prompts, star = _start_states(last_tokens_B), synthetic_exact.optimal_policy(world, beta)
    return {"optimum/reward": synthetic_exact.expected_reward(world, star, prompts),
            "optimum/kl": synthetic_exact.kl_to_ref(world, star, prompts)}


def reference_reward(world: synthetic_exact.World, last_tokens_B: np.ndarray) -> float:
    """optimum/reward_ref = E_{pi_ref}[r] of the world's reference, with x_k weighted as in the eval prompts."""
    return synthetic_exact.expected_reward(world, synthetic_exact.reference_policy(world), _start_states(last_tokens_B))


def frontier_point(world: synthetic_exact.World, last_tokens_B: np.ndarray, kl: float, reward: float,
                   reward_ref: float) -> dict[str, float]:
    """{reward_at_kl, regret, regret_frac} of a policy with KL(pi || pi_ref) = kl and E[r] = reward (see the
    module doc); a negative kl (sampling noise) counts as 0, a nan kl as 0; regret_frac is nan without gain."""
    kl = min(max(kl, 0.0), 1e12) if not np.isnan(kl) else 0.0
    at_kl = float(synthetic_exact.frontier_reward_at_kl(world, kl, _start_states(last_tokens_B))[0])
    gain = at_kl - reward_ref
    return {"reward_at_kl": at_kl, "regret": at_kl - reward,
            "regret_frac": (at_kl - reward) / gain if gain > 0 else float("nan")}


def synthetic_report(world: synthetic_exact.World, beta, last_tokens_B: np.ndarray, sampled_kl: float,
                     sampled_reward: float) -> dict[str, float]:
    """optimum/* (optimum/reward and optimum/kl only with a beta) and frontier/* at the sampled KL."""
    out = optimum_report(world, beta, last_tokens_B) if beta is not None else {}
    out["optimum/reward_ref"] = reference_reward(world, last_tokens_B)
    point = frontier_point(world, last_tokens_B, sampled_kl, sampled_reward, out["optimum/reward_ref"])
    out.update({f"frontier/{k}": v for k, v in point.items()})
    return out


def exact_model_report(policy: Policy, reference: Policy, prompts: Prompts, world: synthetic_exact.World, *,
                       vocab: int, token_offset: int = synthetic.TOKEN_OFFSET, eos_id: int = synthetic.EOS_ID,
                       max_sequences: int = 70_000, block_rows: int = 1 << 15) -> dict[str, float]:
    """Exact KL(pi || pi_ref) and E[r] (the `SyntheticReward` rules) of the completion law that the
    sampled evaluation draws from (up to T + 1 tokens, stopping at EOS), per prompt, averaged.

    Enumerates the (vocab - 1)^T non-EOS prefixes y of length T over the model's `vocab` ids and, by
    the chain rule over the tree of prefixes (each prefix y_<n counted once),
      KL(x) = sum_n sum_{y_<n} pi(y_<n | x) KL(pi(. | x, y_<n) || pi_ref(. | x, y_<n)),
      E[r](x) = sum_{n<T} sum_{content y_<n} pi(y_<n | x) [sum_{a content} pi(a | .) W[y_{n-1}, a]
                + pi(not content | .) (T - n) min W].
    exact_model/mass (the total probability of all leaves) is 1 up to rounding;
    exact_model/well_formed is the probability of T content tokens then EOS."""
    v, n_t = world.vocab_size, world.completion_len
    k = vocab - 1
    if k ** n_t > max_sequences:
        raise ValueError(f"exact_model_report: (vocab - 1)^T = {k}^{n_t} = {k ** n_t} prefixes per prompt exceeds "
                         f"max_sequences={max_sequences} (synthetic.completion_len or the vocabulary is too large)")
    ids = np.array([i for i in range(vocab) if i != eos_id])
    seq_CxT = ids[np.stack(np.unravel_index(np.arange(k ** n_t), (k,) * n_t), axis=1)].astype(np.int32)
    content_CxT = (seq_CxT >= token_offset) & (seq_CxT < token_offset + v)
    y_CxT = np.where(content_CxT, seq_CxT - token_offset, 0)
    dedup_N1 = float(k) ** -(n_t - np.arange(n_t + 1))  # prefix y_<n is shared by k^(T-n) sequences
    w, c = world.reward_VxV, seq_CxT.shape[0]
    stats = {"kl": [], "reward": [], "mass": [], "well_formed": []}
    for b in range(prompts.lens_B.shape[0]):
        def tree(pol):
            blocks = [seq_CxT[i: i + block_rows] for i in range(0, c, block_rows)]
            out = np.concatenate([pol.next_logprobs(Prompts(np.repeat(prompts.tokens_BxP[b: b + 1], len(x), 0),
                                                            np.repeat(prompts.lens_B[b: b + 1], len(x))), x)
                                  for x in blocks])[..., :vocab]
            return np.pad(out, ((0, 0), (0, 0), (0, vocab - out.shape[-1])), constant_values=-np.inf)

        lp, lr = tree(policy), tree(reference)
        p = np.exp(lp)  # [C, T + 1, vocab]
        taken = np.take_along_axis(lp[:, :n_t], seq_CxT[..., None], axis=-1)[..., 0]
        prefix_CxN1 = np.exp(np.concatenate([np.zeros((c, 1)), np.cumsum(taken, axis=1)], axis=1))
        with np.errstate(invalid="ignore"):
            kl_n = np.where(p > 0, p * (lp - lr), 0.0).sum(-1)
        all_content = np.concatenate([np.ones((c, 1), bool), np.cumprod(content_CxT, axis=1) > 0], axis=1)
        prev = np.concatenate([np.full((c, 1), int(prompts.ids(b)[-1]) - token_offset), y_CxT], axis=1)[:, :n_t]
        p_content = p[:, :n_t, token_offset: token_offset + v]  # [C, T, V]
        step_r = (p_content * w[prev]).sum(-1) + (1 - p_content.sum(-1)) * (n_t - np.arange(n_t)) * w.min()
        weight = prefix_CxN1 * dedup_N1
        stats["kl"].append((weight * kl_n).sum())
        stats["reward"].append((weight[:, :n_t] * all_content[:, :n_t] * step_r).sum())
        stats["mass"].append(prefix_CxN1[:, n_t].sum() + (weight[:, :n_t] * p[:, :n_t, eos_id]).sum())
        stats["well_formed"].append((prefix_CxN1[:, n_t] * all_content[:, n_t] * p[:, n_t, eos_id]).sum())
    return {f"exact_model/{key}": float(np.mean(val)) for key, val in stats.items()}
