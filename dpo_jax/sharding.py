"""The device mesh and every partitioning decision: logical axis names -> mesh axes.

The model names each parameter dimension with a logical axis (`embed`, `mlp`, `heads`, `kv_heads`,
`kv`, `vocab`, `layers`); `rules` maps logical names to mesh axes (`data`, `fsdp`, `tensor`). The
rules are a config value, `mesh.rules` (default `DEFAULT_RULES`), checked by `check_rules`; every
sharding of the train state (parameters, LoRA adapters, optimizer state, stacked fused members)
is decided here.
A dimension is sharded only if its size divides evenly by the mesh axes it maps to and no other
dimension of the same array already uses them; otherwise it is replicated. Batches are sharded on
their leading (row / pair) dimension over (`data`, `fsdp`). The `context` axis shards each row's
positions inside the model (`models/context_parallel.py`); parameters are replicated over it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")
CONTEXT_AXIS = "context"  # shards each row's positions (models/context_parallel.py)
TENSOR_AXIS = "tensor"
# Megatron-style tensor parallelism for heads/MLP/vocab, ZeRO-3-style FSDP over the model width.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("batch", BATCH_AXES),
    ("length", None),
)


LOGICAL_AXES = ("layers", "vocab", "embed", "heads", "kv_heads", "kv", "mlp", "batch", "length")


def check_rules(rules, key: str = "mesh.rules") -> tuple[tuple[str, Any], ...]:
    """`rules` as a tuple of (logical axis, mesh axis | tuple of mesh axes | None); a ValueError
    names `config.<key>` and what is wrong (an unknown logical or mesh axis, a repeated name)."""
    out, seen = [], set()
    for i, rule in enumerate(rules):
        if not isinstance(rule, (tuple, list)) or len(rule) != 2:
            raise ValueError(f"config.{key}[{i}]={rule!r}: want (logical axis, mesh axes)")
        name, axes = rule
        if name not in LOGICAL_AXES:
            raise ValueError(f"config.{key}[{i}]: unknown logical axis {name!r}; allowed: {', '.join(LOGICAL_AXES)}")
        if name in seen:
            raise ValueError(f"config.{key}: logical axis {name!r} has two rules")
        seen.add(name)
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        bad = [a for a in flat if a not in MESH_AXES]
        if bad:
            raise ValueError(f"config.{key}[{i}] ({name!r}): unknown mesh axes {bad}; allowed: {', '.join(MESH_AXES)}")
        out.append((name, None if axes is None else (axes if isinstance(axes, str) else tuple(axes))))
    return tuple(out)


def mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolve one -1 entry of `mesh.shape` so that the product equals the number of devices."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh.shape has unknown axes {unknown}; allowed axes: {list(MESH_AXES)}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh.shape={dict(shape)}: sizes must be positive, with at most one -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh.shape={dict(shape)}: {num_devices} devices are not divisible by {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh.shape={dict(shape)} needs {math.prod(sizes.values())} devices; "
                         f"{num_devices} are available")
    return sizes


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with axes MESH_AXES from `mesh.shape`, e.g. {'data': -1, 'fsdp': 1, 'tensor': 1}."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(shape, len(devices))
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def _axis_size(mesh: Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_mesh(logical: Iterable[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array with logical axis names, replicating what cannot be sharded."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(logical, shape):
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        flat = (axes,) if isinstance(axes, str) else tuple(axes)
        flat = tuple(a for a in flat if a not in used and mesh.shape[a] > 1)
        if not flat or size % _axis_size(mesh, flat):
            out.append(None)
            continue
        used.update(flat)
        out.append(flat[0] if len(flat) == 1 else flat)
    return PartitionSpec(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """NamedShardings for every leaf of an NNX state (abstract or concrete), from its logical axes."""
    logical = nnx.get_partition_spec(state)

    def one(spec_var, var):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        names = tuple(spec_var.get_value() if isinstance(spec_var, nnx.Variable) else spec_var or ())
        names = names + (None,) * (len(value.shape) - len(names))
        return NamedSharding(mesh, logical_to_mesh(names, value.shape, mesh, rules))

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(one, logical, state, is_leaf=is_var)


def param_shardings(params: dict, graphdef, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> dict:
    """Pure dict of NamedShardings for a model's parameters (a pure dict of `graphdef`), from their
    logical axes."""
    state = nnx.merge(graphdef, params)
    return nnx.to_pure_dict(state_shardings(nnx.state(state, nnx.Param), mesh, rules))


def logical_shardings(logical_tree, arrays, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """NamedShardings for a tree of arrays whose logical axes are a matching tree of PartitionSpecs
    (e.g. LoRA adapters: `lora.adapter_logical_axes`)."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    return jax.tree.map(lambda names, a: NamedSharding(mesh, logical_to_mesh(tuple(names), a.shape, mesh, rules)),
                        logical_tree, arrays, is_leaf=is_spec)


def optimizer_shardings(tx, params, params_sh, mesh: Mesh):
    """The optimizer state's shardings: each moment like its parameter, every other leaf replicated."""
    is_sh = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    return optax.tree_utils.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), params_sh,
                                            transform_non_params=lambda _: replicated(mesh), is_leaf=is_sh)


def stacked_sharding(sharding: NamedSharding) -> NamedSharding:
    """The sharding of an array stacked on a new leading axis (fused members): that axis replicated."""
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))


def traced_under(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` traced with `mesh` as the context mesh, so that the model sees its `context` axis
    (`models/context_parallel.py`); wrap a function before `jax.jit`."""
    @functools.wraps(fn)
    def under(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return under


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Shard the leading dimension over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def process_pair_offset(mesh: Mesh, pairs_per_process: int) -> int:
    """Where this process's pairs start in a global batch of `pairs_per_process` pairs per process:
    process i's block, i * pairs_per_process (`data.layouts` offsets its `pair_ids` by it). The
    global batch concatenates the processes' rows in the order of their devices on the batch axes,
    so this checks that the process's devices hold exactly that block (true of `make_mesh`)."""
    total = pairs_per_process * jax.process_count()
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((total,))
    covered = sorted({i for idx in index_map.values() for i in range(*idx[0].indices(total))})
    start = jax.process_index() * pairs_per_process
    if covered != list(range(start, start + pairs_per_process)):
        raise ValueError(f"process {jax.process_index()}: its devices hold pairs {covered[:4]}... of the global "
                         f"batch, not the block {start}..{start + pairs_per_process - 1} in process order; build "
                         f"the mesh from jax.devices() in order (sharding.make_mesh)")
    return start


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded over (data, fsdp): the processes'
    rows concatenated in device order (every process must lay out the same shapes, and number its
    pairs from `process_pair_offset`: `data.pipeline` does both)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local_batch.items()}


def check_batch_divisible(num_rows: int, mesh: Mesh, key: str = "data.batch_size") -> None:
    n = _axis_size(mesh, BATCH_AXES)
    if num_rows % n:
        raise ValueError(f"{key}: {num_rows} rows per batch cannot be split over the {n} devices of the "
                         f"mesh axes {BATCH_AXES}; choose a multiple of {n}")
