"""Tests of the mesh, the logical-axis rules, state and batch shardings (8 fake CPU devices)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dpo_jax import sharding
from dpo_jax.models.transformer import Decoder, ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_mesh_shape_resolves_minus_one():
    one = dict(data=1, fsdp=1, context=1, tensor=1)
    assert sharding.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == {**one, "data": 8}
    assert sharding.mesh_shape({"fsdp": -1, "tensor": 2}, 8) == {**one, "fsdp": 4, "tensor": 2}
    assert sharding.mesh_shape({}, 1) == one
    assert sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == {**one, "data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.mesh_shape({"data": -1, "context": 4}, 8) == {**one, "data": 2, "context": 4}


@pytest.mark.parametrize("shape,n,fragment", [
    ({"data": -1, "fsdp": -1}, 8, "at most one -1"),
    ({"data": 0}, 8, "positive"),
    ({"data": -2}, 8, "positive"),
    ({"pipeline": 2}, 8, "unknown axes ['pipeline']"),
    ({"data": 3}, 8, "needs 3 devices; 8 are available"),
    ({"data": 2, "fsdp": 2}, 8, "needs 4 devices"),
    ({"data": -1, "tensor": 3}, 8, "not divisible by 3"),
])
def test_mesh_shape_errors_name_the_key(shape, n, fragment):
    with pytest.raises(ValueError) as e:
        sharding.mesh_shape(shape, n)
    assert str(e.value).startswith("mesh.shape") and fragment in str(e.value), str(e.value)


def test_make_mesh_axes_and_devices(mesh):
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    one = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
    assert dict(one.shape) == {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}


def test_logical_to_mesh(mesh):
    to = lambda names, shape: sharding.logical_to_mesh(names, shape, mesh)  # noqa: E731
    assert to(("embed", "mlp"), (32, 64)) == P("fsdp", "tensor")
    assert to(("layers", "heads", "kv"), (2, 4, 8)) == P(None, "tensor", None)
    # not divisible by the mesh axis size 2: replicated
    assert to(("embed", "mlp"), (33, 63)) == P(None, None)
    # a mesh axis is used at most once per array: the second dimension that wants it is replicated
    assert to(("heads", "mlp"), (4, 64)) == P("tensor", None)
    assert to(("embed", "embed"), (32, 32)) == P("fsdp", None)
    # a dimension that cannot take an axis leaves it free for the next one
    assert to(("heads", "vocab"), (3, 64)) == P(None, "tensor")
    # unnamed dimensions and unknown names are replicated; batch maps to (data, fsdp)
    assert to((None, "unknown"), (8, 8)) == P(None, None)
    assert to(("batch", "length"), (8, 16)) == P(("data", "fsdp"), None)
    assert to(("batch", "embed"), (8, 32)) == P(("data", "fsdp"), None)
    assert to(("batch",), (6,)) == P(None)  # 6 rows over 4 devices


def test_logical_to_mesh_skips_size_one_axes():
    m = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    assert sharding.logical_to_mesh(("embed", "mlp"), (32, 64), m) == P(None, None)
    assert sharding.logical_to_mesh(("batch",), (8,), m) == P("data")
    rules = (("embed", ("data", "tensor")),)
    assert sharding.logical_to_mesh(("embed",), (16,), m, rules) == P("data")


def _specs(mesh, cfg=CFG):
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(jax.tree.map(lambda s: s.spec, sharding.state_shardings(nnx.state(abstract, nnx.Param),
                                                                                      mesh)))


def test_state_shardings_on_a_tiny_decoder(mesh):
    specs = _specs(mesh)
    layers = specs["layers"]
    assert specs["embed"] == P("tensor", "fsdp")          # (vocab, embed)
    assert specs["lm_head"] == P("fsdp", "tensor")        # (embed, vocab)
    assert specs["final_norm"] == P("fsdp")
    assert layers["wq"] == P(None, "fsdp", "tensor", None)  # (layers, embed, heads, kv)
    assert layers["wk"] == P(None, "fsdp", "tensor", None)  # kv_heads = 2 divides tensor = 2
    assert layers["wo"] == P(None, "tensor", None, "fsdp")
    for w in ("w_up", "w_gate"):
        assert layers[w] == P(None, "fsdp", "tensor")
    assert layers["w_down"] == P(None, "tensor", "fsdp")
    assert layers["attn_norm"] == P(None, "fsdp")
    for name, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P)):
        used = [a for a in spec if a is not None]
        assert len(used) == len(set(used)), name


def test_state_shardings_replicate_what_does_not_divide(mesh):
    odd = ModelConfig(vocab_size=63, hidden_size=30, intermediate_size=48, num_layers=2, num_heads=3,
                      num_kv_heads=1, head_dim=10)
    specs = _specs(mesh, odd)
    assert specs["embed"] == P(None, "fsdp")  # vocab 63 is odd
    assert specs["layers"]["wq"] == P(None, "fsdp", None, None)  # 3 heads
    assert specs["layers"]["wk"] == P(None, "fsdp", None, None)  # 1 kv head


def test_state_shardings_place_concrete_arrays(mesh):
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    placed = jax.device_put(state, sharding.state_shardings(state, mesh))
    wq = placed["layers"]["wq"][...]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)
    np.testing.assert_array_equal(np.asarray(wq), np.asarray(model.layers.wq[...]))


def test_global_batch_shards_the_leading_dim(mesh):
    local = {"tokens_BxT": np.arange(8 * 5, dtype=np.int32).reshape(8, 5), "pair_mask_P": np.ones(4, np.float32)}
    g = sharding.global_batch(local, mesh)
    assert g["tokens_BxT"].sharding.spec == P(("data", "fsdp"), None)
    assert g["pair_mask_P"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in g["tokens_BxT"].addressable_shards} == {(2, 5)}
    assert {s.data.shape for s in g["pair_mask_P"].addressable_shards} == {(1,)}
    np.testing.assert_array_equal(np.asarray(g["tokens_BxT"]), local["tokens_BxT"])
    assert sharding.batch_shardings(local, mesh)["tokens_BxT"] == g["tokens_BxT"].sharding
    assert sharding.replicated(mesh).spec == P()


def test_check_batch_divisible(mesh):
    sharding.check_batch_divisible(8, mesh)
    with pytest.raises(ValueError, match=r"data\.batch_size: 6 rows .* 4 devices .* multiple of 4"):
        sharding.check_batch_divisible(6, mesh)
    with pytest.raises(ValueError, match=r"data\.eval_batch_size"):
        sharding.check_batch_divisible(2, mesh, key="data.eval_batch_size")


def test_process_pair_offset_of_one_process_is_zero(mesh):
    assert sharding.process_pair_offset(mesh, 8) == 0


def test_rules_are_a_config_value_that_decides_the_parameter_shardings(mesh):
    from configs import base

    rules = base.get_config().mesh.rules
    assert sharding.check_rules(rules) == sharding.DEFAULT_RULES
    graphdef, state = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    default = sharding.param_shardings(params, graphdef, mesh, sharding.check_rules(rules))
    replicated_embed = sharding.check_rules([(k, None if k == "embed" else v) for k, v in rules])
    changed = sharding.param_shardings(params, graphdef, mesh, replicated_embed)
    specs = lambda tree: {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(tree)}  # noqa: E731
    before, after = specs(default), specs(changed)
    moved = [k for k in before if before[k] != after[k]]
    assert moved and all("fsdp" in str(before[k]) and "fsdp" not in str(after[k]) for k in moved)


@pytest.mark.parametrize("rules,fragment", [
    ([("embd", "fsdp")], "unknown logical axis 'embd'"),
    ([("embed", "pipeline")], "unknown mesh axes ['pipeline']"),
    ([("embed", "fsdp"), ("embed", None)], "'embed' has two rules"),
    ([("embed",)], "want (logical axis, mesh axes)"),
])
def test_bad_rules_name_the_config_key(rules, fragment):
    with pytest.raises(ValueError) as e:
        sharding.check_rules(rules)
    assert str(e.value).startswith("config.mesh.rules") and fragment in str(e.value), str(e.value)


def test_stacked_sharding_replicates_the_member_axis(mesh):
    sh = jax.sharding.NamedSharding(mesh, P("fsdp", None))
    assert sharding.stacked_sharding(sh).spec == P(None, "fsdp", None)
