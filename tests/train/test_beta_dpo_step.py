"""beta-DPO's running statistics in the jitted step: updated once per (micro-)step, with a LoRA policy
and gradient accumulation, kept on a non-finite step, read but not kept by the eval step."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dpo_jax import losses, sharding
from dpo_jax.data import layouts
from dpo_jax.models import lora
from dpo_jax.models.transformer import Decoder
from dpo_jax.train import loop, step
from dpo_jax.train import state as train_state
from tests.train.test_step import CFG, make_batches, one_device_mesh

OBJ = losses.Objective(("beta_dpo",))
HP = OBJ.params(beta=0.5, beta_dpo_alpha=2.0, beta_dpo_rho=0.75)


def _setup(mesh, *, lora_cfg=None, grad_accum=1, loss_state=True):
    tx = optax.MultiSteps(optax.adamw(3e-2), grad_accum) if grad_accum > 1 else optax.adamw(3e-2)
    reference = None if lora_cfg else Decoder(CFG, rngs=nnx.Rngs(0))
    state, state_sh, graphdef = train_state.init_state(
        Decoder(CFG, rngs=nnx.Rngs(0)), reference, tx, mesh, seed=0, lora_cfg=lora_cfg,
        loss_state=OBJ.init_state() if loss_state else None)
    cfg = step.StepConfig(graphdef=graphdef, objective=OBJ, tx=tx, lr=lambda s: 3e-2,
                          ref_mode="base" if lora_cfg else "frozen", lora=lora_cfg, grad_accum=grad_accum,
                          chunk_size=64, vocab_chunk_size=32)
    return state, *loop.compiled_steps(cfg, state_sh, mesh, layouts.BATCH_KEYS)


def _stats(state):
    return {k: float(v) for k, v in state.loss_state["beta_dpo"].items()}


@pytest.mark.parametrize("use_lora,grad_accum", [(False, 1), (True, 2)], ids=["full", "lora_accum2"])
def test_running_statistics_follow_every_micro_step(use_lora, grad_accum):
    mesh = one_device_mesh()
    state, train_fn, eval_fn = _setup(mesh, lora_cfg=lora.LoraConfig(rank=4, alpha=8.0) if use_lora else None,
                                      grad_accum=grad_accum)
    assert _stats(state) == {"margin_mean": 0.0, "margin_std": 0.0, "initialized": 0.0}
    batches = [sharding.global_batch(b, mesh) for b in make_batches(steps=6)]
    state, m = train_fn(state, batches[0], HP)
    assert float(m["loss"]) == pytest.approx(math.log(2.0), rel=1e-6)  # policy == reference: M = 0, beta = beta0
    assert float(m["beta_dpo/beta"]) == pytest.approx(0.5, rel=1e-7)
    assert float(m["beta_dpo/kept_frac"]) == pytest.approx(0.75)  # 6 of 8 pairs
    assert _stats(state)["initialized"] == 1.0
    betas = []
    for b in batches[1:]:
        before = _stats(state)
        state, m = train_fn(state, b, HP)
        after = _stats(state)
        mean = float(m["beta_dpo/margin_mean"])  # the batch mean of M = beta0 h over real pairs
        assert after["margin_mean"] == pytest.approx(0.9 * before["margin_mean"] + 0.1 * mean, rel=1e-5, abs=1e-7)
        assert after["margin_mean"] == pytest.approx(float(m["beta_dpo/running_mean"]), rel=1e-6)
        betas.append(float(m["beta_dpo/beta"]))
    assert len(set(betas)) > 1, betas
    frozen = _stats(state)
    ev = eval_fn(state, batches[0], HP)
    assert "beta_dpo/beta" in ev and _stats(state) == frozen  # the eval step keeps nothing


def test_nonfinite_step_keeps_the_running_statistics():
    mesh = one_device_mesh()
    state, train_fn, _ = _setup(mesh)
    good, = make_batches(steps=1)
    state, _ = train_fn(state, sharding.global_batch(good, mesh), HP)
    before = _stats(state)
    bad = dict(good)
    bad["targets_BxT"] = np.where(good["loss_mask_BxT"] > 0, CFG.vocab_size + 5, good["targets_BxT"]).astype(np.int32)
    state, m = train_fn(state, sharding.global_batch(bad, mesh), HP)
    assert float(m["nonfinite"]) == 1.0
    assert _stats(state) == before


def test_filter_is_a_function_of_the_state_key_and_step():
    """Two runs from the same seed draw the same pairs; the draw is the step's fold of the state key."""
    mesh = one_device_mesh()
    batches = [sharding.global_batch(b, mesh) for b in make_batches(steps=3, seed=4)]
    runs = []
    for _ in range(2):
        state, train_fn, _ = _setup(mesh)
        rows = []
        for b in batches:
            state, m = train_fn(state, b, HP)
            rows.append(float(m["beta_dpo/beta"]))
        runs.append(rows)
    assert runs[0] == runs[1]
    key = step.loss_rng(state)
    want = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 3)
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(want))


def test_missing_loss_state_is_a_clear_error():
    mesh = one_device_mesh()
    state, train_fn, _ = _setup(mesh, loss_state=False)
    with pytest.raises(ValueError, match=r"loss.name='beta_dpo' keeps running statistics"):
        train_fn(state, sharding.global_batch(make_batches(steps=1)[0], mesh), HP)
