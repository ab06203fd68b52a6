"""Tests of dpo_jax/losses/core.py: PairLogps, the seed closed forms, hyper-parameters, the registry, Objective."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_jax import losses as L

NAMED_VARIANTS = {
    # TRL 1.16's loss types
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    # f-divergences, LD-DPO, RPO
    "reverse_kl", "forward_kl", "js_divergence", "alpha_divergence", "ld_dpo", "ld_alpha", "rpo",
    # beyond TRL
    "conservative", "cdpo", "dpop", "simpo", "orpo", "cpo", "kto", "sft_sum",
}


def make_batch(rng, p=8, scale=20.0, dtype=jnp.float32, shared=True):
    draw = lambda: jnp.asarray(-scale * rng.random(p) - 1.0, dtype)  # noqa: E731
    chosen_len = jnp.asarray(rng.integers(1, 30, p), jnp.float32)
    rejected_len = jnp.asarray(rng.integers(1, 30, p), jnp.float32)
    pc, pr, rc, rr = draw(), draw(), draw(), draw()
    extra = {}
    if shared:
        frac = lambda: jnp.asarray(rng.uniform(0.3, 1.0, p), dtype)  # noqa: E731
        extra = dict(policy_chosen_shared=pc * frac(), policy_rejected_shared=pr * frac(),
                     ref_chosen_shared=rc * frac(), ref_rejected_shared=rr * frac())
    return L.PairLogps(pc, pr, rc, rr, chosen_len, rejected_len, **extra)



# ------------------------------------------------------------------------------------------------
# Registry and hyper-parameters.

def test_registry_lists_every_named_variant():
    missing = NAMED_VARIANTS - set(L.LOSSES)
    assert not missing, f"variants missing from LOSSES: {sorted(missing)}"
    for name, spec in L.LOSSES.items():
        assert spec.paper, f"{name} has no formula/paper"


def test_invalid_hyper_parameters_are_named():
    with pytest.raises(ValueError, match=r"loss 'robust': label_smoothing=0.6 is outside"):
        L.params("robust", label_smoothing=0.6)
    with pytest.raises(ValueError, match=r"beta=0.0 is outside"):
        L.params("sigmoid", beta=0.0)
    with pytest.raises(ValueError, match=r"no hyper-parameter 'gama'.*beta, gamma"):
        L.params("simpo", gama=1.0)
    with pytest.raises(ValueError, match=r"unknown loss 'sigmod'; available: .*sigmoid"):
        L.params("sigmod")
    with pytest.raises(ValueError, match=r"loss.weights has 1 entries for 2 losses"):
        L.Objective(("sigmoid", "sft")).params(weights=[1.0])
    with pytest.raises(ValueError, match=r"must be a number"):
        L.params("sigmoid", beta="big")


def test_new_beta_and_weights_do_not_recompile():
    obj = L.Objective(("sigmoid", "sft"))
    batch = make_batch(np.random.default_rng(0))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(hp):
        return obj(batch, hp)[0]

    values = [float(f(obj.params(weights=[1.0, w], beta=b))) for b, w in [(0.1, 0.0), (0.5, 1.0), (2.0, 0.3)]]
    assert len(set(values)) == 3


# ------------------------------------------------------------------------------------------------
# Closed forms.

def test_seed_closed_forms_at_zero_margin():
    x = jnp.array([-3.0, -50.0, -0.5])
    np.testing.assert_allclose(L.dpo_loss(x, x + 1.0, x, x + 1.0, 0.3), math.log(2.0), rtol=1e-7)
    np.testing.assert_allclose(L.grad_weight(x, x + 1.0, x, x + 1.0, 0.3), 0.5, rtol=1e-7)
    np.testing.assert_allclose(L.implicit_reward(x, x, 0.3), 0.0)


def test_seed_closed_forms_and_gradient():
    pc, pr, rc, rr, beta = -10.0, -14.0, -11.0, -12.0, 0.2
    h = (pc - rc) - (pr - rr)  # = 3
    np.testing.assert_allclose(L.implicit_reward(pc, rc, beta), beta * (pc - rc), rtol=1e-6)
    np.testing.assert_allclose(L.dpo_loss(pc, pr, rc, rr, beta), math.log1p(math.exp(-beta * h)), rtol=1e-6)
    w = 1.0 / (1.0 + math.exp(beta * h))
    np.testing.assert_allclose(L.grad_weight(pc, pr, rc, rr, beta), w, rtol=1e-6)
    g_c, g_r, g_rc = jax.grad(L.dpo_loss, argnums=(0, 1, 2))(pc, pr, rc, rr, beta)
    np.testing.assert_allclose(g_c, -beta * w, rtol=1e-6)
    np.testing.assert_allclose(g_r, beta * w, rtol=1e-6)
    np.testing.assert_allclose(g_rc, beta * w, rtol=1e-6)


def test_objective_at_step_zero_policy_equals_reference():
    rng = np.random.default_rng(1)
    b = make_batch(rng)
    b = b._replace(ref_chosen=b.policy_chosen, ref_rejected=b.policy_rejected)
    obj = L.Objective(("sigmoid",))
    loss, _ = obj(b, obj.params(beta=0.7))
    np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
    m = L.reward_metrics(b, 0.7)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logratio/mean"):
        assert float(m[key]) == 0.0, key
    np.testing.assert_allclose(m["grad_weight/mean"], 0.5)


# ------------------------------------------------------------------------------------------------
# The DPO gradient weight (property-based).

@settings(max_examples=50, deadline=None)
@given(pc=st.floats(-200, -0.1), pr=st.floats(-200, -0.1), rc=st.floats(-200, -0.1), rr=st.floats(-200, -0.1),
       beta=st.floats(0.01, 5.0))
def test_grad_weight_is_the_dpo_gradient(pc, pr, rc, rr, beta):
    g_c, g_r = jax.grad(L.dpo_loss, argnums=(0, 1))(jnp.float32(pc), jnp.float32(pr), rc, rr, beta)
    w = L.grad_weight(pc, pr, rc, rr, beta)
    np.testing.assert_allclose(g_c, -beta * w, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g_r, beta * w, rtol=1e-4, atol=1e-7)
