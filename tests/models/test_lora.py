"""LoRA: zero-B start equals the base, gradients reach adapters only, a hand-merged dense model, the
merged Hugging Face export against `transformers`, logical axes and config validation.

Goldens: none stored; references are recomputed here (NumPy hand-merge, PyTorch forward)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_jax import sharding
from dpo_jax.models import lora
from dpo_jax.models.transformer import Decoder, ModelConfig

_BASE = dict(vocab_size=71, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
             max_position_embeddings=64, init_std=0.2)
PRESETS = {
    "llama": dict(),
    "gpt2": dict(family="gpt2", norm="layer", norm_eps=1e-5, activation="gelu_tanh", gated_mlp=False, num_kv_heads=4,
                 position="learned", qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True),
}


@functools.lru_cache(maxsize=None)
def base_of(preset):
    """(model, graphdef, pure params) of a tiny random base model; shared, never mutated by the tests."""
    model = Decoder(ModelConfig(**{**_BASE, **PRESETS[preset]}), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    return model, graphdef, nnx.to_pure_dict(state)


def tokens(B=2, T=7, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 71, (B, T)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def logits_of(graphdef, params, toks):
    model = nnx.merge(graphdef, params)
    return model.logits(model(toks))


def random_adapters(base, cfg, seed=1):
    """init_adapters, then B replaced by random values so the adapters change the model."""
    adapters = lora.init_adapters(base, cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return {n: {"a": ab["a"], "b": jnp.asarray(0.3 * rng.normal(size=ab["b"].shape), jnp.float32)}
            for n, ab in adapters.items()}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_init_shapes_and_zero_b_equals_base(preset):
    _, graphdef, base = base_of(preset)
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = lora.init_adapters(base, cfg, jax.random.key(0))
    want = {"wq", "wk", "wv", "wo", "w_up", "w_down"} | ({"w_gate"} if preset == "llama" else set())
    assert set(adapters) == want
    L, D, H, K, E, F = 2, 32, 4, PRESETS[preset].get("num_kv_heads", 2), 8, 48
    shapes = {"wq": (D, H * E), "wk": (D, K * E), "wv": (D, K * E), "wo": (H * E, D), "w_gate": (D, F),
              "w_up": (D, F), "w_down": (F, D)}
    for name, (n_in, n_out) in shapes.items():
        if name in adapters:
            assert adapters[name]["a"].shape == (L, n_in, 4) and adapters[name]["b"].shape == (L, 4, n_out), name
            np.testing.assert_array_equal(adapters[name]["b"], 0.0)
            a_std = float(jnp.std(adapters[name]["a"]))
            assert 0.5 / np.sqrt(n_in) < a_std < 1.5 / np.sqrt(n_in), f"{name}: std(A) = {a_std}"
    toks = tokens()
    np.testing.assert_array_equal(logits_of(graphdef, lora.merge(base, adapters, cfg), toks),
                                  logits_of(graphdef, base, toks))
    assert lora.num_adapter_params(adapters) == sum(2 * 4 * (i + o) for n, (i, o) in shapes.items() if n in adapters)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_random_adapters_equal_hand_merged_dense_model(preset):
    model, graphdef, base = base_of(preset)
    cfg = lora.LoraConfig(rank=3, alpha=6.0)
    adapters = random_adapters(base, cfg)
    c = model.cfg
    H, K, E, D = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
    dense = jax.tree.map(np.array, base)
    for name, ab in adapters.items():
        upd = 2.0 * np.einsum("lir,lro->lio", np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64))
        if name == "wq":
            upd = upd.reshape(2, D, H, E)
        elif name in ("wk", "wv"):
            upd = upd.reshape(2, D, K, E)
        elif name == "wo":
            upd = upd.reshape(2, H, E, D)
        dense["layers"][name] = (dense["layers"][name] + upd).astype(np.float32)
    toks = tokens(seed=3)
    adapted = lora.merged_model(graphdef, base, adapters, cfg)
    got = logits_of(*nnx.split(adapted), toks)
    np.testing.assert_allclose(got, logits_of(graphdef, dense, toks), atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(got - logits_of(graphdef, base, toks)))) > 0.1, "adapters changed nothing"
    for path in ("embed", "final_norm"):  # untouched arrays are the base's
        np.testing.assert_array_equal(nnx.to_pure_dict(nnx.state(adapted))[path], base[path])


def test_gradients_reach_adapters_only():
    _, graphdef, base = base_of("llama")
    cfg = lora.LoraConfig(rank=4, alpha=16.0)
    adapters = lora.init_adapters(base, cfg, jax.random.key(0))
    toks = tokens(seed=4)
    weights = jax.random.normal(jax.random.key(5), (2, 7, 71))

    def loss(base_params, adapters):
        return jnp.mean(logits_of(graphdef, lora.merge(base_params, adapters, cfg), toks) * weights)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value, (g_base, g_ad) = value_and_grad(base, adapters)
    for leaf in jax.tree.leaves(g_base):
        np.testing.assert_array_equal(leaf, 0.0)
    for name, g in g_ad.items():  # B = 0: dL/dA = scale dL/dW B^T = 0, dL/dB = scale A^T dL/dW != 0
        np.testing.assert_array_equal(g["a"], 0.0)
        assert float(jnp.max(jnp.abs(g["b"]))) > 0, name
    nudged = jax.tree.map(lambda p, g: p - 1.0 * g, adapters, g_ad)
    nudged_value, (g_base, g_ad) = value_and_grad(base, nudged)
    for leaf in jax.tree.leaves(g_base):
        np.testing.assert_array_equal(leaf, 0.0)
    for name, g in g_ad.items():
        assert float(jnp.max(jnp.abs(g["a"]))) > 0 and float(jnp.max(jnp.abs(g["b"]))) > 0, name
    assert float(nudged_value) < float(value), "a gradient step did not lower the loss"


def test_subset_targets_and_jit():
    _, graphdef, base = base_of("llama")
    cfg = lora.LoraConfig(rank=2, alpha=2.0, targets=("wq", "mlp"))
    adapters = random_adapters(base, cfg)
    assert set(adapters) == {"wq", "w_gate", "w_up", "w_down"}
    every = lora.init_adapters(base, lora.LoraConfig(rank=2), jax.random.key(1))
    np.testing.assert_array_equal(adapters["wq"]["a"], every["wq"]["a"])  # A does not depend on the other targets
    merged = jax.jit(lora.merge, static_argnums=2)(base, adapters, cfg)
    eager = lora.merge(base, adapters, cfg)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(eager)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(merged["layers"]["wk"], base["layers"]["wk"])
    assert not np.allclose(merged["layers"]["wq"], base["layers"]["wq"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_merged_export_loads_in_transformers(preset, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, graphdef, base = base_of(preset)
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = random_adapters(base, cfg, seed=7)
    lora.export_merged(graphdef, base, adapters, cfg, tmp_path / "merged")
    toks = tokens(B=2, T=9, seed=8)
    ours = np.asarray(logits_of(*nnx.split(lora.merged_model(graphdef, base, adapters, cfg)), toks))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        ref = hf_model(input_ids=torch.as_tensor(np.array(toks), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    base_logits = np.asarray(logits_of(graphdef, base, toks))
    assert np.abs(ref - base_logits).max() > 0.1, "the export lost the adapters"


def test_logical_axes_place_adapters_on_a_mesh():
    _, _, base = base_of("llama")
    adapters = lora.init_adapters(base, lora.LoraConfig(rank=4), jax.random.key(0))
    axes = lora.adapter_logical_axes(adapters)
    assert axes["wq"]["a"] == jax.sharding.PartitionSpec("layers", "embed", None)
    assert axes["wq"]["b"] == jax.sharding.PartitionSpec("layers", None, "heads")
    assert axes["wo"]["a"] == jax.sharding.PartitionSpec("layers", "heads", None)
    assert axes["w_down"]["b"] == jax.sharding.PartitionSpec("layers", None, "embed")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    def place(spec, x):
        assert len(spec) == x.ndim
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, sharding.logical_to_mesh(tuple(spec), x.shape, mesh)))

    placed = jax.tree.map(place, axes, adapters)
    assert placed["wq"]["a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert placed["w_up"]["b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    with pytest.raises(ValueError, match="'w_bogus'"):
        lora.adapter_logical_axes({"w_bogus": {}})


@pytest.mark.parametrize("kw,match", [
    (dict(rank=0), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(rank=4, alpha=0.0), "alpha"),
    (dict(rank=4, targets=("attention", "embed")), "targets"),
    (dict(rank=4, targets=()), "targets"),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        lora.LoraConfig(**kw)


def test_bad_adapters_and_targets_are_named():
    _, _, base = base_of("gpt2")
    with pytest.raises(ValueError, match="w_gate"):
        lora.init_adapters(base, lora.LoraConfig(rank=2, targets=("w_gate",)), jax.random.key(0))
    cfg = lora.LoraConfig(rank=2)
    adapters = lora.init_adapters(base, cfg, jax.random.key(0))
    bad = {**adapters, "wq": {"a": adapters["wq"]["a"][:, :, :1], "b": adapters["wq"]["b"]}}
    with pytest.raises(ValueError, match="adapters\\['wq'\\]"):
        lora.merge(base, bad, cfg)
    with pytest.raises(ValueError, match="adapters\\['wk'\\]"):  # a rank other than cfg.rank
        lora.merge(base, {"wk": adapters["wk"]}, lora.LoraConfig(rank=3))
    with pytest.raises(ValueError, match="'w_gate'"):
        lora.merge(base, {"w_gate": adapters["w_up"]}, cfg)
    with pytest.raises(ValueError, match="layers"):
        lora.init_adapters({"embed": base["embed"]}, cfg, jax.random.key(0))
    assert lora.LoraConfig(rank=2, targets="mlp").targets == ("mlp",)
