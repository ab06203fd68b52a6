"""The synthetic world's completion format: which samples break it and how, the share of the KL they
carry, the KL of the well-formed part, and the format-constrained (projected) policy.

Format: a completion is well-formed iff it is exactly T content tokens then EOS. A malformed
completion gets exactly one kind, decided by the FIRST position t where it leaves the format (the
format wants a content token at t < T, EOS at t = T and the end of the completion after it):
  early_eos      t < T and the token is EOS, or the completion ends there (it stopped before T
                 content tokens; ending without EOS before T needs max_new_tokens < T + 1);
  special_token  t < T and the token is neither content nor EOS (<pad>, <s>, <unk>, ...);
  past_length    t >= T: T content tokens not followed by EOS (a content or special token, or the
                 end of the completion), or more tokens after that EOS.
So sample/malformed/{past_length, early_eos, special_token} (fractions of all N samples) sum to
sample/malformed_frac.

KL share of the malformed samples (any reward source), with d_i = log pi(y_i) - log pi_ref(y_i) the
per-sample terms of sample/kl:
  sample/malformed_kl_share = sum_{i malformed} d_i / sum_i d_i   (nan, left out, if sum_i d_i = 0).
It is the fraction of the sampled KL estimate the malformed samples carry; the well-formed d_i can
be negative, so it can leave [0, 1].

World KL of the well-formed part. With q the sampled policy, wf the well-formed set and
P_q(wf) = 1 - malformed_frac (the same samples), the KL of the normalized law q(.|wf):
  KL(q(.|wf) || p_world) = E_{q|wf}[log q(y) - log p_world(y)] - log P_q(wf),
estimated by the mean over the well-formed samples (`conditional_kl`; the eval prompts pooled, so it
is the KL of the joint law of (x, y) given wf against the prompts' law times p_world(y|x)).

Projection. The projected policy is the trained policy with its logits masked to the format at
each completion step: content tokens only at steps t < T, EOS only at step T (`format_bias`,
added as the sampler's step bias), i.e. what format-constrained decoding samples:
  proj(y_t | x, y_<t) = pi(y_t | x, y_<t) 1[y_t allowed at t] / sum_{a allowed at t} pi(a | x, y_<t),
so log proj(y | x) = sum_{t<T} of the renormalized content log-probs (the EOS step adds log 1 = 0).
It is sampled on the same prompts, samples per prompt and temperature (its own random stream) and
measured against the world's pi_ref (EOS with probability 1 at T), the frontier's own reference:
  projected/kl     = mean_i [log proj(y_i|x_i) - log pi_world_ref(y_i|x_i)], with projected/kl_stderr;
  projected/reward = mean world reward of its samples, with projected/reward_stderr;
  projected/reward_at_kl, projected/regret, projected/regret_frac: `exact.frontier_point` at
  (projected/kl, projected/reward), the definitions of frontier/* at sample/kl.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from dpo_jax.evaluation.policies import MarkovPolicy, ModelPolicy, Policy

WELL_FORMED, PAST_LENGTH, EARLY_EOS, SPECIAL_TOKEN = 0, 1, 2, 3
KINDS = {PAST_LENGTH: "past_length", EARLY_EOS: "early_eos", SPECIAL_TOKEN: "special_token"}


def malformed_kind(completion: np.ndarray, *, completion_len: int, vocab_size: int, token_offset: int,
                   eos_id: int) -> int:
    """WELL_FORMED, or the kind of the first position that leaves the format (module doc)."""
    y = np.asarray(completion, np.int64)
    content = (y >= token_offset) & (y < token_offset + vocab_size)
    off = np.flatnonzero(~content[:completion_len])
    if off.size:
        return EARLY_EOS if int(y[off[0]]) == eos_id else SPECIAL_TOKEN
    if len(y) < completion_len:
        return EARLY_EOS
    return WELL_FORMED if len(y) == completion_len + 1 and int(y[completion_len]) == eos_id else PAST_LENGTH


def breakdown(kind_N: np.ndarray) -> dict[str, float]:
    """sample/malformed/{kind}: the fraction of all N samples of each kind."""
    kind_N = np.asarray(kind_N)
    return {f"sample/malformed/{name}": float(np.mean(kind_N == code)) for code, name in KINDS.items()}


def kl_share(log_ratio_N: np.ndarray, malformed_N: np.ndarray) -> float:
    """sum over malformed samples of log pi - log pi_ref over the sum over all samples; nan if that is 0."""
    total = float(np.sum(log_ratio_N))
    if total == 0 or not np.isfinite(total):
        return float("nan")
    return float(np.sum(np.asarray(log_ratio_N)[np.asarray(malformed_N, bool)])) / total


def conditional_kl(logp_N: np.ndarray, target_logp_N: np.ndarray, malformed_N: np.ndarray) -> float:
    """KL(q(.|wf) || target) = mean over well-formed samples of (log q - log target) - log P_q(wf), with
    P_q(wf) the well-formed fraction of the same samples; nan without a well-formed sample."""
    good = ~np.asarray(malformed_N, bool)
    if not good.any():
        return float("nan")
    return float(np.mean((logp_N - target_logp_N)[good]) - np.log(good.mean()))


def format_bias(vocab: int, *, completion_len: int, vocab_size: int, token_offset: int, eos_id: int) -> np.ndarray:
    """The step bias of the format, float32 [T + 1, vocab]: rows t < T allow (0) the content ids
    token_offset..token_offset + V - 1, row T allows EOS only; everything else is -inf."""
    if token_offset + vocab_size > vocab or not 0 <= eos_id < vocab:
        raise ValueError(f"format_bias: content ids {token_offset}..{token_offset + vocab_size - 1} and EOS {eos_id} "
                         f"must lie in the model's vocabulary of {vocab}")
    bias = np.full((completion_len + 1, vocab), -np.inf, np.float32)
    bias[:completion_len, token_offset: token_offset + vocab_size] = 0.0
    bias[completion_len, eos_id] = 0.0
    return bias


def projected(policy: Policy, *, completion_len: int, vocab_size: int, token_offset: int,
              eos_id: int) -> Optional[Policy]:
    """The policy masked to the format: a ModelPolicy that stops at `eos_id` with `format_bias` added to
    its step bias, a MarkovPolicy itself (it is on the format by construction); None for any other."""
    if isinstance(policy, MarkovPolicy):
        return policy
    stops = np.atleast_1d(policy.eos_id if isinstance(policy, ModelPolicy) and policy.eos_id is not None else ())
    if isinstance(policy, ModelPolicy) and eos_id in stops:
        return policy.with_step_bias(format_bias(policy.vocab_size, completion_len=completion_len,
                                                 vocab_size=vocab_size, token_offset=token_offset, eos_id=eos_id))
    return None


def malformed_kinds(completions: Sequence[np.ndarray], **format_kw) -> np.ndarray:
    """`malformed_kind` of each completion: int [N]."""
    return np.asarray([malformed_kind(c, **format_kw) for c in completions], np.int64)
