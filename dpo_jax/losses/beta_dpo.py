"""beta-DPO (Wu et al. 2024, "beta-DPO: Direct Preference Optimization with Dynamic beta"): sigmoid DPO
whose beta is recalibrated on every batch from running statistics of the reward margin, with an
optional beta-guided filter that drops the pairs whose margin is least typical.

Per batch of P pairs (real pairs only; h = rho_w - rho_l the log-ratio margin, beta0 = hp["beta"]):

  M_i    = beta0 * h_i                                   reward discrepancy (implicit reward margin)
  M0     <- m * M0 + (1 - m) * mean_i M_i                running mean (the paper's threshold M0)
  sigma  <- m * sigma + (1 - m) * std_i M_i              running std (unbiased batch std)
  keep   k = floor(rho * P) pairs drawn without replacement with probability proportional to the
         Gaussian density N(M_i; M0, sigma^2) (beta-guided data filtering; rho = 1 keeps every pair)
  beta   = beta0 * max(1 + alpha * (mean_{i kept} M_i - M0), 1e-3)
  loss_i = -log sigmoid(stop_gradient(beta) * h_i), averaged over the kept pairs

Choices where the paper leaves room, following the authors' reference code (junkangwu/beta-DPO):
the running statistics are updated first, from every real pair of the batch (before filtering);
the filter and beta then use the updated M0 and sigma; beta uses the mean margin of the kept
pairs. The first batch initializes M0 and sigma to its own mean and std (the reference code starts
both at 0). M, its statistics and the selection never carry gradients. beta is floored at
1e-3 * beta0 so it stays positive for any alpha (the reference code floors it at 1e-3 absolute);
with alpha = 0 the floor is never active and beta = beta0 exactly. The sampling without
replacement is the Gumbel-top-k trick on log N(M_i; M0, sigma^2), driven by a PRNG key (the train
step folds the step number into the state's key); without a key the k most probable pairs are
kept (a deterministic selection). The statistics are updated once per micro-batch.

The running state is a dict of float32 scalars ({"margin_mean", "margin_std", "initialized"}), kept
in the train state (`TrainState.loss_state["beta_dpo"]`) and checkpointed with it.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.losses.core import BETA, HParam, HParams, LossSpec, PairLogps, register

NAME = "beta_dpo"
BETA_FLOOR = 1e-3  # beta >= BETA_FLOOR * beta0
SIGMA_FLOOR = 1e-6  # the Gaussian's std is at least this (a first batch of equal margins has std 0)
ALPHA = HParam(0.6, 0.0, math.inf, doc="beta-DPO alpha: beta = beta0 (1 + alpha (mean M - M0))")
MOMENTUM = HParam(0.9, 0.0, 1.0, high_open=True, doc="beta-DPO m: running statistics M0 <- m M0 + (1 - m) mean M")
RHO = HParam(0.8, 0.0, 1.0, low_open=True, doc="beta-DPO rho: fraction of pairs kept by the filter (1 = no filter)")
HPARAMS = {"beta": BETA, "beta_dpo_alpha": ALPHA, "beta_dpo_momentum": MOMENTUM, "beta_dpo_rho": RHO}


def init_state() -> dict[str, np.float32]:
    """The state before the first batch: no statistics yet."""
    return {"margin_mean": np.float32(0.0), "margin_std": np.float32(0.0), "initialized": np.float32(0.0)}


def update_stats(state, margin_P, mask_P, momentum):
    """EMA of the batch mean and (unbiased) std of M over real pairs; the first batch sets them.
    A batch without real pairs leaves the state unchanged."""
    n = jnp.sum(mask_P)
    mean = jnp.sum(margin_P * mask_P) / jnp.maximum(n, 1.0)
    std = jnp.sqrt(jnp.sum(mask_P * (margin_P - mean) ** 2) / jnp.maximum(n - 1.0, 1.0))
    init = state["initialized"] > 0
    new = {"margin_mean": jnp.where(init, momentum * state["margin_mean"] + (1.0 - momentum) * mean, mean),
           "margin_std": jnp.where(init, momentum * state["margin_std"] + (1.0 - momentum) * std, std),
           "initialized": jnp.float32(1.0)}
    return {k: jnp.where(n > 0, v, jnp.asarray(state[k], jnp.float32)) for k, v in new.items()}


def select(margin_P, mask_P, mean, std, rho, rng: Optional[jax.Array] = None):
    """keep_P in {0, 1}: k = floor(rho n) of the n real pairs (at least one), drawn without replacement
    with probability proportional to N(M_i; mean, std^2) (Gumbel-top-k), or the k most probable
    without `rng`."""
    n = jnp.sum(mask_P)
    k = jnp.maximum(jnp.floor(rho * n + 1e-3), jnp.minimum(n, 1.0))
    log_density_P = -0.5 * ((margin_P - mean) / jnp.maximum(std, SIGMA_FLOOR)) ** 2
    if rng is not None:
        log_density_P = log_density_P + jax.random.gumbel(rng, margin_P.shape, jnp.float32)
    score_P = jnp.where(mask_P > 0, log_density_P, -jnp.inf)
    order_P = jnp.argsort(-score_P, stable=True)
    rank_P = jnp.zeros(margin_P.shape, jnp.int32).at[order_P].set(jnp.arange(margin_P.shape[0], dtype=jnp.int32))
    return ((rank_P < k) & (mask_P > 0)).astype(jnp.float32)


def batch_beta(margin_P, keep_P, mean, beta0, alpha):
    """beta = beta0 * max(1 + alpha (mean_{kept} M - M0), BETA_FLOOR)."""
    kept_mean = jnp.sum(margin_P * keep_P) / jnp.maximum(jnp.sum(keep_P), 1.0)
    return beta0 * jnp.maximum(1.0 + alpha * (kept_mean - mean), BETA_FLOOR)


def stateful(batch: PairLogps, hp: HParams, state, rng: Optional[jax.Array] = None):
    """(loss_P, keep_P, new_state, metrics) of one batch; the loss is meant as a mean over kept pairs."""
    mask_P = batch.mask
    h_P = batch.margin
    margin_P = jax.lax.stop_gradient(hp["beta"] * h_P)
    new = update_stats(state, margin_P, mask_P, hp["beta_dpo_momentum"])
    keep_P = select(margin_P, mask_P, new["margin_mean"], new["margin_std"], hp["beta_dpo_rho"], rng)
    beta = jax.lax.stop_gradient(batch_beta(margin_P, keep_P, new["margin_mean"], hp["beta"], hp["beta_dpo_alpha"]))
    loss_P = -jax.nn.log_sigmoid(beta * h_P)
    n = jnp.maximum(jnp.sum(mask_P), 1.0)
    metrics = {f"{NAME}/beta": beta, f"{NAME}/margin_mean": jnp.sum(margin_P * mask_P) / n,
               f"{NAME}/running_mean": new["margin_mean"], f"{NAME}/running_std": new["margin_std"],
               f"{NAME}/kept_frac": jnp.sum(keep_P) / n}
    return loss_P, keep_P, new, metrics


def _fresh(batch: PairLogps, hp: HParams):
    """The loss without a running state, a first batch with every pair kept: its M0 is the batch's
    own mean margin, so beta = beta0 and the loss is sigmoid DPO, -log sigmoid(beta0 h)."""
    return -jax.nn.log_sigmoid(hp["beta"] * batch.margin)


register(LossSpec(NAME, _fresh, HPARAMS,
                  "beta-DPO, Wu et al. 2024: -log sigma(beta_batch h), beta_batch = beta0 (1 + alpha (mean M - M0)), "
                  "M = beta0 h, M0 a running mean; pairs kept with probability ~ N(M; M0, sigma^2)",
                  init_state=init_state, stateful=stateful))
