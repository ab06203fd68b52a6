"""Blockwise (flash-style) and tiled attention: the math of `layers.masked_attention` with less of the
[T, S] scores: blockwise holds none of them at once, tiled computes only the tiles up to the diagonal.

Queries are cut into blocks of `block_q` rows and keys / values into blocks of `block_k` columns.
For each query block the key blocks are visited in turn with an online softmax: with running max
m, normalizer l and unnormalized output acc per query row,

    s_ij = q_i . k_j (q pre-scaled)        over the block, -inf where the rule hides j from i
    m'   = max(m, max_j s_ij)
    l'   = exp(m - m') l + sum_j exp(s_ij - m')
    acc' = exp(m - m') acc + sum_j exp(s_ij - m') v_j

and at the end o_i = acc_i / l_i, lse_i = m_i + log l_i. The mask of each (query block, key
block) is built on the fly from the positions, segment and branch ids of both sides by the rule of
docs/design.md (`layers.attention_mask`, the dense path's rule: the same function), so the
standard, prefix-shared and packed layouts, sliding windows and the KV cache all work unchanged.
A block pair that the rule hides entirely is skipped (`lax.cond`): causal rows do about half the
work of the dense path. The loops over blocks are `lax.while_loop`s (see `_loop`).

The backward (`jax.custom_vjp`) recomputes each block's scores from the saved (o, lse):

    p_ij = exp(s_ij - lse_i),  D_i = do_i . o_i,  ds_ij = p_ij (do_i . v_j - D_i)
    dq_i = sum_j ds_ij k_j,    dk_j = sum_i ds_ij q_i,   dv_j = sum_i p_ij do_i

so a layer holds O(T * block) scores at a time, never O(T * S). Grouped-query attention keeps the
K key/value heads as they are (queries laid out [B, K, G, T, E], H = K G): K/V are never
repeated. Scores, softmax statistics and every accumulator are float32 whatever the input dtype;
the matmul operands keep the input dtype (bf16 operands, f32 accumulation).

A query row that sees no key (padding, segment 0) gets the mean of all S values, as the dense
path's softmax over uniformly masked scores gives (never NaN); such rows send no gradient to q or k.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpo_jax.models.layers import attention_bias, attention_mask, masked_attention

# ModelConfig.attention / config.model.attention. 'fused': the accelerator's kernel where the layout
# allows (models/attend.py), else as 'auto'.
ATTENTIONS = ("dense", "blockwise", "tiled", "auto", "fused")
# The default query and key block (and query tile), the row length from which 'auto' leaves dense
# attention, and the longest row it runs tiled (longer: blockwise, memory linear in the row length),
# by platform (`jax.default_backend()`; others as "default"). Measured on the 2-core CPU train step
# (docs/performance.md, alternating rounds in one process): tiles of 64 rows beat dense from T = 128
# (1.02x there, 1.04x at T = 320, 1.37x at T = 1024) and blockwise up to T = 1024 (1.18x at T = 320,
# 1.17x at T = 1024); tiles of 32 or 160 were slower at T = 320, 107 the same. Blockwise beyond
# T = 1024 keeps the long-row step's memory linear (a tiled layer keeps about half the dense
# path's [T, T] probabilities for its backward). On accelerators a block pair's matmuls should stay
# large: 256, dense below 512 and never tiled (not measured; the fused kernels are the fast path).
BLOCK = {"cpu": 64, "default": 256}
AUTO_MIN_LENGTH = {"cpu": 128, "default": 512}
TILED_MAX_LENGTH = {"cpu": 1024, "default": 0}
NO_WINDOW = jnp.iinfo(jnp.int32).max  # a sliding window that hides nothing


def for_platform(table: dict) -> int:
    """This platform's entry of BLOCK, AUTO_MIN_LENGTH or TILED_MAX_LENGTH."""
    return table.get(jax.default_backend(), table["default"])


def resolve(kind: str, length: int) -> str:
    """'dense', 'tiled' or 'blockwise' for `kind` in ATTENTIONS at `length` query rows. 'auto', and
    'fused' where no fused kernel applies: dense below this platform's AUTO_MIN_LENGTH, tiled up to
    its TILED_MAX_LENGTH, blockwise beyond (memory linear in the row length)."""
    if kind not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}; got {kind!r}")
    if kind in ("auto", "fused"):
        if length < for_platform(AUTO_MIN_LENGTH):
            return "dense"
        return "tiled" if length <= for_platform(TILED_MAX_LENGTH) else "blockwise"
    return kind


def _blocks(x_BxTx_, n: int, size: int, fill=0):
    """[B, T, ...] -> [n, B, size, ...], T padded with `fill` up to n * size."""
    B, T = x_BxTx_.shape[:2]
    pad = [(0, 0), (0, n * size - T)] + [(0, 0)] * (x_BxTx_.ndim - 2)
    x = jnp.pad(x_BxTx_, pad, constant_values=fill)
    return jnp.moveaxis(x.reshape(B, n, size, *x_BxTx_.shape[2:]), 1, 0)


def _visible(q_ids, k_ids, window):
    """Bx(bq)x(bk) bool: the rule of `layers.attention_mask` on one block pair."""
    return attention_mask(*q_ids, *k_ids, sliding_window=window)[:, 0]


def _scores(q_BxKxGxQxE, k_BxKxCxE):
    return jnp.einsum("bkgqe,bkce->bkgqc", q_BxKxGxQxE, k_BxKxCxE, preferred_element_type=jnp.float32)


def _loop(n: int, body, init):
    """carry = body(i, carry) for i = 0 .. n-1, as a `lax.while_loop`. Not a scan: under a
    differentiated layer scan, JAX hoists the loop-invariant part of a scan body out of the loop
    (here the block masks, which depend only on the ids) and stacks it over the iterations, which
    would rebuild [T, S] buffers; a while loop is one opaque unit to that transformation."""
    return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, body(c[0], c[1])), (jnp.int32(0), init))[1]


def _zeros_after(shape, x):
    """float32 zeros of `shape` (a loop's accumulator) that depend on x's first entry (0 * isfinite,
    exactly 0): XLA cannot fill the buffer before x exists. A constant's fill has no inputs, and in
    an unrolled layer stack XLA:CPU filled every layer's accumulators at once, early (23 float32
    [T, H, E] buffers live at the peak of the long-row step of docs/performance.md)."""
    return jnp.zeros(shape, jnp.float32) + 0.0 * jnp.isfinite(x.reshape(-1)[0]).astype(jnp.float32)


def _at(i, *xs):
    """The i-th block of each [N, ...] array (a dynamic index)."""
    return tuple(jax.lax.dynamic_index_in_dim(x, i, keepdims=False) for x in xs)


def _flash_forward(q_NqxBxKxGxQxE, k_NkxBxKxCxE, v_NkxBxKxCxE, q_ids, k_ids, window):
    """Online softmax over the key blocks, for every query block. Returns (o_NqxBxKxGxQxE float32,
    lse_NqxBxKxGxQ float32; -inf and o = 0 on rows that see no key)."""
    Nq, B, K, G, Q, E = q_NqxBxKxGxQxE.shape
    Nk = k_NkxBxKxCxE.shape[0]
    dt = v_NkxBxKxCxE.dtype

    def query_block(i, out):
        (q_BxKxGxQxE, *qi) = _at(i, q_NqxBxKxGxQxE, *q_ids)

        def key_step(j, carry):
            (k_BxKxCxE, v_BxKxCxE, *ki) = _at(j, k_NkxBxKxCxE, v_NkxBxKxCxE, *k_ids)
            mask_BxQxC = _visible(qi, ki, window)

            def update(carry):
                m_BxKxGxQ, l_BxKxGxQ, acc_BxKxGxQxE = carry
                s = jnp.where(mask_BxQxC[:, None, None], _scores(q_BxKxGxQxE, k_BxKxCxE), -jnp.inf)
                m_new = jnp.maximum(m_BxKxGxQ, jnp.max(s, axis=-1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key seen yet: nothing to shift
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m_BxKxGxQ - m_safe)
                pv = jnp.einsum("bkgqc,bkce->bkgqe", p.astype(dt), v_BxKxCxE, preferred_element_type=jnp.float32)
                return m_new, alpha * l_BxKxGxQ + jnp.sum(p, axis=-1), alpha[..., None] * acc_BxKxGxQxE + pv

            return jax.lax.cond(jnp.any(mask_BxQxC), update, lambda c: c, carry)

        init = (jnp.full((B, K, G, Q), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, Q), jnp.float32),
                jnp.zeros((B, K, G, Q, E), jnp.float32))
        m, l, acc = _loop(Nk, key_step, init)
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o_all, lse_all = out
        return (jax.lax.dynamic_update_index_in_dim(o_all, acc / l_safe[..., None], i, 0),
                jax.lax.dynamic_update_index_in_dim(lse_all, jnp.where(seen, m + jnp.log(l_safe), -jnp.inf), i, 0))

    return _loop(Nq, query_block, (_zeros_after((Nq, B, K, G, Q, E), q_NqxBxKxGxQxE),
                                   _zeros_after((Nq, B, K, G, Q), q_NqxBxKxGxQxE)))


@jax.custom_vjp
def _flash(q_NqxBxKxGxQxE, k_NkxBxKxCxE, v_NkxBxKxCxE, q_ids, k_ids, window):
    return _flash_forward(q_NqxBxKxGxQxE, k_NkxBxKxCxE, v_NkxBxKxCxE, q_ids, k_ids, window)


def _flash_fwd(q, k, v, q_ids, k_ids, window):
    o, lse = _flash_forward(q, k, v, q_ids, k_ids, window)
    return (o, lse), (q, k, v, q_ids, k_ids, window, o, lse)


def _flash_bwd(res, cotangents):
    """Recompute each block pair's probabilities from lse; dk, dv accumulate over the query blocks
    (float32 [Nk, B, K, C, E] buffers), dq over the key blocks."""
    q_NqxBxKxGxQxE, k_NkxBxKxCxE, v_NkxBxKxCxE, q_ids, k_ids, window, o, lse = res
    do_NqxBxKxGxQxE = cotangents[0].astype(jnp.float32)  # lse's cotangent: unused (no gradient flows through it)
    dt = q_NqxBxKxGxQxE.dtype
    D_NqxBxKxGxQ = jnp.sum(do_NqxBxKxGxQxE * o, axis=-1)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    do_in = do_NqxBxKxGxQxE.astype(dt)
    Nq, Nk = q_NqxBxKxGxQxE.shape[0], k_NkxBxKxCxE.shape[0]

    def query_block(i, grads):
        q_BxKxGxQxE, do_BxKxGxQxE, lse_BxKxGxQ, D_BxKxGxQ, *qi = _at(i, q_NqxBxKxGxQxE, do_in, lse_safe,
                                                                    D_NqxBxKxGxQ, *q_ids)

        def key_step(j, carry):
            dq_BxKxGxQxE, dk_NkxBxKxCxE, dv_NkxBxKxCxE = carry
            (k_BxKxCxE, v_BxKxCxE, *ki) = _at(j, k_NkxBxKxCxE, v_NkxBxKxCxE, *k_ids)
            mask_BxQxC = _visible(qi, ki, window)

            def block_grads(_):
                m = mask_BxQxC[:, None, None]
                p = jnp.where(m, jnp.exp(_scores(q_BxKxGxQxE, k_BxKxCxE) - lse_BxKxGxQ[..., None]), 0.0)
                dv = jnp.einsum("bkgqc,bkgqe->bkce", p.astype(dt), do_BxKxGxQxE, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgqe,bkce->bkgqc", do_BxKxGxQxE, v_BxKxCxE, preferred_element_type=jnp.float32)
                ds = (p * (dp - D_BxKxGxQ[..., None])).astype(dt)
                dq = jnp.einsum("bkgqc,bkce->bkgqe", ds, k_BxKxCxE, preferred_element_type=jnp.float32)
                dk = jnp.einsum("bkgqc,bkgqe->bkce", ds, q_BxKxGxQxE, preferred_element_type=jnp.float32)
                return dq, dk, dv

            def nothing(_):
                return jnp.zeros_like(dq_BxKxGxQxE), jnp.zeros_like(dk_NkxBxKxCxE[0]), jnp.zeros_like(dv_NkxBxKxCxE[0])

            dq, dk, dv = jax.lax.cond(jnp.any(mask_BxQxC), block_grads, nothing, None)
            add = lambda acc, d: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
                acc, jax.lax.dynamic_index_in_dim(acc, j, keepdims=False) + d, j, 0)
            return dq_BxKxGxQxE + dq, add(dk_NkxBxKxCxE, dk), add(dv_NkxBxKxCxE, dv)

        dq_NqxBxKxGxQxE, dk, dv = grads
        dq, dk, dv = _loop(Nk, key_step, (jnp.zeros(q_BxKxGxQxE.shape, jnp.float32), dk, dv))
        return jax.lax.dynamic_update_index_in_dim(dq_NqxBxKxGxQxE, dq, i, 0), dk, dv

    zeros_kv = _zeros_after(k_NkxBxKxCxE.shape, do_in)
    dq, dk, dv = _loop(Nq, query_block, (_zeros_after(q_NqxBxKxGxQxE.shape, do_in), zeros_kv, zeros_kv))
    return (dq.astype(dt), dk.astype(k_NkxBxKxCxE.dtype), dv.astype(v_NkxBxKxCxE.dtype), None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, q_ids, k_ids, scale: float, *, sliding_window=None,
                        block_q: int | None = None, block_k: int | None = None):
    """`layers.masked_attention(q, k, v, attention_mask(*q_ids, *k_ids, sliding_window), scale)`
    computed block by block: o_i = sum_j softmax_j(scale q_i . k_j | rule) v_j.

    q_ids = (segment_ids_BxT, positions_BxT, branch_ids_BxT) of the queries, k_ids the same [B, S]
    of the keys (the KV cache's when decoding). `sliding_window`: None, an int, or a traced int32
    scalar (per layer under a scan; `NO_WINDOW` hides nothing). Blocks of `block_q` query rows and
    `block_k` keys (default this platform's `BLOCK`, at most T / S); T and S need not divide by
    them (padded here, the padding masked). Returns o_BxTxHxE in q's dtype; memory O((T + S) H E + H block^2)."""
    B, T, H, E = q_BxTxHxE.shape
    S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
    G = H // K
    block = for_platform(BLOCK)
    bq, bk = min(block_q or block, T), min(block_k or block, S)
    nq, nk = math.ceil(T / bq), math.ceil(S / bk)
    dt = q_BxTxHxE.dtype
    q = (q_BxTxHxE * jnp.asarray(scale, dt)).reshape(B, T, K, G, E)
    q_NqxBxKxGxQxE = _blocks(q, nq, bq).transpose(0, 1, 3, 4, 2, 5)
    k_NkxBxKxCxE = _blocks(k_BxSxKxE, nk, bk).transpose(0, 1, 3, 2, 4)
    v_NkxBxKxCxE = _blocks(v_BxSxKxE, nk, bk).transpose(0, 1, 3, 2, 4)
    q_ids = tuple(_blocks(x.astype(jnp.int32), nq, bq) for x in q_ids)  # padded queries: segment 0, see nothing
    k_ids = tuple(_blocks(x.astype(jnp.int32), nk, bk) for x in k_ids)  # padded keys: segment 0, never seen
    window = jnp.asarray(NO_WINDOW if sliding_window is None else sliding_window, jnp.int32)

    o, lse = _flash(q_NqxBxKxGxQxE, k_NkxBxKxCxE, v_NkxBxKxCxE, q_ids, k_ids, window)
    o_BxTxKxGxE = o.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, K, G, E)[:, :T]
    seen_BxTxKxG = jnp.isfinite(lse.transpose(1, 0, 4, 2, 3).reshape(B, nq * bq, K, G)[:, :T])
    return _average_unseen_rows(o_BxTxKxGxE, seen_BxTxKxG[..., None], v_BxSxKxE).reshape(B, T, H, E).astype(dt)


def _average_unseen_rows(o_BxTxKxGxE, seen, v_BxSxKxE):
    """o where `seen` (broadcast to o), else the mean of all S values of the row's key/value head:
    what the dense path's softmax over uniformly masked scores gives."""
    mean_v_Bx1xKx1xE = jnp.mean(v_BxSxKxE.astype(jnp.float32), axis=1)[:, None, :, None, :]
    return jnp.where(seen, o_BxTxKxGxE, mean_v_Bx1xKx1xE.astype(o_BxTxKxGxE.dtype))


# ----------------------------------------------------------------------------- causal tiles


class Tile(NamedTuple):
    """One query tile of `tiled_attention`: its scores' additive bias over the keys [0, end of the
    tile) (`layers.attention_bias` of the rule's mask, Bx1xQxS float32) and which of its rows see
    some key (BxQ bool)."""

    bias_Bx1xQxS: jax.Array
    seen_BxQ: jax.Array


def tile_masks(q_ids, k_ids, *, sliding_window=None, block: int | None = None) -> list[Tile]:
    """The tiles of `tiled_attention` for queries and keys of one row set (S = T, no KV cache):
    query tile i (rows [lo, hi), `block` rows; default this platform's BLOCK) sees the keys [0, hi)
    by the rule of `layers.attention_mask`. Built once for all layers, as the dense mask is."""
    T = q_ids[0].shape[1]
    if k_ids[0].shape[1] != T:
        raise ValueError(f"tiled attention needs as many keys as queries (no KV cache); got {T} queries and "
                         f"{k_ids[0].shape[1]} keys")
    block = min(block or for_platform(BLOCK), T)
    tiles = []
    for lo in range(0, T, block):
        mask = attention_mask(*(x[:, lo:lo + block] for x in q_ids), *(x[:, :lo + block] for x in k_ids),
                              sliding_window=sliding_window)
        tiles.append(Tile(attention_bias(mask), jnp.any(mask[:, 0], axis=-1)))
    return tiles


def tiled_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, tiles: list[Tile], scale: float):
    """`layers.masked_attention` over the whole row, computed tile by tile: query tile i attends
    with the dense path over the keys up to its last row only (`tile_masks`), skipping the key
    tiles after it. Exact for every layout of data/layouts.py, where a query sees no key after
    it in its row (the prompt comes first, then each branch, segments one after another; tested
    in tests/data/test_layouts.py): causal rows do about half the dense work, with no loop and no
    recomputation (the backward keeps each tile's probabilities: memory about half the dense
    path's, so 'auto' runs it up to `TILED_MAX_LENGTH` tokens only). The mask enters as an additive
    bias (a cheaper backward); a row that sees no key averages all T values, as the dense path
    does, and sends no gradient to q or k."""
    B, T, H, E = q_BxTxHxE.shape
    K = k_BxTxKxE.shape[2]
    outs = []
    for tile in tiles:
        hi = tile.bias_Bx1xQxS.shape[-1]
        lo = hi - tile.bias_Bx1xQxS.shape[-2]
        outs.append(masked_attention(q_BxTxHxE[:, lo:hi], k_BxTxKxE[:, :hi], v_BxTxKxE[:, :hi], tile.bias_Bx1xQxS,
                                     scale))
    o_BxTxKxGxE = jnp.concatenate(outs, axis=1).reshape(B, T, K, H // K, E)
    seen_BxT = jnp.concatenate([tile.seen_BxQ for tile in tiles], axis=1)
    return _average_unseen_rows(o_BxTxKxGxE, seen_BxT[:, :, None, None, None], v_BxTxKxE).reshape(B, T, H, E)
