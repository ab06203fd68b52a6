"""The train step on batches of ranked lists: K = 2 lists under plackett_luce give sigmoid DPO's
loss, gradients and updated parameters on the same pairs (through the Decoder, in the standard,
prefix and packed list layouts), the list metrics are reported, and the reference rules hold."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dpo_jax import losses, sharding
from dpo_jax.data import layouts, list_layouts
from dpo_jax.train import loop, step
from dpo_jax.train import state as train_state
from dpo_jax.models.transformer import Decoder
from tests.train.test_step import CFG, one_device_mesh, random_examples


def _compiled(objective, batch_keys, mesh):
    policy, reference = Decoder(CFG, rngs=nnx.Rngs(0)), Decoder(CFG, rngs=nnx.Rngs(1))
    obj = losses.Objective(objective)
    tx = optax.sgd(0.5)
    state, state_sh, graphdef = train_state.init_state(policy, reference, tx, mesh, seed=0)
    cfg = step.StepConfig(graphdef=graphdef, objective=obj, tx=tx, lr=lambda s: 0.5, chunk_size=64,
                          vocab_chunk_size=32)
    train_fn, eval_fn = loop.compiled_steps(cfg, state_sh, mesh, batch_keys)
    return state, train_fn, eval_fn, obj


def _as_lists(pairs):
    """Each pair as a list of 2: the chosen response first with the higher score."""
    return [{"prompt_ids": e["prompt_ids"], "response_ids": (e["chosen_ids"], e["rejected_ids"]),
             "scores": np.float32([1.0, 0.0])} for e in pairs]


@pytest.mark.parametrize("layout", ["standard", "prefix", "packed"])
def test_two_response_lists_train_as_sigmoid_dpo(layout):
    mesh = one_device_mesh()
    examples = random_examples(np.random.default_rng(3), 6)
    pair_spec = layouts.LayoutSpec(layout="standard", num_pairs=8, buckets=(16, 32))
    list_spec = list_layouts.ListLayoutSpec(layout=layout, num_pairs=8, list_size=2, buckets=(16, 32, 64),
                                            num_rows=4, row_length=64)
    pair_state, pair_train, _, pair_obj = _compiled(("sigmoid",), layouts.BATCH_KEYS, mesh)
    list_state, list_train, list_eval, list_obj = _compiled(
        ("plackett_luce",), layouts.BATCH_KEYS + list_layouts.LIST_KEYS, mesh)
    pair_batch = sharding.global_batch(pair_spec(examples), mesh)
    list_batch = sharding.global_batch(list_spec(_as_lists(examples)), mesh)
    for _ in range(2):  # the second step starts from policies that differ from the reference
        pair_state, pm = pair_train(pair_state, pair_batch, pair_obj.params(beta=0.5))
        list_state, lm = list_train(list_state, list_batch, list_obj.params(beta=0.5))
        np.testing.assert_allclose(lm["loss"], pm["loss"], rtol=1e-5)
        np.testing.assert_allclose(lm["grad_norm"], pm["grad_norm"], rtol=1e-4)
        for key in ("rewards/accuracies", "rewards/margins"):
            np.testing.assert_allclose(lm[key], pm[key], rtol=1e-4, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(lm["rewards/best"], pm["rewards/chosen"], rtol=1e-4, atol=1e-6)
        assert float(lm["pairs"]) == 6.0
    assert float(pm["loss"]) != pytest.approx(np.log(2.0), abs=1e-3)  # the policy moved: the check can fail
    for a, b in zip(jax.tree.leaves(list_state.params), jax.tree.leaves(pair_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    em = list_eval(list_state, list_batch, list_obj.params(beta=0.5))
    assert np.isfinite(float(em["loss"])) and float(em["pairs"]) == 6.0


def test_longer_lists_change_the_loss_and_pad_slots_count_nowhere():
    mesh = one_device_mesh()
    rng = np.random.default_rng(4)
    ids = lambda n: rng.integers(4, 64, n).astype(np.int32)  # noqa: E731
    lists = [{"prompt_ids": ids(4), "response_ids": (ids(3), ids(5), ids(2)), "scores": np.float32([2, 0, 1])},
             {"prompt_ids": ids(3), "response_ids": (ids(4), ids(2)), "scores": np.float32([0, 1])}]
    keys = layouts.BATCH_KEYS + list_layouts.LIST_KEYS
    state, _, eval_fn, obj = _compiled(("plackett_luce",), keys, mesh)
    spec = list_layouts.ListLayoutSpec(layout="prefix", num_pairs=4, list_size=4, buckets=(32,))
    batch = spec(lists)
    np.testing.assert_array_equal(batch["slot_mask_PxK"][:2], [[1, 1, 1, 0], [1, 1, 0, 0]])
    m = eval_fn(state, sharding.global_batch(batch, mesh), obj.params(beta=1.0))
    # policy (seed 0) and reference (seed 1) differ: the loss is the PL loss of their log-ratios
    standard = list_layouts.ListLayoutSpec(layout="standard", num_pairs=4, list_size=4, buckets=(32,))
    m2 = eval_fn(state, sharding.global_batch(standard(lists), mesh), obj.params(beta=1.0))
    np.testing.assert_allclose(m["loss"], m2["loss"], rtol=1e-5)
    assert float(m["pairs"]) == 2.0 and np.isfinite(float(m["loss"]))


def test_precomputed_reference_and_mixed_objectives_are_refused():
    obj = losses.Objective(("plackett_luce",))
    with pytest.raises(ValueError, match="reference.mode='precomputed'.*ranked lists.*'frozen'"):
        step.check_ref_mode("precomputed", obj, has_lora=False)
    with pytest.raises(ValueError, match="mixes losses of ranked lists"):
        losses.Objective(("sigmoid", "plackett_luce"))
    with pytest.raises(ValueError, match="LD-DPO's length weighting is defined for pairs"):
        losses.Objective(("plackett_luce",), ld=True)
