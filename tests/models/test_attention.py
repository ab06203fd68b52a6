"""models/attention.py: blockwise and tiled attention equal the dense path (`layers.masked_attention`
under `layers.attention_mask`) in values and gradients on every layout, with the head groupings,
windows and KV caches the model families use; the Decoder with attention='blockwise' or 'tiled'
equals attention='dense' end to end; blockwise memory grows linearly with the row length."""

import dataclasses
import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_jax.models import attention
from dpo_jax.models.attention import blockwise_attention, tile_masks, tiled_attention
from dpo_jax.models.layers import attention_bias, attention_mask, masked_attention
from dpo_jax.models.transformer import Decoder, ModelConfig, init_cache

from tests.models.test_transformer import tiny

TOL = dict(rtol=1e-5, atol=1e-5)


def _rows(*rows):
    """[(segment, position, branch) per token] per row -> the three [B, T] int32 id arrays, rows
    padded with segment 0 to the longest."""
    T = max(len(r) for r in rows)
    ids = np.zeros((3, len(rows), T), np.int32)
    for b, row in enumerate(rows):
        for t, tok in enumerate(row):
            ids[:, b, t] = tok
    return tuple(jnp.asarray(x) for x in ids)


def _standard(n, pad):
    return [(1, t, 0) for t in range(n)] + [(0, 0, 0)] * pad


def _prefix(n, a, b):
    """A prompt of n tokens shared by a chosen (branch 1) and a rejected (branch 2) completion."""
    return ([(1, t, 0) for t in range(n)] + [(1, n + t, 1) for t in range(a)]
            + [(1, n + t, 2) for t in range(b)])


def _packed(*lengths):
    return [(s + 1, t, 0) for s, n in enumerate(lengths) for t in range(n)]


LAYOUTS = {  # rows of 13 tokens; the standard layout has a fully padded row
    "standard": [_standard(13, 0), _standard(9, 4), _standard(0, 13)],
    "prefix": [_prefix(5, 4, 4), _prefix(3, 2, 5) + [(0, 0, 0)] * 3],
    "packed": [_packed(4, 6, 3), _packed(2, 2, 5) + [(0, 0, 0)] * 4],
    "packed_prefix": [[(1, t, 0) for t in range(3)] + [(1, 3, 1), (1, 4, 1), (1, 3, 2)]
                      + [(2, t, 0) for t in range(4)] + [(2, 4, 1), (2, 4, 2), (0, 0, 0)]],
}
ROWS = [row for rows in LAYOUTS.values() for row in rows]  # [8, 13]: every layout in one batch


def _qkv(B, T, S, H, K, E=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, E)), jax.random.normal(ks[1], (B, S, K, E)),
            jax.random.normal(ks[2], (B, S, K, E)))


@functools.partial(jax.jit, static_argnames=("block_q", "block_k"))
def _dense_and_blockwise(q, k, v, q_ids, k_ids, window, *, block_q, block_k):
    """(o, (dq, dk, dv)) of the dense path, the blockwise one and (keys of the queries' own rows
    only) the tiled one with tiles of `block_q`; the gradients are those of sum(sin(o) * w), w
    fixed. `window`: traced int32 (NO_WINDOW: none)."""
    w = jax.random.normal(jax.random.key(9), q.shape)
    mask = attention_mask(*q_ids, *k_ids, sliding_window=window)
    fns = {"dense": lambda q, k, v: masked_attention(q, k, v, mask, 0.35),
           "blockwise": lambda q, k, v: blockwise_attention(q, k, v, q_ids, k_ids, 0.35, sliding_window=window,
                                                            block_q=block_q, block_k=block_k)}
    if q.shape[1] == k.shape[1]:
        tiles = tile_masks(q_ids, k_ids, sliding_window=window, block=block_q)
        fns["tiled"] = lambda q, k, v: tiled_attention(q, k, v, tiles, 0.35)
    return {name: (fn(q, k, v), jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * w), argnums=(0, 1, 2))(q, k, v))
            for name, fn in fns.items()}


def _assert_same(out, what=""):
    """Every path of `_dense_and_blockwise` equals the dense one."""
    o_ref, grads_ref = out["dense"]
    for kind in set(out) - {"dense"}:
        o, grads = out[kind]
        np.testing.assert_allclose(o, o_ref, **TOL, err_msg=f"{kind} o {what}")
        for name, g, r in zip("qkv", grads, grads_ref):
            np.testing.assert_allclose(g, r, **TOL, err_msg=f"{kind} d{name} {what}")


@pytest.mark.parametrize("block", [4, 5, 13])
def test_blockwise_and_tiled_equal_dense_on_every_layout(block):
    """Standard rows with padding (a row of padding only: it averages all values), prefix-shared
    rows with branches, packed rows of several segments, with and without a sliding window;
    grouped heads (H = 4 over K = 2); blocks and tiles that do not divide T = 13, and one tile."""
    ids = _rows(*ROWS)
    q, k, v = _qkv(len(ROWS), 13, 13, H=4, K=2)
    for window in (attention.NO_WINDOW, 3, 1):
        out = _dense_and_blockwise(q, k, v, ids, ids, jnp.int32(window), block_q=block, block_k=5)
        assert set(out) == {"dense", "blockwise", "tiled"}
        for name, rows in LAYOUTS.items():
            first = ROWS.index(rows[0])
            sl = slice(first, first + len(rows))
            _assert_same(jax.tree.map(lambda x: x[sl], out), f"{name}, window {window}")


def test_tiled_attention_needs_the_keys_of_its_own_rows():
    ids = _rows(_standard(8, 4))
    with pytest.raises(ValueError, match="as many keys as queries"):
        tile_masks(tuple(x[:, 4:] for x in ids), ids)


def test_tiled_attention_skips_the_tiles_after_the_diagonal():
    """Tiles of 4 over 13 rows: query tile i computes scores over keys [0, 4 (i + 1)) only, so
    the scores of the tiled path cover (4 + 8 + 12 + 13) * 4 = 148 of the 169 query-key pairs."""
    ids = _rows(_standard(9, 4))
    tiles = tile_masks(ids, ids, block=4)
    assert [t.bias_Bx1xQxS.shape for t in tiles] == [(1, 1, 4, 4), (1, 1, 4, 8), (1, 1, 4, 12), (1, 1, 1, 13)]
    mask = np.asarray(attention_mask(*ids, *ids))
    for i, t in enumerate(tiles):  # the additive form of the rule's mask on the tile; padding rows see nothing
        rows, keys = slice(4 * i, 4 * i + 4), slice(0, 4 * i + 4)
        np.testing.assert_array_equal(np.asarray(t.bias_Bx1xQxS) == 0, mask[:, :, rows, keys])
        assert set(np.unique(t.bias_Bx1xQxS)) <= {0.0, np.finfo(np.float32).min}
        np.testing.assert_array_equal(t.seen_BxQ, mask[:, 0, rows].any(-1))
    assert not np.asarray(tiles[-1].seen_BxQ).any() and np.asarray(tiles[1].seen_BxQ).all()


def test_an_additive_bias_gives_the_masked_scores_exactly():
    """`layers.masked_attention` with `attention_bias(mask)` equals it with the bool mask bit for
    bit on rows that see some key."""
    ids = _rows(*ROWS)
    q, k, v = _qkv(len(ROWS), 13, 13, H=4, K=2, seed=4)
    mask = attention_mask(*ids, *ids)
    seen = np.asarray(mask[:, 0].any(-1))
    o_mask = np.asarray(masked_attention(q, k, v, mask, 0.35))
    o_bias = np.asarray(masked_attention(q, k, v, attention_bias(mask), 0.35))
    np.testing.assert_array_equal(o_bias[seen], o_mask[seen])
    assert not seen.all()  # the padded rows were there


def test_blockwise_over_a_kv_cache_with_one_kv_head():
    """Queries 5..7 over a 12-slot cache: 8 slots written (the last 3 now), 4 empty (segment 0);
    six query heads share one key/value head."""
    k_ids = _rows(_standard(8, 4), _prefix(3, 3, 2) + [(0, 0, 0)] * 4)
    q_ids = tuple(x[:, 5:8] for x in k_ids)
    q, k, v = _qkv(2, 3, 12, H=6, K=1, seed=3)
    for window in (attention.NO_WINDOW, 2):  # one query block (block_q > T), key blocks of 5
        _assert_same(_dense_and_blockwise(q, k, v, q_ids, k_ids, jnp.int32(window), block_q=8, block_k=5),
                     f"window {window}")


def test_bfloat16_inputs_accumulate_in_float32():
    ids = _rows(*LAYOUTS["prefix"])
    q, k, v = _qkv(2, 13, 13, H=4, K=2, seed=6)
    dense = masked_attention(q, k, v, attention_mask(*ids, *ids), 0.35)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    fn = lambda q, k, v: blockwise_attention(q, k, v, ids, ids, 0.35, block_q=4, block_k=4)  # noqa: E731
    out, grads = jax.jit(lambda *a: (fn(*a), jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)),
                                                      argnums=(0, 1, 2))(*a)))(*bf16)
    assert out.dtype == jnp.bfloat16 and [g.dtype for g in grads] == [jnp.bfloat16] * 3
    np.testing.assert_allclose(np.asarray(out, np.float32), dense, atol=3e-2)


def _largest_intermediate(fn, *args):
    """Elements of the largest array that fn's jaxpr (sub-jaxprs included) computes."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from walk(sub)
    return max(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_memory_is_linear_in_the_row_length():
    """Forward and backward, alone and inside a differentiated scan over layers (where JAX hoists
    loop invariants out of loops), hold nothing near the B H T^2 scores of the dense path."""
    B, T, H, K = 2, 64, 4, 2
    ids = _rows(_standard(T, 0), _prefix(30, 20, 14))
    q, k, v = _qkv(B, T, T, H=H, K=K)
    mask = attention_mask(*ids, *ids)
    attend = {"dense": lambda q, k, v: masked_attention(q, k, v, mask, 0.3),
              "blockwise": lambda q, k, v: blockwise_attention(q, k, v, ids, ids, 0.3, block_q=16, block_k=8)}

    def layers(fn):
        def loss(q, k, v):
            step = lambda c, w: (c + jnp.sum(jnp.sin(fn(q * w, k, v))), None)  # noqa: E731
            return jax.lax.scan(jax.checkpoint(step), 0.0, jnp.arange(1.0, 3.0))[0]
        return jax.grad(loss, argnums=(0, 1, 2))

    scores = B * H * T * T
    assert _largest_intermediate(layers(attend["dense"]), q, k, v) >= scores
    for fn in (jax.grad(lambda *a: jnp.sum(attend["blockwise"](*a)), argnums=(0, 1, 2)), layers(attend["blockwise"])):
        assert _largest_intermediate(fn, q, k, v) <= 2 * q.size < scores / 2  # two layers' q at most


def test_resolve_auto_by_row_length(monkeypatch):
    monkeypatch.setattr(attention, "AUTO_MIN_LENGTH", {"default": 128})
    monkeypatch.setattr(attention, "TILED_MAX_LENGTH", {"default": 1024})
    assert [attention.resolve("auto", n) for n in (127, 128, 1024, 1025)] == ["dense", "tiled", "tiled", "blockwise"]
    assert attention.resolve("fused", 200) == "tiled"  # where no fused kernel applies
    monkeypatch.setattr(attention, "TILED_MAX_LENGTH", {"default": 0})  # accelerators: never tiled
    assert [attention.resolve("auto", n) for n in (127, 128)] == ["dense", "blockwise"]
    assert attention.resolve("dense", 10_000) == "dense" and attention.resolve("blockwise", 1) == "blockwise"
    assert attention.resolve("tiled", 10_000) == "tiled"
    with pytest.raises(ValueError, match="attention"):
        attention.resolve("flash", 8)
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="flash")


# ----------------------------------------------------------------------------- the decoder, end to end


def _batch():
    """[2, 16]: a prefix-shared row with padding and a packed row of three segments."""
    seg, pos, br = _rows(_prefix(6, 4, 3) + [(0, 0, 0)] * 3, _packed(5, 7, 4))
    toks = jnp.asarray(np.random.default_rng(0).integers(3, 97, seg.shape), jnp.int32) * (seg > 0)
    return toks, pos, seg, br


def _forward_and_grads(cfg):
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    toks, pos, seg, br = _batch()
    w = jax.random.normal(jax.random.key(1), (*toks.shape, cfg.hidden_size))

    @nnx.jit
    def run(model):
        def loss(model):
            h = model(toks, positions_BxT=pos, segment_ids_BxT=seg, branch_ids_BxT=br)
            return jnp.sum(jnp.tanh(h) * w), h
        (_, h), g = nnx.value_and_grad(loss, has_aux=True)(model)
        return h, nnx.to_pure_dict(g)

    return run(model)


def _assert_close_tree(tree, ref):
    """Every leaf to 1e-5 relative to its largest entry: elementwise, float32 rounding alone moves
    summed gradients such as the embedding's by about 1e-5 of their scale (the dense path against
    jax.nn.dot_product_attention differs as much as the blockwise one does)."""
    def close(path, a, b):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.max(np.abs(b)))),
                                   err_msg=jax.tree_util.keystr(path))
    jax.tree.map_with_path(close, tree, ref)


@pytest.mark.parametrize("preset, kw", [
    ("llama", {}),  # grouped heads, RoPE, the layer stack scanned
    ("qwen3", {}),  # the window on the second layer only (traced under the scan), q/k norms
    ("gpt2", {}),  # one KV head per query head, learned positions
    ("mistral", dict(scan_min_layers=9, remat="full")),  # the window on every layer, unrolled, rematerialized
], ids=["llama", "qwen3", "gpt2", "mistral_unrolled_remat"])
def test_decoder_blockwise_and_tiled_equal_dense(preset, kw, monkeypatch):
    """Hidden states and every parameter gradient; blocks and tiles of 4 over rows of 16. (qwen2
    and gpt_neox call attention as llama and gpt2 do.)"""
    monkeypatch.setattr(attention, "BLOCK", {"default": 4})
    cfg = tiny(preset, attention="dense", init_std=0.05, **kw)
    h_dense, g_dense = _forward_and_grads(cfg)
    for kind in ("blockwise", "tiled"):
        h, g = _forward_and_grads(dataclasses.replace(cfg, attention=kind))
        np.testing.assert_allclose(h, h_dense, **TOL, err_msg=kind)
        _assert_close_tree(g, g_dense)


def test_attention_block_sets_the_blocks_and_the_tiles():
    """ModelConfig.attention_block (config.model.attention_block) replaces the platform's BLOCK: over
    rows of 16, blockwise and tiled with blocks of 4 and 8 equal dense, and tiled runs T / block
    tiles, one exp each (the scanned layer's body is traced once); 0 keeps BLOCK; < 0 is refused."""
    cfg = tiny("llama", attention="dense", init_std=0.05)
    h_dense, g_dense = _forward_and_grads(cfg)
    toks, pos, seg, br = _batch()

    def exps(cfg):
        model = Decoder(cfg, rngs=nnx.Rngs(0))
        fwd = lambda model: model(toks, positions_BxT=pos, segment_ids_BxT=seg, branch_ids_BxT=br)  # noqa: E731
        return str(jax.make_jaxpr(lambda s: fwd(nnx.merge(nnx.graphdef(model), s)))(nnx.state(model))).count(" exp ")

    for block in (4, 8):
        for kind in ("blockwise", "tiled"):
            h, g = _forward_and_grads(dataclasses.replace(cfg, attention=kind, attention_block=block))
            np.testing.assert_allclose(h, h_dense, **TOL, err_msg=f"{kind} {block}")
            _assert_close_tree(g, g_dense)
        assert exps(dataclasses.replace(cfg, attention="tiled", attention_block=block)) == toks.shape[1] // block
    assert exps(dataclasses.replace(cfg, attention="tiled")) == 1  # BLOCK 64 on the CPU: one tile of 16
    with pytest.raises(ValueError, match="attention_block"):
        dataclasses.replace(cfg, attention_block=-1)


def test_decoder_auto_and_kv_cache(monkeypatch):
    """attention='auto' at a row of AUTO_MIN_LENGTH runs blockwise; prefilling 6 tokens into a
    10-slot KV cache (4 slots empty) gives the dense decoder's hidden states and cache."""
    monkeypatch.setattr(attention, "BLOCK", {"default": 4})
    monkeypatch.setattr(attention, "AUTO_MIN_LENGTH", {"default": 6})
    toks = jnp.asarray(np.random.default_rng(1).integers(3, 97, (2, 6)), jnp.int32)
    prefill = nnx.jit(lambda model, toks, cache: model(toks, cache=cache, cache_index=0))
    outs = {}
    for kind in ("dense", "auto"):
        model = Decoder(tiny("mistral", attention=kind, init_std=0.05), rngs=nnx.Rngs(0))
        outs[kind] = prefill(model, toks, init_cache(model.cfg, 2, 10))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), outs["auto"], outs["dense"])


def _decoder_grad_temp_bytes(T, kind, remat, num_layers=2):
    """XLA's temp memory for the gradient of an unrolled decoder (width 64) on one row of T tokens."""
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_layers=num_layers, num_heads=4,
                      num_kv_heads=2, remat=remat, attention=kind, max_position_embeddings=T)
    assert not cfg.scanned
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    loss = lambda state, toks: jnp.sum(nnx.merge(graphdef, state)(toks) ** 2)  # noqa: E731
    compiled = jax.jit(jax.grad(loss)).lower(state, jax.ShapeDtypeStruct((1, T), jnp.int32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_memory_of_an_unrolled_rematerialized_decoder():
    """XLA's own memory figure for a 2-layer decoder's gradient (unrolled, remat='full'): from T = 256
    to 1024 blockwise temp memory grows about linearly, dense about quadratically; rematerializing
    the unrolled layers saves memory (`transformer._remat`)."""
    temp_bytes = _decoder_grad_temp_bytes

    blockwise = temp_bytes(1024, "blockwise", "full")
    assert blockwise < 4.4 * temp_bytes(256, "blockwise", "full")
    assert temp_bytes(1024, "dense", "full") > 4 * blockwise
    assert temp_bytes(1024, "blockwise", "none") > 1.3 * blockwise


def test_an_unrolled_stack_fills_each_layers_attention_accumulators_in_its_turn():
    """Each extra rematerialized layer adds about its saved input (a float32 [T, D] row) to the
    gradient's temp memory, not its blockwise loops' float32 accumulators as well: those are filled
    when the layer's q (forward) or cotangent (backward) exists (`attention._zeros_after`), where
    constant fills were all scheduled at once, early (1.9 MB per layer here, 0.3 MB now)."""
    T, row_bytes = 2048, 2048 * 64 * 4
    per_layer = (_decoder_grad_temp_bytes(T, "blockwise", "full", num_layers=8)
                 - _decoder_grad_temp_bytes(T, "blockwise", "full", num_layers=2)) / 6
    assert per_layer < 2 * row_bytes, per_layer
