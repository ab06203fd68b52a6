"""Fused attention kernels of accelerators: cuDNN flash attention (GPU) and Pallas splash attention
(TPU), used where they express the attention rule of docs/design.md,

    query i sees key j  iff  seg[i] == seg[j] != 0, pos[j] <= pos[i], branch[j] in {0, branch[i]}
                             (and pos[i] - pos[j] < window),

and `select` says where that is. Both kernels mask by row index, not by position: they agree with
the rule when each segment is one contiguous run of a row whose positions count 0, 1, 2, ... from
its start (then pos[j] <= pos[i] iff j <= i inside a segment, and pos[i] - pos[j] = i - j), which
holds in the layouts named below. Elsewhere `select` returns None and the caller runs the
blockwise or dense attention (`models/attention.py`, `models/layers.py`).

Layouts (docs/design.md):
- "standard": one sequence per row, left-aligned, right padding: causal + one length per row.
  Its single completion branch per row makes the branch condition always true.
- "packed": several sequences per row (segment ids, positions restart per segment): causal within
  segments. cuDNN through `jax.nn.dot_product_attention` (jax 0.10.2) takes one query and one key
  length per row and no segment ids, so only splash (`SegmentIds`) expresses it.
- "prefix": a prompt shared by two completions (branch ids): no index-based mask of either kernel.
Decoding with a KV cache (one query row against a cache with holes and offsets): neither.

A query row that sees no key (padding) gets the mean of all S values, as the dense path's softmax
over uniformly masked scores gives; such rows send no gradient to q or k.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- the rules, in one place

LAYOUTS = ("standard", "packed", "prefix")
KERNEL_OF_BACKEND = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}  # any other backend: no fused kernel
# The layouts whose mask each kernel expresses (see the module docstring).
EXPRESSIBLE = {"cudnn": frozenset({"standard"}), "splash": frozenset({"standard", "packed"})}
# A static int sliding window: cuDNN's `local_window_size=(w - 1, 0)` (with is_causal it becomes
# cuDNN's sliding_window_length = w, keys i - w < j <= i); splash's LocalMask((w - 1, 0)), keys
# i - w + 1 <= j <= i. Both are pos[i] - pos[j] < w under the contiguity above. A traced window
# (a per-layer choice under the layer scan) is not static: no fused kernel.
WINDOWED = {"cudnn": True, "splash": True}
DECODING = frozenset()  # kernels that serve a KV-cache decode step: none
# cuDNN flash attention's own checks (jax/_src/cudnn/fused_attention_stablehlo.py): fp16 / bf16 only
# (float32 raises NotImplementedError), head dim a multiple of 8 and <= 256 (<= 128 before Hopper).
CUDNN_DTYPES = frozenset({"bfloat16", "float16"})
CUDNN_HEAD_DIM_MULTIPLE, CUDNN_MAX_HEAD_DIM = 8, 256
SPLASH_LANES = 128  # splash blocks are multiples of 128 rows / columns; T and S are padded to it
SPLASH_BLOCK = 512  # largest splash block tried (the block is gcd(padded length, SPLASH_BLOCK))


def select(backend: str, *, layout: str, sliding_window, decoding: bool, dtype=None,
           head_dim: int | None = None) -> str | None:
    """'cudnn', 'splash' or None (fall back to blockwise / dense) for `jax.default_backend()`-style
    `backend`, the batch `layout` (one of LAYOUTS), a sliding window (None, or a static int), and
    whether this is a KV-cache decode step. `dtype` / `head_dim`, when given, are checked against
    cuDNN's limits."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    kernel = KERNEL_OF_BACKEND.get(backend)
    if kernel is None or layout not in EXPRESSIBLE[kernel]:
        return None
    if decoding and kernel not in DECODING:
        return None
    if sliding_window is not None and (not WINDOWED[kernel] or not isinstance(sliding_window, (int, np.integer))
                                       or isinstance(sliding_window, bool) or sliding_window < 1):
        return None
    if kernel == "cudnn":
        if dtype is not None and jnp.dtype(dtype).name not in CUDNN_DTYPES:
            return None
        if head_dim is not None and (head_dim % CUDNN_HEAD_DIM_MULTIPLE or head_dim > CUDNN_MAX_HEAD_DIM):
            return None
    return kernel


def _unseen_rows_to_mean(o_BxTxHxE, seen_BxT, v_BxSxKxE):
    """Rows that see no key -> mean_j v_j of their key/value head (the dense path's value)."""
    B, T, H, E = o_BxTxHxE.shape
    K = v_BxSxKxE.shape[2]
    mean_Bx1xKx1xE = jnp.mean(v_BxSxKxE.astype(jnp.float32), axis=1)[:, None, :, None, :]
    o = jnp.where(seen_BxT[:, :, None, None, None], o_BxTxHxE.reshape(B, T, K, H // K, E).astype(jnp.float32),
                  mean_Bx1xKx1xE)
    return o.reshape(B, T, H, E).astype(o_BxTxHxE.dtype)


# ----------------------------------------------------------------------------- cuDNN (GPU)


def cudnn_arguments(q_ids, k_ids, *, sliding_window=None) -> dict:
    """The mask arguments of `jax.nn.dot_product_attention` for the standard layout:
    is_causal=True, query_seq_lengths_B = #{i: q_seg[i] != 0}, key_value_seq_lengths_B =
    #{j: k_seg[j] != 0}, local_window_size = (w - 1, 0) (pos[i] - pos[j] < w) or None."""
    q_segment_ids_BxT, k_segment_ids_BxS = q_ids[0], k_ids[0]
    return dict(is_causal=True,
                query_seq_lengths=jnp.sum(q_segment_ids_BxT != 0, axis=1, dtype=jnp.int32),
                key_value_seq_lengths=jnp.sum(k_segment_ids_BxS != 0, axis=1, dtype=jnp.int32),
                local_window_size=None if sliding_window is None else (int(sliding_window) - 1, 0))


def cudnn_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, q_ids, k_ids, scale, *, sliding_window=None,
                    implementation: str | None = "cudnn"):
    """o_i = softmax_j(scale q_i . k_j | causal, j < len_k, i < len_q, window) v_j by
    `jax.nn.dot_product_attention(implementation=...)` ('cudnn'; 'xla' runs the same arguments
    anywhere), for the standard layout (`select`). q_ids = (segment_ids_BxT, positions_BxT,
    branch_ids_BxT), k_ids the same [B, S]. Grouped-query attention (H = K G) as that function
    does it; padding rows as the dense path. Returns o_BxTxHxE in q's dtype."""
    kwargs = cudnn_arguments(q_ids, k_ids, sliding_window=sliding_window)
    o = jax.nn.dot_product_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, scale=float(scale),
                                     implementation=implementation, **kwargs)
    return _unseen_rows_to_mean(o, q_ids[0] != 0, v_BxSxKxE)


# ----------------------------------------------------------------------------- splash (TPU)


@functools.lru_cache(maxsize=64)
def _splash_kernel(length: int, heads: int, window: int | None, mqa: bool, interpret: bool):
    """A splash kernel over [heads, L, E] queries (L a multiple of SPLASH_LANES): causal, or
    LocalMask((w - 1, 0)) when windowed; segment ids passed at call time. Its block tables are
    built as concrete arrays even under a trace, so the cached kernel serves every later trace."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (length, length)
    one = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    b = math.gcd(length, SPLASH_BLOCK)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    make = sa.make_splash_mqa_single_device if mqa else sa.make_splash_mha_single_device
    with jax.ensure_compile_time_eval():
        return make(sa.MultiHeadMask([one] * heads), block_sizes=blocks, interpret=interpret), sa.SegmentIds


def splash_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, q_ids, k_ids, scale, *, sliding_window=None,
                     interpret: bool = False):
    """o_i = softmax_j(scale q_i . k_j | seg[i] == seg[j], j <= i, i - j < window) v_j by the Pallas
    splash kernel (TPU; `interpret=True` runs it anywhere, slowly), for the standard and packed
    layouts (`select`); self-attention (T == S). T is padded to a multiple of SPLASH_LANES with
    segment 0; grouped-query attention runs the MQA kernel once per key/value head (K/V never
    repeated). Padding rows as the dense path. Returns o_BxTxHxE in q's dtype."""
    B, T, H, E = q_BxTxHxE.shape
    S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
    if S != T:
        raise ValueError(f"splash_attention is self-attention: T == S; got T={T}, S={S}")
    G = H // K
    L = math.ceil(T / SPLASH_LANES) * SPLASH_LANES
    pad = lambda x: jnp.pad(x, [(0, 0), (0, L - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    q_seg_BxL, k_seg_BxL = pad(q_ids[0].astype(jnp.int32)), pad(k_ids[0].astype(jnp.int32))
    q = pad(q_BxTxHxE * jnp.asarray(scale, q_BxTxHxE.dtype))
    k_BxKxLxE, v_BxKxLxE = pad(k_BxSxKxE).transpose(0, 2, 1, 3), pad(v_BxSxKxE).transpose(0, 2, 1, 3)
    window = None if sliding_window is None else int(sliding_window)
    kernel, SegmentIds = _splash_kernel(L, H if G == 1 else G, window, G > 1, interpret)

    def one_row(q_NxLxE, k_, v_, qs_L, ks_L):
        return kernel(q_NxLxE, k_, v_, SegmentIds(q=qs_L, kv=ks_L))

    if G == 1:  # multi-head: one call per row over all H heads
        o = jax.vmap(one_row)(q.transpose(0, 2, 1, 3), k_BxKxLxE, v_BxKxLxE, q_seg_BxL, k_seg_BxL)
        o_BxLxHxE = o.transpose(0, 2, 1, 3)
    else:  # grouped: the G query heads of each key/value head share its K and V
        q_BxKxGxLxE = q.reshape(B, L, K, G, E).transpose(0, 2, 3, 1, 4)
        per_kv = jax.vmap(one_row, in_axes=(0, 0, 0, None, None))
        o = jax.vmap(per_kv)(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, q_seg_BxL, k_seg_BxL)
        o_BxLxHxE = o.transpose(0, 3, 1, 2, 4).reshape(B, L, H, E)
    return _unseen_rows_to_mean(o_BxLxHxE[:, :T].astype(q_BxTxHxE.dtype), q_ids[0] != 0, v_BxSxKxE)


def fused_attention(kernel: str, *args, **kwargs):
    """Run `kernel` ('cudnn' or 'splash', as `select` returned) on (q, k, v, q_ids, k_ids, scale)."""
    return {"cudnn": cudnn_attention, "splash": splash_attention}[kernel](*args, **kwargs)
