"""Which attention a decoder layer runs, on which rows: the one place that chooses.

`layer_attention(cfg, T, q_ids, k_ids)` returns attend(slides, q_BxTxHxE, k_BxSxKxE, v_BxSxKxE) ->
o_BxTxHxE under the rule of docs/design.md between the queries' and keys' (segment, position,
branch) ids, the sliding window where the layer's `slides` (a traced bool under the layer scan)
says. In order:
1. `model.attention='fused'`: the accelerator's kernel (cuDNN on GPU, Pallas splash on TPU,
   `fused_attention.select`) where it expresses the mask of `cfg.attention_layout` (the rows' data
   layout), with no KV cache, no context shards and one static window; run on each device's rows
   (`context_parallel.attend` over the traced mesh). Elsewhere 'fused' runs as 'auto'.
2. A mesh with `context` > 1 and no KV cache: each device attends with its block of queries over
   the all-gathered keys (`models/context_parallel.py`), with the attention of 3 inside.
3. `attention.resolve(cfg.attention, T)`: dense (`layers.masked_attention`, each [B, 1, T, S] mask
   built once for all layers), tiled (`attention.tiled_attention`, each query tile's mask built
   once for all layers) or blockwise (`attention.blockwise_attention`, masks per block pair).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dpo_jax.models import attention as _attention
from dpo_jax.models import context_parallel, fused_attention
from dpo_jax.models.layers import attention_mask, masked_attention


def backend() -> str:
    """The platform the model is compiled for (`jax.default_backend()`)."""
    return jax.default_backend()


def _windows(cfg):
    """The window every layer uses (None or an int), or 'mixed' when some layers slide and some not."""
    kinds = set(cfg.layer_slides)
    if kinds == {True}:
        return cfg.sliding_window
    return None if kinds == {False} else "mixed"


def fused_kernel(cfg, cached: bool) -> str | None:
    """'cudnn', 'splash' or None: the fused kernel this layer runs (rule 1 of the module docstring)."""
    window = _windows(cfg)
    if cfg.attention != "fused" or cached or window == "mixed" or context_parallel.shards() > 1:
        return None
    return fused_attention.select(backend(), layout=cfg.attention_layout, sliding_window=window, decoding=cached,
                                  dtype=cfg.dtype, head_dim=cfg.head_dim)


def layer_attention(cfg, T: int, q_ids, k_ids, cached: bool = False):
    """attend(slides, q, k, v) for rows of T query tokens (see the module docstring)."""
    scale = cfg.head_dim ** -0.5
    kernel = fused_kernel(cfg, cached)
    if kernel is not None:
        kw = dict(sliding_window=_windows(cfg))
        if kernel == "splash":
            kw["interpret"] = jax.default_backend() != "tpu"  # runs anywhere, slowly, off TPU

        def fused(q, k, v, qi, ki):
            return fused_attention.fused_attention(kernel, q, k, v, qi, ki, scale, **kw)

        if context_parallel.on_mesh():  # a Pallas / cuDNN call on each device's own rows
            return lambda slides, q, k, v: context_parallel.attend(fused, q, k, v, q_ids, k_ids)
        return lambda slides, q, k, v: fused(q, k, v, q_ids, k_ids)
    if not cached and context_parallel.shards() > 1:
        def sharded(slides, q, k, v):
            local = lambda q, k, v, qi, ki, sl: local_attention(cfg, T, qi, ki)(sl, q, k, v)  # noqa: E731
            return context_parallel.attend(local, q, k, v, q_ids, k_ids, slides)

        return sharded
    return local_attention(cfg, T, q_ids, k_ids)


def local_attention(cfg, T: int, q_ids, k_ids):
    """Dense, tiled or blockwise attention (rule 3) on the given queries and keys; T (the whole row)
    picks. Tiled needs the keys of the queries' own rows (no KV cache, no context shards): with
    other keys it runs blockwise."""
    scale = cfg.head_dim ** -0.5
    window = _windows(cfg)
    kind = _attention.resolve(cfg.attention, T)
    block = cfg.attention_block or None  # None: this platform's attention.BLOCK
    if kind == "tiled" and q_ids[0].shape[1] != k_ids[0].shape[1]:
        kind = "blockwise"
    if kind == "blockwise":
        def blockwise(slides, q, k, v):
            w = jnp.where(slides, cfg.sliding_window, _attention.NO_WINDOW) if window == "mixed" else window
            return _attention.blockwise_attention(q, k, v, q_ids, k_ids, scale, sliding_window=w, block_q=block,
                                                  block_k=block)

        return blockwise
    build = functools.partial(_attention.tile_masks, block=block) if kind == "tiled" else (
        lambda qi, ki, sliding_window: attention_mask(*qi, *ki, sliding_window=sliding_window))
    masks = {slides: build(q_ids, k_ids, sliding_window=cfg.sliding_window if slides else None)
             for slides in set(cfg.layer_slides)}

    def layer_masks(slides):
        if len(masks) == 1:
            return next(iter(masks.values()))
        return jax.tree.map(lambda on, off: jnp.where(slides, on, off), masks[True], masks[False])

    if kind == "tiled":
        return lambda slides, q, k, v: _attention.tiled_attention(q, k, v, layer_masks(slides), scale)
    return lambda slides, q, k, v: masked_attention(q, k, v, layer_masks(slides), scale)
