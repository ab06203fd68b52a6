"""The registered preference-loss variants, one small pure function each (see `losses/core.py`).

Notation: rho_w, rho_l chosen/rejected log-ratios log pi - log pi_ref; h = rho_w - rho_l;
s(rho) the f-divergence score of a log-ratio (s = rho for reverse KL, the DPO default);
|y| the number of completion tokens; sigma the logistic function. All losses are per pair.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dpo_jax.losses.core import BETA, SMOOTHING, HParam, LossSpec, PairLogps, register

log_sigmoid = jax.nn.log_sigmoid
sigmoid = jax.nn.sigmoid
EXP_CLAMP = 80.0  # exponents are clamped here so exp stays finite in float32 (as TRL does)


# ------------------------------------------------------------------------------------------------
# f-divergence scores (Wang et al. 2023, "Beyond Reverse KL"): the reward difference becomes
# f'(pi/pi_ref)(y_w) - f'(pi/pi_ref)(y_l), constants dropped. Conventions as TRL 1.16.

def score_reverse_kl(rho, hp):
    return rho


def score_forward_kl(rho, hp):
    """f'(u) = 1 - 1/u  ->  -exp(-rho)."""
    return -jnp.exp(jnp.minimum(-rho, EXP_CLAMP))


def score_js_divergence(rho, hp):
    """f'(u) = log(2u / (1 + u))  ->  log sigmoid(rho)."""
    return log_sigmoid(rho)


def score_alpha_divergence(rho, hp):
    """f'(u) = (u^(alpha-1) - 1) / (alpha - 1)  ->  exp((alpha-1) rho) / (alpha-1); alpha=1: rho."""
    a1 = hp["alpha"] - 1.0
    near_one = jnp.abs(a1) < 1e-6
    safe = jnp.where(near_one, 1.0, a1)
    return jnp.where(near_one, rho, jnp.exp(jnp.minimum(safe * rho, EXP_CLAMP)) / safe)


def _score_margin(score):
    return lambda b, hp: score(b.chosen_logratio, hp) - score(b.rejected_logratio, hp)


def _margin_h(b, hp):
    return b.margin


def _margin_loss(name, paper, of_margin, d_of_margin, hparams, margin=_margin_h, aliases=()):
    return register(LossSpec(name=name, fn=lambda b, hp: of_margin(margin(b, hp), hp), hparams=hparams,
                             paper=paper, margin=margin, of_margin=of_margin, d_of_margin=d_of_margin), *aliases)


# ------------------------------------------------------------------------------------------------
# Losses that are a function of one margin m per pair, with closed-form dL/dm.

def _sigmoid(m, hp):
    return -log_sigmoid(hp["beta"] * m)


def _d_sigmoid(m, hp):
    return -hp["beta"] * sigmoid(-hp["beta"] * m)


_margin_loss("sigmoid", "DPO, Rafailov et al. 2023: -log sigma(beta h)", _sigmoid, _d_sigmoid, {"beta": BETA},
             aliases=("dpo",))
_margin_loss("reverse_kl", "f-DPO, Wang et al. 2023, reverse KL (= sigmoid DPO): -log sigma(beta h)",
             _sigmoid, _d_sigmoid, {"beta": BETA}, margin=_score_margin(score_reverse_kl))
_margin_loss("forward_kl", "f-DPO, Wang et al. 2023, forward KL: -log sigma(beta (e^-rho_l - e^-rho_w))",
             _sigmoid, _d_sigmoid, {"beta": BETA}, margin=_score_margin(score_forward_kl))
_margin_loss("js_divergence", "f-DPO, Wang et al. 2023, Jensen-Shannon: -log sigma(beta (log s(rho_w) - log s(rho_l)))",
             _sigmoid, _d_sigmoid, {"beta": BETA}, margin=_score_margin(score_js_divergence))
_margin_loss("alpha_divergence", "f-DPO, Wang et al. 2023, alpha-divergence: scores e^((a-1) rho)/(a-1)",
             _sigmoid, _d_sigmoid, {"beta": BETA, "alpha": HParam(0.5, 0.0, math.inf, low_open=True)},
             margin=_score_margin(score_alpha_divergence))
_margin_loss("ld_dpo", "LD-DPO, Liu et al. 2024: sigmoid DPO on logp_shared + alpha (logp - logp_shared)",
             _sigmoid, _d_sigmoid, {"beta": BETA, "ld_alpha": HParam(0.5, 0.0, 1.0)},
             margin=lambda b, hp: b.length_desensitized(hp["ld_alpha"]).margin, aliases=("ld_alpha",))
_margin_loss("sigmoid_norm", "Length-normalized DPO (TRL; Tulu 3): -log sigma(beta (rho_w/|y_w| - rho_l/|y_l|))",
             _sigmoid, _d_sigmoid, {"beta": BETA},
             margin=lambda b, hp: b.chosen_logratio / jnp.maximum(b.chosen_len, 1.0)
             - b.rejected_logratio / jnp.maximum(b.rejected_len, 1.0))


def _hinge(m, hp):
    return jax.nn.relu(1.0 - hp["beta"] * m)


def _d_hinge(m, hp):
    return jnp.where(hp["beta"] * m < 1.0, -hp["beta"], 0.0)


_margin_loss("hinge", "SLiC-HF, Zhao et al. 2023: max(0, 1 - beta h)", _hinge, _d_hinge, {"beta": BETA})


def _robust(m, hp):
    e, z = hp["label_smoothing"], hp["beta"] * m
    return (-(1.0 - e) * log_sigmoid(z) + e * log_sigmoid(-z)) / (1.0 - 2.0 * e)


def _d_robust(m, hp):
    e, z = hp["label_smoothing"], hp["beta"] * m
    return hp["beta"] * (-(1.0 - e) * sigmoid(-z) - e * sigmoid(z)) / (1.0 - 2.0 * e)


_margin_loss("robust", "rDPO, Chowdhury et al. 2024: unbiased under label flips with rate eps",
             _robust, _d_robust, {"beta": BETA, "label_smoothing": SMOOTHING})


def _conservative(m, hp):
    e, z = hp["label_smoothing"], hp["beta"] * m
    return -(1.0 - e) * log_sigmoid(z) - e * log_sigmoid(-z)


def _d_conservative(m, hp):
    e, z = hp["label_smoothing"], hp["beta"] * m
    return hp["beta"] * (-(1.0 - e) * sigmoid(-z) + e * sigmoid(z))


_margin_loss("conservative", "cDPO (Mitchell 2023; original DPO code, Tunix): label smoothing inside the sigmoid",
             _conservative, _d_conservative, {"beta": BETA, "label_smoothing": HParam(0.1, 0.0, 0.5, high_open=True)},
             aliases=("cdpo",))


def _exo(m, hp):
    e, z = hp["label_smoothing"], hp["beta"] * m
    return (sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-e))
            + sigmoid(-z) * (log_sigmoid(-z) - jnp.log(e)))


def _d_exo(m, hp):
    e, z = hp["label_smoothing"], hp["beta"] * m
    # d/dz [s (log s - log(1-e)) + (1-s)(log(1-s) - log e)] = s(1-s) (z - log(1-e) + log e), s = sigma(z)
    return hp["beta"] * sigmoid(z) * sigmoid(-z) * (z - jnp.log1p(-e) + jnp.log(e))


_margin_loss("exo_pair", "EXO, Ji et al. 2024 (eq. 16): KL(softmax(beta rho) || [1-eps, eps])",
             _exo, _d_exo, {"beta": BETA, "label_smoothing": HParam(1e-3, 0.0, 1.0, low_open=True, high_open=True)})


def _discopop(m, hp):
    z, tau = hp["beta"] * m, hp["tau"]
    # logistic * (1 - sigma(z/tau)) + exp(-z) * sigma(z/tau), the second product formed in log space
    return -log_sigmoid(z) * sigmoid(-z / tau) + jnp.exp(jnp.minimum(-z + log_sigmoid(z / tau), EXP_CLAMP))


def _d_discopop(m, hp):
    z, tau = hp["beta"] * m, hp["tau"]
    s_t, s_nt = sigmoid(z / tau), sigmoid(-z / tau)  # s_nt = 1 - s_t without cancellation
    exponent = -z + log_sigmoid(z / tau)
    exp_mod = jnp.exp(jnp.minimum(exponent, EXP_CLAMP))
    d_logistic = -sigmoid(-z) * s_nt + log_sigmoid(z) * s_t * s_nt / tau
    d_exp = jnp.where(exponent < EXP_CLAMP, exp_mod * (-1.0 + s_nt / tau), 0.0)  # flat where clamped
    return hp["beta"] * (d_logistic + d_exp)


_margin_loss("discopop", "DiscoPOP, Chris Lu et al. 2024 (eq. 5): log-ratio modulated logistic/exponential",
             _discopop, _d_discopop, {"beta": BETA, "tau": HParam(0.05, 0.0, math.inf, low_open=True)})


# ------------------------------------------------------------------------------------------------
# Losses of both log-ratios (or of lengths, sorting, or the policy alone).

def _token_nll(b: PairLogps) -> jax.Array:
    """Per-pair share of the batch's token-mean NLL of the chosen completions: its mean over real
    pairs is -sum_P logp_w / sum_P |y_w|, the cross-entropy TRL's `sft` term and ORPO/CPO use."""
    mask = b.mask
    mean_len = jnp.sum(b.chosen_len * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return -b.policy_chosen / jnp.maximum(mean_len, 1.0)


register(LossSpec("sft", lambda b, hp: _token_nll(b), {}, "SFT NLL of the chosen completions, batch token mean "
                  "(TRL's `sft`): -sum_P logp_w / sum_P |y_w|", uses_reference=False, needs_pairs=False))
register(LossSpec("sft_sum", lambda b, hp: -b.policy_chosen, {}, "SFT NLL of the chosen completions, summed per "
                  "sequence (L_pref + w L_SFT of RPO, Liu et al. 2024; NeMo-RL): -mean_P logp_w = sft * mean_P |y_w|",
                  uses_reference=False, needs_pairs=False))


def _ipo(b, hp):
    m = b.chosen_logratio / jnp.maximum(b.chosen_len, 1.0) - b.rejected_logratio / jnp.maximum(b.rejected_len, 1.0)
    return (m - 1.0 / (2.0 * hp["beta"])) ** 2


register(LossSpec("ipo", _ipo, {"beta": BETA}, "IPO, Azar et al. 2023 (eq. 17), log-ratios averaged per token as TRL: "
                  "(rho_w/|y_w| - rho_l/|y_l| - 1/(2 beta))^2"))


def _nca(b, hp):
    rw, rl = hp["beta"] * b.chosen_logratio, hp["beta"] * b.rejected_logratio
    return -log_sigmoid(rw) - 0.5 * log_sigmoid(-rw) - 0.5 * log_sigmoid(-rl)


register(LossSpec("nca_pair", _nca, {"beta": BETA}, "NCA, Chen et al. 2024: -log s(r_w) - (log s(-r_w) + log s(-r_l))/2"))


def _bco(b, hp):
    return -log_sigmoid(hp["beta"] * b.chosen_logratio) - log_sigmoid(-hp["beta"] * b.rejected_logratio)


register(LossSpec("bco_pair", _bco, {"beta": BETA}, "BCO, Jung et al. 2024, paired: -log s(r_w) - log s(-r_l)"))


def _sppo_hard(b, hp):
    half = 0.5 / hp["beta"]
    return (b.chosen_logratio - half) ** 2 + (b.rejected_logratio + half) ** 2


register(LossSpec("sppo_hard", _sppo_hard, {"beta": BETA}, "SPPO, Wu et al. 2024, hard labels: "
                  "(rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2"))


def _sorted_pairing(a_P, b_P, mask_P):
    """Sort a and b independently (filler pairs last) and pair them up: a_(i) - b_(i), returned in
    the positions of a's real pairs so that a masked mean over pairs averages exactly the real ones."""
    big = jnp.finfo(jnp.float32).max
    order_a = jnp.argsort(jnp.where(mask_P > 0, a_P, big))
    diff_sorted = a_P[order_a] - jnp.sort(jnp.where(mask_P > 0, b_P, big))
    diff_sorted = jnp.where(mask_P[order_a] > 0, diff_sorted, 0.0)
    return jnp.zeros_like(a_P).at[order_a].set(diff_sorted)


def _smoothed_sigmoid(z, e):
    return -log_sigmoid(z) * (1.0 - e) - log_sigmoid(-z) * e


def _aot(b, hp):
    d = _sorted_pairing(b.policy_chosen - b.policy_rejected, b.ref_chosen - b.ref_rejected, b.mask)
    return _smoothed_sigmoid(hp["beta"] * d, hp["label_smoothing"])


def _aot_unpaired(b, hp):
    d = _sorted_pairing(b.chosen_logratio, b.rejected_logratio, b.mask)
    return _smoothed_sigmoid(hp["beta"] * d, hp["label_smoothing"])


register(LossSpec("aot", _aot, {"beta": BETA, "label_smoothing": SMOOTHING},
                  "AOT, Melnyk et al. 2024: sigmoid loss on sorted policy vs sorted reference log-ratios (paired)"))
register(LossSpec("aot_unpaired", _aot_unpaired, {"beta": BETA, "label_smoothing": SMOOTHING},
                  "AOT, Melnyk et al. 2024: sigmoid loss on sorted chosen vs sorted rejected log-ratios (unpaired)"))


def _apo_zero(b, hp):
    return 1.0 - sigmoid(hp["beta"] * b.chosen_logratio) + sigmoid(hp["beta"] * b.rejected_logratio)


def _apo_down(b, hp):
    return sigmoid(hp["beta"] * b.chosen_logratio) + 1.0 - sigmoid(hp["beta"] * b.margin)


register(LossSpec("apo_zero", _apo_zero, {"beta": BETA}, "APO-zero, D'Oosterlinck et al. 2024 (eq. 7)"))
register(LossSpec("apo_down", _apo_down, {"beta": BETA}, "APO-down, D'Oosterlinck et al. 2024 (eq. 8)"))


def _dpop(b, hp):
    penalty = jnp.maximum(0.0, b.ref_chosen - b.policy_chosen)
    return -log_sigmoid(hp["beta"] * (b.margin - hp["dpop_lambda"] * penalty))


register(LossSpec("dpop", _dpop, {"beta": BETA, "dpop_lambda": HParam(50.0, 0.0)},
                  "DPO-Positive (Smaug), Pal et al. 2024: -log s(beta (h - lambda max(0, logpref_w - logp_w)))"))


def _rpo(b, hp):
    return _sigmoid(b.margin, hp) + hp["rpo_alpha"] * _token_nll(b)


register(LossSpec("rpo", _rpo, {"beta": BETA, "rpo_alpha": HParam(1.0, 0.0)},
                  "RPO, Pang et al. 2024 / Liu et al. 2024: sigmoid DPO + alpha * NLL(chosen)"))


def _simpo(b, hp):
    avg_w = b.policy_chosen / jnp.maximum(b.chosen_len, 1.0)
    avg_l = b.policy_rejected / jnp.maximum(b.rejected_len, 1.0)
    return -log_sigmoid(hp["beta"] * (avg_w - avg_l) - hp["gamma"])


register(LossSpec("simpo", _simpo, {"beta": HParam(2.0, 0.0, math.inf, low_open=True), "gamma": HParam(1.0, 0.0)},
                  "SimPO, Meng et al. 2024 (eq. 6): -log s(beta logp_w/|y_w| - beta logp_l/|y_l| - gamma)",
                  uses_reference=False))


def _log_odds(avg_logp):
    """log(p / (1 - p)) of the mean token probability p = exp(avg_logp), stable for p -> 0 and p -> 1."""
    avg_logp = jnp.minimum(avg_logp, -1e-6)
    return avg_logp - jnp.log(-jnp.expm1(avg_logp))


def _orpo(b, hp):
    avg_w = b.policy_chosen / jnp.maximum(b.chosen_len, 1.0)
    avg_l = b.policy_rejected / jnp.maximum(b.rejected_len, 1.0)
    return _token_nll(b) - hp["beta"] * log_sigmoid(_log_odds(avg_w) - _log_odds(avg_l))


register(LossSpec("orpo", _orpo, {"beta": BETA}, "ORPO, Hong et al. 2024 (eq. 6): NLL - lambda log s(log odds_w - "
                  "log odds_l), lambda = beta as in TRL", uses_reference=False))


def _cpo(b, hp):
    return -log_sigmoid(hp["beta"] * (b.policy_chosen - b.policy_rejected)) + hp["cpo_alpha"] * _token_nll(b)


register(LossSpec("cpo", _cpo, {"beta": BETA, "cpo_alpha": HParam(1.0, 0.0)},
                  "CPO, Xu et al. 2024 (eq. 5): -log s(beta (logp_w - logp_l)) + alpha NLL(chosen)",
                  uses_reference=False))


def kto_reference_point(b: PairLogps) -> jax.Array:
    """KTO's z0 = max(0, mean KL estimate), no gradient. Without mismatched completions in the batch
    the mean log-ratio of the batch's own completions stands in for it."""
    mean = jnp.sum((b.chosen_logratio + b.rejected_logratio) * b.mask) / jnp.maximum(2.0 * jnp.sum(b.mask), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_unpaired(policy_logps, ref_logps, desirable, z0, hp):
    """KTO, Ethayarajh et al. 2024 (eq. 8), per example: lambda_D (1 - s(beta (rho - z0))) if desirable,
    lambda_U (1 - s(beta (z0 - rho))) if not. `desirable` is a 0/1 array; z0 the (detached) KL point."""
    rho = jnp.asarray(policy_logps, jnp.float32) - jnp.asarray(ref_logps, jnp.float32)
    good = hp["desirable_weight"] * (1.0 - sigmoid(hp["beta"] * (rho - z0)))
    bad = hp["undesirable_weight"] * (1.0 - sigmoid(hp["beta"] * (z0 - rho)))
    return jnp.where(jnp.asarray(desirable) > 0, good, bad)


def _kto(b, hp):
    z0 = kto_reference_point(b)
    ones = jnp.ones_like(b.policy_chosen)
    return 0.5 * (kto_unpaired(b.policy_chosen, b.ref_chosen, ones, z0, hp)
                  + kto_unpaired(b.policy_rejected, b.ref_rejected, 0 * ones, z0, hp))


register(LossSpec("kto", _kto, {"beta": BETA, "desirable_weight": HParam(1.0, 0.0, low_open=True),
                                "undesirable_weight": HParam(1.0, 0.0, low_open=True)},
                  "KTO, Ethayarajh et al. 2024: chosen as desirable, rejected as undesirable; mean over both"))
