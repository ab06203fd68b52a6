"""Fused sweep members: member k of a fused step equals the separate run k."""

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dpo_jax import losses, runner, sharding
from dpo_jax.train import loop, step
from dpo_jax.train import members as fused
from dpo_jax.train import state as train_state
from dpo_jax.data import layouts
from tests.train.test_step import CFG, make_batches, one_device_mesh

# hyper-parameters of three members that differ in beta and in the weight of the SFT term
MEMBERS = [dict(beta=0.1, weights=[1.0, 0.0]), dict(beta=0.5, weights=[1.0, 0.3]), dict(beta=2.0, weights=[1.0, 1.0])]


def build(mesh, members=0):
    from dpo_jax.models.transformer import Decoder

    obj = losses.Objective(("sigmoid", "sft"))
    # SGD with momentum: updates are linear in the gradients, so parameters can be compared tightly
    # (Adam's g / sqrt(v) turns float32 round-off in near-zero gradients into lr-sized steps).
    tx = optax.sgd(0.02, momentum=0.9)
    state, state_sh, graphdef = train_state.init_state(Decoder(CFG, rngs=nnx.Rngs(0)), Decoder(CFG, rngs=nnx.Rngs(1)),
                                                 tx, mesh, seed=0)
    cfg = step.StepConfig(graphdef=graphdef, objective=obj, tx=tx, lr=lambda s: 0.02, chunk_size=64,
                          vocab_chunk_size=32)
    if members:
        state, state_sh = fused.stack_state(state, state_sh, members)
        cfg = dataclasses.replace(cfg, members=members)
    train_fn, eval_fn = loop.compiled_steps(cfg, state_sh, mesh, layouts.BATCH_KEYS)
    return state, train_fn, eval_fn, obj


@pytest.mark.parametrize("mesh_shape", [None])  # sharding itself is covered by tests/test_step.py
def test_member_k_matches_separate_run_k(mesh_shape):
    mesh = one_device_mesh() if mesh_shape is None else sharding.make_mesh(mesh_shape)
    batches = [sharding.global_batch(b, mesh) for b in make_batches(steps=5)]
    separate = []
    for m in MEMBERS:
        state, train_fn, _, obj = build(mesh)
        hp = obj.params(**m)
        losses_k = []
        for b in batches:
            state, metrics = train_fn(state, b, hp)
            losses_k.append(float(metrics["loss"]))
        separate.append((losses_k, jax.device_get(state.params)))
    state, train_fn, eval_fn, obj = build(mesh, members=len(MEMBERS))
    hp = fused.stack_hparams([obj.params(**m) for m in MEMBERS])
    assert hp["beta"].shape == (3,) and hp["loss_weights"].shape == (3, 2)
    fused_losses = []
    for b in batches:
        state, metrics = train_fn(state, b, hp)
        assert metrics["loss"].shape == (3,)
        fused_losses.append(np.asarray(metrics["loss"]))
    for k, (losses_k, params_k) in enumerate(separate):
        np.testing.assert_allclose([l[k] for l in fused_losses], losses_k, rtol=1e-5, err_msg=f"member {k} losses")
        for a, b in zip(jax.tree.leaves(params_k), jax.tree.leaves(fused.member(state.params, k))):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=f"member {k} params")
    assert len({round(float(fused_losses[-1][k]), 6) for k in range(3)}) == 3  # the members differ
    ev = eval_fn(state, batches[0], hp)
    assert ev["loss"].shape == (3,)


def test_groups_fuse_only_loss_hyperparameters():
    from configs import synthetic

    base = synthetic.get_config("runlocal=1")
    variants = []
    for beta in (0.5, 1.0):
        c = base.copy_and_resolve_references()
        c.loss.beta = beta
        variants.append(c)
    other_loss = base.copy_and_resolve_references()
    other_loss.loss.name = "ipo"
    other_lr = base.copy_and_resolve_references()
    other_lr.optim.lr = 3e-3
    smoothing = base.copy_and_resolve_references()
    smoothing.loss.label_smoothing = 0.1
    assert fused.groups([*variants, other_loss, other_lr, smoothing]) == [[0, 1, 4], [2], [3]]


def test_stack_hparams_requires_the_same_keys():
    with pytest.raises(ValueError, match="fused member 1 has loss hyper-parameters"):
        fused.stack_hparams([{"beta": 0.1}, {"beta": 0.2, "gamma": 1.0}])


def test_run_fused_writes_each_members_workdir_like_a_separate_run(tmp_path):
    from configs import synthetic

    def config(beta):
        c = synthetic.get_config("runlocal=1")
        c.sft.steps = 0
        c.eval.num_prompts = 0
        c.train.update(steps=3, log_every=1, checkpoint_every=0, progress=False, export_final=True)
        c.loss.beta = beta
        return c

    reports = runner.run_group([config(0.5), config(2.0)], [str(tmp_path / "a"), str(tmp_path / "b")])
    separate = runner.run(config(2.0), str(tmp_path / "separate"))
    np.testing.assert_allclose(reports[1]["eval/loss"], separate["eval/loss"], rtol=1e-5)
    assert reports[0]["eval/loss"] != pytest.approx(reports[1]["eval/loss"], rel=1e-3)
    for name in ("a", "b"):
        for f in ("config.json", "run_info.json", "metrics.jsonl", "report.json", "final/model.safetensors"):
            assert (tmp_path / name / f).exists(), f"{name}/{f}"
    def losses(name):
        rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if isinstance(r.get("loss"), float)}

    got, want = losses("b"), losses("separate")
    assert sorted(got) == sorted(want) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-5)
    with pytest.raises(ValueError, match="differ only in loss hyper-parameters"):
        other = config(1.0)
        other.optim.lr = 1e-2
        runner.run_group([config(1.0), other], [str(tmp_path / "x"), str(tmp_path / "y")])


@pytest.mark.parametrize("lora,ref_mode", [(True, "frozen"), (False, "sync"), (False, "base")])
def test_members_need_full_fine_tuning_and_a_shared_reference(lora, ref_mode):
    with pytest.raises(ValueError, match="fused members support full fine-tuning"):
        step.check_members(2, has_lora=lora, ref_mode=ref_mode)
    step.check_members(0, has_lora=lora, ref_mode=ref_mode)  # a plain run: no restriction
    step.check_members(2, has_lora=False, ref_mode="precomputed")
