"""Low-rank adapters (LoRA) on the stacked-layer `Decoder` parameters, as pure functions.

Each adapted projection W (a `layers/<name>` array with a leading L axis) is viewed as an
[L, in, out] matrix: wq/wk/wv [L, D, H|K, E] -> [L, D, (H|K)*E], wo [L, H, E, D] -> [L, H*E, D],
w_gate/w_up [L, D, F], w_down [L, F, D]. Its adapter is A [L, in, r], B [L, r, out] and

    W' = W + (alpha / r) * A @ B        (reshaped back to W's shape).

The trainer keeps `params` = the adapters only and the frozen base weights apart; `merge` builds
the full parameter dict inside the step (the base under stop_gradient), so `jax.grad` of a loss
of `merge(base, adapters, cfg)` w.r.t. `adapters` is the LoRA gradient and the base can never
move. A = normal / sqrt(in), B = 0: the adapted model starts equal to the base. Cost note: the
merged forward differentiates through the dense W', so the backward forms the dense [L, in, out]
gradient of each adapted projection once per step before projecting it onto A and B (no optimizer
state or copy of the base is kept, but the matmul FLOPs of that gradient are paid).
`merged_model` / `export_merged` give a plain Decoder / Hugging Face checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from dpo_jax.models import hf
from dpo_jax.models.transformer import Decoder

GROUPS = {"attention": ("wq", "wk", "wv", "wo"), "mlp": ("w_gate", "w_up", "w_down")}
# per projection: how many axes after L form the matmul input, and the logical axes of (in, out)
_PROJECTIONS = {
    "wq": (1, ("embed", "heads")),
    "wk": (1, ("embed", "kv_heads")),
    "wv": (1, ("embed", "kv_heads")),
    "wo": (2, ("heads", "embed")),
    "w_gate": (1, ("embed", "mlp")),
    "w_up": (1, ("embed", "mlp")),
    "w_down": (1, ("mlp", "embed")),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r >= 1, alpha > 0 (scale alpha / r), targets: groups ('attention', 'mlp') and/or
    projection names ('wq', 'wk', 'wv', 'wo', 'w_gate', 'w_up', 'w_down')."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention", "mlp")

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be an integer >= 1; got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be a finite number > 0; got {self.alpha!r}")
        allowed = (*GROUPS, *_PROJECTIONS)
        bad = [t for t in targets if t not in allowed]
        if not targets or bad:
            raise ValueError(f"LoraConfig.targets must be a non-empty tuple of {list(allowed)}; "
                             f"got {list(targets)}" + (f" (unknown: {bad})" if bad else ""))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def projection_names(self, layer_params: Mapping[str, Any]) -> tuple[str, ...]:
        """The adapted projections present in `layer_params` (the `layers` dict), in a fixed order.
        Groups skip what a family lacks (GPT-2 has no w_gate); a projection named explicitly must exist."""
        names = []
        for t in self.targets:
            if t in _PROJECTIONS and t not in layer_params:
                raise ValueError(f"LoraConfig.targets names {t!r}, which the model's layers lack "
                                 f"(layers: {sorted(layer_params)})")
            names += [n for n in GROUPS.get(t, (t,)) if n in layer_params]
        return tuple(n for n in _PROJECTIONS if n in names)


def _layers(base_params: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(base_params, Mapping) or not isinstance(base_params.get("layers"), Mapping):
        raise ValueError("base_params must be the Decoder's pure parameter dict (nnx.to_pure_dict) with a "
                         "'layers' dict of stacked arrays")
    return base_params["layers"]


def _matrix_shape(name: str, shape) -> tuple[int, int, int]:
    """(L, in, out) of the matrix view of projection `name` with array shape `shape`."""
    if name not in _PROJECTIONS:
        raise ValueError(f"adapter {name!r} is not a LoRA-able projection; allowed: {list(_PROJECTIONS)}")
    n_in_axes = _PROJECTIONS[name][0]
    if len(shape) < n_in_axes + 2:
        raise ValueError(f"layers/{name} has shape {tuple(shape)}; expected [L, ...] with {n_in_axes} input axes")
    return shape[0], math.prod(shape[1:1 + n_in_axes]), math.prod(shape[1 + n_in_axes:])


def init_adapters(base_params: Mapping[str, Any], cfg: LoraConfig, key, dtype=jnp.float32) -> dict:
    """{name: {"a": [L, in, r] ~ N(0, 1/in), "b": [L, r, out] = 0}} for every targeted projection."""
    layers = _layers(base_params)
    names = cfg.projection_names(layers)
    if not names:
        raise ValueError(f"LoraConfig.targets {list(cfg.targets)} select no projection of layers {sorted(layers)}")
    dims = {name: _matrix_shape(name, layers[name].shape) for name in names}

    def make(key):
        out = {}
        for name, (L, n_in, n_out) in dims.items():  # A depends on the key and the name, not on other targets
            k = jax.random.fold_in(key, list(_PROJECTIONS).index(name))
            a = jax.random.normal(k, (L, n_in, cfg.rank), jnp.float32) / math.sqrt(n_in)
            out[name] = {"a": a.astype(dtype), "b": jnp.zeros((L, cfg.rank, n_out), dtype)}
        return out

    return jax.jit(make)(key)  # one small program rather than one eager dispatch per array


def adapter_logical_axes(adapters: Mapping[str, Any]) -> dict:
    """{name: {"a": P('layers', <in axis>, None), "b": P('layers', None, <out axis>)}}: logical axis
    names (as `nnx.get_partition_spec` gives for the model) for `sharding.logical_to_mesh`. The
    flattened head dims of wq/wk/wv/wo take the heads / kv_heads axis (heads-major layout)."""
    out = {}
    for name in adapters:
        if name not in _PROJECTIONS:
            raise ValueError(f"adapter {name!r} is not a LoRA-able projection; allowed: {list(_PROJECTIONS)}")
        in_axis, out_axis = _PROJECTIONS[name][1]
        out[name] = {"a": PartitionSpec("layers", in_axis, None), "b": PartitionSpec("layers", None, out_axis)}
    return out


def _delta(name: str, adapter: Mapping[str, Any], shape, cfg: LoraConfig):
    """(alpha / r) * A @ B for projection `name`, float32, reshaped to the base array's `shape`."""
    L, n_in, n_out = _matrix_shape(name, shape)
    a, b = (adapter.get("a"), adapter.get("b")) if isinstance(adapter, Mapping) else (None, None)
    if a is None or b is None:
        raise ValueError(f"adapters[{name!r}] must be a dict with arrays 'a' and 'b'")
    r = cfg.rank
    if tuple(a.shape) != (L, n_in, r) or tuple(b.shape) != (L, r, n_out):
        raise ValueError(f"adapters[{name!r}]: expected a [L, in, rank] = {(L, n_in, r)} and b [L, rank, out] = "
                         f"{(L, r, n_out)} for layers/{name} {tuple(shape)}; got a {tuple(a.shape)}, b {tuple(b.shape)}")
    ab = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
    return (cfg.scale * ab).reshape(shape)


def merge(base_params: Mapping[str, Any], adapters: Mapping[str, Any], cfg: LoraConfig) -> dict:
    """The full parameter dict with W' = stop_gradient(W) + (alpha/r) A @ B on each adapted
    projection (computed in float32, cast to W's dtype); every other array is the base's, under
    stop_gradient. Pure and jit-able; gradients reach only `adapters`."""
    _layers(base_params)
    frozen = jax.tree.map(jax.lax.stop_gradient, dict(base_params))
    layers = dict(frozen["layers"])
    for name, adapter in adapters.items():
        if name not in layers:
            raise ValueError(f"adapters has {name!r}, which base_params['layers'] lacks (layers: {sorted(layers)})")
        w = layers[name]
        layers[name] = (w.astype(jnp.float32) + _delta(name, adapter, w.shape, cfg)).astype(w.dtype)
    return {**frozen, "layers": layers}


def merged_model(graphdef, base_params: Mapping[str, Any], adapters: Mapping[str, Any], cfg: LoraConfig) -> Decoder:
    """A plain Decoder holding the merged weights (`nnx.merge(graphdef, merge(...))`)."""
    return nnx.merge(graphdef, merge(base_params, adapters, cfg))


def export_merged(graphdef, base_params: Mapping[str, Any], adapters: Mapping[str, Any], cfg: LoraConfig, out_dir,
                  **export_kw):
    """Write the merged model as a Hugging Face checkpoint (`hf.export_model`; kwargs pass through)."""
    return hf.export_model(merged_model(graphdef, base_params, adapters, cfg), out_dir, **export_kw)


def num_adapter_params(adapters: Mapping[str, Any]) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapters))
