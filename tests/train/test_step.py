"""Tests of the train/eval step: closed form at step 0, frozen reference, sharding, no recompiles."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dpo_jax import losses, sharding
from dpo_jax.train import loop, step
from dpo_jax.train import state as train_state
from dpo_jax.data import layouts
from dpo_jax.models.transformer import Decoder, ModelConfig
from tests.models.test_layers import lowered_dots

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def random_examples(rng, n, vocab=64):
    def ids(lo, hi):
        return rng.integers(4, vocab, rng.integers(lo, hi)).astype(np.int32)

    out = []
    for _ in range(n):
        chosen, rejected = ids(2, 9), ids(2, 9)
        out.append({"prompt_ids": ids(2, 7), "chosen_ids": np.append(chosen, 2).astype(np.int32),
                    "rejected_ids": np.append(rejected, 2).astype(np.int32)})
    return out


def make_batches(seed=0, steps=5, pairs=8, layout="standard"):
    rng = np.random.default_rng(seed)
    spec = layouts.LayoutSpec(layout=layout, num_pairs=pairs, buckets=(16, 32), prefix_min_saving=0.0)
    return [spec(random_examples(rng, pairs)) for _ in range(steps)]


def setup(mesh, objective=("sigmoid",), ref_mode="frozen", same_reference=True, lr=1e-2, cfg=CFG,
          batch_keys=layouts.BATCH_KEYS):
    policy = Decoder(cfg, rngs=nnx.Rngs(0))
    reference = Decoder(cfg, rngs=nnx.Rngs(0 if same_reference else 1)) if ref_mode in ("frozen", "sync") else None
    obj = losses.Objective(objective)
    tx = optax.adamw(lr)
    state, state_sh, graphdef = train_state.init_state(policy, reference, tx, mesh, seed=0)
    cfg = step.StepConfig(graphdef=graphdef, objective=obj, tx=tx, lr=lambda s: lr, ref_mode=ref_mode,
                          chunk_size=64, vocab_chunk_size=32)
    train_fn, eval_fn = loop.compiled_steps(cfg, state_sh, mesh, batch_keys)
    return state, train_fn, eval_fn, obj


def one_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def test_step_zero_policy_equals_reference_closed_form():
    mesh = one_device_mesh()
    state, train_fn, _, obj = setup(mesh)
    batch = sharding.global_batch(make_batches(steps=1)[0], mesh)
    _, m = train_fn(state, batch, obj.params(beta=0.3))
    np.testing.assert_allclose(m["loss"], math.log(2.0), rtol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logratio/mean"):
        assert float(m[key]) == 0.0, key
    np.testing.assert_allclose(m["grad_weight/mean"], 0.5)
    assert float(m["rewards/accuracies"]) == 0.0  # ties are not counted as correct (as TRL)


def test_reference_never_moves_and_policy_does():
    mesh = one_device_mesh()
    state, train_fn, _, obj = setup(mesh, same_reference=False)
    ref0 = jax.tree.map(np.asarray, state.ref_params)
    pol0 = jax.tree.map(np.asarray, state.params)
    hp = obj.params(beta=0.1)
    for b in make_batches(steps=3):
        state, m = train_fn(state, sharding.global_batch(b, mesh), hp)
    for path, (a, b) in zip(jax.tree_util.tree_leaves_with_path(ref0), zip(jax.tree.leaves(ref0),
                                                                          jax.tree.leaves(state.ref_params))):
        np.testing.assert_array_equal(a, np.asarray(b), err_msg=f"reference parameter {path[0]} moved")
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(pol0), jax.tree.leaves(state.params))]
    assert all(moved), "every policy parameter should have been updated"
    assert int(state.step) == 3


def test_new_beta_does_not_recompile():
    mesh = one_device_mesh()
    policy = Decoder(CFG, rngs=nnx.Rngs(0))
    obj = losses.Objective(("sigmoid", "sft"))
    tx = optax.sgd(1e-3)
    state, state_sh, graphdef = train_state.init_state(policy, Decoder(CFG, rngs=nnx.Rngs(1)), tx, mesh, seed=0)
    cfg = step.StepConfig(graphdef=graphdef, objective=obj, tx=tx, lr=lambda s: 1e-3, chunk_size=64,
                          vocab_chunk_size=32)
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(state, batch, hp):
        return step.eval_step(cfg, state, batch, hp)

    batch = sharding.global_batch(make_batches(steps=1)[0], mesh)
    losses_seen = {float(f(state, batch, obj.params(beta=b, weights=[1.0, w]))["loss"])
                   for b, w in [(0.1, 0.0), (0.5, 1.0), (2.0, 0.5)]}
    assert len(losses_seen) == 3


def test_nonfinite_step_is_not_applied():
    mesh = one_device_mesh()
    state, train_fn, _, obj = setup(mesh)
    batch = make_batches(steps=1)[0]
    bad = dict(batch)
    bad["targets_BxT"] = np.where(batch["loss_mask_BxT"] > 0, CFG.vocab_size + 5, batch["targets_BxT"]).astype(np.int32)
    before = jax.tree.map(np.asarray, state.params)
    state, m = train_fn(state, sharding.global_batch(bad, mesh), obj.params())
    assert float(m["nonfinite"]) == 1.0 and not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("tx,finite_steps", [
    (optax.sgd(float("nan")), 0),  # a NaN learning rate: the update is NaN at once
    (optax.sgd(1e-30, momentum=1e38), 2),  # the momentum trace overflows at step 3; params barely move
], ids=["nan_lr", "optimizer_state_overflow"])
def test_nonfinite_update_is_not_applied(tx, finite_steps):
    """Loss and gradient finite, the update not: the guard looks at what would be committed."""
    mesh = one_device_mesh()
    obj = losses.Objective(("sigmoid",))
    policy = Decoder(CFG, rngs=nnx.Rngs(0))
    state, state_sh, graphdef = train_state.init_state(policy, Decoder(CFG, rngs=nnx.Rngs(1)), tx, mesh, seed=0)
    cfg = step.StepConfig(graphdef=graphdef, objective=obj, tx=tx, lr=lambda s: 0.0, chunk_size=64, vocab_chunk_size=32)
    train_fn = loop.compiled_steps(cfg, state_sh, mesh, layouts.BATCH_KEYS)[0]
    batch = sharding.global_batch(make_batches(steps=1)[0], mesh)
    for _ in range(finite_steps):
        state, m = train_fn(state, batch, obj.params())
        assert float(m["nonfinite"]) == 0.0
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, m = train_fn(state, batch, obj.params())
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert float(m["nonfinite"]) == 1.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert int(state.step) == finite_steps + 1


def test_logit_bias_masks_tokens_in_every_log_prob():
    """`StepConfig.logit_bias_V`: log-probs are those of softmax(logits + bias), for the policy and the
    reference alike; masked ids get no mass and the allowed ones are renormalized."""
    from dpo_jax import logprobs

    mesh = one_device_mesh()
    batch = make_batches(steps=1)[0]
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    tx = optax.sgd(1e-3)
    state, _, graphdef = train_state.init_state(model, Decoder(CFG, rngs=nnx.Rngs(0)), tx, mesh, seed=0)
    bias_V = np.zeros(CFG.vocab_size, np.float32)
    bias_V[[0, 1, 3]] = logprobs.MASKED_LOGIT
    cfg = step.StepConfig(graphdef=graphdef, objective=losses.Objective(("sigmoid",)), tx=tx, lr=lambda s: 1e-3,
                          chunk_size=64, vocab_chunk_size=32, logit_bias_V=bias_V)
    got = step.model_logps(cfg, state.params, batch)
    logits_BxTxV = np.asarray(model.logits(model(batch["tokens_BxT"], positions_BxT=batch["positions_BxT"],
                                                  segment_ids_BxT=batch["segment_ids_BxT"],
                                                  branch_ids_BxT=batch["branch_ids_BxT"])), np.float64) + bias_V
    logz_BxT = np.log(np.exp(logits_BxTxV - logits_BxTxV.max(-1, keepdims=True)).sum(-1)) + logits_BxTxV.max(-1)
    tok_BxT = np.take_along_axis(logits_BxTxV, np.asarray(batch["targets_BxT"])[..., None], -1)[..., 0] - logz_BxT
    mask, pairs, branch = (np.asarray(batch[k]) for k in ("loss_mask_BxT", "pair_ids_BxT", "branch_ids_BxT"))
    want = np.zeros(8)
    for b, t in zip(*np.nonzero((mask > 0) & (branch == 1))):
        want[pairs[b, t]] += tok_BxT[b, t]
    np.testing.assert_allclose(np.asarray(got.chosen), want, rtol=2e-5)
    plain = step.model_logps(dataclasses.replace(cfg, logit_bias_V=None), state.params, batch)
    assert np.all(np.asarray(got.chosen) > np.asarray(plain.chosen))  # mass of the masked ids went to the rest


@pytest.mark.parametrize("tie", [False, True], ids=["lm_head", "tied"])
def test_bfloat16_compute_runs_the_log_probs_matmuls_in_bfloat16(tie):
    """dtype bfloat16 over float32 master weights: the unembedding enters the log-probs in bfloat16
    (every [D, V] product of the gradient takes bfloat16 operands, as the layers' forward products
    do; they took float32 before), its gradient comes back float32, and the log-probs stay within
    bfloat16 rounding of float32's."""
    cfg32 = dataclasses.replace(CFG, vocab_size=72, tie_embeddings=tie)  # V = 72: no other dimension
    batch = make_batches(steps=1)[0]
    out = {}
    for name, cfg in (("float32", cfg32), ("bfloat16", dataclasses.replace(cfg32, dtype="bfloat16"))):
        model = Decoder(cfg, rngs=nnx.Rngs(0))
        assert model.unembedding()[0].dtype == jnp.dtype(name)
        graphdef, params = nnx.split(model)
        params = nnx.to_pure_dict(params)
        scfg = step.StepConfig(graphdef=graphdef, objective=losses.Objective(("sigmoid",)), tx=optax.sgd(1.0),
                               lr=lambda s: 1.0, chunk_size=64, vocab_chunk_size=128)  # one vocabulary chunk
        fn = lambda p: jnp.sum(step.model_logps(scfg, p, batch).chosen)  # noqa: E731
        value, grads = jax.value_and_grad(fn)(params)
        out[name] = float(value)
        assert (grads["embed"] if tie else grads["lm_head"]).dtype == jnp.float32
        unembed = {(lhs[1], rhs[1]) for lhs, rhs, _ in lowered_dots(jax.grad(fn), params)
                   if "72" in lhs[0].split("x") + rhs[0].split("x")}
        want = {"float32": "f32", "bfloat16": "bf16"}[name]
        assert unembed == {(want, want)}, (name, unembed)
    assert out["bfloat16"] != out["float32"]
    np.testing.assert_allclose(out["bfloat16"], out["float32"], rtol=2e-2)


def test_all_finite_looks_at_floating_leaves_only():
    assert bool(step.all_finite({"a": jnp.ones(3), "count": jnp.int32(7)}))
    assert not bool(step.all_finite({"a": jnp.array([1.0, jnp.inf]), "count": jnp.int32(7)}))
    assert not bool(step.all_finite([jnp.zeros(2), (jnp.array(jnp.nan, jnp.bfloat16),)]))
    assert bool(step.all_finite({}))


@pytest.mark.parametrize("layout,scan", [("standard", True), ("prefix", True), ("standard", False)])
def test_sharded_equals_unsharded(layout, scan):
    """Five steps on a data=2, fsdp=2, tensor=2 mesh of 8 CPU devices give the one-device losses
    (layer stack scanned, as in deep models, or unrolled, as in shallow ones)."""
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
    batches = make_batches(steps=5, layout=layout)
    assert {b["tokens_BxT"].shape[0] for b in batches} == {8 if layout == "prefix" else 16}  # 8 pairs
    runs = {}
    cfg = dataclasses.replace(CFG, scan_min_layers=0 if scan else CFG.num_layers + 1)
    assert cfg.scanned is scan
    for name, mesh in (("one", one_device_mesh()), ("mesh", sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))):
        state, train_fn, _, obj = setup(mesh, same_reference=False, cfg=cfg)
        hp = obj.params(beta=0.1)
        out = []
        for b in batches:
            state, m = train_fn(state, sharding.global_batch(b, mesh), hp)
            out.append(float(m["loss"]))
        runs[name] = out
        if name == "mesh":
            specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
            assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs), specs
    np.testing.assert_allclose(runs["mesh"], runs["one"], rtol=1e-5)
    assert len(set(runs["one"])) == 5  # the losses move, so the comparison means something


def test_sync_reference_moves_towards_policy():
    mesh = one_device_mesh()
    state, train_fn, _, obj = setup(mesh, ref_mode="sync", same_reference=False)
    state, _ = train_fn(state, sharding.global_batch(make_batches(steps=1)[0], mesh), obj.params())
    synced = step.sync_reference(state, 0.25)
    for p, r, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ref_params), jax.tree.leaves(synced.ref_params)):
        np.testing.assert_allclose(s, 0.25 * np.asarray(p) + 0.75 * np.asarray(r), rtol=1e-6, atol=1e-7)


def test_reference_free_mode_rejects_reference_losses():
    with pytest.raises(ValueError, match=r"reference.mode='none' is only for reference-free losses"):
        step.StepConfig(graphdef=None, objective=losses.Objective(("sigmoid",)), tx=optax.sgd(1.0),
                        lr=lambda s: 1.0, ref_mode="none")
    with pytest.raises(ValueError, match=r"reference.mode='bogus'; allowed"):
        step.StepConfig(graphdef=None, objective=losses.Objective(("simpo",)), tx=optax.sgd(1.0),
                        lr=lambda s: 1.0, ref_mode="bogus")


def test_reference_free_simpo_trains():
    mesh = one_device_mesh()
    state, train_fn, _, obj = setup(mesh, objective=("simpo",), ref_mode="none")
    assert state.ref_params is None
    hp = obj.params()
    first = None
    for b in make_batches(steps=1) * 4:  # the same batch four times: the loss must go down
        state, m = train_fn(state, sharding.global_batch(b, mesh), hp)
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < first
    assert float(jnp.asarray(m["nonfinite"])) == 0.0


def test_lora_policy_with_base_reference():
    """A LoRA policy starts equal to its base (loss ln 2), trains only its adapters, and its
    reference (mode 'base') is the same weights with the adapters off."""
    from dpo_jax.models import lora

    mesh = one_device_mesh()
    obj = losses.Objective(("sigmoid",))
    tx = optax.adamw(1e-2)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    state, state_sh, graphdef = train_state.init_state(Decoder(CFG, rngs=nnx.Rngs(0)), None, tx, mesh, seed=0, lora_cfg=lcfg)
    cfg = step.StepConfig(graphdef=graphdef, objective=obj, tx=tx, lr=lambda s: 1e-2, ref_mode="base", lora=lcfg,
                          chunk_size=64, vocab_chunk_size=32)
    train_fn, _ = loop.compiled_steps(cfg, state_sh, mesh, layouts.BATCH_KEYS)
    assert set(state.params) == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    base0 = jax.tree.map(np.asarray, state.base_params)
    adapters0 = jax.tree.map(np.asarray, state.params)
    hp = obj.params(beta=0.1)
    batches = make_batches(steps=3)
    state, m = train_fn(state, sharding.global_batch(batches[0], mesh), hp)
    np.testing.assert_allclose(m["loss"], math.log(2.0), rtol=1e-6)
    for b in batches[1:]:
        state, m = train_fn(state, sharding.global_batch(b, mesh), hp)
    assert float(m["loss"]) != pytest.approx(math.log(2.0), rel=1e-4)
    for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(state.base_params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(adapters0),
                                                                      jax.tree.leaves(state.params)))


def _two_process_batch(spec, examples):
    """The global batch two processes assemble (`sharding.global_batch` concatenates their rows in
    process order): each lays out its half with the merged plan and its pair offset."""
    half = len(examples) // 2
    parts = [examples[:half], examples[half:]]
    plan = spec.plan(np.max([spec.batch_stats(p) for p in parts], axis=0))
    local = [spec(p, plan, pair_offset=q * half) for q, p in enumerate(parts)]
    return {k: np.concatenate([b[k] for b in local]) for k in local[0]}


@pytest.mark.parametrize("layout", ["standard", "prefix", "packed"])
def test_two_process_global_batch_has_the_one_process_loss(layout):
    rng = np.random.default_rng(7)
    examples = random_examples(rng, 8)
    examples[5]["chosen_ids"] = np.append(np.full(20, 9), 2).astype(np.int32)  # only process 1 has a long row
    kw = dict(num_rows=4, row_length=64) if layout == "packed" else {}
    one = layouts.LayoutSpec(layout=layout, num_pairs=8, buckets=(16, 32, 64), logit_slots=True, **kw)
    half = dataclasses.replace(one, num_pairs=4, num_rows=2 if layout == "packed" else 0)
    merged = _two_process_batch(half, examples)
    ids = merged["pair_ids_BxT"][merged["loss_mask_BxT"] > 0]
    assert sorted(set(ids.tolist())) == list(range(8)), "pair ids must be unique across processes"
    mesh = one_device_mesh()
    state, _, eval_fn, obj = setup(mesh, same_reference=False, batch_keys=layouts.BATCH_KEYS + (layouts.SLOTS_KEY,))
    hp = obj.params(beta=0.3)
    want = eval_fn(state, sharding.global_batch(one(examples), mesh), hp)
    got = eval_fn(state, sharding.global_batch(merged, mesh), hp)
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "pairs"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # What each process numbering its pairs from 0 gave: pair k of process 0 summed with pair k of process 1.
    local_ids = dict(merged, pair_ids_BxT=merged["pair_ids_BxT"] % 4)
    broken = eval_fn(state, sharding.global_batch(local_ids, mesh), hp)
    assert not np.isclose(float(broken["loss"]), float(want["loss"]), rtol=1e-3)
