"""Tests of dpo_jax/train/state.py: what `init_state` places on the mesh, with and without LoRA."""

import jax
import numpy as np
import optax
from flax import nnx

from dpo_jax import sharding
from dpo_jax.models import lora
from dpo_jax.models.transformer import Decoder, ModelConfig
from dpo_jax.train import state as train_state

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_full_policy_state_holds_policy_reference_and_optimizer():
    policy, reference = Decoder(CFG, rngs=nnx.Rngs(0)), Decoder(CFG, rngs=nnx.Rngs(1))
    state, shardings, graphdef = train_state.init_state(policy, reference, optax.adamw(1e-3), _mesh(), seed=3)
    assert int(state.step) == 0 and state.base_params is None
    for got, want in zip(_leaves(state.params), _leaves(nnx.to_pure_dict(nnx.split(policy)[1]))):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(_leaves(state.ref_params), _leaves(nnx.to_pure_dict(nnx.split(reference)[1]))):
        np.testing.assert_array_equal(got, want)
    # Adam's moments start at zero, one per parameter, in the parameters' shardings.
    mu = state.opt_state[0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(state.params)
    assert all(not x.any() for x in _leaves(mu))
    assert jax.tree.structure(shardings.params) == jax.tree.structure(state.params)
    for x, sh in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings.params)):
        assert x.sharding.is_equivalent_to(sh, x.ndim)
    assert nnx.merge(graphdef, state.params).cfg == CFG
    np.testing.assert_array_equal(np.asarray(state.rng), np.asarray(jax.random.key_data(jax.random.key(3))))


def test_lora_state_trains_adapters_over_frozen_base_and_no_reference_copy():
    policy = Decoder(CFG, rngs=nnx.Rngs(0))
    cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("wq", "wv"))
    state, shardings, _ = train_state.init_state(policy, None, optax.sgd(1e-3), _mesh(), seed=0, lora_cfg=cfg)
    assert state.ref_params is None and shardings.ref_params is None
    for got, want in zip(_leaves(state.base_params), _leaves(nnx.to_pure_dict(nnx.split(policy)[1]))):
        np.testing.assert_array_equal(got, want)
    n_base = sum(x.size for x in _leaves(state.base_params))
    n_adapters = sum(x.size for x in _leaves(state.params))
    assert 0 < n_adapters < n_base / 10
    merged = lora.merge(state.base_params, state.params, cfg)  # B starts at zero: the merge is the base
    for got, want in zip(_leaves(merged), _leaves(state.base_params)):
        np.testing.assert_array_equal(got, want)
