"""Tests of the registered variants (dpo_jax/losses/variants.py): stability, invariances, closed-form derivatives,
theory (the exact optimum) and TRL parity."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_jax import losses as L
from tests.losses.test_core import make_batch

# Losses that depend on the log-probs only through reward differences r_w - r_l (log Z(x) cancels).
REWARD_DIFFERENCE = {"sigmoid", "dpo", "reverse_kl", "hinge", "robust", "conservative", "cdpo", "exo_pair",
                     "discopop", "ld_dpo", "ld_alpha", "aot", "beta_dpo"}
MARGIN_LOSSES = sorted(n for n, s in L.LOSSES.items() if s.d_of_margin is not None)


def loss_of(name, batch, **hp):
    return L.masked_mean(L.LOSSES[name](batch, L.params(name, **hp)), batch.as_float32().mask)


# ------------------------------------------------------------------------------------------------
# Finite values and the partition-function invariance.

@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_finite_for_huge_margins_and_bfloat16(name):
    rng = np.random.default_rng(2)
    base = make_batch(rng, p=4)
    for sign in (1.0, -1.0):
        b = base._replace(policy_chosen=base.policy_chosen + sign * 1e4,
                          policy_chosen_shared=base.policy_chosen_shared + sign * 1e4)
        value, grads = jax.value_and_grad(lambda bb: loss_of(name, bb))(b)
        assert np.isfinite(float(value)), f"{name}: loss not finite at margin {sign}*1e4"
        for g in jax.tree_util.tree_leaves(grads):
            assert np.all(np.isfinite(np.asarray(g))), f"{name}: gradient not finite at margin {sign}*1e4"
    bf = make_batch(rng, p=4, dtype=jnp.bfloat16)
    value, grads = jax.value_and_grad(lambda bb: loss_of(name, bb))(bf)
    assert value.dtype == jnp.float32 and np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_partition_function_cancels(name):
    """Adding log Z(x) to both policy log-probs of a prompt leaves reward-difference losses unchanged."""
    rng = np.random.default_rng(3)
    b = make_batch(rng)
    log_z = jnp.asarray(rng.normal(0.0, 5.0, b.policy_chosen.shape), jnp.float32)
    shifted = b._replace(policy_chosen=b.policy_chosen + log_z, policy_rejected=b.policy_rejected + log_z,
                         policy_chosen_shared=b.policy_chosen_shared + log_z,
                         policy_rejected_shared=b.policy_rejected_shared + log_z)
    before = L.LOSSES[name](b, L.params(name))
    after = L.LOSSES[name](shifted, L.params(name))
    if name in REWARD_DIFFERENCE:
        np.testing.assert_allclose(after, before, rtol=2e-5, atol=2e-6, err_msg=name)
    else:  # the check can fail: these losses see the log-probs themselves, not only differences
        assert not np.allclose(after, before, rtol=1e-4), f"{name} unexpectedly invariant; add to REWARD_DIFFERENCE?"


# ------------------------------------------------------------------------------------------------
# Closed-form derivatives against autodiff (property-based).

def _random_hp(spec, data):
    hp = {}
    for key, p in spec.hparams.items():
        lo = p.low if math.isfinite(p.low) else -5.0
        hi = min(p.high, lo + 5.0) if math.isfinite(p.high) else lo + 5.0
        lo, hi = lo + 1e-3 * (hi - lo) + 1e-3, hi - 1e-3 * (hi - lo) - 1e-3
        hp[key] = data.draw(st.floats(lo, hi), label=key)
    return L.params(spec.name, **hp)


@pytest.mark.parametrize("name", MARGIN_LOSSES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_closed_form_derivative_equals_autodiff(name, data):
    spec = L.LOSSES[name]
    hp = {k: jnp.float32(v) for k, v in _random_hp(spec, data).items()}
    m = jnp.float32(data.draw(st.floats(-40.0, 40.0), label="margin"))
    if name == "hinge":  # not differentiable at beta m = 1
        m = jnp.where(jnp.abs(hp["beta"] * m - 1.0) < 1e-3, m + 0.01, m)
    auto = jax.grad(spec.of_margin)(m, hp)
    np.testing.assert_allclose(spec.d_of_margin(m, hp), auto, rtol=2e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", MARGIN_LOSSES)
def test_margin_decomposition(name):
    spec = L.LOSSES[name]
    b = make_batch(np.random.default_rng(4)).as_float32()
    hp = {k: jnp.float32(v) for k, v in L.params(name).items()}
    np.testing.assert_allclose(spec.fn(b, hp), spec.of_margin(spec.margin(b, hp), hp), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Masking, reference-free losses, KTO.

@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_filler_pairs_do_not_change_the_loss(name):
    rng = np.random.default_rng(5)
    b = make_batch(rng, p=6)
    filler = make_batch(rng, p=3)
    both = L.PairLogps(*(None if x is None else jnp.concatenate([x, y]) for x, y in zip(b[:-1], filler[:-1])),
                       pair_mask=jnp.array([1.0] * 6 + [0.0] * 3))
    np.testing.assert_allclose(loss_of(name, both), loss_of(name, b), rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", ["simpo", "orpo", "cpo", "sft", "sft_sum"])
def test_reference_free_losses_ignore_the_reference(name):
    rng = np.random.default_rng(6)
    b = make_batch(rng)
    other = b._replace(ref_chosen=b.ref_chosen - 7.0, ref_rejected=b.ref_rejected + 3.0)
    assert not L.LOSSES[name].uses_reference
    np.testing.assert_allclose(loss_of(name, other), loss_of(name, b), rtol=1e-6)


def test_sft_and_sft_sum_closed_form():
    """Chosen log-probs -6, -10 over 3 and 5 tokens, plus a filler pair: sft_sum = (6 + 10) / 2 = 8 nats
    per sequence, sft = (6 + 10) / (3 + 5) = 2 nats per token."""
    b = L.PairLogps(*(jnp.array(v) for v in ([-6.0, -10.0, -50.0], [-1.0, -2.0, -3.0], [-4.0, -4.0, -4.0],
                                             [-5.0, -5.0, -5.0], [3.0, 5.0, 40.0], [2.0, 2.0, 2.0])),
                    pair_mask=jnp.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(loss_of("sft_sum", b), 8.0, rtol=1e-6)
    np.testing.assert_allclose(loss_of("sft", b), 2.0, rtol=1e-6)
    obj = L.Objective(("sigmoid", "sft_sum"))
    _, terms = obj(b, obj.params(weights=[1.0, 0.5]))
    np.testing.assert_allclose(terms["loss/sft_sum"], 8.0, rtol=1e-6)


@pytest.mark.parametrize("equal_lengths", [True, False])
def test_sft_sum_is_sft_times_mean_length(equal_lengths):
    b = make_batch(np.random.default_rng(12), p=6)
    if equal_lengths:
        b = b._replace(chosen_len=jnp.full_like(b.chosen_len, 7.0))
    mean_len = float(jnp.mean(b.chosen_len))
    np.testing.assert_allclose(loss_of("sft_sum", b), loss_of("sft", b) * mean_len, rtol=1e-5)


def test_ld_dpo_and_ld_alpha_report_the_same_loss_and_metrics():
    """ld_dpo and sigmoid with the ld_alpha modifier are one loss; both report the LD-weighted log-probs."""
    b = make_batch(np.random.default_rng(13))
    ld_dpo, modifier = L.Objective(("ld_dpo",)), L.Objective(("sigmoid",), ld=True)
    hp_a, hp_b = ld_dpo.params(beta=0.1, ld_alpha=0.3), modifier.params(beta=0.1, ld_alpha=0.3)
    np.testing.assert_allclose(ld_dpo(b, hp_a)[0], modifier(b, hp_b)[0], rtol=1e-6)
    m_a = L.reward_metrics(ld_dpo.metric_pairs(b, hp_a), 0.1)
    m_b = L.reward_metrics(modifier.metric_pairs(b, hp_b), 0.1)
    assert m_a.keys() == m_b.keys()
    for key in m_a:
        np.testing.assert_allclose(m_a[key], m_b[key], rtol=1e-6, err_msg=key)
    weighted = b.length_desensitized(0.3).policy_chosen
    np.testing.assert_allclose(m_a["logps/chosen"], jnp.mean(weighted), rtol=1e-6)
    with pytest.raises(ValueError, match="applying it again"):
        L.Objective(("ld_dpo",), ld=True)


def test_kto_closed_form():
    hp = {k: jnp.float32(v) for k, v in L.params("kto", beta=0.5, desirable_weight=2.0).items()}
    z0 = jnp.float32(0.3)
    out = L.variants.kto_unpaired(jnp.array([-1.0, -1.0]), jnp.array([-2.0, -2.0]), jnp.array([1, 0]), z0, hp)
    s = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    np.testing.assert_allclose(out, [2.0 * (1 - s(0.5 * (1.0 - 0.3))), 1 - s(0.5 * (0.3 - 1.0))], rtol=1e-6)
    b = make_batch(np.random.default_rng(7))
    g = jax.grad(lambda bb: loss_of("kto", bb))(b)  # the reference point carries no gradient
    assert np.all(np.asarray(g.policy_chosen) <= 0) and np.all(np.asarray(g.policy_rejected) >= 0)


# ------------------------------------------------------------------------------------------------
# Theory: on a tabular bandit the population loss is minimized by the closed-form optimum.

def _population_batch(logits_K, pi_ref_K, reward_K):
    """All ordered pairs (i chosen, j rejected), weighted by pi_ref(i) pi_ref(j) sigmoid(r_i - r_j)."""
    k = logits_K.shape[0]
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    i, j = i.ravel(), j.ravel()
    logp = jax.nn.log_softmax(logits_K)
    log_ref = jnp.log(pi_ref_K)
    weight = pi_ref_K[i] * pi_ref_K[j] * jax.nn.sigmoid(reward_K[i] - reward_K[j])
    ones = jnp.ones(k * k)
    return L.PairLogps(logp[i], logp[j], log_ref[i], log_ref[j], ones, ones, pair_mask=weight)


def _minimize(name, beta, pi_ref, reward):
    hp = L.params(name, beta=beta)
    loss = lambda th: L.masked_mean(L.LOSSES[name](_population_batch(th, pi_ref, reward), hp),  # noqa: E731
                                    _population_batch(th, pi_ref, reward).pair_mask)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def run(theta):
        def body(carry, _):
            th, state = carry
            v, g = value_and_grad(th, state=state)
            upd, state = opt.update(g, state, th, value=v, grad=g, value_fn=loss)
            return (optax.apply_updates(th, upd), state), None
        (th, _), _ = jax.lax.scan(body, (theta, opt.init(theta)), None, length=300)
        return th

    return jax.nn.softmax(run(jnp.zeros_like(pi_ref)))


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_dpo_population_optimum_is_pi_star(beta):
    rng = np.random.default_rng(8)
    pi_ref = jnp.asarray(rng.dirichlet(np.ones(6)), jnp.float32)
    reward = jnp.asarray(rng.normal(0, 1.0, 6), jnp.float32)
    pi_star = pi_ref * jnp.exp(reward / beta)
    pi_star = pi_star / pi_star.sum()
    pi = _minimize("sigmoid", beta, pi_ref, reward)
    tv = 0.5 * float(jnp.abs(pi - pi_star).sum())
    assert tv < 1e-3, f"TV(pi_DPO, pi*) = {tv}"
    assert 0.5 * float(jnp.abs(pi_ref - pi_star).sum()) > 0.05  # the optimum is far from pi_ref


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_ipo_population_optimum(beta):
    """Azar et al. 2023: pi*(y) ∝ pi_ref(y) exp(p(y > pi_ref) / tau), tau = beta, p(y > mu) = E_mu sigma(r_y - r_y')."""
    rng = np.random.default_rng(9)
    pi_ref = jnp.asarray(rng.dirichlet(np.ones(6)), jnp.float32)
    reward = jnp.asarray(rng.normal(0, 1.0, 6), jnp.float32)
    win = jax.nn.sigmoid(reward[:, None] - reward[None, :]) @ pi_ref
    pi_star = pi_ref * jnp.exp(win / beta)
    pi_star = pi_star / pi_star.sum()
    pi = _minimize("ipo", beta, pi_ref, reward)
    tv = 0.5 * float(jnp.abs(pi - pi_star).sum())
    assert tv < 1e-3, f"TV(pi_IPO, pi*_IPO) = {tv}"
    dpo_star = pi_ref * jnp.exp(reward / beta)
    assert 0.5 * float(jnp.abs(pi - dpo_star / dpo_star.sum()).sum()) > 1e-2  # a different optimum than DPO's


# ------------------------------------------------------------------------------------------------
# Parity with TRL 1.16 (tests/fixtures/trl_parity, see its PROVENANCE.md).

REGEN = ("goldens: tests/fixtures/trl_parity/trl_reference.json, produced by its make_reference.py with "
         "TRL 1.16 DPOTrainer.compute_loss on one batch of 16 pairs, float32 CPU, beta 0.1; regenerate with "
         "`python tests/fixtures/trl_parity/make_reference.py OUTDIR` (needs torch, transformers, trl)")


def _fixture_batch(path):
    ref = json.loads((path / "trl_reference.json").read_text())
    pairs = ref["pairs"]
    col = lambda k: jnp.asarray([p[k] for p in pairs], jnp.float32)  # noqa: E731
    n = lambda k: jnp.asarray([len(p[k]) for p in pairs], jnp.float32)  # noqa: E731
    batch = L.PairLogps(col("policy_chosen_logps"), col("policy_rejected_logps"), col("reference_chosen_logps"),
                        col("reference_rejected_logps"), n("chosen_ids"), n("rejected_ids"),
                        col("policy_chosen_shared_logps"), col("policy_rejected_shared_logps"),
                        col("reference_chosen_shared_logps"), col("reference_rejected_shared_logps"))
    return ref, batch


def objective_for_trl_case(case):
    """Map a TRL DPOConfig loss setting to (Objective, hyper-parameters)."""
    names = tuple(case["loss_type"])
    if case.get("f_divergence_type", "reverse_kl") != "reverse_kl":
        assert names == ("sigmoid",)
        names = (case["f_divergence_type"],)
    obj = L.Objective(names, ld="ld_alpha" in case)
    known = set().union(*(s.hparams for s in obj.specs))
    kw = {"beta": 0.1, "label_smoothing": case.get("label_smoothing"), "alpha": case.get("f_alpha_divergence_coef")}
    kw = {k: v for k, v in kw.items() if v is not None and k in known}
    return obj, obj.params(weights=case.get("loss_weights"), ld_alpha=case.get("ld_alpha"), **kw)


def test_trl_parity_every_case(trl_fixture_dir):
    ref, batch = _fixture_batch(trl_fixture_dir)
    assert len(ref["cases"]) == 20
    for case in ref["cases"]:
        obj, hp = objective_for_trl_case(case["case"])
        loss, _ = jax.jit(obj)(batch, hp)
        f_div = case["case"].get("f_divergence_type", "reverse_kl") != "reverse_kl"
        np.testing.assert_allclose(loss, case["loss"], rtol=1e-4 if f_div else 1e-5,
                                   err_msg=f"{case['case']}: loss; {REGEN}")
        _assert_trl_metrics(obj, hp, batch, ref["beta"], case)


TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


def _assert_trl_metrics(obj, hp, batch, beta, case):
    metrics = L.reward_metrics(obj.metric_pairs(batch, hp), beta)  # TRL reports rewards with beta even for sft
    for key in TRL_METRICS:
        # atol: the rewards are beta times differences of float32 log-probs near -120 (ulp 7.6e-6).
        np.testing.assert_allclose(metrics[key], case["metrics"][key], rtol=1e-5, atol=2e-6,
                                   err_msg=f"{case['case']}: {key}; {REGEN}")


def test_ld_dpo_reports_trl_ld_alpha_metrics(trl_fixture_dir):
    """TRL with ld_alpha reports the LD-weighted log-probs (logps/chosen -91.90 here, not the full -102.55);
    the registered ld_dpo reports the same as the sigmoid + ld_alpha spelling."""
    ref, batch = _fixture_batch(trl_fixture_dir)
    case = next(c for c in ref["cases"] if "ld_alpha" in c["case"])
    obj = L.Objective(("ld_dpo",))
    hp = obj.params(beta=ref["beta"], ld_alpha=case["case"]["ld_alpha"])
    np.testing.assert_allclose(jax.jit(obj)(batch, hp)[0], case["loss"], rtol=1e-5, err_msg=f"ld_dpo loss; {REGEN}")
    _assert_trl_metrics(obj, hp, batch, ref["beta"], case)
