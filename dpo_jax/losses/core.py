"""Preference losses on per-sequence log-probs: implicit rewards, DPO, gradient weights, variants.

The RLHF objective max_pi E[r] - beta KL(pi || pi_ref) has the optimum
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x). Inverting it gives the implicit reward
r_hat(x, y) = beta log(pi(y|x) / pi_ref(y|x)) (+ beta log Z(x), which cancels in every reward
difference). Notation used throughout, for a pair (x, y_w, y_l):

  rho_w = log pi(y_w|x) - log pi_ref(y_w|x)     chosen log-ratio
  rho_l = log pi(y_l|x) - log pi_ref(y_l|x)     rejected log-ratio
  h     = rho_w - rho_l                         log-ratio margin (reward margin = beta h)

DPO: L = -log sigmoid(beta h), and dL/dtheta = -beta sigmoid(-beta h) (grad log pi(y_w) -
grad log pi(y_l)); sigmoid(r_hat_l - r_hat_w) = sigmoid(-beta h) is the per-pair gradient weight.

Every loss in `LOSSES` maps a `PairLogps` batch and a dict of float32 hyper-parameters (traced
arrays: changing beta never recompiles) to per-pair losses [P]. Variants that are a function of
one scalar margin per pair also expose that margin and the closed-form derivative of the loss
with respect to it (`LossSpec.margin`, `.of_margin`, `.d_of_margin`). Variant formulas live in
`losses/variants.py`, which registers them (the package's `__init__` imports it); this module holds
the core, the registry and the combination of several weighted losses (`Objective`), and never
imports the variants.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
HParams = Mapping[str, Array]


class PairLogps(NamedTuple):
    """Summed completion log-probs of P pairs (all [P]); lengths count completion tokens.

    `*_shared` (optional) are the sums over the first min(len_w, len_l) completion tokens, used by
    LD-DPO; `pair_mask` (optional) is 1 for real pairs and 0 for batch filler.
    """

    policy_chosen: Array
    policy_rejected: Array
    ref_chosen: Array
    ref_rejected: Array
    chosen_len: Array
    rejected_len: Array
    policy_chosen_shared: Optional[Array] = None
    policy_rejected_shared: Optional[Array] = None
    ref_chosen_shared: Optional[Array] = None
    ref_rejected_shared: Optional[Array] = None
    pair_mask: Optional[Array] = None

    def as_float32(self) -> "PairLogps":
        return PairLogps(*(None if a is None else jnp.asarray(a, jnp.float32) for a in self))

    @property
    def chosen_logratio(self) -> Array:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratio(self) -> Array:
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> Array:
        """h = rho_w - rho_l."""
        return self.chosen_logratio - self.rejected_logratio

    @property
    def mask(self) -> Array:
        return jnp.ones_like(self.policy_chosen) if self.pair_mask is None else self.pair_mask

    def length_desensitized(self, alpha: Array) -> "PairLogps":
        """LD-DPO (Liu et al. 2024): logp = shared + alpha * (full - shared), policy and reference."""
        if self.policy_chosen_shared is None or self.ref_chosen_shared is None:
            raise ValueError("LD-DPO (ld_alpha) needs the shared-prefix log-probs: PairLogps."
                             "policy_chosen_shared/policy_rejected_shared/ref_*_shared are None")
        mix = lambda full, shared: shared + alpha * (full - shared)  # noqa: E731
        return self._replace(
            policy_chosen=mix(self.policy_chosen, self.policy_chosen_shared),
            policy_rejected=mix(self.policy_rejected, self.policy_rejected_shared),
            ref_chosen=mix(self.ref_chosen, self.ref_chosen_shared),
            ref_rejected=mix(self.ref_rejected, self.ref_rejected_shared))


# ------------------------------------------------------------------------------------------------
# The core of the seed derivation.

@jax.jit
def implicit_reward(policy_logps: Array, ref_logps: Array, beta: Array) -> Array:
    """r_hat = beta (log pi(y|x) - log pi_ref(y|x)), up to beta log Z(x) which cancels in differences."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return f32(beta) * (f32(policy_logps) - f32(ref_logps))


@jax.jit
def dpo_loss(policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array,
             beta: Array) -> Array:
    """Per-pair sigmoid DPO loss -log sigmoid(r_hat_w - r_hat_l) (Rafailov et al. 2023, eq. 7)."""
    margin = (implicit_reward(policy_chosen, ref_chosen, beta)
              - implicit_reward(policy_rejected, ref_rejected, beta))
    return -jax.nn.log_sigmoid(margin)


@jax.jit
def grad_weight(policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array,
                beta: Array) -> Array:
    """sigmoid(r_hat_l - r_hat_w): the scalar that scales grad log pi(y_w) - grad log pi(y_l).

    d dpo_loss / d log pi(y_w) = -beta * grad_weight, d dpo_loss / d log pi(y_l) = +beta * grad_weight.
    """
    margin = (implicit_reward(policy_chosen, ref_chosen, beta)
              - implicit_reward(policy_rejected, ref_rejected, beta))
    return jax.nn.sigmoid(-margin)


# ------------------------------------------------------------------------------------------------
# Hyper-parameters.

@dataclasses.dataclass(frozen=True)
class HParam:
    """A loss hyper-parameter: its default and admissible interval (bounds inclusive unless open)."""

    default: float
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    doc: str = ""

    def check(self, loss: str, key: str, value) -> float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"loss {loss!r}: hyper-parameter {key!r} must be a number, got {value!r}")
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if too_low or too_high or not math.isfinite(value):
            interval = f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
            raise ValueError(f"loss {loss!r}: {key}={value} is outside its allowed range {interval}"
                             + (f" ({self.doc})" if self.doc else ""))
        return value


BETA = HParam(0.1, 0.0, math.inf, low_open=True, doc="inverse KL strength; reward = beta * log-ratio")
SMOOTHING = HParam(0.0, 0.0, 0.5, high_open=True, doc="probability that a preference label is flipped")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A registered loss: `fn(batch, hp) -> loss_P`, its hyper-parameters and its citation.

    For a loss that is a function of one margin per pair, `margin(batch, hp) -> m_P`,
    `of_margin(m, hp) -> loss` and its closed-form derivative `d_of_margin(m, hp) -> dloss/dm`.
    """

    name: str
    fn: Callable[[PairLogps, HParams], Array]
    hparams: Mapping[str, HParam]
    paper: str
    uses_reference: bool = True
    needs_pairs: bool = True  # False: a loss of the chosen completion alone (trains on unpaired rows)
    margin: Optional[Callable[[PairLogps, HParams], Array]] = None
    of_margin: Optional[Callable[[Array, HParams], Array]] = None
    d_of_margin: Optional[Callable[[Array, HParams], Array]] = None
    # A loss with running statistics (beta_dpo): `init_state() -> {key: float32 scalar}` and
    # `stateful(batch, hp, state, rng) -> (loss_P, keep_P, new_state, metrics)`, the loss a mean over
    # the real pairs with keep_P = 1; `fn` is then its value on a fresh state.
    init_state: Optional[Callable[[], dict]] = None
    stateful: Optional[Callable[..., tuple]] = None
    # What `fn` takes: "pairs" (PairLogps: chosen and rejected) or "lists" (`listwise.ListLogps`:
    # K scored responses per prompt); the registry keeps the kinds apart (`LOSSES`, `LIST_LOSSES`).
    batch_kind: str = "pairs"

    def __call__(self, batch: PairLogps, hp: HParams) -> Array:
        return self.fn(batch.as_float32(), {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()})


BATCH_KINDS = ("pairs", "lists")
LOSSES: dict[str, LossSpec] = {}  # losses of preference pairs (PairLogps)
LIST_LOSSES: dict[str, LossSpec] = {}  # losses of ranked lists (listwise.ListLogps)


def register(spec: LossSpec, *aliases: str) -> LossSpec:
    if spec.batch_kind not in BATCH_KINDS:
        raise ValueError(f"loss {spec.name!r}: batch_kind={spec.batch_kind!r}; allowed: {', '.join(BATCH_KINDS)}")
    registry = LOSSES if spec.batch_kind == "pairs" else LIST_LOSSES
    for key in (spec.name, *aliases):
        if key in LOSSES or key in LIST_LOSSES:
            raise ValueError(f"loss {key!r} is registered twice")
        registry[key] = spec
    return spec


def names() -> list[str]:
    """Every registered loss name, pairwise and listwise, sorted."""
    return sorted({**LOSSES, **LIST_LOSSES})


def get(name: str) -> LossSpec:
    spec = LOSSES.get(name) or LIST_LOSSES.get(name)
    if spec is None:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(names())}")
    return spec


def params(name: str, **overrides) -> dict[str, np.float32]:
    """Validated hyper-parameters of loss `name` (defaults filled in) as float32 scalars."""
    spec = get(name)
    unknown = sorted(set(overrides) - set(spec.hparams))
    if unknown:
        raise ValueError(f"loss {name!r} has no hyper-parameter {', '.join(map(repr, unknown))}; "
                         f"its hyper-parameters are: {', '.join(sorted(spec.hparams)) or 'none'}")
    return {k: np.float32(hp.check(name, k, overrides.get(k, hp.default))) for k, hp in spec.hparams.items()}


def masked_mean(x_P: Array, mask_P: Array) -> Array:
    return jnp.sum(x_P * mask_P) / jnp.maximum(jnp.sum(mask_P), 1.0)


# ------------------------------------------------------------------------------------------------
# Weighted combinations: TRL's loss_weights, RPO, and L_pref + w * L_SFT.

@dataclasses.dataclass(frozen=True)
class Objective:
    """L = sum_i w_i * mean_P(loss_i), with hyper-parameters shared by name across the terms.

    The weights are the traced array hp["loss_weights"]; `ld=True` applies LD-DPO's length
    weighting (hp["ld_alpha"]) to the log-probs before every term, as TRL's `ld_alpha`. A loss with
    its own `ld_alpha` (ld_dpo) applies it inside its margin instead, so the two never combine.
    Either way the metrics see the weighted log-probs (`metric_pairs`).
    """

    names: tuple[str, ...]
    ld: bool = False

    def __post_init__(self):
        if not self.names:
            raise ValueError("loss.name: at least one loss is needed")
        kinds = {get(n).batch_kind for n in self.names}
        if len(kinds) > 1:
            lists = [n for n in self.names if get(n).batch_kind == "lists"]
            raise ValueError(f"loss {'+'.join(self.names)!r} mixes losses of ranked lists ({', '.join(lists)}) "
                             "with losses of pairs: a batch holds one or the other")
        if self.ld and self.batch_kind == "lists":
            raise ValueError(f"ld=True with {'+'.join(self.names)!r}: LD-DPO's length weighting is defined "
                             "for pairs, not for ranked lists")
        if self.ld and self.own_ld:
            raise ValueError(f"ld=True with {'+'.join(self.names)!r}: a loss with its own ld_alpha (ld_dpo) "
                             "already applies LD-DPO's weighting; applying it again would use alpha^2")

    @property
    def specs(self) -> tuple[LossSpec, ...]:
        return tuple(get(n) for n in self.names)

    @property
    def uses_reference(self) -> bool:
        return any(s.uses_reference for s in self.specs)

    @property
    def batch_kind(self) -> str:
        """"pairs" or "lists": what every term takes (`LossSpec.batch_kind`; never mixed)."""
        return self.specs[0].batch_kind

    @property
    def own_ld(self) -> bool:
        """A term has its own `ld_alpha` hyper-parameter (ld_dpo) and weights its margin itself."""
        return any("ld_alpha" in s.hparams for s in self.specs)

    @property
    def paired_names(self) -> tuple[str, ...]:
        """The losses of the objective that compare a pair's two completions (`LossSpec.needs_pairs`)."""
        return tuple(n for n, s in zip(self.names, self.specs) if s.needs_pairs)

    def params(self, weights=None, ld_alpha: Optional[float] = None, **overrides) -> dict[str, np.ndarray]:
        if ld_alpha is not None and self.own_ld:  # the loss's own hyper-parameter (ld_dpo)
            overrides = {**overrides, "ld_alpha": ld_alpha}
            ld_alpha = None
        known = set().union(*(s.hparams for s in self.specs))
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"loss {'+'.join(self.names)!r} has no hyper-parameter "
                             f"{', '.join(map(repr, unknown))}; its hyper-parameters are: {', '.join(sorted(known))}")
        hp: dict[str, np.ndarray] = {}
        for name in self.names:
            own = {k: v for k, v in overrides.items() if k in get(name).hparams}
            hp.update(params(name, **own))
        weights = [1.0] * len(self.names) if weights is None else list(weights)
        if len(weights) != len(self.names):
            raise ValueError(f"loss.weights has {len(weights)} entries for {len(self.names)} losses {self.names}")
        hp["loss_weights"] = np.asarray(weights, np.float32)
        if self.ld:
            hp["ld_alpha"] = np.float32(HParam(1.0, 0.0, 1.0, doc="LD-DPO weight of tokens past the "
                                               "shorter completion").check("ld", "ld_alpha", 1.0 if ld_alpha is None else ld_alpha))
        elif ld_alpha is not None:
            raise ValueError("ld_alpha given to an Objective built with ld=False")
        return hp

    def prepare(self, batch: PairLogps, hp: HParams) -> PairLogps:
        """The log-probs every term sees: float32, LD-weighted when `ld`."""
        batch = batch.as_float32()
        return batch.length_desensitized(hp["ld_alpha"]) if self.ld else batch

    def metric_pairs(self, batch: PairLogps, hp: HParams) -> PairLogps:
        """The log-probs `reward_metrics` reports: LD-weighted, logp_shared + alpha (logp - logp_shared),
        whenever LD-DPO's weighting is in effect (`ld`, or a loss with its own `ld_alpha`), as TRL
        reports `logps/*` and `rewards/*` with `ld_alpha`; so `ld_dpo` and `sigmoid` with `ld_alpha`
        report the same metrics. Otherwise the log-probs as given (float32)."""
        batch = batch.as_float32()
        return batch.length_desensitized(hp["ld_alpha"]) if self.ld or self.own_ld else batch

    def __call__(self, batch: PairLogps, hp: HParams) -> tuple[Array, dict[str, Array]]:
        """Returns (scalar loss, {"loss/<name>": mean term loss}); batch log-probs in any float dtype.
        A term with running statistics uses a fresh state (`LossSpec.fn`); see `apply`."""
        total, terms, _ = self.apply(batch, hp)
        return total, terms

    def init_state(self) -> Optional[dict]:
        """{loss name: its running state} of the terms that have one, or None when none has."""
        return {s.name: s.init_state() for s in self.specs if s.init_state is not None} or None

    def apply(self, batch: PairLogps, hp: HParams, loss_state: Optional[dict] = None,
              rng: Optional[Array] = None) -> tuple[Array, dict[str, Array], Optional[dict]]:
        """(scalar loss, terms and the stateful terms' metrics, the updated `loss_state`). A term with
        running statistics (`LossSpec.stateful`) reads and updates loss_state[name] and averages its
        loss over the pairs it keeps; with `loss_state` None every term is stateless (`fn`)."""
        hp = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}
        batch = self.prepare(batch, hp)
        total, terms = jnp.float32(0.0), {}
        new_state = None if loss_state is None else dict(loss_state)
        for i, spec in enumerate(self.specs):
            if spec.stateful is not None and loss_state is not None:
                loss_P, keep_P, new_state[spec.name], extra = spec.stateful(batch, hp, loss_state[spec.name], rng)
                term = masked_mean(loss_P, batch.mask * keep_P)
                terms.update(extra)
            else:
                term = masked_mean(spec.fn(batch, hp), batch.mask)
            terms[f"loss/{spec.name}"] = term
            total = total + hp["loss_weights"][i] * term
        return total, terms, new_state


def reward_metrics(batch: PairLogps, beta: Array) -> dict[str, Array]:
    """TRL's reward metrics plus the gradient-weight statistics, each a mean over real pairs:

      rewards/chosen, rewards/rejected   r_w = beta rho_w, r_l = beta rho_l
      rewards/margins, rewards/accuracies   r_w - r_l, [r_w > r_l]
      logps/chosen, logps/rejected       log pi(y_w|x), log pi(y_l|x)
      grad_weight/mean                   w = sigmoid(r_l - r_w) (the DPO gradient weight)
      grad_weight/saturated_frac         [w < 0.05]
      logratio/mean                      (rho_w + rho_l) / 2, the mean log pi/pi_ref of the data's
                                         completions. Not a KL: the completions come from the data,
                                         not from pi, so it can be negative (E_pi[log pi/pi_ref] >= 0).

    `batch` as the objective reports it (`Objective.metric_pairs`: LD-weighted under LD-DPO).
    """
    batch = batch.as_float32()
    mask = batch.mask
    r_w = implicit_reward(batch.policy_chosen, batch.ref_chosen, beta)
    r_l = implicit_reward(batch.policy_rejected, batch.ref_rejected, beta)
    weight = jax.nn.sigmoid(r_l - r_w)
    mean = lambda x: masked_mean(x, mask)  # noqa: E731
    return {
        "rewards/chosen": mean(r_w),
        "rewards/rejected": mean(r_l),
        "rewards/accuracies": mean((r_w > r_l).astype(jnp.float32)),
        "rewards/margins": mean(r_w - r_l),
        "logps/chosen": mean(batch.policy_chosen),
        "logps/rejected": mean(batch.policy_rejected),
        "grad_weight/mean": mean(weight),
        "grad_weight/saturated_frac": mean((weight < 0.05).astype(jnp.float32)),
        "logratio/mean": mean(0.5 * (batch.chosen_logratio + batch.rejected_logratio)),
    }
