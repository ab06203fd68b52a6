"""The decoder: attention rule, layouts, numerics (bf16, remat), KV cache, sharding metadata, config."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_jax.models.layers import make_attention_mask
from dpo_jax.models.transformer import LOGICAL_AXES, Decoder, ModelConfig, init_cache, num_params

_BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
             max_position_embeddings=64, init_std=0.2)
PRESETS = {
    "llama": dict(num_kv_heads=2),
    "mistral": dict(family="mistral", num_kv_heads=2, sliding_window=3),
    "qwen2": dict(family="qwen2", qkv_bias=True, tie_embeddings=True, num_kv_heads=1),
    "qwen3": dict(family="qwen3", qk_norm=True, head_dim=16, num_kv_heads=2, sliding_window=2,
                  sliding_layers=(False, True)),
    "gpt2": dict(family="gpt2", norm="layer", norm_eps=1e-5, activation="gelu_tanh", gated_mlp=False,
                 position="learned", qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True),
    "gpt_neox": dict(family="gpt_neox", norm="layer", activation="gelu", gated_mlp=False, qkv_bias=True,
                     o_bias=True, mlp_bias=True, parallel_residual=True, rotary_fraction=0.5),
}


def tiny(preset="llama", **kw):
    """A 2-layer model of `preset`; the layer stack is scanned (scan_min_layers=0), as in deep models."""
    return ModelConfig(**{**_BASE, **PRESETS[preset], "scan_min_layers": 0, **kw})


@functools.cache
def model_of(cfg, seed=0):
    """One model per (config, seed) for the whole module (tests never mutate it)."""
    return Decoder(cfg, rngs=nnx.Rngs(seed))


@nnx.jit
def fwd(model, toks, positions=None, segments=None, branches=None):
    return model(toks, positions_BxT=positions, segment_ids_BxT=segments, branch_ids_BxT=branches)


def tokens(B, T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 97, (B, T)), jnp.int32)


def _i(*rows):
    return jnp.asarray(np.array(rows, np.int32))


# ----------------------------------------------------------------------------- the rule itself


def test_mask_padded_row():
    m = make_attention_mask(_i([1, 1, 1, 0, 0]), _i([0, 1, 2, 0, 0]))
    assert m.shape == (1, 1, 5, 5) and m.dtype == jnp.bool_
    want = np.zeros((5, 5), bool)
    want[:3, :3] = np.tril(np.ones((3, 3), bool))
    np.testing.assert_array_equal(m[0, 0], want)


def test_mask_packed_segments():
    m = make_attention_mask(_i([1, 1, 2, 2, 2]), _i([0, 1, 0, 1, 2]))[0, 0]
    want = np.array([[1, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [0, 0, 1, 0, 0],
                     [0, 0, 1, 1, 0],
                     [0, 0, 1, 1, 1]], bool)
    np.testing.assert_array_equal(m, want)


def test_mask_prefix_shared_rejected_does_not_see_chosen():
    # p0 | p1 c0 c1 (chosen branch) | p1 r0 (rejected branch) | pad
    seg, pos, br = _i([1, 1, 1, 1, 1, 1, 0]), _i([0, 1, 2, 3, 1, 2, 0]), _i([0, 1, 1, 1, 2, 2, 0])
    m = make_attention_mask(seg, pos, br)[0, 0]
    want = np.array([[1, 0, 0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0, 0],
                     [1, 1, 1, 0, 0, 0, 0],
                     [1, 1, 1, 1, 0, 0, 0],
                     [1, 0, 0, 0, 1, 0, 0],
                     [1, 0, 0, 0, 1, 1, 0],
                     [0, 0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(m, want)


def test_mask_sliding_window():
    m = make_attention_mask(_i([1, 1, 1, 1]), _i([0, 1, 2, 3]), sliding_window=2)[0, 0]
    np.testing.assert_array_equal(m, np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], bool))


# ----------------------------------------------------------------------------- the rule in the model


def _right_padded(*seqs):
    T = max(len(x) for x in seqs)
    toks = jnp.stack([jnp.pad(x, (0, T - len(x))) for x in seqs])
    return toks, jnp.asarray(np.arange(T)[None] < np.array([len(x) for x in seqs])[:, None], jnp.int32)


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_packed_row_equals_separate_rows(preset):
    model = model_of(tiny(preset))
    a, b = tokens(1, 3, seed=1)[0], tokens(1, 4, seed=2)[0]
    row = jnp.concatenate([a, b, jnp.zeros(2, jnp.int32)])[None]
    h = fwd(model, row, _i([0, 1, 2, 0, 1, 2, 3, 0, 0]), _i([1, 1, 1, 2, 2, 2, 2, 0, 0]))
    sep = fwd(model, *_right_padded(a, b)[:1], None, _right_padded(a, b)[1])
    np.testing.assert_allclose(h[0, :3], sep[0, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h[0, 3:7], sep[1, :4], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(h)).all()


@pytest.mark.parametrize("preset", ["llama", "qwen3"])
def test_prefix_shared_row_equals_separate_rows(preset):
    model = model_of(tiny(preset))
    prompt, chosen, rejected = tokens(1, 4, 3)[0], tokens(1, 3, 4)[0], tokens(1, 5, 5)[0]
    n = len(prompt) - 1
    row = jnp.concatenate([prompt[:-1], prompt[-1:], chosen, prompt[-1:], rejected])[None]
    pos = list(range(n)) + list(range(n, n + 4)) + list(range(n, n + 6))
    br = [0] * n + [1] * 4 + [2] * 6
    h = fwd(model, row, _i(pos), jnp.ones_like(row), _i(br))[0]
    toks, seg = _right_padded(jnp.concatenate([prompt, chosen]), jnp.concatenate([prompt, rejected]))
    full = fwd(model, toks, None, seg)
    np.testing.assert_allclose(h[:n + 4], full[0, :n + 4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h[n + 4:], full[1, n:n + 6], rtol=1e-5, atol=1e-5)


SEG = [[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]  # a right-padded row and an all-padding row


@functools.cache
def _loss_and_grads(remat="none", scan_layers=True):
    """(loss, grads, jaxpr text) of a fixed weighted sum of logits over the real tokens of SEG."""
    model = model_of(tiny("llama", remat=remat, scan_layers=scan_layers))
    toks, seg = tokens(2, 6), _i(*SEG)
    weights = jax.random.normal(jax.random.key(1), (2, 6, 97)) * seg[..., None]

    def loss(m):
        return jnp.mean(m.logits(m(toks, segment_ids_BxT=seg)) * weights)

    jaxpr = str(jax.make_jaxpr(lambda s: loss(nnx.merge(nnx.graphdef(model), s)))(nnx.state(model)))
    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    return value, grads, jaxpr


def test_padding_rows_give_no_nan_values_or_gradients():
    value, grads, _ = _loss_and_grads()
    assert np.isfinite(float(value)) and float(value) != 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    model = model_of(tiny("llama"))
    assert np.isfinite(np.asarray(model.logits(fwd(model, tokens(2, 6), None, _i(*SEG))))).all()


# ----------------------------------------------------------------------------- numerics


def test_defaults_are_plain_causal_and_logits_float32():
    model = model_of(tiny("llama"))
    toks = tokens(2, 6)
    h = fwd(model, toks)
    h2 = fwd(model, toks, jnp.broadcast_to(jnp.arange(6), (2, 6)), jnp.ones((2, 6), jnp.int32),
             jnp.zeros((2, 6), jnp.int32))
    np.testing.assert_array_equal(h, h2)
    # causal: changing a later token leaves earlier hidden states unchanged
    h3 = fwd(model, toks.at[:, 3].set(5))
    np.testing.assert_array_equal(h[:, :3], h3[:, :3])
    assert not np.allclose(h[:, 3:], h3[:, 3:])
    logits = model.logits(h)
    assert logits.shape == (2, 6, 97) and logits.dtype == jnp.float32
    w, b = model.unembedding()
    assert w.shape == (32, 97) and b is None


@pytest.mark.parametrize("preset,dtype,param_dtype", [("llama", "bfloat16", "float32"),
                                                      ("gpt2", "bfloat16", "bfloat16")])
def test_bfloat16_compute_close_to_float32(preset, dtype, param_dtype):
    cfg = tiny(preset)
    toks = tokens(2, 6)
    ref = model_of(cfg).logits(fwd(model_of(cfg), toks))
    model = model_of(dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(param_dtype)}
    h = fwd(model, toks)
    assert h.dtype == jnp.bfloat16
    logits = model.logits(h)
    assert logits.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(logits - ref)))
    assert err < 0.03 * float(jnp.max(jnp.abs(ref))) + 1e-2, f"{dtype}/{param_dtype}: max |diff| {err}"
    assert err > 0  # it really ran in bfloat16


@pytest.mark.parametrize("remat,scan_layers", [("full", True), ("dots", False)])
def test_remat_same_values_and_gradients(remat, scan_layers):
    value, grads, plain = _loss_and_grads()
    v, g, jaxpr = _loss_and_grads(remat, scan_layers)
    assert "remat" in jaxpr and "remat" not in plain, f"remat={remat} not reflected in the jaxpr"
    np.testing.assert_allclose(v, value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("remat,policy", [("none", None), ("full", "policy=None"),
                                           ("dots", "policy=DotsSaveable(only_if_no_batch_dims=True)"),
                                           ("dots_all", "policy=DotsSaveable(only_if_no_batch_dims=False)")])
def test_every_remat_policy_is_wired(remat, policy):
    model = nnx.eval_shape(lambda: Decoder(tiny("llama", remat=remat), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens(2, 6)))(state))
    assert re.findall(r"policy=\S+", jaxpr) == ([] if policy is None else [policy])


def test_scan_and_unrolled_layers_agree():
    toks = tokens(2, 6)
    a = fwd(model_of(tiny("qwen3")), toks)
    b = fwd(model_of(tiny("qwen3", scan_layers=False)), toks)
    c = fwd(model_of(tiny("qwen3", scan_min_layers=3)), toks)  # 2 layers < 3: unrolled
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c, b, rtol=1e-5, atol=1e-5)


def test_shallow_stacks_unroll_deep_stacks_scan():
    assert ModelConfig(num_layers=2).scanned is False  # default scan_min_layers = 9
    assert ModelConfig(num_layers=9).scanned is True
    assert ModelConfig(num_layers=9, scan_layers=False).scanned is False
    assert ModelConfig(num_layers=2, scan_min_layers=0).scanned is True
    for cfg, has_scan in ((tiny(), True), (tiny(scan_min_layers=3), False)):
        model = nnx.eval_shape(lambda cfg=cfg: Decoder(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens(2, 6)))(state))
        assert ("scan[" in jaxpr) is has_scan


# ----------------------------------------------------------------------------- KV cache


@nnx.jit
def _decode(model, toks, positions, segments, cache, index):
    return model(toks, positions_BxT=positions, segment_ids_BxT=segments, cache=cache, cache_index=index)


@pytest.mark.parametrize("preset", ["llama", "qwen3", "gpt2"])
def test_kv_cache_decoding_equals_full_forward(preset):
    """Prefill 2 tokens, then decode one at a time (traced cache_index): hidden states of the full forward."""
    model = model_of(tiny(preset))
    B, T, prefill = 2, 6, 2
    toks = tokens(B, T)
    full = fwd(model, toks)
    cache = init_cache(model.cfg, B, T, jnp.float32)
    assert cache["k_LxBxSxKxE"].shape == (2, B, T, model.cfg.num_kv_heads, model.cfg.head_dim)
    h, cache = model(toks[:, :prefill], cache=cache, cache_index=0)
    np.testing.assert_allclose(h, full[:, :prefill], rtol=1e-5, atol=1e-5)
    ones = jnp.ones((B, 1), jnp.int32)
    for t in range(prefill, T):
        h, cache = _decode(model, toks[:, t:t + 1], ones * t, ones, cache, jnp.int32(t))
        np.testing.assert_allclose(h[:, 0], full[:, t], rtol=1e-5, atol=1e-5, err_msg=f"{preset}: step {t}")


def test_kv_cache_with_left_padded_prompts():
    """Ragged prompts, left-padded (segment 0): each row decodes as if it were alone."""
    model = model_of(tiny("llama"))
    a, b = tokens(1, 6, seed=8)[0], tokens(1, 4, seed=9)[0]
    toks, seg = _right_padded(a, b)
    full = fwd(model, toks, None, seg)
    prompt = jnp.stack([a[:3], jnp.concatenate([jnp.zeros(2, jnp.int32), b[:1]])])
    cache = init_cache(model.cfg, 2, 6)
    _, cache = model(prompt, positions_BxT=_i([0, 1, 2], [0, 0, 0]), segment_ids_BxT=_i([1, 1, 1], [0, 0, 1]),
                     cache=cache, cache_index=0)
    for step in range(3):
        nxt = jnp.stack([a[3 + step], b[1 + step]])[:, None]
        h, cache = _decode(model, nxt, _i([3 + step], [1 + step]), jnp.ones((2, 1), jnp.int32), cache,
                           jnp.int32(3 + step))
        np.testing.assert_allclose(h[0, 0], full[0, 3 + step], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h[1, 0], full[1, 1 + step], rtol=1e-5, atol=1e-5)


def test_cache_requires_index():
    model = model_of(tiny("llama"))
    with pytest.raises(ValueError, match="cache_index"):
        model(tokens(1, 2), cache=init_cache(model.cfg, 1, 4))


# ----------------------------------------------------------------------------- metadata and config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_parameter_has_logical_axis_names(preset):
    cfg = tiny(preset, qkv_bias=True, o_bias=True, mlp_bias=True)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))  # metadata without computing values
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(flat) > 8
    for path, var in flat:
        names = var.get_metadata().get("out_sharding")
        where = "/".join(map(str, path))
        assert names is not None, f"{where} has no logical axis names"
        shape = var.get_raw_value().shape
        assert len(names) == len(shape), f"{where}: names {names} vs shape {shape}"
        assert set(names) <= set(LOGICAL_AXES) | {None}, f"{where}: unknown axis in {names}"
        assert (path[0] == "layers") == (names[0] == "layers"), f"{where}: {names}"
    specs = nnx.get_partition_spec(nnx.state(model))
    assert specs["embed"].get_raw_value() == jax.sharding.PartitionSpec("vocab", "embed")
    assert num_params(model) == sum(int(np.prod(v.get_raw_value().shape)) for _, v in flat)


@pytest.mark.parametrize("field,value,match", [
    ("num_kv_heads", 3, "num_kv_heads"),
    ("remat", "sometimes", "remat"),
    ("dtype", "int8", "dtype"),
    ("family", "bert", "family"),
    ("rotary_fraction", 0.1, "rotary_fraction"),
    ("sliding_layers", (True,), "sliding_layers"),
])
def test_config_errors_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny("llama", **{field: value})


def test_config_is_hashable_and_normalizes_dtypes():
    cfg = tiny("llama", dtype=jnp.bfloat16, param_dtype=np.float32)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    assert hash(cfg) == hash(tiny("llama", dtype="bfloat16"))
    assert cfg.head_dim == 8
