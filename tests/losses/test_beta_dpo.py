"""beta-DPO (dpo_jax/losses/beta_dpo.py): the running statistics and the batch beta against the
paper's update rule computed by hand in NumPy, the reduction to sigmoid DPO, and the filter."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import losses as L
from dpo_jax.losses import beta_dpo

OBJ = L.Objective(("beta_dpo",))


def pairs_with_margins(h_P, mask_P=None):
    """A batch whose log-ratio margins are exactly h_P (the reference at 0, the rejected at -1)."""
    h_P = jnp.asarray(h_P, jnp.float32)
    zeros, ones = jnp.zeros_like(h_P), jnp.ones_like(h_P)
    return L.PairLogps(h_P - 1.0, -ones, zeros, zeros, 3 * ones, 3 * ones,
                       pair_mask=None if mask_P is None else jnp.asarray(mask_P, jnp.float32))


def run(batches, rng=None, **hp):
    """(per-step losses, per-step terms, final state) of the objective over `batches`."""
    params = OBJ.params(**hp)
    state = OBJ.init_state()
    out = []
    for i, b in enumerate(batches):
        key = None if rng is None else jax.random.fold_in(rng, i)
        loss, terms, state = OBJ.apply(b, params, state, key)
        out.append((float(loss), {k: float(v) for k, v in terms.items()}))
    return out, state


def numpy_rule(margins, beta0, alpha, m, rho=1.0):
    """The update rule by hand: M = beta0 h; M0, sigma EMAs of the batch mean / unbiased std (the first
    batch sets them); keep the floor(rho n) pairs of highest N(M; M0, sigma^2) (deterministic
    selection); beta = beta0 max(1 + alpha (mean_kept M - M0), 1e-3); loss = mean_kept -log s(beta h)."""
    mu = sigma = None
    rows = []
    for h in margins:
        h = np.asarray(h, np.float64)
        M = beta0 * h
        mean, std = M.mean(), M.std(ddof=1)
        mu = mean if mu is None else m * mu + (1 - m) * mean
        sigma = std if sigma is None else m * sigma + (1 - m) * std
        k = max(1, math.floor(rho * len(h) + 1e-9))
        kept = np.argsort(np.abs(M - mu) / max(sigma, 1e-6), kind="stable")[:k]
        beta = beta0 * max(1 + alpha * (M[kept].mean() - mu), 1e-3)
        loss = np.mean(np.log1p(np.exp(-beta * h[kept])))
        rows.append(dict(mu=mu, sigma=sigma, beta=beta, loss=loss, kept=np.sort(kept)))
    return rows


MARGINS = [[0.5, 1.0, -2.0, 3.0, 0.0, 1.5], [2.0, 2.5, -1.0, 4.0, 0.5, 1.0],
           [-1.0, 0.0, 0.5, 6.0, 1.0, -0.5], [3.0, 3.5, 2.0, -4.0, 2.5, 5.0]]


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_update_rule_matches_the_paper_by_hand(rho):
    """Four steps of M0 <- m M0 + (1 - m) mean M, sigma likewise, beta = beta0 (1 + alpha (mean M - M0)),
    with every pair kept (rho = 1) and with the deterministic filter keeping 3 of 6 (rho = 0.5)."""
    beta0, alpha, m = 0.5, 0.8, 0.9
    got, state = run([pairs_with_margins(h) for h in MARGINS], beta=beta0, beta_dpo_alpha=alpha,
                     beta_dpo_momentum=m, beta_dpo_rho=rho)
    want = numpy_rule(MARGINS, beta0, alpha, m, rho)
    for i, ((loss, terms), w) in enumerate(zip(got, want)):
        assert terms["beta_dpo/running_mean"] == pytest.approx(w["mu"], rel=1e-5), i
        assert terms["beta_dpo/running_std"] == pytest.approx(w["sigma"], rel=1e-5), i
        assert terms["beta_dpo/beta"] == pytest.approx(w["beta"], rel=1e-5), i
        assert terms["beta_dpo/margin_mean"] == pytest.approx(beta0 * np.mean(MARGINS[i]), rel=1e-5), i
        assert terms["beta_dpo/kept_frac"] == pytest.approx(len(w["kept"]) / 6), i
        assert loss == pytest.approx(w["loss"], rel=1e-5), i
    assert float(state["beta_dpo"]["margin_mean"]) == pytest.approx(want[-1]["mu"], rel=1e-5)
    assert float(state["beta_dpo"]["initialized"]) == 1.0
    assert len({round(w["beta"], 6) for w in want}) == 4, "the constructed batches should move beta every step"


def test_alpha_zero_without_filter_is_sigmoid_dpo_in_loss_and_gradient():
    """alpha = 0, rho = 1: beta = beta0 whatever the running state, so loss and gradient are sigmoid DPO's."""
    rng = np.random.default_rng(0)
    hp = dict(beta=0.3, beta_dpo_alpha=0.0, beta_dpo_rho=1.0)
    _, state = run([pairs_with_margins(rng.normal(0, 2, 8)) for _ in range(3)], **hp)  # a non-trivial state
    batch = pairs_with_margins(rng.normal(1, 3, 8), mask_P=[1, 1, 1, 1, 1, 1, 0, 0])
    sig = L.Objective(("sigmoid",))

    def ours(logps):  # the gradient with respect to the policy log-probs
        return OBJ.apply(batch._replace(policy_chosen=logps[0], policy_rejected=logps[1]), OBJ.params(**hp), state,
                         jax.random.key(1))[0]

    def dpo(logps):
        return sig(batch._replace(policy_chosen=logps[0], policy_rejected=logps[1]), sig.params(beta=0.3))[0]

    logps = (batch.policy_chosen, batch.policy_rejected)
    (a, ga), (b, gb) = jax.value_and_grad(ours)(logps), jax.value_and_grad(dpo)(logps)
    assert float(a) == float(b)
    assert np.abs(np.asarray(ga[0])).sum() > 0
    for x, y in zip(ga, gb):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(L.LOSSES["beta_dpo"](batch, L.params("beta_dpo", beta=0.3)),
                                  L.LOSSES["sigmoid"](batch, L.params("sigmoid", beta=0.3)))


def test_beta_is_a_constant_of_the_gradient():
    """d loss / d h_i = -beta sigmoid(-beta h_i) / k on the k kept pairs, 0 elsewhere: no gradient
    flows through beta, M0 or the selection."""
    h = jnp.asarray([0.5, 1.0, -2.0, 3.0, 0.0, 1.5])
    hp = OBJ.params(beta=0.5, beta_dpo_alpha=2.0, beta_dpo_rho=0.5)
    state = OBJ.init_state()

    def loss_of_h(h_P):
        return OBJ.apply(pairs_with_margins(h_P), hp, state)[0]

    _, terms, _ = OBJ.apply(pairs_with_margins(h), hp, state)
    beta = terms["beta_dpo/beta"]
    keep = beta_dpo.select(0.5 * h, jnp.ones(6), 0.5 * jnp.mean(h), 0.5 * jnp.std(h, ddof=1), 0.5)
    want = -beta * jax.nn.sigmoid(-beta * h) * keep / 3.0
    np.testing.assert_allclose(jax.grad(loss_of_h)(h), want, rtol=1e-6, atol=1e-8)
    assert float(beta) != pytest.approx(0.5), "the constructed batch should change beta"


def test_filter_keeps_the_fraction_and_prefers_typical_margins():
    """Sampling without replacement (Gumbel-top-k on the Gaussian log-density), given the key: exactly
    floor(rho n) real pairs, the same ones for the same key; a pair at M0 is kept far more often than one
    at 3 sigma."""
    M = jnp.asarray([0.0, 0.1, -0.1, 0.3, -0.3, 0.5, -0.5, 1.0, -1.0, 3.0], jnp.float32)
    mask = jnp.ones(10)
    for n, rho in [(10, 0.8), (10, 0.5), (7, 0.8), (10, 1.0), (10, 0.05)]:
        m_ = mask.at[n:].set(0.0)
        keep = beta_dpo.select(M, m_, 0.0, 1.0, rho, jax.random.key(0))
        assert float(keep.sum()) == max(1, math.floor(rho * n + 1e-9)), (n, rho)
        assert float(jnp.sum(keep * (1 - m_))) == 0.0, "filler pairs are never kept"
    keys = jax.random.split(jax.random.key(3), 400)
    keeps = jax.vmap(lambda k: beta_dpo.select(M, mask, 0.0, 1.0, 0.8, k))(keys)
    np.testing.assert_array_equal(keeps[0], beta_dpo.select(M, mask, 0.0, 1.0, 0.8, keys[0]))
    assert len({tuple(np.asarray(k)) for k in keeps}) > 1, "the key should change the draw"
    freq = np.asarray(keeps.mean(0))
    assert freq[0] > 0.85 and freq[-1] < 0.2, freq
    assert freq[0] > freq[7] > freq[-1], freq
    deterministic = beta_dpo.select(M, mask, 0.0, 1.0, 0.8)
    np.testing.assert_array_equal(deterministic, [1, 1, 1, 1, 1, 1, 1, 1, 0, 0])  # ties: the earlier pair


def test_filler_pairs_do_not_move_the_statistics():
    h = [0.5, 1.0, -2.0, 3.0]
    hp = dict(beta=0.5, beta_dpo_alpha=1.0, beta_dpo_rho=0.5)
    (a,), _ = run([pairs_with_margins(h)], **hp)
    (b,), _ = run([pairs_with_margins(h + [50.0, -50.0], mask_P=[1, 1, 1, 1, 0, 0])], **hp)
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    for key in ("beta_dpo/beta", "beta_dpo/running_mean", "beta_dpo/running_std"):
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-6), key
    assert b[1]["beta_dpo/kept_frac"] == pytest.approx(2 / 4)


def test_beta_stays_positive():
    """A batch far below M0 would give 1 + alpha (mean M - M0) < 0: beta is floored at 1e-3 beta0."""
    hp = dict(beta=0.5, beta_dpo_alpha=10.0, beta_dpo_momentum=0.9, beta_dpo_rho=1.0)
    got, _ = run([pairs_with_margins([10.0, 12.0]), pairs_with_margins([-30.0, -20.0])], **hp)
    assert got[1][1]["beta_dpo/beta"] == pytest.approx(0.5 * 1e-3)


def test_step_zero_closed_form():
    """policy == reference: every M is 0, beta = beta0 and the loss is ln 2."""
    zeros = jnp.zeros(5)
    batch = L.PairLogps(zeros - 2, zeros - 3, zeros - 2, zeros - 3, zeros + 2, zeros + 2)
    loss, terms, state = OBJ.apply(batch, OBJ.params(), OBJ.init_state(), jax.random.key(0))
    assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)
    assert float(terms["beta_dpo/beta"]) == pytest.approx(0.1, rel=1e-7)
    assert float(state["beta_dpo"]["margin_std"]) == 0.0


def test_hyper_parameters_are_checked_by_name():
    with pytest.raises(ValueError, match=r"beta_dpo_rho=0.0 is outside"):
        L.params("beta_dpo", beta_dpo_rho=0.0)
    with pytest.raises(ValueError, match=r"beta_dpo_momentum=1.0 is outside"):
        L.params("beta_dpo", beta_dpo_momentum=1.0)
    with pytest.raises(ValueError, match=r"beta_dpo_alpha=-0.5 is outside"):
        L.params("beta_dpo", beta_dpo_alpha=-0.5)
    assert OBJ.init_state() == {"beta_dpo": beta_dpo.init_state()}
    assert L.Objective(("sigmoid", "sft")).init_state() is None


def test_config_selects_beta_dpo_and_names_bad_keys():
    from configs import synthetic
    from dpo_jax import config_check

    c = synthetic.get_config("runlocal=1,loss=beta_dpo")
    c.loss.update(beta_dpo_alpha=0.5, beta_dpo_rho=1.0)
    config_check.validate(c)
    hp = config_check.loss_hparams(c)
    assert (hp["beta_dpo_alpha"], hp["beta_dpo_rho"], hp["beta_dpo_momentum"]) == (0.5, 1.0, np.float32(0.9))
    c.loss.beta_dpo_rho = 1.5
    with pytest.raises(ValueError, match=r"config.loss: loss 'beta_dpo': beta_dpo_rho=1.5 is outside"):
        config_check.validate(c)
    other = synthetic.get_config("runlocal=1")
    other.loss.beta_dpo_momentum = 0.5
    with pytest.raises(ValueError, match=r"config.loss.beta_dpo_momentum=0.5 is not a hyper-parameter of "
                                         r"config.loss.name='sigmoid'.*beta_dpo"):
        config_check.validate(other)
