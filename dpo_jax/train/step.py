"""One training or evaluation step: (state, batch, hp) -> (state, metrics). The loss is passed in.

The policy runs ONE forward over every row of the batch (chosen and rejected rows together, or
prefix-shared rows; see docs/design.md, "The batch"); log-probs come from the final hidden states
through the chunked unembedding (`dpo_jax.logprobs`), so [B, T, V] logits never exist. The
reference's log-probs are computed outside `jax.grad` (and under `stop_gradient`), read from the
batch (precomputed), or are zero (reference-free losses). Hyper-parameters `hp` (beta, loss
weights, ...) are traced arrays: changing them never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from dpo_jax import logprobs, losses
from dpo_jax.losses import listwise
from dpo_jax.models import lora
from dpo_jax.train import reference_cache

REF_MODES = ("frozen", "precomputed", "none", "base", "sync")
PRECOMPUTED_KEYS = tuple(f"{k}_P" for k in reference_cache.KEYS)  # the per-pair batch fields of the cache


class TrainState(struct.PyTreeNode):
    """Everything a step changes. `params`/`ref_params` are pure dicts of arrays (nnx.split state)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ref_params: Any = None  # the frozen or TR-DPO-synced reference; None for other modes
    rng: Optional[jax.Array] = None
    base_params: Any = None  # LoRA: the frozen base weights (then `params` holds the adapters only)
    # running statistics of the losses that have them (beta_dpo): {loss: {key: float32 scalar}},
    # replicated ([K] per key with fused members); None for an objective without any
    loss_state: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static parts of the step (closed over by jit)."""

    graphdef: Any
    objective: losses.Objective
    tx: optax.GradientTransformation
    lr: Callable[[Any], Any]
    ref_mode: str = "frozen"
    grad_accum: int = 1
    chunk_size: int = logprobs.DEFAULT_CHUNK_SIZE
    vocab_chunk_size: int = logprobs.DEFAULT_VOCAB_CHUNK_SIZE
    naive_logits: bool = False  # plain [N, V] float32 logits instead of the chunked path (for comparison)
    lora: Optional[lora.LoraConfig] = None  # a LoRA policy: params are adapters over state.base_params
    members: int = 0  # K > 0: K fused policies (stacked params, hp arrays [K]) sharing batch and reference
    logit_bias_V: Any = None  # float32 [V] added to every model's logits (policy and reference), e.g. a vocabulary mask

    def __post_init__(self):
        check_ref_mode(self.ref_mode, self.objective, has_lora=self.lora is not None)
        check_members(self.members, has_lora=self.lora is not None, ref_mode=self.ref_mode)


def check_members(members: int, *, has_lora: bool, ref_mode: str) -> None:
    """Fused members (K > 0) train full policies against a frozen, precomputed or no reference: a
    LoRA base or a reference synced to each member is not shared by the K members."""
    if members and (has_lora or ref_mode in ("sync", "base")):
        raise ValueError("fused members support full fine-tuning with reference.mode frozen, precomputed or none "
                         f"(got reference.mode={ref_mode!r}{', a LoRA policy' if has_lora else ''})")


def check_ref_mode(mode: str, objective: losses.Objective, *, has_lora: bool, key: str = "",
                   loss_name: Optional[str] = None) -> None:
    """The rules of a reference mode: one of REF_MODES; 'none' only for reference-free losses;
    'precomputed' only for pairs; 'base' only with a LoRA policy. Messages name `key` + 'reference.mode' (`config_check` passes 'config.')."""
    if mode not in REF_MODES:
        raise ValueError(f"{key}reference.mode={mode!r}; allowed: {', '.join(REF_MODES)}")
    if mode == "none" and objective.uses_reference:
        free = sorted({s.name for s in losses.LOSSES.values() if not s.uses_reference})
        name = loss_name if loss_name is not None else "+".join(objective.names)
        raise ValueError(f"{key}reference.mode='none' is only for reference-free losses ({', '.join(free)}); "
                         f"{key}loss.name={name!r} uses a reference")
    if mode == "precomputed" and objective.batch_kind == "lists":
        raise ValueError(f"{key}reference.mode='precomputed' caches per-pair log-probs; the losses of ranked lists "
                         f"({'+'.join(objective.names)}) take the reference's per-response log-probs: use 'frozen'")
    if mode == "base" and not has_lora:
        raise ValueError(f"{key}reference.mode='base' needs a LoRA policy: set {key}model.lora.rank > 0")


def model_logps(cfg: StepConfig, params, batch, *, reference: bool = False):
    """The summed completion log-probs of the model with `params` on `batch`: per pair
    (`logprobs.SequenceLogps`), or per list and slot ([P, K]) for an objective of ranked lists.
    `reference`: a forward never differentiated, run as a scan over the layers (the same values;
    an unrolled stack let XLA:CPU keep every layer's temporaries of it, docs/performance.md)."""
    model = nnx.merge(cfg.graphdef, params)
    hidden_BxTxD = model(batch["tokens_BxT"], positions_BxT=batch["positions_BxT"],
                         segment_ids_BxT=batch["segment_ids_BxT"], branch_ids_BxT=batch["branch_ids_BxT"],
                         scan=True if reference else None)
    w_DxV, b_V = model.unembedding()
    if cfg.logit_bias_V is not None:
        b_V = cfg.logit_bias_V if b_V is None else b_V + cfg.logit_bias_V
    sizes = dict(bias_V=b_V, chunk_size=cfg.chunk_size, vocab_chunk_size=cfg.vocab_chunk_size, naive=cfg.naive_logits)
    if cfg.objective.batch_kind == "lists":
        if "scores_PxK" not in batch:
            raise ValueError(f"loss.name={'+'.join(cfg.objective.names)!r} trains on ranked lists, but the batch "
                             "has no 'scores_PxK' (lay it out with data.list_layouts)")
        return logprobs.list_completion_logps(hidden_BxTxD, w_DxV, batch, *batch["scores_PxK"].shape, **sizes)[0]
    return logprobs.completion_logps(hidden_BxTxD, w_DxV, batch, batch["pair_mask_P"].shape[0], **sizes)


def policy_params(cfg: StepConfig, params, base_params):
    """The full parameters of the policy: `params`, or the LoRA merge W + (alpha/r) A B over the base."""
    return params if cfg.lora is None else lora.merge(base_params, params, cfg.lora)


def reference_logps(cfg: StepConfig, state: TrainState, batch) -> Optional[logprobs.SequenceLogps]:
    """The reference's log-probs, never differentiated; None for reference-free training."""
    if cfg.ref_mode in ("frozen", "sync"):
        out = model_logps(cfg, jax.lax.stop_gradient(state.ref_params), batch, reference=True)
    elif cfg.ref_mode == "base":  # the LoRA policy with its adapters switched off
        out = model_logps(cfg, jax.lax.stop_gradient(state.base_params), batch, reference=True)
    elif cfg.ref_mode == "precomputed":
        missing = [k for k in PRECOMPUTED_KEYS if k not in batch]
        if missing:
            raise ValueError(f"reference.mode='precomputed' but the batch lacks {missing}")
        zeros = jnp.zeros_like(batch["ref_chosen_P"])
        out = logprobs.SequenceLogps(batch["ref_chosen_P"], batch["ref_rejected_P"], zeros, zeros,
                                     batch["ref_chosen_shared_P"], batch["ref_rejected_shared_P"])
    else:
        return None
    return jax.tree.map(jax.lax.stop_gradient, out)


def pair_logps(policy: logprobs.SequenceLogps, ref: Optional[logprobs.SequenceLogps], pair_mask_P) -> losses.PairLogps:
    if ref is None:
        zeros = jnp.zeros_like(policy.chosen)
        ref = logprobs.SequenceLogps(zeros, zeros, zeros, zeros, zeros, zeros)
    return losses.PairLogps(policy.chosen, policy.rejected, ref.chosen, ref.rejected, policy.chosen_len,
                            policy.rejected_len, policy.chosen_shared, policy.rejected_shared,
                            ref.chosen_shared, ref.rejected_shared, pair_mask=pair_mask_P.astype(jnp.float32))


def preference_logps(cfg: StepConfig, policy, ref, batch):
    """What the objective takes: `losses.PairLogps`, or `listwise.ListLogps` (policy and reference
    [P, K], the batch's scores and slot mask) for an objective of ranked lists; ref None is zeros."""
    if cfg.objective.batch_kind == "lists":
        return listwise.ListLogps(policy, jnp.zeros_like(policy) if ref is None else ref, batch["scores_PxK"],
                                  batch["slot_mask_PxK"], batch["pair_mask_P"].astype(jnp.float32))
    return pair_logps(policy, ref, batch["pair_mask_P"])


def _loss(params, cfg: StepConfig, ref, batch, hp, base_params=None, loss_state=None, rng=None):
    policy = model_logps(cfg, policy_params(cfg, params, base_params), batch)
    pairs = preference_logps(cfg, policy, ref, batch)
    loss, terms, new_loss_state = cfg.objective.apply(pairs, hp, loss_state, rng)
    return loss, (pairs, terms, new_loss_state)


def loss_rng(state: TrainState) -> Optional[jax.Array]:
    """The PRNG key of this step's stochastic loss parts (beta_dpo's filter): the state's key with
    the step folded in; None for a state without a key."""
    if state.rng is None:
        return None
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def check_loss_state(cfg: StepConfig, state: TrainState) -> None:
    if cfg.objective.init_state() is not None and state.loss_state is None:
        raise ValueError(f"loss.name={'+'.join(cfg.objective.names)!r} keeps running statistics: build the "
                         "TrainState with loss_state=objective.init_state() (train.state.init_state(loss_state=...))")


def batch_metrics(cfg: StepConfig, pairs: losses.PairLogps, loss, terms, hp, batch) -> dict[str, jax.Array]:
    reported = cfg.objective.metric_pairs(pairs, hp)
    rewards = listwise.list_metrics if isinstance(pairs, listwise.ListLogps) else losses.reward_metrics
    metrics = {"loss": loss, **terms, **rewards(reported, hp["beta"])}
    metrics["pairs"] = jnp.sum(batch["pair_mask_P"].astype(jnp.float32))
    metrics["tokens/input"] = jnp.sum(batch["segment_ids_BxT"] > 0).astype(jnp.float32)
    metrics["tokens/completion"] = jnp.sum(batch["loss_mask_BxT"]).astype(jnp.float32)
    return metrics


def _member_update(cfg: StepConfig, params, opt_state, hp, loss_state, *, count, base_params, ref, batch, rng):
    """Loss, gradient and optimizer update of one policy. The update is committed only when what it
    would commit is finite: the loss, the gradient norm, every updated parameter and every optimizer
    state entry (a NaN learning rate or an overflowing parameter is caught as well as a NaN loss);
    the loss's running statistics (`loss_state`) move with it."""
    (loss, (pairs, terms, new_loss_state)), grads = jax.value_and_grad(_loss, has_aux=True)(
        params, cfg, ref, batch, hp, base_params, loss_state, rng)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = cfg.tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((new_params, new_opt_state, new_loss_state))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    metrics = batch_metrics(cfg, pairs, loss, terms, hp, batch)
    metrics.update({"grad_norm": grad_norm, "learning_rate": cfg.lr(count // cfg.grad_accum),
                    "nonfinite": 1.0 - ok.astype(jnp.float32)})
    return keep(new_params, params), keep(new_opt_state, opt_state), keep(new_loss_state, loss_state), metrics


def all_finite(tree) -> jax.Array:
    """True iff every floating-point entry of `tree` is finite (integer leaves, e.g. counts, pass)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def train_step(cfg: StepConfig, state: TrainState, batch, hp) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer (micro-)step. A step whose loss, gradient, updated parameters or optimizer state
    are not finite leaves params and optimizer state unchanged and reports `nonfinite` = 1; the
    training loop decides whether to stop or go on.

    Fused members (`cfg.members` = K > 0): params and optimizer state carry a leading axis K, every
    hyper-parameter in `hp` is an array [K, ...], and one policy update per member runs (`lax.map`)
    on the same batch with the same reference log-probs (computed once); metrics are [K]. A loss
    with running statistics updates `state.loss_state` (per member: [K] entries).
    """
    check_loss_state(cfg, state)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}
    ref = reference_logps(cfg, state, batch)
    update = functools.partial(_member_update, cfg, count=state.step, base_params=state.base_params, ref=ref,
                               batch=batch, rng=loss_rng(state))
    if cfg.members:  # members one after the other inside one program (the same kernels as a plain step)
        params, opt_state, loss_state, metrics = jax.lax.map(
            lambda x: update(*x), (state.params, state.opt_state, hp, state.loss_state))
    else:
        params, opt_state, loss_state, metrics = update(state.params, state.opt_state, hp, state.loss_state)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, loss_state=loss_state), metrics


def eval_step(cfg: StepConfig, state: TrainState, batch, hp) -> dict[str, jax.Array]:
    """Loss and metrics of the current policy (or of each fused member) on one batch (no update; a
    loss's running statistics are read as a train step would, and not kept)."""
    check_loss_state(cfg, state)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}
    ref = reference_logps(cfg, state, batch)
    rng = loss_rng(state)

    def member(params, hp, loss_state):
        loss, (pairs, terms, _) = _loss(params, cfg, ref, batch, hp, state.base_params, loss_state, rng)
        return batch_metrics(cfg, pairs, loss, terms, hp, batch)

    if cfg.members:
        return jax.lax.map(lambda x: member(*x), (state.params, hp, state.loss_state))
    return member(state.params, hp, state.loss_state)


def sync_reference(state: TrainState, alpha) -> TrainState:
    """TR-DPO soft update (Gorbatovski et al. 2024): pi_ref <- alpha pi_theta + (1 - alpha) pi_ref."""
    ref = jax.tree.map(lambda p, r: (alpha * p.astype(jnp.float32) + (1 - alpha) * r.astype(jnp.float32)).astype(r.dtype),
                       state.params, state.ref_params)
    return state.replace(ref_params=ref)
