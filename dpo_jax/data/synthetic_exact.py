"""The synthetic Markov preference world and its exact optimum, in numpy float64.

World. Content tokens 0..V-1. The reference policy is a first-order Markov chain,
pi_ref(a | s) = P[s, a], each row of P drawn from Dirichlet(alpha). A prompt x = (x_1..x_k) has
x_1 ~ mu (uniform or the stationary law of P) and x_{i+1} ~ P[x_i]. A completion y = (y_1..y_T)
has exactly T tokens, y_0 = x_k, and the true reward is r(x, y) = sum_{t=1..T} W[y_{t-1}, y_t]
with W = reward_scale * N(0, 1) entries. Everything about a completion depends on the prompt only
through its last token s = x_k, so per-prompt quantities are per-start-state vectors `*_V`; the
prompt distribution enters only through the law of x_k, q = mu P^(k-1).

Policies. A `TabularPolicy` holds probs_TxVxV[t - 1, s, a] = pi(y_t = a | y_{t-1} = s): a
time-dependent Markov chain, the family that contains every pi*_beta (pi_ref repeats P).

Optimum. pi*_beta(y | x) = pi_ref(y | x) exp(r(x, y) / beta) / Z(x) maximizes
E[r] - beta KL(pi || pi_ref) for every prompt. With L_t = V_t / beta (soft values in nats):
    L_T(s) = 0,
    L_{t-1}(s) = log sum_a P[s, a] exp(W[s, a] / beta + L_t(a)),
    pi*(y_t = a | y_{t-1} = s) = P[s, a] exp(W[s, a] / beta + L_t(a) - L_{t-1}(s)),
    log Z(x) = L_0(x_k),   and   E_{pi*}[r] - beta KL(pi* || pi_ref) = beta log Z(x).
Exact statistics of any tabular policy by a forward recursion over the state law p_t (p_0 = the
start state): E[r] = sum_t sum_s p_{t-1}(s) sum_a pi_t(a|s) W[s, a] and, by the chain rule,
KL = sum_t sum_s p_{t-1}(s) KL(pi_t(.|s) || P[s, .]).

Frontier. Since pi*_beta maximizes E[r] - beta KL (also averaged over prompts), the curve
beta -> (KL(pi*_beta), E_{pi*_beta}[r]) is the exact reward-KL frontier: no policy has more
expected reward at equal or smaller KL. KL(pi*_beta) decreases continuously from K_max (beta -> 0,
pi_ref restricted to the reward-maximizing completions) to 0 (beta -> inf), so the frontier at a
KL budget is found by bisection on beta (`frontier_reward_at_kl`), not interpolated.
"""

from __future__ import annotations

import dataclasses

import numpy as np

INITIAL_CHOICES = ("uniform", "stationary")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a world; `make_world(cfg)` is a pure function of it.

    Defaults are sized for a CPU demo (see `dpo_jax/data/synthetic.py`): V = 8, k = 4, T = 8.
    """

    vocab_size: int = 8  # V content tokens
    prompt_len: int = 4  # k
    completion_len: int = 8  # T
    dirichlet_alpha: float = 1.0  # concentration of each row of pi_ref; small -> peaked rows
    reward_scale: float = 1.0  # W entries ~ reward_scale * N(0, 1)
    initial: str = "uniform"  # law of x_1: "uniform" or "stationary" (of pi_ref)
    seed: int = 0

    def __post_init__(self):
        for name, low in (("vocab_size", 2), ("prompt_len", 1), ("completion_len", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"WorldConfig.{name} must be an int >= {low}, got {value!r}")
        if not (np.isfinite(self.dirichlet_alpha) and self.dirichlet_alpha > 0):
            raise ValueError(f"WorldConfig.dirichlet_alpha must be > 0, got {self.dirichlet_alpha!r}")
        if not (np.isfinite(self.reward_scale) and self.reward_scale >= 0):
            raise ValueError(f"WorldConfig.reward_scale must be >= 0, got {self.reward_scale!r}")
        if self.initial not in INITIAL_CHOICES:
            raise ValueError(f"WorldConfig.initial must be one of {INITIAL_CHOICES}, got {self.initial!r}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"WorldConfig.seed must be an int >= 0, got {self.seed!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class World:
    """pi_ref's transition matrix P (`ref_probs_VxV`), the law of x_1 and the reward matrix W."""

    config: WorldConfig
    ref_probs_VxV: np.ndarray
    init_probs_V: np.ndarray
    reward_VxV: np.ndarray

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def prompt_len(self) -> int:
        return self.config.prompt_len

    @property
    def completion_len(self) -> int:
        return self.config.completion_len

    @property
    def prompt_last_probs_V(self) -> np.ndarray:
        """Law of the last prompt token x_k: q = mu P^(k-1)."""
        q = self.init_probs_V
        for _ in range(self.prompt_len - 1):
            q = q @ self.ref_probs_VxV
        return q


def _stationary(probs_VxV: np.ndarray) -> np.ndarray:
    """A stationary law pi = pi P (least squares with sum(pi) = 1; clipped at 0)."""
    v = probs_VxV.shape[0]
    a = np.vstack([probs_VxV.T - np.eye(v), np.ones((1, v))])
    b = np.concatenate([np.zeros(v), [1.0]])
    pi = np.clip(np.linalg.lstsq(a, b, rcond=None)[0], 0.0, None)
    return pi / pi.sum()


def make_world(cfg: WorldConfig) -> World:
    """Draws P (rows ~ Dirichlet(alpha), first) then W (second) from default_rng(cfg.seed)."""
    v = cfg.vocab_size
    rng = np.random.default_rng(cfg.seed)
    ref = rng.dirichlet(np.full(v, float(cfg.dirichlet_alpha)), size=v)
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"WorldConfig.dirichlet_alpha={cfg.dirichlet_alpha} is too small: draws are not finite")
    ref = ref / ref.sum(axis=1, keepdims=True)
    reward = float(cfg.reward_scale) * rng.standard_normal((v, v))
    init = np.full(v, 1.0 / v) if cfg.initial == "uniform" else _stationary(ref)
    return World(config=cfg, ref_probs_VxV=ref, init_probs_V=init, reward_VxV=reward)


@dataclasses.dataclass(frozen=True, eq=False)
class TabularPolicy:
    """probs_TxVxV[t - 1, s, a] = pi(y_t = a | y_{t-1} = s), t = 1..T; rows sum to 1 (float64)."""

    probs_TxVxV: np.ndarray

    def __post_init__(self):
        probs = np.asarray(self.probs_TxVxV, dtype=np.float64)
        if probs.ndim != 3 or probs.shape[1] != probs.shape[2]:
            raise ValueError(f"TabularPolicy.probs_TxVxV must have shape [T, V, V], got {probs.shape}")
        if not np.all(np.isfinite(probs)) or np.any(probs < 0):
            raise ValueError("TabularPolicy.probs_TxVxV must be finite and >= 0")
        row_err = np.max(np.abs(probs.sum(axis=-1) - 1.0))
        if row_err > 1e-9:
            raise ValueError(f"TabularPolicy.probs_TxVxV rows must sum to 1 (worst error {row_err:.3g})")
        object.__setattr__(self, "probs_TxVxV", probs)

    @property
    def completion_len(self) -> int:
        return self.probs_TxVxV.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.probs_TxVxV.shape[1]

    def log_probs_TxVxV(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.probs_TxVxV)

    @classmethod
    def from_logits(cls, logits_TxVxV: np.ndarray) -> TabularPolicy:
        """pi_t(a|s) = softmax_a(logits[t - 1, s, a]); -inf logits give exact zeros."""
        logits = np.asarray(logits_TxVxV, dtype=np.float64)
        return cls(np.exp(logits - _logsumexp(logits, axis=-1)[..., None]))


def reference_policy(world: World) -> TabularPolicy:
    """pi_ref as a tabular policy: P at every step."""
    t, v = world.completion_len, world.vocab_size
    return TabularPolicy(np.broadcast_to(world.ref_probs_VxV, (t, v, v)).copy())


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m, axis=axis)


def _log_ref(world: World) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(world.ref_probs_VxV)


def _check_policy(world: World, policy: TabularPolicy) -> None:
    want = (world.completion_len, world.vocab_size, world.vocab_size)
    if policy.probs_TxVxV.shape != want:
        raise ValueError(f"policy.probs_TxVxV has shape {policy.probs_TxVxV.shape}, the world needs [T, V, V] = {want}")


def _check_tokens(name: str, tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{name} holds tokens outside 0..{vocab_size - 1} (min {tokens.min()}, max {tokens.max()})")


def _soft_backward(world: World, betas_Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log Z per start state [Q, V], log pi*_beta [Q, T, V, V]) for each beta, by the recursion above."""
    betas = np.asarray(betas_Q, dtype=np.float64)
    if betas.ndim != 1 or not np.all(np.isfinite(betas)) or np.any(betas <= 0):
        raise ValueError(f"beta must be finite and > 0, got {betas}")
    log_ref, w = _log_ref(world), world.reward_VxV
    n_t, v = world.completion_len, world.vocab_size
    value_QxV = np.zeros((betas.size, v))
    logpi = np.empty((betas.size, n_t, v, v))
    for t in range(n_t, 0, -1):
        m_QxVxV = log_ref[None] + w[None] / betas[:, None, None] + value_QxV[:, None, :]
        value_QxV = _logsumexp(m_QxVxV, axis=-1)
        logpi[:, t - 1] = m_QxVxV - value_QxV[..., None]
    return value_QxV, logpi


def _forward_stats(world: World, probs_QxTxVxV: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E[r] [Q, V], KL to pi_ref [Q, V]) per start state, by the forward recursion above."""
    log_ref, w = _log_ref(world), world.reward_VxV
    n_q, n_t, v = probs_QxTxVxV.shape[:3]
    state_QxVxV = np.broadcast_to(np.eye(v), (n_q, v, v)).copy()  # [q, start, current]
    reward, kl = np.zeros((n_q, v)), np.zeros((n_q, v))
    for t in range(n_t):
        pi = probs_QxTxVxV[:, t]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl_terms = np.where(pi > 0, pi * (np.log(pi) - log_ref[None]), 0.0)
        reward += np.einsum("qus,qs->qu", state_QxVxV, np.sum(pi * w[None], axis=-1))
        kl += np.einsum("qus,qs->qu", state_QxVxV, np.sum(kl_terms, axis=-1))
        state_QxVxV = state_QxVxV @ pi
    return reward, kl


def start_weights(world: World, prompts_NxK: np.ndarray | None = None) -> np.ndarray:
    """Weights over the start state x_k: the prompt law q, or the empirical law of given prompts."""
    if prompts_NxK is None:
        return world.prompt_last_probs_V
    prompts = np.asarray(prompts_NxK)
    if prompts.ndim != 2 or prompts.shape[0] == 0:
        raise ValueError(f"prompts_NxK must be a non-empty [N, k] int array, got shape {prompts.shape}")
    _check_tokens("prompts_NxK", prompts, world.vocab_size)
    return np.bincount(prompts[:, -1], minlength=world.vocab_size) / prompts.shape[0]


def expected_reward_per_state(world: World, policy: TabularPolicy) -> np.ndarray:
    """E_{y ~ pi(.|x)}[r(x, y)] for each last prompt token x_k = s: [V]."""
    _check_policy(world, policy)
    return _forward_stats(world, policy.probs_TxVxV[None])[0][0]


def kl_to_ref_per_state(world: World, policy: TabularPolicy) -> np.ndarray:
    """KL(pi(.|x) || pi_ref(.|x)) over whole completions, for each x_k = s: [V] (inf off support)."""
    _check_policy(world, policy)
    return _forward_stats(world, policy.probs_TxVxV[None])[1][0]


def expected_reward(world: World, policy: TabularPolicy, prompts_NxK: np.ndarray | None = None) -> float:
    """E_x E_{y ~ pi}[r]: over the prompt distribution, or the mean over the given prompts."""
    return float(expected_reward_per_state(world, policy) @ start_weights(world, prompts_NxK))


def kl_to_ref(world: World, policy: TabularPolicy, prompts_NxK: np.ndarray | None = None) -> float:
    """E_x KL(pi(.|x) || pi_ref(.|x)): over the prompt distribution, or the mean over given prompts."""
    return float(kl_to_ref_per_state(world, policy) @ start_weights(world, prompts_NxK))


def optimal_policy(world: World, beta: float) -> TabularPolicy:
    """pi*_beta = argmax_pi E[r] - beta KL(pi || pi_ref), i.e. pi_ref exp(r / beta) / Z, as a tabular policy."""
    return TabularPolicy(np.exp(_soft_backward(world, np.array([beta], dtype=np.float64))[1][0]))


def log_partition(world: World, beta: float) -> np.ndarray:
    """log Z(x) = log E_{y ~ pi_ref(.|x)} exp(r(x, y) / beta) = L_0(x_k), per start state: [V]."""
    return _soft_backward(world, np.array([beta], dtype=np.float64))[0][0]


def max_reward_policy(world: World) -> TabularPolicy:
    """The beta -> 0 limit of pi*_beta: pi_ref restricted to the completions of maximal reward.

    M_T = 0, M_{t-1}(s) = max_{a: P[s,a] > 0} W[s, a] + M_t(a); N_t(s) = pi_ref mass of the maximal
    continuations from s; pi(a | s) is proportional to P[s, a] N_t(a) over the maximizing a.
    """
    ref, log_ref, w = world.ref_probs_VxV, _log_ref(world), world.reward_VxV
    n_t, v = world.completion_len, world.vocab_size
    best_V, log_mass_V = np.zeros(v), np.zeros(v)  # in log space: masses underflow for peaked pi_ref
    probs = np.empty((n_t, v, v))
    for t in range(n_t, 0, -1):
        q_VxV = np.where(ref > 0, w + best_V[None, :], -np.inf)
        best_V = q_VxV.max(axis=-1)
        tol = 1e-12 * np.maximum(1.0, np.abs(best_V))
        log_weight = np.where(q_VxV >= (best_V - tol)[:, None], log_ref + log_mass_V[None, :], -np.inf)
        log_mass_V = _logsumexp(log_weight, axis=-1)
        probs[t - 1] = np.exp(log_weight - log_mass_V[:, None])
    return TabularPolicy(probs)


def frontier(world: World, betas, prompts_NxK: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kl_B, reward_B) of pi*_beta for each beta: the exact reward-KL frontier, in the order given."""
    betas_B = np.atleast_1d(np.asarray(betas, dtype=np.float64))
    weights_V = start_weights(world, prompts_NxK)
    _, logpi = _soft_backward(world, betas_B)
    reward_BxV, kl_BxV = _forward_stats(world, np.exp(logpi))
    return kl_BxV @ weights_V, reward_BxV @ weights_V


def beta_for_kl(world: World, kl, prompts_NxK: np.ndarray | None = None, iters: int = 64) -> np.ndarray:
    """The beta with KL(pi*_beta) = kl (averaged), by bisection in log beta; inf at kl = 0, 0 at kl >= K_max."""
    kl_Q = np.atleast_1d(np.asarray(kl, dtype=np.float64))
    if kl_Q.ndim != 1 or not np.all(np.isfinite(kl_Q)) or np.any(kl_Q < 0):
        raise ValueError(f"kl must be finite and >= 0, got {kl}")
    weights_V = start_weights(world, prompts_NxK)
    k_max = float(kl_to_ref_per_state(world, max_reward_policy(world)) @ weights_V)
    scale = max(float(np.abs(world.reward_VxV).max()), 1e-300)

    def kl_at(betas):
        return _forward_stats(world, np.exp(_soft_backward(world, betas)[1]))[1] @ weights_V

    lo, hi = np.full(kl_Q.size, 1e-2 * scale), np.full(kl_Q.size, 1e2 * scale)
    for _ in range(6):  # widen the brackets to [1e-20, 1e20] * scale at most
        lo = np.where((kl_at(lo) < kl_Q) & (lo > 1e-19 * scale), lo * 1e-3, lo)
        hi = np.where((kl_at(hi) > kl_Q) & (hi < 1e19 * scale), hi * 1e3, hi)
    for _ in range(iters):
        mid = np.sqrt(lo * hi)
        too_far = kl_at(mid) > kl_Q  # KL too large: beta too small
        lo, hi = np.where(too_far, mid, lo), np.where(too_far, hi, mid)
    beta = np.sqrt(lo * hi)
    beta = np.where(kl_Q <= 0, np.inf, beta)
    return np.where(kl_Q >= k_max, 0.0, beta)


def frontier_reward_at_kl(world: World, kl, prompts_NxK: np.ndarray | None = None) -> np.ndarray:
    """max {E[r] : KL(pi || pi_ref) <= kl} = E_{pi*_beta}[r] at the beta with KL(pi*_beta) = kl.

    Exact up to the bisection tolerance (no interpolation): E[r] of pi_ref at kl = 0, the maximal
    expected reward (of `max_reward_policy`) for kl >= K_max. Non-decreasing and concave in kl.
    """
    weights_V = start_weights(world, prompts_NxK)
    beta_Q = beta_for_kl(world, kl, prompts_NxK)
    out = np.empty(beta_Q.shape)
    inner = np.isfinite(beta_Q) & (beta_Q > 0)
    if inner.any():
        out[inner] = frontier(world, beta_Q[inner], prompts_NxK)[1]
    out[beta_Q == np.inf] = float(expected_reward_per_state(world, reference_policy(world)) @ weights_V)
    out[beta_Q == 0] = float(expected_reward_per_state(world, max_reward_policy(world)) @ weights_V)
    return out


def sequence_reward(world: World, last_tokens_N, completions_NxT) -> np.ndarray:
    """r(x, y) = sum_t W[y_{t-1}, y_t] with y_0 = x_k: [N] (or a scalar for one completion)."""
    last, comp = _sequence_args(last_tokens_N, completions_NxT, world.completion_len, world.vocab_size)
    prev = np.concatenate([last[:, None], comp[:, :-1]], axis=1)
    out = world.reward_VxV[prev, comp].sum(axis=1)
    return out[0] if np.ndim(completions_NxT) == 1 else out


def sequence_logprob(policy: TabularPolicy, last_tokens_N, completions_NxT) -> np.ndarray:
    """log pi(y | x) = sum_t log pi_t(y_t | y_{t-1}), y_0 = x_k: [N] (or a scalar for one completion)."""
    last, comp = _sequence_args(last_tokens_N, completions_NxT, policy.completion_len, policy.vocab_size)
    prev = np.concatenate([last[:, None], comp[:, :-1]], axis=1)
    steps = np.arange(comp.shape[1])[None, :]
    with np.errstate(divide="ignore"):
        out = np.log(policy.probs_TxVxV[steps, prev, comp]).sum(axis=1)
    return out[0] if np.ndim(completions_NxT) == 1 else out


def _sequence_args(last_tokens_N, completions_NxT, n_t: int, v: int) -> tuple[np.ndarray, np.ndarray]:
    comp = np.atleast_2d(np.asarray(completions_NxT))
    last = np.atleast_1d(np.asarray(last_tokens_N))
    if comp.ndim != 2 or comp.shape[1] != n_t:
        raise ValueError(f"completions_NxT must have shape [N, T={n_t}], got {np.shape(completions_NxT)}")
    if last.shape != (comp.shape[0],):
        raise ValueError(f"last_tokens_N must have shape [N={comp.shape[0]}], got {np.shape(last_tokens_N)}")
    _check_tokens("completions_NxT", comp, v)
    _check_tokens("last_tokens_N", last, v)
    return last.astype(np.int64), comp.astype(np.int64)
