"""The completion format of the synthetic world: the kind of each malformed sample (hand-built and
sampled from known off-format mass), the KL share of malformed samples, sample/kl_world against its
definition, and the projected (format-constrained) policy against exact enumeration."""

import jax
import numpy as np
import pytest
from flax import nnx

from dpo_jax.data import synthetic as syn
from dpo_jax.data import synthetic_exact as sx
from dpo_jax.evaluation import format as fm
from dpo_jax.evaluation import policies as pol
from dpo_jax.evaluation import sampled as ev
from dpo_jax.models.transformer import Decoder, ModelConfig
from tests.evaluation.test_sampled import eval_prompts, within, world

OFF, EOS, PAD, BOS, UNK = syn.TOKEN_OFFSET, syn.EOS_ID, syn.PAD_ID, syn.BOS_ID, syn.UNK_ID
W, E, S = fm.WELL_FORMED, fm.EARLY_EOS, fm.SPECIAL_TOKEN
PL = fm.PAST_LENGTH


def tiny_decoder(content: int, seed: int, init_std: float = 0.3) -> Decoder:
    cfg = ModelConfig(vocab_size=OFF + content, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, init_std=init_std)
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def c(*ys):
    return [OFF + y for y in ys]


# T = 3: the first position that leaves the format decides
HAND_BUILT = [
    (c(0, 1, 2) + [EOS], W),
    (c(0, 1, 2, 3), PL),  # T content tokens, then a content token instead of EOS
    (c(0, 1, 2), PL),  # T content tokens, then the end
    (c(0, 1, 2) + [PAD], PL),  # a special token where EOS was due: past length, not special
    (c(0, 1, 2) + [EOS] + c(1), PL),  # more after the EOS
    (c(0) + [EOS], E),
    ([EOS], E),
    (c(0, 1) + [EOS, UNK], E),  # EOS first, then a special token
    (c(0) + [UNK, EOS], S),  # a special token first, then EOS
    ([BOS] + c(0, 1, 2) + [EOS], S),
    (c(1) + [PAD] + c(1, 1, 1, 1), S),
    (c(0, 1), E),  # ended before T without EOS (max_new_tokens < T + 1)
    ([], E),
]


def test_malformed_kind_of_hand_built_completions():
    w = world(vocab_size=4, completion_len=3)
    reward = ev.SyntheticReward(w)
    comps = [np.asarray(ids, np.int64) for ids, _ in HAND_BUILT]
    kinds = reward.kinds(comps)
    assert kinds.tolist() == [k for _, k in HAND_BUILT]
    _, bad = reward([np.array([OFF + 1])] * len(comps), comps)
    np.testing.assert_array_equal(bad, kinds != fm.WELL_FORMED)  # one owner of "malformed"
    parts = fm.breakdown(kinds)
    assert parts == {"sample/malformed/past_length": 4 / 13, "sample/malformed/early_eos": 5 / 13,
                     "sample/malformed/special_token": 3 / 13}
    assert sum(parts.values()) == pytest.approx(bad.mean(), abs=1e-15)


class TablePolicy:
    """y ~ a fixed table of K completions (model ids) with probabilities p_K after every prompt."""

    def __init__(self, completions, probs_K):
        self.table, self.probs_K = [np.asarray(x, np.int32) for x in completions], np.asarray(probs_K, np.float64)

    def sample(self, prompts, key, *, max_new_tokens, temperature=1.0, row_ids_N=None):
        n = prompts.lens_B.shape[0]
        ids = np.arange(n) if row_ids_N is None else np.asarray(row_ids_N)
        u_N = pol.row_uniforms(key, ids, 1)[:, 0]
        pick_N = np.minimum(np.searchsorted(np.cumsum(self.probs_K), u_N, side="right"), len(self.table) - 1)
        tokens, mask = np.zeros((n, max_new_tokens), np.int32), np.zeros((n, max_new_tokens), np.float32)
        for i, k in enumerate(pick_N):
            tokens[i, : len(self.table[k])], mask[i, : len(self.table[k])] = self.table[k], 1.0
        return pol.Completions(tokens, mask, np.log(self.probs_K[pick_N]))

    def logprob(self, prompts, tokens_NxM, mask_NxM):
        index = {tuple(x): k for k, x in enumerate(self.table)}
        rows = [tuple(t[m > 0]) for t, m in zip(tokens_NxM, mask_NxM)]
        return np.asarray([np.log(self.probs_K[index[r]]) if r in index else -np.inf for r in rows])


def test_malformed_breakdown_of_a_policy_with_known_off_format_mass():
    """Known masses: past length 0.2, early EOS 0.15, special tokens 0.05 + 0.1; the sampled fractions
    match within sampling error, sum to malformed_frac exactly, and the KL share is its definition."""
    w = world(vocab_size=4, completion_len=3)
    table = [c(0, 1, 2) + [EOS], c(3, 3, 3) + [EOS], c(0, 1, 2, 3), c(0) + [EOS], c(1) + [UNK, EOS],
             [PAD] + c(0, 1) + [EOS]]
    probs = np.array([0.4, 0.1, 0.2, 0.15, 0.1, 0.05])
    policy, reference = TablePolicy(table, probs), TablePolicy(table, np.full(6, 1 / 6))
    _, prompts = eval_prompts(w, 8)
    e = ev.Evaluator(reference=reference, prompts=prompts, reward=ev.SyntheticReward(w), world=w, beta=1.0,
                     samples_per_prompt=256, max_new_tokens=5)
    out = e(policy)
    n = e.num_rows
    for key, p in (("past_length", 0.2), ("early_eos", 0.15), ("special_token", 0.15)):
        within(out[f"sample/malformed/{key}"], p, np.sqrt(p * (1 - p) / n))
    assert sum(out[f"sample/malformed/{k}"] for k in fm.KINDS.values()) == pytest.approx(
        out["sample/malformed_frac"], abs=1e-12)
    rows = e.gathered(e.local_rows(policy))
    d = rows["logp"] - rows["ref_logp"]
    assert out["sample/malformed_kl_share"] == pytest.approx(d[rows["malformed"]].sum() / d.sum(), rel=1e-12)
    assert not any(k.startswith("projected/") for k in out)  # a table cannot be masked: no projection
    assert np.isnan(fm.kl_share(np.zeros(4), np.ones(4, bool)))


def biased_policy(seed: int, w) -> pol.ModelPolicy:
    """A random decoder nudged towards the format by a finite bias (+3 on content before T, on EOS at T):
    a mix of well-formed and malformed completions."""
    model = tiny_decoder(w.vocab_size, seed, init_std=0.05)
    nudge = 3.0 * (fm.format_bias(OFF + w.vocab_size, **ev.SyntheticReward(w).format_kw) == 0)
    return pol.ModelPolicy(model, eos_id=EOS, batch_size=4096, step_bias_NxV=nudge)


def enumerate_leaves(n_vocab: int, n_t: int):
    """Every completion the sampler can draw (up to T + 1 tokens, stopping at EOS): tokens, mask, T + 1 wide."""
    leaves = [s for n in range(1, n_t + 2) for s in np.ndindex(*(n_vocab,) * n)
              if EOS not in s[:-1] and (s[-1] == EOS or n == n_t + 1)]
    toks, mask = np.zeros((len(leaves), n_t + 1), np.int32), np.zeros((len(leaves), n_t + 1), np.float32)
    for i, s in enumerate(leaves):
        toks[i, : len(s)], mask[i, : len(s)] = s, 1.0
    return toks, mask


def exact_conditional_kl(policy, w, prompts):
    """(KL(q(x, y | wf) || u(x) p_world(y|x)), its estimator's standard error per sqrt(N)) by enumeration,
    x uniform over the prompts: sum_x u(x) sum_{y wf} q(y|x) / P (log q - log p_world) - log P."""
    toks, mask = enumerate_leaves(OFF + w.vocab_size, w.completion_len)
    world_ref = pol.MarkovPolicy(sx.reference_policy(w))
    weights, diffs = [], []
    for b in range(prompts.lens_B.shape[0]):
        rep = pol.Prompts(np.repeat(prompts.tokens_BxP[b: b + 1], len(toks), 0),
                          np.repeat(prompts.lens_B[b], len(toks)))
        lq = policy.logprob(rep, toks, mask)
        np.testing.assert_allclose(np.exp(lq).sum(), 1.0, atol=1e-5)
        good = ev.SyntheticReward(w).kinds([t[m > 0] for t, m in zip(toks, mask)]) == fm.WELL_FORMED
        weights.append(np.exp(lq[good]) / prompts.lens_B.shape[0])
        diffs.append(lq[good] - world_ref.logprob(rep.select(good), toks[good], mask[good]))
    q, d = np.concatenate(weights), np.concatenate(diffs)
    p_wf = q.sum()
    mean = float(q @ d / p_wf)
    var = float(q @ (d - mean) ** 2 / p_wf)
    return mean - np.log(p_wf), np.sqrt((var + (1 - p_wf)) / p_wf)


def test_kl_world_is_the_kl_of_the_policy_conditioned_on_well_formed_samples():
    """sample/kl_world and sample/kl_ref_world against KL(q(.|wf) || world pi_ref) by enumerating every
    completion (V = 2, T = 2), within a few standard errors; and the estimator on given rows."""
    w = world(vocab_size=2, completion_len=2, prompt_len=2)
    pi, ref = biased_policy(0, w), biased_policy(1, w)
    prompts = pol.make_prompts([[OFF + 1, OFF + 0], [OFF + 0, OFF + 1]])
    e = ev.Evaluator(reference=ref, prompts=prompts, reward=ev.SyntheticReward(w), world=w, samples_per_prompt=2048)
    out = e(pi)
    assert 0.1 < out["sample/malformed_frac"] < 0.9 and 0.1 < out["sample/malformed_frac_ref"] < 0.9
    for key, policy in (("sample/kl_world", pi), ("sample/kl_ref_world", ref)):
        exact, se_unit = exact_conditional_kl(policy, w, prompts)
        within(out[key], exact, se_unit / np.sqrt(e.num_rows))
    logq, logp = np.array([-1.0, -2.0, -0.5, -3.0]), np.array([-1.5, -1.0, -9.0, -np.inf])
    bad = np.array([False, False, True, True])
    assert fm.conditional_kl(logq, logp, bad) == pytest.approx(np.mean([0.5, -1.0]) - np.log(0.5))
    assert np.isnan(fm.conditional_kl(logq, logp, np.ones(4, bool)))


def projected_logprobs_by_enumeration(pi, prompts_b, w):
    """log proj(y|x) of every content sequence y (V^T of them, then EOS), from the unmasked policy's
    next-token log-probs renormalized over the content tokens at each step t < T: [V^T], and the tokens."""
    v, n_t = w.vocab_size, w.completion_len
    seqs = np.stack(np.unravel_index(np.arange(v ** n_t), (v,) * n_t), axis=1)
    toks = np.concatenate([seqs + OFF, np.full((len(seqs), 1), EOS)], axis=1).astype(np.int32)
    lp = pi.next_logprobs(prompts_b, toks)[:, :n_t]  # [C, T, vocab]
    content = lp[..., OFF: OFF + v]
    renorm = content - np.log(np.exp(content).sum(-1, keepdims=True))
    return np.take_along_axis(renorm, seqs[..., None], axis=-1)[..., 0].sum(1), seqs, toks


def test_projected_policy_equals_exact_enumeration():
    """The format-masked decoder: its teacher-forced and sampled log-probs equal the enumerated
    renormalized log-probs, its samples are all well-formed, and projected/kl, projected/reward match
    the exact values within a few standard errors; projected/regret(_frac) follow their definitions."""
    w = world(vocab_size=3, completion_len=3, prompt_len=2, seed=1)
    pi = pol.ModelPolicy(tiny_decoder(3, seed=0, init_std=0.5), eos_id=EOS, batch_size=4096)
    ref = pol.ModelPolicy(tiny_decoder(3, seed=1, init_std=0.5), eos_id=EOS, batch_size=4096)
    content, prompts = eval_prompts(w, 3, seed=2)
    proj = fm.projected(pi, **ev.SyntheticReward(w).format_kw)
    world_ref = pol.MarkovPolicy(sx.reference_policy(w))
    kl, reward = [], []
    for b in range(3):
        n = w.vocab_size ** w.completion_len
        rep = pol.Prompts(np.repeat(prompts.tokens_BxP[b: b + 1], n, 0), np.repeat(prompts.lens_B[b], n))
        want, seqs, toks = projected_logprobs_by_enumeration(pi, rep, w)
        np.testing.assert_allclose(proj.logprob(rep, toks, np.ones(toks.shape, np.float32)), want, atol=2e-5)
        np.testing.assert_allclose(np.exp(want).sum(), 1.0, atol=1e-5)
        many = pol.Prompts(np.repeat(prompts.tokens_BxP[b: b + 1], 256, 0), np.repeat(prompts.lens_B[b], 256))
        drawn = proj.sample(many, jax.random.key(b), max_new_tokens=w.completion_len + 1)
        assert (ev.SyntheticReward(w).kinds([drawn.ids(i) for i in range(256)]) == fm.WELL_FORMED).all()
        index = np.ravel_multi_index((drawn.tokens_NxM[:, : w.completion_len] - OFF).T,
                                     (w.vocab_size,) * w.completion_len)
        np.testing.assert_allclose(drawn.logps_N, want[index], atol=2e-5)
        q = np.exp(want)
        kl.append(q @ (want - world_ref.logprob(rep, toks, np.ones(toks.shape, np.float32))))
        reward.append(q @ sx.sequence_reward(w, np.full(n, content[b, -1]), seqs))
    e = ev.Evaluator(reference=ref, prompts=prompts, reward=ev.SyntheticReward(w), world=w, beta=1.0,
                     samples_per_prompt=1024)
    out = e(pi)
    assert out["sample/malformed_frac"] > 0.3  # the unmasked policy is mostly off the format
    within(out["projected/kl"], np.mean(kl), out["projected/kl_stderr"])
    within(out["projected/reward"], np.mean(reward), out["projected/reward_stderr"])
    at_kl = sx.frontier_reward_at_kl(w, out["projected/kl"], content[:, -1:])[0]
    assert out["projected/reward_at_kl"] == pytest.approx(at_kl, rel=1e-9)
    assert out["projected/regret"] == pytest.approx(at_kl - out["projected/reward"], rel=1e-9)
    assert out["projected/regret_frac"] == pytest.approx(
        out["projected/regret"] / (at_kl - out["optimum/reward_ref"]), rel=1e-9)


def test_projection_composes_with_a_vocabulary_mask():
    """A policy trained with a vocabulary mask ([1, V] bias, every step) keeps it under the projection:
    the bias is the sum, its forbidden content token is never drawn."""
    w = world(vocab_size=3, completion_len=2)
    allowed = np.ones(OFF + 3, bool)
    allowed[[PAD, BOS, UNK, OFF + 1]] = False
    masked = pol.ModelPolicy(tiny_decoder(3, seed=0, init_std=0.5), eos_id=EOS,
                             step_bias_NxV=np.where(allowed, 0.0, -np.inf)[None])
    proj = fm.projected(masked, **ev.SyntheticReward(w).format_kw)
    fmt = fm.format_bias(OFF + 3, **ev.SyntheticReward(w).format_kw)
    np.testing.assert_array_equal(proj.step_bias_NxV, fmt + np.where(allowed, 0.0, -np.inf)[None])
    prompts = pol.make_prompts([[OFF + 0], [OFF + 2]]).repeat(64)
    drawn = proj.sample(prompts, jax.random.key(0), max_new_tokens=3)
    assert set(np.unique(drawn.tokens_NxM[:, :2])) == {OFF + 0, OFF + 2} and (drawn.tokens_NxM[:, 2] == EOS).all()
    np.testing.assert_allclose(proj.logprob(prompts, drawn.tokens_NxM, drawn.mask_NxM), drawn.logps_N, atol=1e-5)
    next_lp = masked.next_logprobs(prompts.select(np.arange(4)), drawn.tokens_NxM[:4])  # the exact path, masked too
    assert np.isneginf(next_lp[..., ~allowed]).all() and np.isfinite(next_lp[..., allowed]).all()
    assert fm.projected(pol.ModelPolicy(masked.model, eos_id=()), **ev.SyntheticReward(w).format_kw) is None
