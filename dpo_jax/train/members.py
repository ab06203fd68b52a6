"""Fused sweep members: K runs that differ only in loss hyper-parameters, trained as one program.

The K policies start from the same initialization (same seed and model), so their parameters and
optimizer states are stacked on a leading member axis and one update per member runs on
each batch (one member after the other inside the program: `lax.map` keeps the plain step's
kernels, where a vmap over member weights turned every matmul into a slower batched one on CPU); the
data pipeline, the batch and the reference forward are shared, and beta / loss
weights / variant hyper-parameters enter as arrays [K]. Member k computes exactly what the separate
run k computes (the same batches, the same reference log-probs, its own update).

What may differ between fused members: `loss.beta`, `loss.weights` and every numeric loss
hyper-parameter (`loss.label_smoothing`, `loss.gamma`, ...). Everything else (loss names, model,
data, optimizer, seed, steps) must agree; `groups` sorts a sweep's configs into fusable groups.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import sharding

# Keys that must NOT differ between fused members, by prefix, beyond which the loss section's
# numeric hyper-parameters are free.
FREE_SECTION = "loss"
FIXED_LOSS_KEYS = ("name", "ld_alpha")


def _flat(config) -> dict[str, Any]:
    out = {}

    def walk(prefix, node):
        for key in sorted(node.keys()):
            value = node[key]
            path = f"{prefix}{key}"
            if hasattr(value, "keys"):
                walk(path + ".", value)
            else:
                out[path] = value
    walk("", config)
    return out


def fixed_part(config) -> str:
    """The config minus the keys fused members may vary (a hashable signature)."""
    flat = _flat(config)
    fixed = {k: v for k, v in flat.items()
             if not k.startswith(FREE_SECTION + ".") or k.split(".", 1)[1] in FIXED_LOSS_KEYS}
    fixed["loss.ld_alpha_set"] = flat.get("loss.ld_alpha") is not None
    fixed.pop("loss.ld_alpha", None)
    return json.dumps(fixed, sort_keys=True, default=str)


def groups(configs: Sequence[Any]) -> list[list[int]]:
    """Indices of configs that can be fused together (same fixed part), in first-seen order."""
    by_sig: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        by_sig.setdefault(fixed_part(c), []).append(i)
    return list(by_sig.values())


def stack_hparams(hps: Sequence[dict]) -> dict[str, np.ndarray]:
    """[{name: scalar or [n]}] * K -> {name: [K] or [K, n]} (every member has the same keys)."""
    keys = set(hps[0])
    for i, hp in enumerate(hps):
        if set(hp) != keys:
            raise ValueError(f"fused member {i} has loss hyper-parameters {sorted(hp)}, member 0 has {sorted(keys)}")
    return {k: np.stack([np.asarray(hp[k], np.float32) for hp in hps]) for k in sorted(keys)}


def stack_state(state, shardings, k: int):
    """(state with params, opt_state and loss_state (a loss's running statistics) stacked K times,
    the matching shardings)."""
    is_sh = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731

    def stack_tree(tree, sh_tree):
        sh_k = jax.tree.map(sharding.stacked_sharding, sh_tree, is_leaf=is_sh)
        out = jax.jit(lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), t),
                      out_shardings=sh_k)(tree)
        return out, sh_k

    params, p_sh = stack_tree(state.params, shardings.params)
    opt_state, o_sh = stack_tree(state.opt_state, shardings.opt_state)
    loss_state, l_sh = (None, None) if state.loss_state is None else stack_tree(state.loss_state,
                                                                                shardings.loss_state)
    return (state.replace(params=params, opt_state=opt_state, loss_state=loss_state),
            shardings.replace(params=p_sh, opt_state=o_sh, loss_state=l_sh))


def member(tree, k: int):
    """Member k's slice of a stacked tree (host arrays)."""
    return jax.tree.map(lambda x: np.asarray(x[k]), jax.device_get(tree))
