"""Tests of the learning-rate schedules (closed forms), gradient accumulation, clipping and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from dpo_jax.train import optim

PEAK, TOTAL, WARMUP = 2e-3, 110, 10


def optim_cfg(**kw):
    c = base.get_config().optim
    c.update(kw)
    return c


def lr_at(sched, steps):
    return np.array([float(sched(s)) for s in steps])


def test_warmup_is_linear_from_zero():
    for kind in optim.SCHEDULES:
        s = optim.schedule(PEAK, TOTAL, WARMUP, kind, end_lr_frac=0.1)
        np.testing.assert_allclose(lr_at(s, [0, 1, 5, 9]), [PEAK * t / WARMUP for t in (0, 1, 5, 9)], rtol=1e-6)
        assert float(s(WARMUP)) == pytest.approx(PEAK, rel=1e-6), kind


@pytest.mark.parametrize("end_frac", [0.0, 0.1])
def test_schedules_after_warmup_closed_form(end_frac):
    decay = TOTAL - WARMUP
    end = PEAK * end_frac
    steps = np.array([WARMUP, WARMUP + 25, WARMUP + 50, WARMUP + 99, TOTAL, TOTAL + 40])
    t = np.minimum(steps - WARMUP, decay)
    expected = {
        "constant": np.full(len(steps), PEAK),
        "linear": PEAK + (end - PEAK) * t / decay,
        "cosine": end + (PEAK - end) * 0.5 * (1 + np.cos(math.pi * t / decay)),
    }
    for kind, want in expected.items():
        got = lr_at(optim.schedule(PEAK, TOTAL, WARMUP, kind, end_lr_frac=end_frac), steps)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=PEAK * 1e-6, err_msg=kind)
    # the middle of cosine is the mean of peak and end
    assert float(optim.schedule(PEAK, TOTAL, WARMUP, "cosine", end_frac)(WARMUP + 50)) == pytest.approx((PEAK + end) / 2)


def test_no_warmup_starts_at_peak():
    for kind in optim.SCHEDULES:
        assert float(optim.schedule(PEAK, TOTAL, 0, kind)(0)) == pytest.approx(PEAK), kind
    s = optim.schedule(PEAK, 4, 0, "linear", end_lr_frac=0.5)
    np.testing.assert_allclose(lr_at(s, [0, 1, 2, 3, 4, 9]), PEAK * np.array([1, .875, .75, .625, .5, .5]), rtol=1e-6)


def test_make_optimizer_returns_the_schedule():
    tx, lr = optim.make_optimizer(optim_cfg(lr=PEAK, warmup_steps=WARMUP, schedule="linear", end_lr_frac=0.2), TOTAL)
    assert float(lr(TOTAL)) == pytest.approx(0.2 * PEAK)
    assert isinstance(tx, optax.GradientTransformation)


def _run(cfg, grads, total=100):
    tx, _ = optim.make_optimizer(cfg, total)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    history = []
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
        history.append(np.asarray(params["w"]))
    return history


def test_grad_accum_updates_every_k_calls_with_the_mean_gradient():
    k, lr = 3, 0.5
    grads = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    hist = _run(optim_cfg(name="sgd", lr=lr, grad_accum=k, clip_norm=0.0), grads)
    w = np.zeros(3, np.float32)
    for i, h in enumerate(hist):
        if (i + 1) % k == 0:
            w = w - lr * grads[i + 1 - k:i + 1].mean(axis=0)
        np.testing.assert_allclose(h, w, rtol=1e-5, atol=1e-7, err_msg=f"call {i}")
    assert not np.array_equal(hist[2], hist[1]) and np.array_equal(hist[0], hist[1])
    tx, _ = optim.make_optimizer(optim_cfg(grad_accum=k), 10)
    assert isinstance(tx, optax.MultiSteps)
    tx1, _ = optim.make_optimizer(optim_cfg(grad_accum=1), 10)
    assert not isinstance(tx1, optax.MultiSteps)


def test_grad_accum_schedule_counts_optimizer_updates():
    """With warmup 2 and k=2, the first real update uses lr(0) = 0 and the second lr(1) = peak / 2."""
    grads = np.ones((4, 3), np.float32)
    hist = _run(optim_cfg(name="sgd", lr=1.0, warmup_steps=2, grad_accum=2, clip_norm=0.0), grads)
    np.testing.assert_allclose([h[0] for h in hist], [0.0, 0.0, 0.0, -0.5], atol=1e-7)


def test_clip_by_global_norm():
    g = np.array([3.0, 4.0, 0.0], np.float32)  # norm 5
    clipped = _run(optim_cfg(name="sgd", lr=1.0, clip_norm=1.0), [g])[0]
    np.testing.assert_allclose(clipped, -g / 5.0, rtol=1e-6)
    small = _run(optim_cfg(name="sgd", lr=1.0, clip_norm=10.0), [g])[0]
    np.testing.assert_allclose(small, -g, rtol=1e-6)
    off = _run(optim_cfg(name="sgd", lr=1.0, clip_norm=0.0), [g * 100])[0]
    np.testing.assert_allclose(off, -g * 100, rtol=1e-6)


def test_adamw_first_step_and_weight_decay():
    g = np.array([1.0, -2.0, 0.5], np.float32)
    first = _run(optim_cfg(name="adamw", lr=0.1, clip_norm=0.0), [g])[0]
    np.testing.assert_allclose(first, -0.1 * np.sign(g), rtol=1e-4)  # m/sqrt(v) = sign(g) at step 1
    tx, _ = optim.make_optimizer(optim_cfg(name="adamw", lr=0.1, weight_decay=0.5, clip_norm=0.0), 10)
    params = {"w": jnp.ones(3)}
    upd, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params)
    np.testing.assert_allclose(upd["w"], -0.1 * 0.5 * np.ones(3), rtol=1e-6)


def test_rmsprop_and_sgd_momentum():
    g = np.array([1.0, 2.0, -1.0], np.float32)
    decay, eps = 0.99, 1e-8
    got = _run(optim_cfg(name="rmsprop", lr=0.01, b2=decay, eps=eps, clip_norm=0.0), [g])[0]
    np.testing.assert_allclose(got, -0.01 * g / (np.sqrt((1 - decay) * g**2) + eps), rtol=1e-5)
    hist = _run(optim_cfg(name="sgd", lr=1.0, momentum=0.9, clip_norm=0.0), [g, g])
    np.testing.assert_allclose(hist[1], -g - (0.9 * g + g), rtol=1e-6)


def test_invalid_settings_name_the_key():
    with pytest.raises(ValueError, match=r"optim\.name='adam'.*adamw"):
        optim.make_optimizer(optim_cfg(name="adam"), 10)
    with pytest.raises(ValueError, match=r"optim\.schedule='cosin'.*cosine"):
        optim.make_optimizer(optim_cfg(schedule="cosin"), 10)
    with pytest.raises(ValueError, match=r"optim\.schedule='exp'"):
        optim.schedule(1.0, 10, 0, "exp")
    for bad in (0.0, -1e-3, float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match=rf"^optim\.lr={bad!r}; must be finite and > 0$"):
            optim.make_optimizer(optim_cfg(lr=bad), 10)
    with pytest.raises(ValueError, match=r"^config\.sft\.lr=nan; must be finite and > 0$"):
        optim.check_lr(float("nan"), key="config.sft.lr")
    optim.check_lr(1e-6)
    with pytest.raises(ValueError, match=r"optim\.grad_accum"):
        optim.make_optimizer(optim_cfg(grad_accum=0), 10)
    with pytest.raises(ValueError, match=r"optim\.warmup_steps"):
        optim.schedule(1.0, 10, -1)


def test_jittable_schedule():
    s = optim.schedule(PEAK, TOTAL, WARMUP, "cosine", 0.1)
    got = jax.jit(jax.vmap(s))(jnp.arange(0, 120, 7))
    np.testing.assert_allclose(got, lr_at(s, range(0, 120, 7)), rtol=1e-6)
