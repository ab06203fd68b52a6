"""The train state on the mesh: the policy's parameters (or LoRA adapters over frozen weights), the
optimizer state and the frozen reference, each placed in the shardings of its logical axes."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax import sharding
from dpo_jax.models import lora
from dpo_jax.train import step


def init_state(model, reference, tx, mesh, seed: int, lora_cfg: Optional[lora.LoraConfig] = None,
               rules=sharding.DEFAULT_RULES, loss_state=None):
    """(TrainState placed on the mesh, its shardings, graphdef). With `lora_cfg`, the trained params
    are fresh adapters and the model's weights become the frozen `base_params`. `rules`: the
    logical-axis rules (`config.mesh.rules`). `loss_state`: the objective's running statistics
    (`Objective.init_state()`, float32 scalars), replicated; None for an objective without any."""
    graphdef, params_state = nnx.split(model)
    params = nnx.to_pure_dict(params_state)
    p_sh = sharding.param_shardings(params, graphdef, mesh, rules)
    params = jax.device_put(params, p_sh)
    rep = sharding.replicated(mesh)
    base, base_sh = None, None
    if lora_cfg is not None:
        base, base_sh = params, p_sh
        params = lora.init_adapters(base, lora_cfg, jax.random.key(seed))
        p_sh = sharding.logical_shardings(lora.adapter_logical_axes(params), params, mesh, rules)
        params = jax.device_put(params, p_sh)
    opt_sh = sharding.optimizer_shardings(tx, params, p_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    ref_params, ref_sh = None, None
    if reference is not None:
        ref_sh = base_sh or p_sh
        ref_params = jax.device_put(nnx.to_pure_dict(nnx.split(reference)[1]), ref_sh)
    state = step.TrainState(step=jax.device_put(jnp.int32(0), rep), params=params, opt_state=opt_state,
                            ref_params=ref_params, rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), rep),
                            base_params=base,
                            loss_state=jax.device_put(jax.tree.map(jnp.float32, loss_state), rep))
    shardings = step.TrainState(step=rep, params=p_sh, opt_state=opt_sh, ref_params=ref_sh, rng=rep,
                                base_params=base_sh, loss_state=jax.tree.map(lambda _: rep, loss_state))
    return state, shardings, graphdef
