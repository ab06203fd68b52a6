"""Listwise preference losses on per-(list, slot) summed log-probs: Plackett-Luce DPO and LiPO-lambda.

A list holds K responses y_1..y_K to one prompt x with scores psi_1..psi_K (higher is better);
lists shorter than K are padded and `mask_PxK` marks the real slots. With the implicit reward
r_k = beta (log pi(y_k|x) - log pi_ref(y_k|x)) (as in `core.implicit_reward`):

Plackett-Luce DPO (Rafailov et al. 2023, appendix A.3: the PL model, eq. 18, with the implicit
rewards in place of r; LiPO's DPO_PL, ListMLE in learning to rank). With
distinct scores and tau the order by score (best first), the PL probability of the order is
  P(tau | r) = prod_{i=1}^{K} exp(r_tau(i)) / sum_{j >= i} exp(r_tau(j)),
  L_PL = -log P(tau | r) = sum_{i=1}^{K-1} [logsumexp_{j >= i} r_tau(j) - r_tau(i)]
(the last factor is 1). With K = 2 this is -log sigmoid(r_w - r_l), sigmoid DPO (eq. 7).

Ties (equal scores). The order of tied responses carries no preference, so no term compares two
tied responses: each response competes only with itself and the responses strictly worse than it,
  L_PL = sum_{k real} [log(exp(r_k) + sum_{j real: psi_j < psi_k} exp(r_j)) - r_k].
This is the rule LiPO-lambda applies (its sum runs over pairs with psi_i > psi_j only, tied pairs
contribute nothing). Without ties it is the PL loss above term by term (the risk set of the i-th
best is itself plus everything below it); a list whose responses are all tied has loss 0. Unlike
Breslow's approximation (every tied response shares its whole group's risk set) it does not push
tied rewards towards each other, and unlike random tie-breaking it is deterministic and invariant
to the order of the slots.

LiPO-lambda (Liu et al. 2024, arXiv 2402.01878, the LambdaLoss of Wang et al. 2018):
  L_lambda = sum_{i, j: psi_i > psi_j} Delta_ij log(1 + exp(-(r_i - r_j))),
  Delta_ij = |G_i - G_j| |1 / D(tau_i) - 1 / D(tau_j)|,   G_i = 2^psi_i - 1,   D(tau) = log2(1 + tau),
with tau_i the rank (1 = best) of response i among the real responses of its list by the current
implicit rewards r (descending; equal rewards ranked by score, then slot index, so tau and the loss
do not depend on the order of the slots even at pi = pi_ref), computed under stop_gradient:
Delta_ij is a weight, not differentiated. With K = 2, Delta = (2^psi_w - 2^psi_l) (1 - 1/log2 3),
a constant times sigmoid DPO.

All losses are float32 and per list [P]; padded slots may hold any values (NaN included).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from dpo_jax.losses.core import BETA, LIST_LOSSES, HParams, LossSpec, implicit_reward, masked_mean, register

Array = jax.Array


class ListLogps(NamedTuple):
    """Summed completion log-probs of P lists of K slots (all [P, K]); `mask_PxK` 1 for real slots.

    `list_mask_P` (optional) is 1 for real lists and 0 for batch filler.
    """

    policy_PxK: Array
    ref_PxK: Array
    scores_PxK: Array
    mask_PxK: Array
    list_mask_P: Optional[Array] = None

    def as_float32(self) -> "ListLogps":
        return ListLogps(*(None if a is None else jnp.asarray(a, jnp.float32) for a in self))

    @property
    def mask(self) -> Array:
        """[P]: 1 for real lists (the name `core.Objective` averages per-example losses with)."""
        return jnp.ones(self.policy_PxK.shape[:1], jnp.float32) if self.list_mask_P is None else self.list_mask_P


def _rewards(policy_logps_PxK, ref_logps_PxK, mask_PxK, beta):
    """(r [P, K] with padded slots set to 0, real-slot mask [P, K] as bool)."""
    real_PxK = jnp.asarray(mask_PxK) > 0
    pol = jnp.where(real_PxK, jnp.asarray(policy_logps_PxK, jnp.float32), 0.0)
    ref = jnp.where(real_PxK, jnp.asarray(ref_logps_PxK, jnp.float32), 0.0)
    return implicit_reward(pol, ref, beta), real_PxK


def _scores(scores_PxK, real_PxK):
    return jnp.where(real_PxK, jnp.asarray(scores_PxK, jnp.float32), 0.0)


@jax.jit
def plackett_luce_loss(policy_logps_PxK: Array, ref_logps_PxK: Array, scores_PxK: Array, mask_PxK: Array,
                       beta: Array) -> Array:
    """Per-list Plackett-Luce DPO loss [P] (module doc): sum_k [log(e^{r_k} + sum_{psi_j < psi_k} e^{r_j}) - r_k]
    over the real slots k, the j real too; equal to -log P_PL(order by score | r) without ties."""
    r_PxK, real_PxK = _rewards(policy_logps_PxK, ref_logps_PxK, mask_PxK, beta)
    s_PxK = _scores(scores_PxK, real_PxK)
    k = r_PxK.shape[-1]
    eye_KxK = jnp.eye(k, dtype=bool)
    # risk_PxKxK[p, i, j]: slot j is in the risk set of slot i (itself, or real and strictly worse).
    worse_PxKxK = (s_PxK[:, None, :] < s_PxK[:, :, None]) & real_PxK[:, None, :]
    risk_PxKxK = eye_KxK[None] | worse_PxKxK
    # log(sum_{j in risk(i)} e^{r_j}) - r_i = logsumexp_{j in risk(i)} (r_j - r_i): the j = i term is
    # exactly 0, so the gradient has no 1 - softmax cancellation (K = 2 gives softplus(r_l - r_w)).
    diff_PxKxK = r_PxK[:, None, :] - r_PxK[:, :, None]
    diff_PxKxK = jnp.where(eye_KxK[None], 0.0, diff_PxKxK)
    term_PxK = jax.nn.logsumexp(diff_PxKxK, axis=-1, where=risk_PxKxK)
    return jnp.sum(jnp.where(real_PxK, term_PxK, 0.0), axis=-1)


def reward_ranks(r_PxK: Array, scores_PxK: Array, mask_PxK: Array) -> Array:
    """tau [P, K]: 1-based rank of each real slot by r (descending); equal r are ordered by score
    (descending: the ideal order, so at pi = pi_ref tau is the order by score), then by slot index;
    padded slots rank after every real one. Integer-valued float32, no gradient."""
    r = jax.lax.stop_gradient(jnp.asarray(r_PxK, jnp.float32))
    real_PxK = jnp.asarray(mask_PxK) > 0
    s = _scores(scores_PxK, real_PxK)
    k = r.shape[-1]
    idx = jnp.arange(k)
    # ahead_PxKxK[p, i, j]: slot j ranks ahead of slot i.
    real_j = real_PxK[:, None, :]
    real_i = real_PxK[:, :, None]
    r_j, r_i, s_j, s_i = r[:, None, :], r[:, :, None], s[:, None, :], s[:, :, None]
    lower_index = (idx[None, :] < idx[:, None])[None]
    before = (r_j > r_i) | ((r_j == r_i) & ((s_j > s_i) | ((s_j == s_i) & lower_index)))
    ahead_PxKxK = real_j & (~real_i | before)
    ahead_PxKxK = ahead_PxKxK | (~real_j & ~real_i & lower_index)
    return 1.0 + jnp.sum(ahead_PxKxK, axis=-1).astype(jnp.float32)


def lambda_weights(scores_PxK: Array, r_PxK: Array, mask_PxK: Array) -> Array:
    """Delta [P, K, K] = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)| (G = 2^psi - 1, D = log2(1 + tau)),
    zero unless both slots are real; under stop_gradient."""
    real_PxK = jnp.asarray(mask_PxK) > 0
    s_PxK = _scores(scores_PxK, real_PxK)
    gain_PxK = jnp.exp2(s_PxK) - 1.0
    inv_disc_PxK = 1.0 / jnp.log2(1.0 + reward_ranks(r_PxK, s_PxK, mask_PxK))
    delta = (jnp.abs(gain_PxK[:, :, None] - gain_PxK[:, None, :])
             * jnp.abs(inv_disc_PxK[:, :, None] - inv_disc_PxK[:, None, :]))
    both = real_PxK[:, :, None] & real_PxK[:, None, :]
    return jax.lax.stop_gradient(jnp.where(both, delta, 0.0))


@jax.jit
def lipo_lambda_loss(policy_logps_PxK: Array, ref_logps_PxK: Array, scores_PxK: Array, mask_PxK: Array,
                     beta: Array) -> Array:
    """Per-list LiPO-lambda loss [P] (module doc): sum_{psi_i > psi_j} Delta_ij (-log sigmoid(r_i - r_j))."""
    r_PxK, real_PxK = _rewards(policy_logps_PxK, ref_logps_PxK, mask_PxK, beta)
    s_PxK = _scores(scores_PxK, real_PxK)
    better_PxKxK = (s_PxK[:, :, None] > s_PxK[:, None, :]) & real_PxK[:, :, None] & real_PxK[:, None, :]
    delta_PxKxK = lambda_weights(s_PxK, r_PxK, real_PxK)
    pair_PxKxK = -jax.nn.log_sigmoid(r_PxK[:, :, None] - r_PxK[:, None, :])
    return jnp.sum(jnp.where(better_PxKxK, delta_PxKxK * pair_PxKxK, 0.0), axis=(-2, -1))


def listwise_loss(policy_logps_PxK: Array, ref_logps_PxK: Array, scores_PxK: Array, mask_PxK: Array,
                  beta: Array, lambda_weighting: bool = False) -> Array:
    """Plackett-Luce DPO, or LiPO-lambda with `lambda_weighting=True`: per-list losses [P]."""
    fn = lipo_lambda_loss if lambda_weighting else plackett_luce_loss
    return fn(policy_logps_PxK, ref_logps_PxK, scores_PxK, mask_PxK, beta)


# ------------------------------------------------------------------------------------------------
# The registered list losses: `fn(ListLogps, hp) -> loss_P`, in `core.LIST_LOSSES` (batch_kind
# "lists": the step lays such batches out as ranked lists, `data/list_layouts.py`).

def _pl(batch: ListLogps, hp: HParams) -> Array:
    return plackett_luce_loss(batch.policy_PxK, batch.ref_PxK, batch.scores_PxK, batch.mask_PxK, hp["beta"])


def _lipo(batch: ListLogps, hp: HParams) -> Array:
    return lipo_lambda_loss(batch.policy_PxK, batch.ref_PxK, batch.scores_PxK, batch.mask_PxK, hp["beta"])


register(LossSpec(
    name="plackett_luce", fn=_pl, hparams={"beta": BETA}, batch_kind="lists",
    paper="Plackett-Luce DPO, Rafailov et al. 2023 app. A.3 (LiPO's DPO_PL): -log P_PL(order | beta rho); "
          "tied responses are not compared"))
register(LossSpec(
    name="lipo_lambda", fn=_lipo, hparams={"beta": BETA}, batch_kind="lists",
    paper="LiPO-lambda, Liu et al. 2024: sum_{psi_i > psi_j} Delta_ij log(1 + e^-(r_i - r_j)), LambdaLoss weights"))
LISTWISE_LOSSES = LIST_LOSSES  # the registry of list losses (the pairwise one is `core.LOSSES`)


def list_metrics(batch: ListLogps, beta: Array) -> dict[str, Array]:
    """Means over real lists: rewards/accuracies (the fraction of strictly ordered real pairs whose
    implicit rewards agree with the scores), rewards/best, rewards/worst (r of the best and worst
    scored response; the first slot among equals) and rewards/margins (their difference)."""
    batch = batch.as_float32()
    r_PxK, real_PxK = _rewards(batch.policy_PxK, batch.ref_PxK, batch.mask_PxK, beta)
    s_PxK = _scores(batch.scores_PxK, real_PxK)
    better = (s_PxK[:, :, None] > s_PxK[:, None, :]) & real_PxK[:, :, None] & real_PxK[:, None, :]
    agree = jnp.sum(better & (r_PxK[:, :, None] > r_PxK[:, None, :]), axis=(-2, -1))
    n_pairs = jnp.sum(better, axis=(-2, -1))
    acc_P = agree / jnp.maximum(n_pairs, 1)
    best = jnp.argmax(jnp.where(real_PxK, s_PxK, -jnp.inf), axis=-1)
    worst = jnp.argmin(jnp.where(real_PxK, s_PxK, jnp.inf), axis=-1)
    r_best = jnp.take_along_axis(r_PxK, best[:, None], axis=-1)[:, 0]
    r_worst = jnp.take_along_axis(r_PxK, worst[:, None], axis=-1)[:, 0]
    mask = batch.mask
    return {"rewards/accuracies": masked_mean(acc_P, mask * (n_pairs > 0)),
            "rewards/best": masked_mean(r_best, mask), "rewards/worst": masked_mean(r_worst, mask),
            "rewards/margins": masked_mean(r_best - r_worst, mask)}
