"""models/layers.py: the pure layer math against independent references."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.models import transformer
from dpo_jax.models.layers import dense, masked_attention, rope_sin_cos


def lowered_dots(fn, *args, platform="cpu"):
    """Every dot_general of `fn`'s jitted StableHLO lowered for `platform`:
    [((lhs shape, lhs type), (rhs shape, rhs type), result type)], shapes as '8x32'."""
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    pattern = r"dot_general.*:\s*\(tensor<([\dx]*)x(\w+)>, tensor<([\dx]*)x(\w+)>\) -> tensor<[\dx]*x(\w+)>"
    return [((m[1], m[2]), (m[3], m[4]), m[5]) for m in re.finditer(pattern, text)]


def test_dense_without_the_float32_product_keeps_the_backward_in_the_input_dtype():
    """`dense(..., float32_product=False)`: the same values (float32 exactly; bfloat16 within its
    rounding), and lowered for GPU its backward's products take bfloat16 operands where the float32
    product makes them float32."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    w = jax.random.normal(jax.random.key(1), (8, 6))
    for f32 in (True, False):
        np.testing.assert_array_equal(dense(x, w, float32_product=f32), dense(x, w))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(dense(xb, wb, float32_product=False), np.float32),
                               np.asarray(dense(xb, wb), np.float32), rtol=1e-2, atol=1e-2)

    def types(f32):
        grad = jax.grad(lambda x, w: jnp.sum(dense(x, w, float32_product=f32).astype(jnp.float32) ** 2), (0, 1))
        return sorted({(lhs[1], rhs[1]) for lhs, rhs, _ in lowered_dots(grad, xb, wb, platform="cuda")})

    assert types(False) == [("bf16", "bf16")]
    assert ("f32", "f32") in types(True)


def test_off_the_cpu_a_bfloat16_decoders_projections_run_in_bfloat16(monkeypatch):
    """Lowered for GPU, every projection product of a bfloat16 decoder's gradient (forward, d x and
    d W of q, k, v, o, gate, up, down) takes bfloat16 operands; compiled for the CPU the forward's ask
    for the float32 product (`layers.dense`), which XLA:CPU computes anyway."""
    cfg = transformer.ModelConfig(vocab_size=40, hidden_size=24, intermediate_size=56, num_layers=2, num_heads=4,
                                  num_kv_heads=2, dtype="bfloat16")
    graphdef, state = nnx.split(transformer.Decoder(cfg, rngs=nnx.Rngs(0)))
    toks = jnp.zeros((2, 16), jnp.int32)

    def projections(backend, platform):
        monkeypatch.setattr(transformer, "backend", lambda: backend)
        grad = jax.grad(lambda state, toks: jnp.sum(nnx.merge(graphdef, state)(toks).astype(jnp.float32) ** 2))
        dims = {"24", "56", "12"}  # hidden, intermediate, the 2 KV heads x head dim 6
        return [(lhs[1], rhs[1], out) for lhs, rhs, out in lowered_dots(grad, state, toks, platform=platform)
                if len(lhs[0].split("x")) == 2 and set(lhs[0].split("x") + rhs[0].split("x")) & dims]

    gpu = projections("gpu", "cuda")
    assert len(gpu) == 2 * 7 * 3 and set(gpu) == {("bf16", "bf16", "bf16")}, gpu
    cpu = projections("cpu", "cpu")
    assert ("bf16", "bf16", "f32") in cpu and ("f32", "f32", "f32") in cpu


def test_masked_attention_equals_jax_dot_product_attention():
    """The decoder's attention (rewritten for CPU speed) against jax.nn.dot_product_attention: values
    and gradients, grouped KV heads, a fully masked row, float32 and bfloat16."""
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, shape) for kk, shape in zip(ks, [(2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8)]))
    mask = jax.random.bernoulli(ks[3], 0.6, (2, 1, 5, 7)).at[0, 0, 1].set(False)

    def loss(fn):
        return lambda q, k, v: jax.numpy.sum(jax.numpy.sin(fn(q, k, v)))

    ours = lambda q, k, v: masked_attention(q, k, v, mask, 0.3)  # noqa: E731
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
    for g, r in zip(jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    bf16 = [x.astype(jax.numpy.bfloat16) for x in (q, k, v)]
    out = ours(*bf16)
    assert out.dtype == jax.numpy.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref(q, k, v), atol=3e-2)


def test_dense_is_the_einsum_as_one_2d_matmul():
    from dpo_jax.models.layers import dense

    ks = jax.random.split(jax.random.key(1), 4)
    x, w = jax.random.normal(ks[0], (2, 3, 8)), jax.random.normal(ks[1], (8, 4, 5))
    np.testing.assert_allclose(dense(x, w), jax.numpy.einsum("btd,dhe->bthe", x, w), rtol=1e-5, atol=1e-5)
    o, wo = jax.random.normal(ks[2], (2, 3, 4, 5)), jax.random.normal(ks[3], (4, 5, 8))
    np.testing.assert_allclose(dense(o, wo, in_axes=2), jax.numpy.einsum("bthe,hed->btd", o, wo), rtol=1e-5,
                               atol=1e-5)


def test_rope_sin_cos_is_computed_once_per_forward_on_cpu(monkeypatch):
    """Materialized (on CPU), the compiled gradient of a 3-layer, 4-head decoder computes sin and cos
    once each (in each branch of the conditional); left to XLA:CPU's fusion they are recomputed in
    every fusion that uses them. The values are the same either way."""
    positions_BxT = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 7)), jnp.int32)
    inv_freq = np.asarray([1.0, 0.1, 0.01], np.float32)
    for a, b in zip(rope_sin_cos(positions_BxT, inv_freq, materialize=True),
                    rope_sin_cos(positions_BxT, inv_freq, materialize=False)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def sines(platform):
        monkeypatch.setattr(transformer, "backend", lambda: platform)
        cfg = transformer.ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                                      num_kv_heads=2)
        graphdef, state = nnx.split(transformer.Decoder(cfg, rngs=nnx.Rngs(0)))
        loss = lambda state, toks: jnp.sum(nnx.merge(graphdef, state)(toks) ** 2)  # noqa: E731
        hlo = jax.jit(jax.grad(loss)).lower(state, jnp.zeros((2, 16), jnp.int32)).compile().as_text()
        return hlo.count(" sine("), hlo.count(" cosine(")

    assert sines("cpu") == (2, 2)
    assert min(sines("gpu")) > 2  # what the conditional prevents
