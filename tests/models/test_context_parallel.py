"""models/context_parallel.py: rows sharded over the `context` mesh axis give the values and
gradients of unsharded rows (decoder on every layout, dense and blockwise; the train step on the
standard, prefix and packed layouts), and the compiled per-device memory at long T falls with the
number of context shards."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from ml_collections import ConfigDict

from dpo_jax import config_check, losses, sharding
from dpo_jax.data import layouts
from dpo_jax.models import context_parallel
from dpo_jax.models.transformer import Decoder, ModelConfig
from dpo_jax.train import loop, step
from dpo_jax.train import state as train_state

from tests.models.test_attention import ROWS, _rows
from tests.train.test_step import CFG, random_examples

T = 16  # the rows of every layout (13 tokens) padded to a multiple of 4 context shards
UNSHARDED = {"data": 2, "fsdp": 4}
CONTEXT_4 = {"data": 2, "context": 4}


def _ids():
    pad = lambda x: jnp.pad(x, ((0, 0), (0, T - x.shape[1])))  # noqa: E731
    return tuple(pad(x) for x in _rows(*ROWS))  # [8, T]: standard, prefix, packed, packed-prefix rows


def _max_rel_err(tree, ref):
    return max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in
               zip(jax.tree.leaves(tree), jax.tree.leaves(ref)))


def decoder_value_and_grad(cfg, ids, mesh_shape=None):
    """(value, parameter gradients, jaxpr text) of a loss of the Decoder's hidden states on rows with
    the given (segment, position, branch) ids, traced under a mesh of `mesh_shape` when given."""
    seg, pos, br = ids
    tokens = jax.random.randint(jax.random.key(1), seg.shape, 0, cfg.vocab_size)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)

    def loss(params):
        h = nnx.merge(graphdef, params)(tokens, positions_BxT=pos, segment_ids_BxT=seg, branch_ids_BxT=br)
        return jnp.sum(jnp.sin(h) * (seg[..., None] > 0))

    fn, kw = jax.value_and_grad(loss), {}
    if mesh_shape is not None:
        mesh = sharding.make_mesh(mesh_shape)
        fn, kw = sharding.traced_under(mesh, fn), dict(in_shardings=sharding.replicated(mesh))
    value, grads = jax.jit(fn, **kw)(params)
    return value, grads, str(jax.make_jaxpr(fn)(params))


@pytest.mark.parametrize("attention", ["dense", "blockwise", "tiled"])  # tiled: blockwise on each shard
def test_decoder_with_context_shards_equals_unsharded(attention):
    """Every layout in one batch, GQA, one sliding and one full layer: context=4 (with and without
    tensor=2) gives the unsharded values and parameter gradients to 1e-5."""
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      attention=attention, sliding_window=6, sliding_layers=(True, False))
    ref_value, ref_grads, _ = decoder_value_and_grad(cfg, _ids(), UNSHARDED)
    for shape in (CONTEXT_4, {"context": 4, "tensor": 2}):
        value, grads, _ = decoder_value_and_grad(cfg, _ids(), shape)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5, err_msg=str(shape))
        assert _max_rel_err(grads, ref_grads) < 1e-5, shape


def test_attention_is_context_parallel_only_under_a_context_mesh():
    """Without a mesh or with context=1 the model never enters shard_map; with context=4 it does
    (one shard_map per layer in the forward)."""
    cfg = dataclasses.replace(CFG, attention="blockwise")
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((2, T), jnp.int32)
    forward = lambda p: nnx.merge(graphdef, p)(tokens)  # noqa: E731

    def shard_maps(mesh_shape):
        fn = forward if mesh_shape is None else sharding.traced_under(sharding.make_mesh(mesh_shape), forward)
        return str(jax.make_jaxpr(fn)(params)).count("shard_map")

    assert shard_maps(None) == 0
    assert shard_maps(UNSHARDED) == 0
    assert shard_maps(CONTEXT_4) == cfg.num_layers


def _dpo_steps(mesh, cfg, batches):
    """(loss, gradient norm) of each of three DPO steps, and the gradient of the first batch's loss
    at the initial parameters."""
    policy, reference = Decoder(cfg, rngs=nnx.Rngs(0)), Decoder(cfg, rngs=nnx.Rngs(1))
    tx = optax.adamw(1e-2)
    state, state_sh, graphdef = train_state.init_state(policy, reference, tx, mesh, seed=0)
    objective = losses.Objective(("sigmoid",))
    step_cfg = step.StepConfig(graphdef=graphdef, objective=objective, tx=tx, lr=lambda s: 1e-2, chunk_size=64,
                               vocab_chunk_size=32)
    hp = objective.params(beta=0.1)
    first = sharding.global_batch(batches[0], mesh)

    def loss(params, batch):
        return step._loss(params, step_cfg, step.reference_logps(step_cfg, state, batch), batch, hp)[0]

    grads = jax.jit(sharding.traced_under(mesh, jax.grad(loss)))(state.params, first)
    grads = jax.tree.map(np.asarray, grads)
    train_fn, _ = loop.compiled_steps(step_cfg, state_sh, mesh, layouts.BATCH_KEYS)
    metrics = []
    for b in batches:
        state, m = train_fn(state, sharding.global_batch(b, mesh), hp)
        metrics.append((float(m["loss"]), float(m["grad_norm"])))
    return np.asarray(metrics), grads


@pytest.mark.parametrize("layout", ["standard", "prefix", "packed"])
def test_train_step_with_context_shards_equals_unsharded(layout):
    """Three DPO steps on the layout's own rows (blockwise attention): the losses and gradient norms of
    context=4 equal those of context=1 to 1e-5, and so does the first step's gradient."""
    rng = np.random.default_rng(0)
    spec = layouts.LayoutSpec(layout=layout, num_pairs=8, buckets=(16, 32), prefix_min_saving=0.0,
                              num_rows=8, row_length=32 if layout == "packed" else 0)
    batches = [spec(random_examples(rng, 8)) for _ in range(3)]
    assert all(b["tokens_BxT"].shape[1] % 4 == 0 for b in batches)
    cfg = dataclasses.replace(CFG, attention="blockwise")
    ref_metrics, ref_grads = _dpo_steps(sharding.make_mesh(UNSHARDED), cfg, batches)
    metrics, grads = _dpo_steps(sharding.make_mesh(CONTEXT_4), cfg, batches)
    np.testing.assert_allclose(metrics, ref_metrics, rtol=1e-5)
    assert len(set(ref_metrics[:, 0])) == 3  # the losses move, so the comparison means something
    assert _max_rel_err(grads, ref_grads) < 1e-5


def test_per_device_memory_falls_with_context_shards():
    """Compiled forward + backward of one 4096-token row (blockwise, remat full): the per-device
    temporaries shrink with every doubling of the context shards (measured 96 / 52 / 28 MB)."""
    cfg = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
                      num_kv_heads=2, attention="blockwise", remat="full")
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    tokens = jnp.zeros((1, 4096), jnp.int32)

    def loss(params, tokens):
        return jnp.sum(nnx.merge(graphdef, params)(tokens) ** 2)

    temp = {}
    for shards in (1, 2, 4):
        mesh = sharding.make_mesh({"context": shards}, devices=jax.devices()[:shards])
        rep = sharding.replicated(mesh)
        grad = jax.jit(sharding.traced_under(mesh, jax.grad(loss)), in_shardings=(rep, rep))
        temp[shards] = grad.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
    assert temp[2] < 0.65 * temp[1] and temp[4] < 0.65 * temp[2], temp


def test_row_lengths_must_split_over_the_context_shards():
    """At trace time (a row of 18 tokens over 4 shards) and in the config check, naming the key."""
    graphdef, params = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))
    forward = lambda p: nnx.merge(graphdef, p)(jnp.zeros((2, 18), jnp.int32))  # noqa: E731
    with pytest.raises(ValueError, match=r"config.mesh.shape.context=4"):
        jax.eval_shape(sharding.traced_under(sharding.make_mesh(CONTEXT_4), forward), params)
    data = ConfigDict(dict(max_length=1024, min_bucket=16, pack_length=0))
    config_check.check_context_lengths(data, 4)
    data.min_bucket = 6
    with pytest.raises(ValueError, match=r"config.data.min_bucket=6 .*context=4"):
        config_check.check_context_lengths(data, 4)
    data.min_bucket, data.pack_length = 16, 1026
    with pytest.raises(ValueError, match=r"config.data.pack_length=1026"):
        config_check.check_context_lengths(data, 4)


def test_shards_reads_the_traced_mesh():
    assert context_parallel.shards() == 1
    with jax.sharding.use_abstract_mesh(sharding.make_mesh(CONTEXT_4).abstract_mesh):
        assert context_parallel.shards() == 4
