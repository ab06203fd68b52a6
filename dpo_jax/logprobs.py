"""Per-token and per-sequence log-probs from final hidden states and the unembedding.

Pure functions; no model import. All log-prob math is float32 whatever the input dtypes.

- `token_logps`: logp_n = log softmax(h_n W + b)[y_n], computed over tiles of (position chunk,
  vocabulary chunk) with a custom VJP, so the float32 [N, V] logits never exist at once, in the
  forward or the backward pass. `naive_token_logps` is the plain reference.
- `sequence_logps`: segment sums over pair ids of the masked token log-probs, split by branch
  (1 = chosen, 2 = rejected), the token counts, and LD-DPO's shared-prefix sums.
- `completion_logps`: only completion positions need logits; when the batch carries
  `logit_slots_BxC` (per-row positions computed on the host, see `data.layouts.logit_slots`), the
  loss-masked hidden states are gathered into [B, C, D] rows first (`slot_completions`: shards
  like the batch).
"""

import functools
import math
import operator
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dpo_jax.data import layouts

DEFAULT_CHUNK_SIZE = 1024
DEFAULT_VOCAB_CHUNK_SIZE = 8192
MASKED_LOGIT = -1e9  # a logit bias that removes a token: exp underflows to 0, gradients stay finite

LOGPROB_KEYS = ("targets_BxT", "loss_mask_BxT", "pair_ids_BxT", "branch_ids_BxT")  # what of a batch this reads


# --------------------------------------------------------------------------------------------
# Per-token log-probs.


def _positive_int(name, value):
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive int; got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def _check_token_args(hidden, unembed, targets, bias):
    if unembed.ndim != 2:
        raise ValueError(f"unembed_DxV must be 2-D [D, V]; got shape {unembed.shape}")
    if hidden.ndim < 1 or hidden.shape[-1] != unembed.shape[0]:
        raise ValueError(
            f"hidden must be [..., D] with D = unembed_DxV.shape[0] = {unembed.shape[0]}; "
            f"got hidden shape {hidden.shape}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have the leading shape of hidden {tuple(hidden.shape[:-1])}; "
            f"got targets shape {tuple(targets.shape)}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids; got dtype {targets.dtype}")
    for name, x in (("hidden", hidden), ("unembed_DxV", unembed), ("bias_V", bias)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point; got dtype {x.dtype}")
    if bias is not None and tuple(bias.shape) != (unembed.shape[1],):
        raise ValueError(
            f"bias_V must have shape ({unembed.shape[1]},) (the vocabulary of unembed_DxV); "
            f"got {tuple(bias.shape)}"
        )


def _logits(h_RxD, w_DxV, b_V):
    """float32 logits h W + b (products of the input dtype accumulated in float32)."""
    logits_RxV = jnp.dot(h_RxD, w_DxV, preferred_element_type=jnp.float32)
    if b_V is not None:
        logits_RxV = logits_RxV + b_V.astype(jnp.float32)
    return logits_RxV


def naive_token_logps(
    hidden, unembed_DxV, targets, *, bias_V=None, chunk_size=None, vocab_chunk_size=None
):
    """Reference: log_softmax(h W + b)[target] over all positions at once (float32 [N, V] logits).

    Same signature as `token_logps`; the chunk sizes are accepted and ignored.
    """
    del chunk_size, vocab_chunk_size
    _check_token_args(hidden, unembed_DxV, targets, bias_V)
    logits = _logits(hidden, unembed_DxV, bias_V)
    logps = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logps, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _vocab_chunks(vocab, vocab_chunk_size):
    """(width, number of full chunks, tail width) of the contiguous vocabulary chunks."""
    width = min(vocab, vocab_chunk_size)
    return width, vocab // width, vocab % width


def _over_vocab(step, carry, w_DxV, b_V, vocab_chunk_size):
    """carry = step(carry, w_DxVc, b_Vc, offset) over contiguous vocabulary chunks."""
    vocab = w_DxV.shape[1]
    width, num_full, tail = _vocab_chunks(vocab, vocab_chunk_size)

    def full_chunk(j, carry):
        offset = j * width
        w_DxVc = lax.dynamic_slice_in_dim(w_DxV, offset, width, axis=1)
        b_Vc = None if b_V is None else lax.dynamic_slice_in_dim(b_V, offset, width)
        return step(carry, w_DxVc, b_Vc, offset)

    if num_full == 1:
        carry = full_chunk(0, carry)
    else:
        carry = lax.fori_loop(0, num_full, full_chunk, carry)
    if tail:
        offset = num_full * width
        b_tail = None if b_V is None else b_V[offset:]
        carry = step(carry, w_DxV[:, offset:], b_tail, offset)
    return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_logps(h_KxRxD, w_DxV, b_V, t_KxR, vocab_chunk_size):
    """Log-probs of K chunks of R positions: [K, R] float32."""
    return _chunked_fwd(h_KxRxD, w_DxV, b_V, t_KxR, vocab_chunk_size)[0]


def _pick(logits_RxVc, t_R, offset):
    """logits[r, t_r - offset] where the target falls in this vocabulary chunk, else 0 (a gather
    of R values, not a masked pass over the tile)."""
    width = logits_RxVc.shape[1]
    local_R = t_R - offset
    inside_R = (local_R >= 0) & (local_R < width)
    index_Rx1 = jnp.clip(local_R, 0, width - 1)[:, None]
    picked_R = jnp.take_along_axis(logits_RxVc, index_Rx1, axis=1)[:, 0]
    return jnp.where(inside_R, picked_R, 0.0)


def _one_tile(h_KxRxD, w_DxV, vocab_chunk_size):
    """Whether all positions and the whole vocabulary fit in one [R, V] tile."""
    return h_KxRxD.shape[0] == 1 and w_DxV.shape[1] <= vocab_chunk_size


def _chunked_fwd(h_KxRxD, w_DxV, b_V, t_KxR, vocab_chunk_size):
    """Scan over position chunks; inside, an online log-sum-exp over vocabulary chunks. When one
    tile holds everything, its softmax is kept for the backward instead of recomputed."""
    vocab = w_DxV.shape[1]

    if _one_tile(h_KxRxD, w_DxV, vocab_chunk_size):
        h_RxD, t_R = h_KxRxD[0], t_KxR[0]
        logits_RxV = _logits(h_RxD, w_DxV, b_V)
        max_R = jnp.max(logits_RxV, axis=-1)
        lse_R = max_R + jnp.log(jnp.sum(jnp.exp(logits_RxV - max_R[:, None]), axis=-1))
        probs_RxV = jnp.exp(logits_RxV - lse_R[:, None])
        logps_R = jnp.where((t_R >= 0) & (t_R < vocab), _pick(logits_RxV, t_R, 0) - lse_R, jnp.nan)
        return logps_R[None], (h_KxRxD, w_DxV, b_V, t_KxR, lse_R[None], probs_RxV)

    def position_chunk(_, xs):
        h_RxD, t_R = xs

        def step(carry, w_DxVc, b_Vc, offset):
            max_R, sum_R, target_R = carry
            logits_RxVc = _logits(h_RxD, w_DxVc, b_Vc)
            new_max_R = jnp.maximum(max_R, jnp.max(logits_RxVc, axis=-1))
            sum_R = sum_R * jnp.exp(max_R - new_max_R) + jnp.sum(
                jnp.exp(logits_RxVc - new_max_R[:, None]), axis=-1
            )
            return new_max_R, sum_R, target_R + _pick(logits_RxVc, t_R, offset)

        rows = h_RxD.shape[0]
        init = (
            jnp.full((rows,), jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows,), jnp.float32),
        )
        max_R, sum_R, target_R = _over_vocab(step, init, w_DxV, b_V, vocab_chunk_size)
        lse_R = max_R + jnp.log(sum_R)
        logps_R = jnp.where((t_R >= 0) & (t_R < vocab), target_R - lse_R, jnp.nan)
        return None, (logps_R, lse_R)

    _, (logps_KxR, lse_KxR) = lax.scan(position_chunk, None, (h_KxRxD, t_KxR))
    return logps_KxR, (h_KxRxD, w_DxV, b_V, t_KxR, lse_KxR)


def _dlogits(logits_or_probs_RxVc, t_R, lse_R, g_R, offset, *, probs=False):
    """d logp / d logits times g: (onehot(t) - softmax) g, float32 [R, Vc]."""
    p_RxVc = logits_or_probs_RxVc if probs else jnp.exp(logits_or_probs_RxVc - lse_R[:, None])
    iota_RxVc = lax.broadcasted_iota(jnp.int32, p_RxVc.shape, 1)
    hit_RxVc = iota_RxVc == (t_R - offset)[:, None]
    return (hit_RxVc - p_RxVc) * g_R[:, None]


def _chunked_bwd(vocab_chunk_size, residuals, g_KxR):
    """Over vocabulary chunks j, then position chunks k: recompute logits_kj; dlogits =
    (onehot - softmax) g (d logp / d logits); dh_k += dlogits W_j^T (float32 [N, D] accumulator);
    dW_j = sum_k h_k^T dlogits; db_j = sum_k sum_r dlogits. The matmuls take dlogits in the input
    dtype promote(h, W) and accumulate in float32. One tile: the forward's softmax, no recompute."""
    h_KxRxD, w_DxV, b_V, t_KxR, lse_KxR = residuals[:5]
    compute_dtype = jnp.promote_types(h_KxRxD.dtype, w_DxV.dtype)
    g_KxR = g_KxR.astype(jnp.float32)

    if len(residuals) == 6:  # one tile
        h_RxD = h_KxRxD[0]
        dlogits_RxV = _dlogits(residuals[5], t_KxR[0], lse_KxR[0], g_KxR[0], 0, probs=True)
        dl_RxV = dlogits_RxV.astype(compute_dtype)
        dh_RxD = jnp.dot(dl_RxV, w_DxV.T, preferred_element_type=jnp.float32)
        dw_DxV = jnp.dot(h_RxD.T, dl_RxV, preferred_element_type=jnp.float32)
        db_V = None if b_V is None else jnp.sum(dlogits_RxV, axis=0).astype(b_V.dtype)
        return dh_RxD[None].astype(h_KxRxD.dtype), dw_DxV.astype(w_DxV.dtype), db_V, None

    def step(carry, w_DxVc, b_Vc, offset):
        dh_KxRxD, dw_DxV, db_V = carry
        width = w_DxVc.shape[1]

        def position_chunk(acc, xs):
            dw_DxVc, db_Vc = acc
            h_RxD, t_R, lse_R, g_R, dh_RxD = xs
            dlogits_RxVc = _dlogits(_logits(h_RxD, w_DxVc, b_Vc), t_R, lse_R, g_R, offset)
            dl_RxVc = dlogits_RxVc.astype(compute_dtype)
            dh_RxD = dh_RxD + jnp.dot(dl_RxVc, w_DxVc.T, preferred_element_type=jnp.float32)
            dw_DxVc = dw_DxVc + jnp.dot(h_RxD.T, dl_RxVc, preferred_element_type=jnp.float32)
            if db_Vc is not None:
                db_Vc = db_Vc + jnp.sum(dlogits_RxVc, axis=0)
            return (dw_DxVc, db_Vc), dh_RxD

        acc = (
            jnp.zeros((w_DxV.shape[0], width), jnp.float32),
            None if b_V is None else jnp.zeros((width,), jnp.float32),
        )
        (dw_DxVc, db_Vc), dh_KxRxD = lax.scan(
            position_chunk, acc, (h_KxRxD, t_KxR, lse_KxR, g_KxR, dh_KxRxD)
        )
        dw_DxV = lax.dynamic_update_slice_in_dim(dw_DxV, dw_DxVc.astype(dw_DxV.dtype), offset, 1)
        if db_V is not None:
            db_V = lax.dynamic_update_slice_in_dim(db_V, db_Vc.astype(db_V.dtype), offset, 0)
        return dh_KxRxD, dw_DxV, db_V

    init = (
        jnp.zeros(h_KxRxD.shape, jnp.float32),
        jnp.zeros_like(w_DxV),
        None if b_V is None else jnp.zeros_like(b_V),
    )
    dh_KxRxD, dw_DxV, db_V = _over_vocab(step, init, w_DxV, b_V, vocab_chunk_size)
    return dh_KxRxD.astype(h_KxRxD.dtype), dw_DxV, db_V, None


_chunked_logps.defvjp(_chunked_fwd, _chunked_bwd)


def positions_per_tile(chunk_size: int, vocab_chunk_size: int, vocab: int) -> int:
    """Rmax of `token_logps`: chunk_size positions per tile of vocab_chunk_size columns, and
    proportionally more when the whole vocabulary is narrower, so that a tile never holds more
    than chunk_size x vocab_chunk_size float32 logits."""
    return chunk_size * vocab_chunk_size // min(vocab, vocab_chunk_size)


def token_logps(
    hidden,
    unembed_DxV,
    targets,
    *,
    bias_V=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
    vocab_chunk_size=DEFAULT_VOCAB_CHUNK_SIZE,
):
    """logp[...] = log softmax(hidden[...] @ W + b)[targets[...]], float32, in [R, Vc] tiles.

    hidden: [N, D] or [B, T, D] (any leading shape), float32 or bfloat16; unembed_DxV: [D, V];
    targets: int, hidden's leading shape, values in [0, V) (others give NaN); bias_V: optional [V].
    The vocabulary is cut into contiguous chunks of Vc = min(V, vocab_chunk_size) columns (plus a
    tail); the positions into ceil(N / Rmax) chunks of R <= Rmax rows, Rmax = chunk_size *
    vocab_chunk_size // Vc, so a tile holds at most chunk_size x vocab_chunk_size logits whatever V
    (a vocabulary narrower than vocab_chunk_size takes more positions per tile). Chunk k takes rows
    k, k + K, k + 2K, ..., so a batch sharding of the positions stays on the rows of every chunk.
    Forward: per position chunk, an online log-sum-exp over vocabulary chunks. Backward (custom
    VJP, logits recomputed): per vocabulary chunk, a scan over position chunks. Live memory beyond
    inputs and gradients: a few [R, Vc] float32 tiles, [D, Vc] float32, and a float32 [N, D]
    accumulator for d hidden. When one tile holds everything (N <= Rmax, V <= vocab_chunk_size),
    its float32 softmax is kept from the forward for the backward.
    Gradients w.r.t. hidden, unembed and bias come back in their dtypes.
    Both chunk sizes must be Python ints (static under jit).
    """
    _check_token_args(hidden, unembed_DxV, targets, bias_V)
    chunk_size = _positive_int("chunk_size", chunk_size)
    vocab_chunk_size = _positive_int("vocab_chunk_size", vocab_chunk_size)
    lead, d = hidden.shape[:-1], hidden.shape[-1]
    n = math.prod(lead)
    num_chunks = max(1, -(-n // positions_per_tile(chunk_size, vocab_chunk_size, unembed_DxV.shape[1])))
    rows = -(-n // num_chunks)  # <= positions_per_tile; pads fewer than num_chunks rows
    pad = num_chunks * rows - n
    h_NxD = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0)))
    t_N = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad))
    h_KxRxD = h_NxD.reshape(rows, num_chunks, d).swapaxes(0, 1)
    t_KxR = t_N.reshape(rows, num_chunks).swapaxes(0, 1)
    logps_KxR = _chunked_logps(h_KxRxD, unembed_DxV, bias_V, t_KxR, vocab_chunk_size)
    return logps_KxR.swapaxes(0, 1).reshape(-1)[:n].reshape(lead)



# --------------------------------------------------------------------------------------------
# Per-sequence reduction.


class SequenceLogps(NamedTuple):
    """Per-pair sums, all float32 [P].

    chosen / rejected: sum of the masked token log-probs of branch 1 / 2;
    chosen_len / rejected_len: number of loss-masked tokens of each branch;
    chosen_shared / rejected_shared: the sums over the first min(chosen_len, rejected_len)
    completion tokens of each branch (LD-DPO: ld = shared + alpha * (full - shared)).
    """

    chosen: jax.Array
    rejected: jax.Array
    chosen_len: jax.Array
    rejected_len: jax.Array
    chosen_shared: jax.Array
    rejected_shared: jax.Array


def sequence_logps(token_logps_BxT, loss_mask_BxT, pair_ids_BxT, branch_ids_BxT, num_pairs):
    """Segment sums over pair ids of the masked token log-probs, split by branch.

    chosen_p = sum_{i: pair_i = p, branch_i = 1} mask_i logp_i (likewise rejected, branch 2);
    *_len_p = #{i: pair_i = p, branch_i = b, mask_i > 0}; the shared sums keep the tokens whose
    rank among their (pair, branch) tokens, in row-major order, is < min(chosen_len, rejected_len).
    Positions with mask 0, branch not in {1, 2} or pair id outside [0, num_pairs) count nowhere
    (their log-probs may be anything, NaN included). All four arrays share one shape (any).
    """
    shape = tuple(token_logps_BxT.shape)
    for name, x in (
        ("loss_mask_BxT", loss_mask_BxT),
        ("pair_ids_BxT", pair_ids_BxT),
        ("branch_ids_BxT", branch_ids_BxT),
    ):
        if tuple(x.shape) != shape:
            raise ValueError(
                f"{name} must have the shape of token_logps_BxT {shape}; got {tuple(x.shape)}"
            )
    p = _positive_int("num_pairs", num_pairs)
    logps_N = token_logps_BxT.reshape(-1).astype(jnp.float32)
    mask_N = loss_mask_BxT.reshape(-1).astype(jnp.float32)
    pair_N = pair_ids_BxT.reshape(-1).astype(jnp.int32)
    branch_N = branch_ids_BxT.reshape(-1).astype(jnp.int32)

    counted_N = (mask_N > 0) & (pair_N >= 0) & (pair_N < p) & ((branch_N == 1) | (branch_N == 2))
    pair_N = jnp.where(counted_N, pair_N, 0)
    chosen_N = counted_N & (branch_N == 1)
    rejected_N = counted_N & (branch_N == 2)
    weighted_N = jnp.where(counted_N, mask_N * logps_N, 0.0)

    def per_pair(values_N, select_N):
        return jax.ops.segment_sum(jnp.where(select_N, values_N, 0.0), pair_N, num_segments=p)

    ones_N = jnp.ones_like(mask_N)
    chosen_len_P = per_pair(ones_N, chosen_N)
    rejected_len_P = per_pair(ones_N, rejected_N)

    # Rank of each counted token among the tokens of its (pair, branch), in row-major order.
    n = logps_N.shape[0]
    key_N = jnp.where(counted_N, 2 * pair_N + branch_N - 1, 2 * p)
    order_N = jnp.argsort(key_N, stable=True)
    sorted_key_N = key_N[order_N]
    pos_N = jnp.arange(n, dtype=jnp.int32)
    first_K = jax.ops.segment_min(pos_N, sorted_key_N, num_segments=2 * p + 1)
    rank_N = jnp.zeros((n,), jnp.int32).at[order_N].set(pos_N - first_K[sorted_key_N])
    shared_len_P = jnp.minimum(chosen_len_P, rejected_len_P)
    in_shared_N = rank_N.astype(jnp.float32) < shared_len_P[pair_N]

    return SequenceLogps(
        chosen=per_pair(weighted_N, chosen_N),
        rejected=per_pair(weighted_N, rejected_N),
        chosen_len=chosen_len_P,
        rejected_len=rejected_len_P,
        chosen_shared=per_pair(weighted_N, chosen_N & in_shared_N),
        rejected_shared=per_pair(weighted_N, rejected_N & in_shared_N),
    )


def branch_logps(token_logps_BxT, loss_mask_BxT, pair_ids_BxT, branch_ids_BxT, num_lists: int, num_branches: int):
    """Per (list, branch) sums for K-branch rows (a prompt shared by K completions, branches 1..K):
    logps_PxK[p, k] = sum_{i: pair_i = p, branch_i = k + 1} mask_i logp_i and lens_PxK[p, k] the
    number of those masked tokens (float32). Positions with mask 0, a branch outside 1..K or a list
    id outside [0, P) count nowhere. With K = 2 these are `sequence_logps`' chosen and rejected."""
    p, k = _positive_int("num_lists", num_lists), _positive_int("num_branches", num_branches)
    logps_N = token_logps_BxT.reshape(-1).astype(jnp.float32)
    mask_N = loss_mask_BxT.reshape(-1).astype(jnp.float32)
    pair_N = pair_ids_BxT.reshape(-1).astype(jnp.int32)
    branch_N = branch_ids_BxT.reshape(-1).astype(jnp.int32)
    counted_N = (mask_N > 0) & (pair_N >= 0) & (pair_N < p) & (branch_N >= 1) & (branch_N <= k)
    key_N = jnp.where(counted_N, pair_N * k + branch_N - 1, 0)
    sums = jax.ops.segment_sum(jnp.where(counted_N, mask_N * logps_N, 0.0), key_N, num_segments=p * k)
    lens = jax.ops.segment_sum(counted_N.astype(jnp.float32), key_N, num_segments=p * k)
    return sums.reshape(p, k), lens.reshape(p, k)


# --------------------------------------------------------------------------------------------
# Only completion positions need logits.


def _check_batch(batch: Mapping[str, Any], hidden_BxTxD):
    if hidden_BxTxD.ndim != 3:
        raise ValueError(f"hidden_BxTxD must be 3-D [B, T, D]; got shape {hidden_BxTxD.shape}")
    missing = [k for k in LOGPROB_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing key(s) {missing}; need {list(LOGPROB_KEYS)}")
    for k in LOGPROB_KEYS:
        if tuple(batch[k].shape) != tuple(hidden_BxTxD.shape[:2]):
            raise ValueError(
                f"batch[{k!r}] must have shape [B, T] = {tuple(hidden_BxTxD.shape[:2])} "
                f"(from hidden_BxTxD); got {tuple(batch[k].shape)}"
            )


def slot_completions(hidden_BxTxD, batch: Mapping[str, Any]):
    """(hidden_BxCxD, targets_BxC, loss_mask_BxC, pair_ids_BxC, branch_ids_BxC) at the positions of
    `batch["logit_slots_BxC"]` (row b, slot c -> position slots[b, c]); -1 slots get loss mask 0 and
    branch 0, so they count nowhere. Rows stay rows: the gather shards with the batch."""
    slots_BxC = batch[layouts.SLOTS_KEY]
    if slots_BxC.ndim != 2 or slots_BxC.shape[0] != hidden_BxTxD.shape[0]:
        raise ValueError(f"batch[{layouts.SLOTS_KEY!r}] must be [B, C] with B = {hidden_BxTxD.shape[0]}; "
                         f"got {tuple(slots_BxC.shape)}")
    valid_BxC = slots_BxC >= 0
    index_BxC = jnp.where(valid_BxC, slots_BxC, 0).astype(jnp.int32)
    take = lambda x: jnp.take_along_axis(x, index_BxC, axis=1)  # noqa: E731
    hidden_BxCxD = jnp.take_along_axis(hidden_BxTxD, index_BxC[..., None], axis=1)
    mask_BxC = jnp.where(valid_BxC, take(batch["loss_mask_BxT"]), 0).astype(batch["loss_mask_BxT"].dtype)
    branch_BxC = jnp.where(valid_BxC, take(batch["branch_ids_BxT"]), 0)
    return hidden_BxCxD, take(batch["targets_BxT"]), mask_BxC, take(batch["pair_ids_BxT"]), branch_BxC


def _masked_token_logps(hidden_BxTxD, unembed_DxV, batch, *, bias_V, chunk_size, vocab_chunk_size, naive):
    """(token log-probs, loss mask, pair ids, branch ids), all [B, T], or [B, C] at the batch's logit
    slots when it has `logit_slots_BxC` (`slot_completions`; the same sums)."""
    _check_batch(batch, hidden_BxTxD)
    sizes = dict(bias_V=bias_V, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)
    token_logps_fn = naive_token_logps if naive else token_logps
    if layouts.SLOTS_KEY in batch:
        hidden_BxCxD, targets_BxC, mask_BxC, pairs_BxC, branches_BxC = slot_completions(hidden_BxTxD, batch)
        return token_logps_fn(hidden_BxCxD, unembed_DxV, targets_BxC, **sizes), mask_BxC, pairs_BxC, branches_BxC
    logps_BxT = token_logps_fn(hidden_BxTxD, unembed_DxV, batch["targets_BxT"], **sizes)
    return logps_BxT, batch["loss_mask_BxT"], batch["pair_ids_BxT"], batch["branch_ids_BxT"]


def completion_logps(
    hidden_BxTxD,
    unembed_DxV,
    batch: Mapping[str, Any],
    num_pairs: int,
    *,
    bias_V=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
    naive: bool = False,
) -> SequenceLogps:
    """Per-pair log-probs of a batch (docs/design.md, "The batch") from its final hidden states.

    Logits at all B*T positions, or, when the batch has `logit_slots_BxC`, only at its B*C slots
    (`slot_completions`; the same values). naive: `naive_token_logps` (float32 [N, V] logits at
    once) instead of the chunked `token_logps`, to measure what chunking saves.
    """
    parts = _masked_token_logps(hidden_BxTxD, unembed_DxV, batch, bias_V=bias_V, chunk_size=chunk_size,
                                vocab_chunk_size=vocab_chunk_size, naive=naive)
    return sequence_logps(*parts, num_pairs)


def list_completion_logps(
    hidden_BxTxD,
    unembed_DxV,
    batch: Mapping[str, Any],
    num_lists: int,
    num_branches: int,
    *,
    bias_V=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
    naive: bool = False,
):
    """(logps_PxK, lens_PxK): the summed log-prob and length of each list's K responses
    (`branch_logps`) in a batch of ranked lists (`data/list_layouts.py`); as `completion_logps`."""
    parts = _masked_token_logps(hidden_BxTxD, unembed_DxV, batch, bias_V=bias_V, chunk_size=chunk_size,
                                vocab_chunk_size=vocab_chunk_size, naive=naive)
    return branch_logps(*parts, num_lists, num_branches)
