"""Context parallelism: every row's sequence sharded over the `context` mesh axis.

With C = mesh.shape['context'] > 1, the decoder's activations x_BxTxD are laid out [batch axes,
context, ...]: each device holds T / C consecutive positions of its rows, so the residual stream,
the MLP and the saved activations of a layer shrink by C. Attention is the one operation that
mixes positions. Each device keeps its own T / C queries and all-gathers the keys and values
(and their segment / position / branch ids) of the row over the context axis:

    o_i = sum_j softmax_j(scale q_i . k_j | rule) v_j,   i in this device's block, j in 0 .. T-1

computed by the same attention (dense or blockwise) as without context parallelism, under the
rule of docs/design.md on the gathered ids, so the standard, prefix-shared and packed layouts
work unchanged (the prefix and its branches may sit on different devices). The transpose of the
all-gather is a reduce-scatter, so dk and dv come back summed onto the devices that own them.
Per layer a device holds the gathered K / V of its rows ([B, T, K, E] each, K the key/value
heads), not [T, T] scores: blockwise attention keeps memory linear in T.

The model knows no mesh: the mesh comes from the context of the trace (`jax.set_mesh`, which the
train and eval steps enter: `train/loop.compiled_steps`). Without a mesh, or with C = 1, nothing
changes. Decoding with a KV cache is never context-parallel.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from dpo_jax.sharding import BATCH_AXES, CONTEXT_AXIS, TENSOR_AXIS


def _mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or CONTEXT_AXIS not in mesh.axis_names else mesh


def on_mesh() -> bool:
    """Whether the trace has a mesh with a `context` axis (of any size)."""
    return _mesh() is not None


def shards() -> int:
    """C: the size of the `context` axis of the mesh being traced under (1 without one)."""
    mesh = _mesh()
    return 1 if mesh is None else mesh.shape[CONTEXT_AXIS]


def _size(mesh, axes) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def _batch_axes(mesh, B: int):
    """The batch axes the rows are split over, or None when B does not divide by them."""
    return BATCH_AXES if B % _size(mesh, BATCH_AXES) == 0 else None


def check_length(T: int) -> None:
    """T must split evenly over the context shards (a ValueError names the mesh key)."""
    C = shards()
    if C > 1 and T % C:
        raise ValueError(f"rows of {T} tokens cannot be split over config.mesh.shape.context={C} devices; "
                         f"choose row lengths (data.max_length and its buckets) that are multiples of {C}")


def constrain(x_BxTx_):
    """x laid out [batch axes, context, replicated ...] when C > 1; unchanged otherwise."""
    mesh = _mesh()
    if mesh is None or mesh.shape[CONTEXT_AXIS] == 1:
        return x_BxTx_
    spec = P(_batch_axes(mesh, x_BxTx_.shape[0]), CONTEXT_AXIS)
    return jax.lax.with_sharding_constraint(x_BxTx_, jax.sharding.NamedSharding(mesh, spec))


def attend(local: Callable, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, q_ids, k_ids, *extra):
    """local(q_BxTcxHxE, k_BxTxKxE, v_BxTxKxE, q_ids (Tc), k_ids (T), *extra) -> o_BxTcxHxE on each
    device's block of Tc = T / C queries against the all-gathered keys; returns o_BxTxHxE laid out
    like q. `extra`: replicated operands (e.g. a layer's traced sliding-window flag). Query and key
    ids come from the same rows (no KV cache): q_ids and k_ids are [B, T] each."""
    mesh = _mesh()
    B, T, H, _ = q_BxTxHxE.shape
    K = k_BxTxKxE.shape[2]
    check_length(T)
    batch = _batch_axes(mesh, B)
    tp = mesh.shape.get(TENSOR_AXIS, 1)
    heads = TENSOR_AXIS if tp > 1 and H % tp == 0 and K % tp == 0 else None
    tok, ids = P(batch, CONTEXT_AXIS, heads, None), P(batch, CONTEXT_AXIS)

    def body(q, k, v, qi, ki, *ex):
        gather = lambda x: jax.lax.all_gather(x, CONTEXT_AXIS, axis=1, tiled=True)  # noqa: E731
        return local(q, gather(k), gather(v), qi, tuple(gather(x) for x in ki), *ex)

    n_ids = len(q_ids)
    fn = jax.shard_map(body, mesh=mesh,
                       in_specs=(tok, tok, tok, (ids,) * n_ids, (ids,) * n_ids) + (P(),) * len(extra),
                       out_specs=tok, check_vma=False)  # every operand but `extra` is device-varying
    return fn(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, tuple(q_ids), tuple(k_ids), *extra)
