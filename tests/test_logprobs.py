"""Tests of dpo_jax/logprobs.py: chunked vs naive log-probs, the per-pair reduction, logit slots."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.logprobs import (
    SequenceLogps,
    completion_logps,
    naive_token_logps,
    positions_per_tile,
    sequence_logps,
    token_logps,
)


def _inputs(seed, lead, d, v, dtype=jnp.float32):
    """numpy-random inputs (jax.random would compile a sampler per shape: seconds on 2 cores)."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(*lead, d)), dtype)
    unembed = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d) * 3, dtype)
    bias = jnp.asarray(rng.normal(size=(v,)), dtype)
    targets = jnp.asarray(rng.integers(0, v, lead), jnp.int32)
    weights = jnp.asarray(rng.normal(size=lead), jnp.float32)  # cotangent of the log-probs
    return hidden, unembed, bias, targets, weights


def _value_and_grads(fn, hidden, unembed, bias, targets, weights, **sizes):
    """Log-probs and the gradients of sum(logps * weights), one jit (eager dispatch is slow)."""

    def loss(h, w, b):
        logps = fn(h, w, targets, bias_V=b, **sizes)
        return jnp.sum(logps * weights), logps

    (_, logps), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        hidden, unembed, bias
    )
    return logps, grads


# (leading shape, D, V, chunk_size, vocab_chunk_size): chunks that do not divide N or V, one
# chunk, one-row chunks, more positions than vocabulary and the reverse.
SHAPES = [
    ((7,), 8, 37, 3, 10),
    ((7,), 8, 37, 1, 37),
    ((2, 5), 16, 33, 4, 8),
    ((3, 6), 12, 50, 100, 1000),
    ((64,), 8, 11, 10, 4),
    ((5,), 4, 300, 2, 64),
    ((40,), 8, 16, 4, 64),  # V < vocab_chunk_size: 16 positions per tile, three chunks of 14
]


@pytest.mark.parametrize("lead,d,v,chunk,vchunk", SHAPES)
def test_chunked_equals_naive_values_and_grads(lead, d, v, chunk, vchunk):
    args = _inputs(0, lead, d, v)
    sizes = dict(chunk_size=chunk, vocab_chunk_size=vchunk)
    logps, grads = _value_and_grads(token_logps, *args, **sizes)
    ref_logps, ref_grads = _value_and_grads(naive_token_logps, *args)
    assert logps.shape == lead and logps.dtype == jnp.float32
    np.testing.assert_allclose(logps, ref_logps, rtol=1e-5, atol=1e-5)
    for name, g, ref in zip(("hidden", "unembed", "bias"), grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5, err_msg=f"d/d{name}")


def test_chunked_without_bias_and_under_jit():
    hidden, unembed, _, targets, weights = _inputs(1, (9,), 8, 21)

    def loss(fn, h, w):
        return jnp.sum(fn(h, w, targets, chunk_size=4, vocab_chunk_size=5) * weights)

    got = jax.jit(jax.value_and_grad(lambda h, w: loss(token_logps, h, w), argnums=(0, 1)))(
        hidden, unembed
    )
    ref = jax.value_and_grad(lambda h, w: loss(naive_token_logps, h, w), argnums=(0, 1))(
        hidden, unembed
    )
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs():
    h32, w32, b32, targets, weights = _inputs(2, (3, 7), 16, 45)
    h16, w16, b16 = (x.astype(jnp.bfloat16) for x in (h32, w32, b32))
    sizes = dict(chunk_size=5, vocab_chunk_size=16)
    logps, grads = _value_and_grads(token_logps, h16, w16, b16, targets, weights, **sizes)
    assert logps.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    # Same bf16 inputs, naive path: the forward math is float32 on exact bf16 products.
    ref16_logps, _ = _value_and_grads(naive_token_logps, h16, w16, b16, targets, weights)
    np.testing.assert_allclose(logps, ref16_logps, rtol=1e-4, atol=1e-4)
    # Gradients against float32 math on the upcast inputs: bf16 rounding of dlogits and outputs.
    up = [x.astype(jnp.float32) for x in (h16, w16, b16)]
    _, ref_grads = _value_and_grads(naive_token_logps, *up, targets, weights)
    for name, g, ref in zip(("hidden", "unembed", "bias"), grads, ref_grads):
        scale = float(jnp.max(jnp.abs(ref)))
        np.testing.assert_allclose(
            np.asarray(g, np.float32), ref, rtol=0, atol=2e-2 * scale, err_msg=f"d/d{name}"
        )


def test_out_of_range_target_is_nan():
    hidden, unembed, _, _, _ = _inputs(3, (3,), 4, 10)
    logps = token_logps(hidden, unembed, jnp.array([0, 10, 9]), vocab_chunk_size=4)
    assert np.isfinite(logps[0]) and np.isnan(logps[1]) and np.isfinite(logps[2])


def test_logits_never_materialized():
    """The compiled value-and-grad keeps far less than one float32 [N, V] array of temporaries."""
    n, d, v = 512, 32, 8192
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def temp_bytes(fn):
        def f(h, w, t):
            return jax.value_and_grad(lambda h, w: jnp.sum(fn(h, w, t)), argnums=(0, 1))(h, w)

        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = n * v * 4
    assert temp_bytes(naive_token_logps) >= logits_bytes  # the measure does see [N, V]
    chunked = temp_bytes(
        lambda h, w, t: token_logps(h, w, t, chunk_size=64, vocab_chunk_size=1024)
    )
    assert chunked < logits_bytes / 8, (chunked, logits_bytes)


def test_compiles_once_for_a_fixed_shape():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss_and_grads(hidden, unembed, targets):
        return jax.value_and_grad(
            lambda h, w: jnp.sum(token_logps(h, w, targets, chunk_size=4, vocab_chunk_size=8)),
            argnums=(0, 1),
        )(hidden, unembed)

    for seed in range(3):
        hidden, unembed, _, targets, _ = _inputs(seed, (2, 5), 8, 20)
        loss_and_grads(hidden, unembed, targets)
    hidden, unembed, _, targets, _ = _inputs(0, (2, 6), 8, 20)
    with pytest.raises(AssertionError):  # the guard is live: a new shape retraces
        loss_and_grads(hidden, unembed, targets)


@pytest.mark.parametrize("chunk,vchunk,v,rows", [
    (1024, 8192, 32000, 1024),  # a full vocabulary tile: chunk_size positions
    (1024, 8192, 8192, 1024),
    (1024, 8192, 4096, 2048),  # half as wide: twice the positions
    (1024, 8192, 3000, 2796),
    (3, 10, 37, 3),
])
def test_a_tile_holds_at_most_chunk_size_times_vocab_chunk_size_logits(chunk, vchunk, v, rows):
    assert positions_per_tile(chunk, vchunk, v) == rows
    assert rows * min(v, vchunk) <= chunk * vchunk < (rows + 1) * min(v, vchunk)


def test_a_narrow_vocabulary_keeps_more_positions_in_one_tile():
    """N = 1280 positions of a 4096-entry vocabulary fit one tile of the default sizes (1024 x 8192
    logits): no scan over position chunks, and the softmax is kept for the backward; N = 2049 does not."""
    def jaxpr(n):
        h, w, t = jnp.zeros((n, 8)), jnp.zeros((8, 4096)), jnp.zeros((n,), jnp.int32)
        return str(jax.make_jaxpr(jax.grad(lambda h: jnp.sum(token_logps(h, w, t))))(h))

    assert "scan" not in jaxpr(1280)
    assert "scan" in jaxpr(2049)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(unembed=jnp.zeros((4,))), "unembed_DxV"),
        (dict(unembed=jnp.zeros((5, 10))), "hidden"),
        (dict(targets=jnp.zeros((4,), jnp.int32)), "targets"),
        (dict(targets=jnp.zeros((3,), jnp.float32)), "targets"),
        (dict(bias_V=jnp.zeros((9,))), "bias_V"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(vocab_chunk_size=1.5), "vocab_chunk_size"),
    ],
)
def test_token_logps_rejects_bad_input(kwargs, match):
    args = dict(hidden=jnp.zeros((3, 4)), unembed=jnp.zeros((4, 10)), targets=jnp.zeros((3,), int))
    args.update(kwargs)
    hidden, unembed, targets = args.pop("hidden"), args.pop("unembed"), args.pop("targets")
    with pytest.raises(ValueError, match=match):
        token_logps(hidden, unembed, targets, **args)


# ----------------------------------------------------------------------------------------------
# The batch: row 0 packs two prefix-shared pairs, rows 1-2 hold pair 2 in the standard layout,
# row 3 one prefix-shared pair with equal lengths; pair 4 only fills the batch.
# Segments: ("prompt", n) or (pair, branch, n); the rest of the row is padding.

T, P = 16, 5
ROWS = [
    [("prompt", 2), (0, 1, 3), (0, 2, 2), ("prompt", 2), (1, 1, 2), (1, 2, 4)],
    [("prompt", 3), (2, 1, 5)],
    [("prompt", 3), (2, 2, 6)],
    [("prompt", 4), (3, 1, 4), (3, 2, 4)],
]


def _layout(rows, t, seed=0):
    rng = np.random.default_rng(seed)
    b = len(rows)
    mask = np.zeros((b, t), np.float32)
    branch = np.zeros((b, t), np.int32)
    pair = rng.integers(0, P, (b, t)).astype(np.int32)  # junk where the mask is 0
    for r, segments in enumerate(rows):
        col = 0
        for seg in segments:
            n = seg[-1]
            if seg[0] != "prompt":
                mask[r, col : col + n] = 1
                pair[r, col : col + n] = seg[0]
                branch[r, col : col + n] = seg[1]
            col += n
        assert col <= t
    return mask, pair, branch


def _loop_reference(logps, mask, pair, branch, num_pairs):
    """Plain Python: walk the batch in row-major order, collect each (pair, branch) sequence."""
    seqs = {(p, br): [] for p in range(num_pairs) for br in (1, 2)}
    for r in range(mask.shape[0]):
        for c in range(mask.shape[1]):
            if mask[r, c] > 0 and branch[r, c] in (1, 2):
                seqs[(int(pair[r, c]), int(branch[r, c]))].append(float(logps[r, c]))
    out = {k: np.zeros(num_pairs) for k in SequenceLogps._fields}
    for p in range(num_pairs):
        ch, rj = seqs[(p, 1)], seqs[(p, 2)]
        shared = min(len(ch), len(rj))
        out["chosen"][p], out["rejected"][p] = sum(ch), sum(rj)
        out["chosen_len"][p], out["rejected_len"][p] = len(ch), len(rj)
        out["chosen_shared"][p], out["rejected_shared"][p] = sum(ch[:shared]), sum(rj[:shared])
    return out


def _assert_seq_close(got, want, **tol):
    for name in SequenceLogps._fields:
        np.testing.assert_allclose(getattr(got, name), want[name], err_msg=name, **tol)


def test_sequence_logps_matches_python_loop():
    mask, pair, branch = _layout(ROWS, T)
    logps = -np.random.default_rng(0).exponential(size=mask.shape).astype(np.float32)
    logps_with_junk = np.where(mask > 0, logps, np.nan)  # unmasked values must not leak
    got = jax.jit(sequence_logps, static_argnums=4)(logps_with_junk, mask, pair, branch, P)
    want = _loop_reference(logps, mask, pair, branch, P)
    _assert_seq_close(got, want, rtol=1e-6, atol=1e-6)
    assert want["chosen_len"][4] == 0 and got.chosen[4] == 0  # the filler pair
    assert list(want["chosen_len"][:4]) == [3, 2, 5, 4]  # the layout is what it says


def test_ld_shared_sums_by_hand():
    # Row 0: pair 0 prefix-shared, chosen logps -1 -2 -3, rejected -4 -5.
    # Rows 1/2: pair 1 standard, chosen -0.5 -0.25, rejected -1 -1 -8.
    logps = np.array(
        [
            [0, -1, -2, -3, -4, -5],
            [0, 0, -0.5, -0.25, 0, 0],
            [0, 0, -1, -1, -8, 0],
        ],
        np.float32,
    )
    mask = np.array([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]], np.float32)
    branch = np.array([[0, 1, 1, 1, 2, 2], [0, 0, 1, 1, 0, 0], [0, 0, 2, 2, 2, 0]], np.int32)
    pair = np.array([[0] * 6, [1] * 6, [1] * 6], np.int32)
    got = sequence_logps(logps, mask, pair, branch, 2)
    np.testing.assert_allclose(got.chosen, [-6, -0.75])
    np.testing.assert_allclose(got.rejected, [-9, -10])
    np.testing.assert_allclose(got.chosen_len, [3, 2])
    np.testing.assert_allclose(got.rejected_len, [2, 3])
    np.testing.assert_allclose(got.chosen_shared, [-3, -0.75])
    np.testing.assert_allclose(got.rejected_shared, [-9, -2])
    alpha = 0.5  # LD-DPO: shared + alpha * (full - shared)
    ld_chosen = got.chosen_shared + alpha * (got.chosen - got.chosen_shared)
    np.testing.assert_allclose(ld_chosen, [-4.5, -0.75])


BATCH_FIELDS = ("loss_mask_BxT", "pair_ids_BxT", "branch_ids_BxT")


def _batch(seed, d, v):
    mask, pair, branch = _layout(ROWS, T, seed)
    hidden, unembed, _, targets, _ = _inputs(seed, mask.shape, d, v)
    batch = {
        "targets_BxT": targets,
        "loss_mask_BxT": jnp.asarray(mask),
        "pair_ids_BxT": jnp.asarray(pair),
        "branch_ids_BxT": jnp.asarray(branch),
    }
    return hidden, unembed, batch


def test_completion_logps_full_path_matches_loop():
    hidden, unembed, batch = _batch(1, 8, 30)
    got = jax.jit(
        lambda h, w, b: completion_logps(h, w, b, P, chunk_size=7, vocab_chunk_size=8)
    )(hidden, unembed, batch)
    logps = jax.jit(naive_token_logps)(hidden, unembed, batch["targets_BxT"])
    want = _loop_reference(
        np.asarray(logps), *(np.asarray(batch[k]) for k in BATCH_FIELDS), P
    )
    _assert_seq_close(got, want, rtol=1e-5, atol=1e-5)


def test_logit_slots_path_equals_full_path():
    """Per-row slots from the host (`layouts.logit_slots`): same sums (LD-DPO's shared ones too) and
    gradients as logits at every position; -1 slots count nowhere."""
    from dpo_jax.data import layouts  # pylint: disable=g-import-not-at-top

    hidden, unembed, batch = _batch(3, 8, 30)

    def run(h, w, b):
        seq = completion_logps(h, w, b, P, chunk_size=8, vocab_chunk_size=16)
        return jnp.sum(seq.chosen_shared - 0.5 * seq.rejected + 0.1 * seq.chosen), seq

    grad_fn = jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True))
    (_, full), full_grads = grad_fn(hidden, unembed, batch)
    mask = np.asarray(batch["loss_mask_BxT"])
    assert np.array_equal(layouts.logit_slots(mask), [np.r_[np.nonzero(r)[0], [-1] * (T - int(r.sum()))] for r in mask])
    slots = np.full((len(mask), 12), -1, np.int32)  # C = 12 < T = 16: the fullest row has 11
    for b, row in enumerate(mask):
        (where,) = np.nonzero(row)
        slots[b, :len(where)] = where
    (_, sl), slot_grads = grad_fn(hidden, unembed, {**batch, "logit_slots_BxC": jnp.asarray(slots)})
    for name in SequenceLogps._fields:
        np.testing.assert_allclose(getattr(sl, name), getattr(full, name), rtol=1e-5, atol=1e-5, err_msg=name)
    for g, r in zip(slot_grads, full_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    # A slot pointing at a masked position that is NOT listed drops that token: the path really reads the slots.
    fewer = slots.copy()
    fewer[0, 0] = -1
    (_, dropped), _ = grad_fn(hidden, unembed, {**batch, "logit_slots_BxC": jnp.asarray(fewer)})
    assert not np.allclose(np.asarray(dropped.chosen_len) + np.asarray(dropped.rejected_len),
                           np.asarray(full.chosen_len) + np.asarray(full.rejected_len))


def test_batch_validation_names_the_key():
    hidden, unembed, batch = _batch(0, 8, 30)
    missing = {k: v for k, v in batch.items() if k != "pair_ids_BxT"}
    with pytest.raises(ValueError, match="pair_ids_BxT"):
        completion_logps(hidden, unembed, missing, P)
    wrong = dict(batch, branch_ids_BxT=batch["branch_ids_BxT"][:, :-1])
    with pytest.raises(ValueError, match="branch_ids_BxT"):
        completion_logps(hidden, unembed, wrong, P)
    with pytest.raises(ValueError, match="loss_mask_BxT"):
        z = jnp.zeros((2, 3))
        sequence_logps(z, jnp.zeros((2, 4)), z, z, 1)
