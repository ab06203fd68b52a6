"""Pure layer math of the decoder (`models/transformer.py`): the attention rule of docs/design.md,
rotary embeddings, norms, activations, grouped-query attention and the 2-D projection matmul.
Functions of arrays only; `rope_inv_freq` reads a `ModelConfig`'s rope fields.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------- the attention rule


def attention_mask(q_segment_ids_BxT, q_positions_BxT, q_branch_ids_BxT,
                   k_segment_ids_BxS, k_positions_BxS, k_branch_ids_BxS, *, sliding_window=None):
    """Bx1xTxS bool: query i sees key j iff seg[i] == seg[j] != 0, pos[j] <= pos[i],
    branch[j] in {0, branch[i]} (and pos[i] - pos[j] < sliding_window when given)."""
    qs, ks = q_segment_ids_BxT[:, :, None], k_segment_ids_BxS[:, None, :]
    qp, kp = q_positions_BxT[:, :, None], k_positions_BxS[:, None, :]
    qb, kb = q_branch_ids_BxT[:, :, None], k_branch_ids_BxS[:, None, :]
    mask = (qs == ks) & (qs != 0) & (kp <= qp) & ((kb == 0) | (kb == qb))
    if sliding_window is not None:
        mask &= qp - kp < sliding_window
    return mask[:, None]


def make_attention_mask(segment_ids_BxT, positions_BxT, branch_ids_BxT=None, *, sliding_window=None):
    """The attention rule of docs/design.md on one row set: Bx1xTxT bool (see `attention_mask`).
    Padding (segment 0) sees nothing; attention turns such rows uniform, never NaN."""
    if branch_ids_BxT is None:
        branch_ids_BxT = jnp.zeros_like(segment_ids_BxT)
    return attention_mask(segment_ids_BxT, positions_BxT, branch_ids_BxT,
                          segment_ids_BxT, positions_BxT, branch_ids_BxT, sliding_window=sliding_window)


# ----------------------------------------------------------------------------- pure layer math


def rope_inv_freq(cfg) -> np.ndarray:
    """inv_freq_k = theta^(-2k / R), k < R/2 (R = rotary dim), then the configured scaling."""
    dim = cfg.rotary_dim
    inv = (1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)
    sc = cfg.rope_scaling
    if sc is None or sc.rope_type == "default":
        return inv
    if sc.rope_type == "linear":
        return (inv / sc.factor).astype(np.float32)
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_sin_cos(positions_BxT, inv_freq_R2, *, materialize: bool):
    """sin and cos of positions * inv_freq_k, [B, T, R/2] float32 each. With `materialize`, computed
    once, inside a conditional whose two branches are this same function (its predicate only has to
    be unknown to the compiler): a fusion boundary. Without one, XLA:CPU recomputes both
    transcendentals inside every fusion that uses them, per head, per layer, forward and backward
    (the CPU train step 1.05-1.08x faster at T = 128 with it, 1.00-1.14x at T = 320;
    docs/performance.md)."""
    ang_BxTxR2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_R2)
    trig = lambda a: (jnp.sin(a), jnp.cos(a))  # noqa: E731
    if not materialize:
        return trig(ang_BxTxR2)
    return jax.lax.cond(jnp.isfinite(ang_BxTxR2.reshape(-1)[0]), trig, trig, ang_BxTxR2)


def apply_rope(x_BxTxNxE, sin_BxTxR2, cos_BxTxR2):
    """Rotate the first R dims of each head in halves: [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]."""
    r2 = sin_BxTxR2.shape[-1]
    x = x_BxTxNxE.astype(jnp.float32)
    x1, x2, rest = x[..., :r2], x[..., r2:2 * r2], x[..., 2 * r2:]
    s, c = sin_BxTxR2[:, :, None, :], cos_BxTxR2[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], axis=-1)
    return out.astype(x_BxTxNxE.dtype)


def norm(x, scale, bias, kind, eps):
    """RMSNorm x / sqrt(mean x^2 + eps) * scale, or LayerNorm (x - mu) / sqrt(var + eps) * scale + bias;
    statistics in float32."""
    x32 = x.astype(jnp.float32)
    if kind == "rms":
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    else:
        mu = jnp.mean(x32, axis=-1, keepdims=True)
        y = (x32 - mu) * jax.lax.rsqrt(jnp.var(x32, axis=-1, keepdims=True) + eps)
    y = y.astype(x.dtype) * scale.astype(x.dtype)
    return y if bias is None else y + bias.astype(x.dtype)


def activation(x, kind):
    if kind == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=(kind == "gelu_tanh"))


HIDDEN_SCORE = float(np.finfo(np.float32).min)  # the score of a key the rule hides from a query


def attention_bias(mask):
    """The additive form of a bool attention mask: 0.0 where it admits a key, HIDDEN_SCORE where not
    (float32). s + HIDDEN_SCORE rounds to HIDDEN_SCORE for every |s| < 1e31, so scores under it
    equal the masked ones of `masked_attention` exactly."""
    return jnp.where(mask, 0.0, HIDDEN_SCORE).astype(jnp.float32)


def masked_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask_Bx1xTxS, scale: float):
    """o_i = sum_j e_ij v_j / sum_j e_ij, e_ij = exp(s_ij - max_j s_ij), s_ij = scale q_i . k_j where
    the mask admits j (else HIDDEN_SCORE); query heads grouped over the K key/value heads (H = K G).
    Scores and the normalization in float32; a row that sees nothing averages all values (never
    NaN). Same math as `jax.nn.dot_product_attention`; head-major layouts and normalizing after
    the value product make it about 10% faster in the CPU train step (docs/performance.md).

    `mask_Bx1xTxS` is bool, or its float32 `attention_bias` (added to the scores): the same values;
    the bias's backward skips a select over the scores (tiled attention's backward 1.2x faster on
    the CPU), but a row that sees nothing then sends gradient to q and k (callers that take it
    replace such rows, as `attention.tiled_attention` does)."""
    B, T, H, E = q_BxTxHxE.shape
    K = k_BxSxKxE.shape[2]
    q_BxKxGxTxE = (q_BxTxHxE * jnp.asarray(scale, q_BxTxHxE.dtype)).reshape(B, T, K, H // K, E).transpose(
        0, 2, 3, 1, 4)
    k_BxKxSxE, v_BxKxSxE = k_BxSxKxE.transpose(0, 2, 1, 3), v_BxSxKxE.transpose(0, 2, 1, 3)
    s = jnp.einsum("bkgte,bkse->bkgts", q_BxKxGxTxE, k_BxKxSxE, preferred_element_type=jnp.float32)
    if mask_Bx1xTxS.dtype == jnp.bool_:
        s = jnp.where(mask_Bx1xTxS[:, :, None], s, HIDDEN_SCORE)
    else:
        s = s + mask_Bx1xTxS[:, :, None]
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))  # shift-invariant: no gradient
    o = jnp.einsum("bkgts,bkse->bkgte", e.astype(v_BxKxSxE.dtype), v_BxKxSxE, preferred_element_type=jnp.float32)
    o = o / jnp.sum(e, axis=-1, keepdims=True)
    return o.astype(q_BxTxHxE.dtype).transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)


def dense(x, w, in_axes: int = 1, *, float32_product: bool = True):
    """x [..., I1..Ik] @ w [I1..Ik, O...] (k = in_axes) as ONE 2-D matmul over the flattened rows,
    returned in x's dtype (accumulated in float32 either way). Same math as the einsum; on XLA:CPU
    the backward of a 3-D einsum such as "btd,df->btf" materializes transposed copies of the [B*T, F]
    activations and runs about 2x slower.

    `float32_product`: ask for the float32 product and round it to x's dtype. XLA:CPU runs a bfloat16
    matmul in float32 anyway, and asking keeps it from holding float32 copies of a bfloat16 stack's
    outputs (0.5 GB less in the long-row step of docs/performance.md), so the decoder asks on the
    CPU only. Elsewhere the product's cotangent would come back float32 and the backward's matmuls
    (two thirds of training's) would take float32 operands on GPU (bfloat16 x float32 on TPU);
    without it they take x's dtype, as the forward's do."""
    lead, inner = x.shape[:x.ndim - in_axes], x.shape[x.ndim - in_axes:]
    k = math.prod(inner)
    x_MxK, w_KxN = x.reshape(-1, k), w.reshape(k, -1)
    if float32_product:
        y = jnp.matmul(x_MxK, w_KxN, preferred_element_type=jnp.float32).astype(x.dtype)
    else:
        y = jnp.matmul(x_MxK, w_KxN.astype(x.dtype))
    return y.reshape(*lead, *w.shape[in_axes:])
