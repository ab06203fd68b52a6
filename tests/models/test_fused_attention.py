"""Fused attention: the dispatch table, the cuDNN argument mapping (run through the same
`jax.nn.dot_product_attention` call with the XLA implementation) and the splash kernel in Pallas
interpret mode, each against the dense path (`layers.masked_attention` under `layers.attention_mask`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models import fused_attention as fa
from dpo_jax.models import layers

SCALE = 0.25

# The expected kernel of every (backend, layout) when not decoding, written out by hand.
EXPECTED = {
    ("cpu", "standard"): None, ("cpu", "packed"): None, ("cpu", "prefix"): None,
    ("gpu", "standard"): "cudnn", ("gpu", "packed"): None, ("gpu", "prefix"): None,
    ("cuda", "standard"): "cudnn", ("cuda", "packed"): None, ("cuda", "prefix"): None,
    ("rocm", "standard"): None, ("rocm", "packed"): None, ("rocm", "prefix"): None,
    ("tpu", "standard"): "splash", ("tpu", "packed"): "splash", ("tpu", "prefix"): None,
}


@pytest.mark.parametrize("decoding", [False, True])
@pytest.mark.parametrize("window", [None, 1, 64])
@pytest.mark.parametrize("backend,layout", sorted(EXPECTED))
def test_dispatch_table(backend, layout, window, decoding):
    want = None if decoding else EXPECTED[backend, layout]
    assert fa.select(backend, layout=layout, sliding_window=window, decoding=decoding) == want


def test_select_refuses_what_the_kernels_cannot_take():
    with pytest.raises(ValueError, match="layout must be one of"):
        fa.select("gpu", layout="paged", sliding_window=None, decoding=False)
    for window in (jnp.int32(8), True, 0):  # traced / not an int / empty window
        assert fa.select("tpu", layout="packed", sliding_window=window, decoding=False) is None
    assert fa.select("tpu", layout="packed", sliding_window=np.int64(8), decoding=False) == "splash"
    gpu = dict(layout="standard", sliding_window=None, decoding=False)
    assert fa.select("gpu", dtype=jnp.float32, **gpu) is None  # cuDNN: fp16 / bf16 only
    assert fa.select("gpu", dtype=jnp.bfloat16, head_dim=128, **gpu) == "cudnn"
    assert fa.select("gpu", dtype=jnp.float16, head_dim=256, **gpu) == "cudnn"
    assert fa.select("gpu", head_dim=12, **gpu) is None
    assert fa.select("gpu", head_dim=264, **gpu) is None
    assert fa.select("tpu", dtype=jnp.float32, head_dim=12, **gpu) == "splash"


# ----------------------------------------------------------------------------- batches of each layout


def _ids(rows, T):
    """rows: per row a list of (prompt length, [(branch, length), ...]) sequences, packed left to
    right; a sequence's branches follow its prompt, positions continuing from the prompt and
    restarting for each branch (the prefix layout); a single branch is the standard layout."""
    seg, pos, br = (np.zeros((len(rows), T), np.int32) for _ in range(3))
    for b, seqs in enumerate(rows):
        s = 0
        for n, (prompt, branches) in enumerate(seqs):
            seg[b, s:s + prompt], pos[b, s:s + prompt] = n + 1, np.arange(prompt)
            s += prompt
            for branch, length in branches:
                seg[b, s:s + length], br[b, s:s + length] = n + 1, branch
                pos[b, s:s + length] = prompt + np.arange(length)
                s += length
    return tuple(jnp.asarray(x) for x in (seg, pos, br))


T = 40
LAYOUTS = {
    "standard": _ids([[(7, [(1, 20)])], [(7, [(2, 11)])], [(4, [(2, 36)])]], T),  # right padding
    "packed": _ids([[(5, [(1, 6)]), (3, [(2, 12)]), (4, [(1, 4)])], [(9, [(1, 15)]), (2, [(1, 6)])],
                    [(3, [(2, 3)])]], T),
    "prefix": _ids([[(8, [(1, 9), (2, 12)])], [(5, [(1, 6), (2, 4)]), (3, [(1, 5), (2, 5)])],
                    [(2, [(1, 3), (2, 3)])]], T),
}


def _qkv(B, H, K, E, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=(B, T, n, E)), dtype) for n in (H, K, K))


def _dense(q, k, v, ids, window):
    return layers.masked_attention(q, k, v, layers.attention_mask(*ids, *ids, sliding_window=window), SCALE)


def _grads(fn, q, k, v):
    return jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2))(q, k, v)


def _max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def _assert_matches_dense(fused, layout, window, H, K):
    ids = LAYOUTS[layout]
    q, k, v = _qkv(ids[0].shape[0], H, K, 16)
    run = lambda q, k, v: fused(q, k, v, ids, ids, SCALE, sliding_window=window)  # noqa: E731
    dense = lambda q, k, v: _dense(q, k, v, ids, window)  # noqa: E731
    assert _max_err(run(q, k, v), dense(q, k, v)) < 1e-5
    for name, a, b in zip("qkv", _grads(run, q, k, v), _grads(dense, q, k, v)):
        assert _max_err(a, b) < 1e-5, f"d{name}"


def test_padding_rows_average_all_values():
    """The dense path's value for a row that sees nothing, which the fused paths reproduce."""
    ids = LAYOUTS["standard"]
    q, k, v = _qkv(3, 2, 2, 8)
    o = fa.cudnn_attention(q, k, v, ids, ids, SCALE, implementation="xla")
    pad = np.asarray(ids[0][0] == 0)
    np.testing.assert_allclose(o[0, pad], np.broadcast_to(v[0].mean(axis=0), o[0, pad].shape), atol=1e-6)


# ----------------------------------------------------------------------------- cuDNN mapping


def test_cudnn_arguments():
    ids = LAYOUTS["standard"]
    args = fa.cudnn_arguments(ids, ids, sliding_window=16)
    assert args["is_causal"] is True and args["local_window_size"] == (15, 0)
    np.testing.assert_array_equal(args["query_seq_lengths"], [27, 18, 40])
    np.testing.assert_array_equal(args["key_value_seq_lengths"], [27, 18, 40])
    assert args["query_seq_lengths"].dtype == jnp.int32
    assert fa.cudnn_arguments(ids, ids)["local_window_size"] is None


@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("H,K", [(4, 4), (4, 2)])
def test_cudnn_mapping_matches_dense(window, H, K, monkeypatch):
    """The default call asks for cuDNN; the same arguments under the XLA implementation give the
    dense path's values and gradients on the standard layout."""
    seen = []
    original = jax.nn.dot_product_attention

    def recording(*args, **kwargs):
        seen.append(kwargs["implementation"])
        return original(*args, **{**kwargs, "implementation": "xla"})

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    _assert_matches_dense(fa.cudnn_attention, "standard", window, H, K)
    assert seen and set(seen) == {"cudnn"}


def test_cudnn_rows_past_the_lengths_are_overwritten(monkeypatch):
    """Whatever the kernel writes on rows past query_seq_lengths, the output is the dense path's."""
    original = jax.nn.dot_product_attention

    def garbage_past_lengths(*args, **kwargs):
        o = original(*args, **{**kwargs, "implementation": "xla"})
        rows = jnp.arange(o.shape[1])[None, :] < kwargs["query_seq_lengths"][:, None]
        return jnp.where(rows[:, :, None, None], o, jnp.nan)

    monkeypatch.setattr(jax.nn, "dot_product_attention", garbage_past_lengths)
    ids = LAYOUTS["standard"]
    q, k, v = _qkv(3, 4, 2, 8)
    assert _max_err(fa.cudnn_attention(q, k, v, ids, ids, SCALE), _dense(q, k, v, ids, None)) < 1e-5


@pytest.mark.parametrize("layout", ["packed", "prefix"])
def test_cudnn_mapping_cannot_express(layout):
    """Why `select` refuses these layouts on GPU: lengths + causal give another mask."""
    ids = LAYOUTS[layout]
    q, k, v = _qkv(3, 2, 2, 8)
    o = fa.cudnn_attention(q, k, v, ids, ids, SCALE, implementation="xla")
    assert _max_err(o, _dense(q, k, v, ids, None)) > 0.1


# ----------------------------------------------------------------------------- splash, Pallas interpret mode


def _splash(*args, **kwargs):
    return fa.splash_attention(*args, interpret=True, **kwargs)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("H,K", [(4, 4), (4, 2)])
@pytest.mark.parametrize("layout", ["standard", "packed"])
def test_splash_matches_dense(layout, H, K, window):
    _assert_matches_dense(_splash, layout, window, H, K)


def test_splash_cannot_express_prefix():
    ids = LAYOUTS["prefix"]
    q, k, v = _qkv(3, 2, 2, 8)
    assert _max_err(_splash(q, k, v, ids, ids, SCALE), _dense(q, k, v, ids, None)) > 0.1


def test_splash_needs_self_attention():
    q, k, v = _qkv(1, 2, 2, 8)
    ids = LAYOUTS["standard"]
    with pytest.raises(ValueError, match="T == S"):
        _splash(q, k[:, :8], v[:, :8], ids, tuple(x[:, :8] for x in ids), SCALE)


def test_splash_kernel_first_built_under_jit_serves_later_traces():
    """The kernel cache is filled inside a trace here; a second, separate trace must reuse it."""
    fa._splash_kernel.cache_clear()
    ids = LAYOUTS["packed"]
    q, k, v = _qkv(3, 2, 1, 8, seed=3)
    run = lambda q, k, v: _splash(q, k, v, ids, ids, SCALE)  # noqa: E731
    first = jax.jit(run)(q, k, v)
    dq = jax.jit(jax.grad(lambda q: jnp.sum(run(q, k, v))))(q)
    assert _max_err(first, _dense(q, k, v, ids, None)) < 1e-5
    assert _max_err(dq, jax.grad(lambda q: jnp.sum(_dense(q, k, v, ids, None)))(q)) < 1e-5
