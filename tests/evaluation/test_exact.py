"""Exact evaluation in the synthetic world: zero frontier regret of the exact optimum, and the exact
enumeration of a policy's completions against closed forms, brute force and the sampled estimates."""

import numpy as np
import pytest
from flax import nnx

from dpo_jax.data import synthetic as syn
from dpo_jax.data import synthetic_exact as sx
from dpo_jax.evaluation import exact as ex
from dpo_jax.evaluation import policies as pol
from dpo_jax.evaluation import sampled as ev
from dpo_jax.models.transformer import Decoder, ModelConfig
from tests.evaluation.test_sampled import eval_prompts, random_tabular, within, world

OFF, EOS = syn.TOKEN_OFFSET, syn.EOS_ID


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_regret_of_the_exact_optimum_is_zero(beta):
    w = world()
    content, prompts = eval_prompts(w, 32, seed=3)
    e = ev.Evaluator(reference=pol.MarkovPolicy(sx.reference_policy(w)), prompts=prompts,
                     reward=ev.SyntheticReward(w), world=w, beta=beta, samples_per_prompt=64)
    out = e(pol.MarkovPolicy(sx.optimal_policy(w, beta)))
    se = np.hypot(out["sample/reward_stderr"], beta * out["sample/kl_stderr"])
    within(out["frontier/regret"], 0.0, se)
    within(out["sample/kl"], out["optimum/kl"], out["sample/kl_stderr"])
    within(out["sample/reward"], out["optimum/reward"], out["sample/reward_stderr"])
    assert abs(out["frontier/regret_frac"]) < 0.02
    # on the format by construction: its projection is itself, measured against the world's pi_ref
    within(out["projected/kl"], out["optimum/kl"], out["projected/kl_stderr"])
    within(out["projected/regret"], 0.0, np.hypot(out["projected/reward_stderr"], beta * out["projected/kl_stderr"]))
    assert out["sample/malformed_frac"] == 0.0 and out["sample/malformed/past_length"] == 0.0
    # the reference itself sits at the frontier's origin, and a worse policy has positive regret
    np.testing.assert_allclose(out["optimum/reward_ref"], sx.expected_reward(w, sx.reference_policy(w), content))
    worse = e(pol.MarkovPolicy(random_tabular(w, 0)))
    assert worse["frontier/regret"] > 0.5


def test_exact_model_report_equals_closed_form_for_tabular_policies():
    w = world(vocab_size=4, completion_len=4)
    content, prompts = eval_prompts(w, 6)
    star = sx.optimal_policy(w, 0.7)
    out = ex.exact_model_report(pol.MarkovPolicy(star), pol.MarkovPolicy(sx.reference_policy(w)), prompts, w,
                                vocab=OFF + 4, block_rows=1000)
    assert out["exact_model/mass"] == pytest.approx(1.0, abs=1e-12)
    assert out["exact_model/well_formed"] == pytest.approx(1.0, abs=1e-12)
    assert out["exact_model/kl"] == pytest.approx(sx.kl_to_ref(w, star, content), rel=1e-10)
    assert out["exact_model/reward"] == pytest.approx(sx.expected_reward(w, star, content), rel=1e-10)
    with pytest.raises(ValueError, match="max_sequences"):
        ex.exact_model_report(pol.MarkovPolicy(star), pol.MarkovPolicy(star), prompts, w, vocab=OFF + 4,
                              max_sequences=100)


def test_exact_model_report_of_a_transformer_equals_brute_force_and_the_sampled_estimate():
    """A random decoder over <pad> <s> </s> <unk> t0 t1 (malformed completions included): the tree sums
    equal the sum over every leaf (up to T + 1 tokens, stopping at EOS), and the sampled KL and reward
    match them within a few standard errors."""
    w = world(vocab_size=2, completion_len=2, prompt_len=2)
    cfg = ModelConfig(vocab_size=OFF + 2, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, init_std=0.3)
    pi = pol.ModelPolicy(Decoder(cfg, rngs=nnx.Rngs(0)), eos_id=EOS, batch_size=2048)
    ref = pol.ModelPolicy(Decoder(cfg, rngs=nnx.Rngs(1)), eos_id=EOS, batch_size=2048)
    prompts = pol.make_prompts([[OFF + 1, OFF + 0], [OFF + 0, OFF + 1]])
    exact = ex.exact_model_report(pi, ref, prompts, w, vocab=OFF + 2)
    assert exact["exact_model/mass"] == pytest.approx(1.0, abs=1e-5)
    leaves = [s for n in (1, 2, 3) for s in np.ndindex(*(OFF + 2,) * n)
              if EOS not in s[:-1] and (s[-1] == EOS or n == 3)]
    toks = np.zeros((len(leaves), 3), np.int32)
    mask = np.zeros((len(leaves), 3), np.float32)
    for i, s in enumerate(leaves):
        toks[i, : len(s)], mask[i, : len(s)] = s, 1.0
    kl, reward = [], []
    for b in range(2):
        rep = pol.Prompts(np.repeat(prompts.tokens_BxP[b: b + 1], len(leaves), 0),
                         np.repeat(prompts.lens_B[b], len(leaves)))
        lp, lr = pi.logprob(rep, toks, mask), ref.logprob(rep, toks, mask)
        np.testing.assert_allclose(np.exp(lp).sum(), 1.0, atol=1e-5)
        r, _ = ev.SyntheticReward(w)([prompts.ids(b)] * len(leaves), [t[m > 0] for t, m in zip(toks, mask)])
        kl.append(np.sum(np.exp(lp) * (lp - lr)))
        reward.append(np.sum(np.exp(lp) * r))
    assert exact["exact_model/kl"] == pytest.approx(np.mean(kl), rel=1e-4)
    assert exact["exact_model/reward"] == pytest.approx(np.mean(reward), rel=1e-4, abs=1e-6)
    e = ev.Evaluator(reference=ref, prompts=prompts, reward=ev.SyntheticReward(w), world=w, samples_per_prompt=1024)
    out = e(pi)
    assert 0 < out["sample/malformed_frac"] < 1
    within(out["sample/kl"], exact["exact_model/kl"], out["sample/kl_stderr"])
    within(out["sample/reward"], exact["exact_model/reward"], out["sample/reward_stderr"])
