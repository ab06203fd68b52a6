"""The policies the evaluation samples from and scores, on B right-padded prompts.

A policy is anything with `sample` (completions y ~ pi(.|x) at a temperature, with the log-prob of
the distribution actually sampled; row i's draw depends only on the key, its global row id
`row_ids_N[i]` and its prompt, so any split of the rows into batches or processes gives the same
completions), `logprob` (teacher-forced log pi(y|x) at temperature 1, summed over the completion
incl. EOS) and, for the exact path (`exact.exact_model_report`),
`next_logprobs`: `ModelPolicy` wraps a Decoder (optionally with a per-step logit bias, e.g. the
vocabulary mask it was trained with, so that it is sampled and scored as the biased distribution),
`MarkovPolicy` a `synthetic_exact.TabularPolicy` (e.g. pi*_beta) in model token ids.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.data import synthetic, synthetic_exact
from dpo_jax.models import sampler


class Prompts(NamedTuple):
    """B right-padded prompts: tokens_BxP int32 (row b valid in [0, lens_B[b])), lens_B int32."""

    tokens_BxP: np.ndarray
    lens_B: np.ndarray

    def ids(self, b: int) -> np.ndarray:
        return self.tokens_BxP[b, : self.lens_B[b]]

    def repeat(self, s: int) -> "Prompts":
        """Each prompt s times in a row (prompt-major: row b * s + j)."""
        return Prompts(np.repeat(self.tokens_BxP, s, axis=0), np.repeat(self.lens_B, s))

    def select(self, rows_N: np.ndarray) -> "Prompts":
        """The prompts of rows `rows_N` (indices or a slice), in that order."""
        return Prompts(self.tokens_BxP[rows_N], self.lens_B[rows_N])


def make_prompts(ids: Sequence[Sequence[int]], pad_id: int = 0) -> Prompts:
    if not ids or any(len(x) == 0 for x in ids):
        raise ValueError("make_prompts: need at least one prompt, each with >= 1 token")
    lens = np.asarray([len(x) for x in ids], np.int32)
    tokens = np.full((len(ids), int(lens.max())), pad_id, np.int32)
    for b, x in enumerate(ids):
        tokens[b, : len(x)] = x
    return Prompts(tokens, lens)


def tokenize_prompts(rows, tokenize_fn: Callable, n: int, pad_id: int = 0) -> Prompts:
    """The prompt ids of the first `n` rows the tokenize step keeps (in order), tokenized like training."""
    ids = []
    for i in range(len(rows)):
        example = tokenize_fn(rows[i])
        if example is not None:
            ids.append(np.asarray(example["prompt_ids"], np.int32))
        if len(ids) == n:
            break
    if not ids:
        raise ValueError(f"eval prompts: none of the {len(rows)} rows survived tokenization")
    return make_prompts(ids, pad_id)


class Completions(NamedTuple):
    """tokens_NxM int32 (pad after the end), mask_NxM float32 (1 for generated tokens incl. EOS),
    logps_N float64: log-prob of each completion under the distribution it was drawn from."""

    tokens_NxM: np.ndarray
    mask_NxM: np.ndarray
    logps_N: np.ndarray

    def ids(self, i: int) -> np.ndarray:
        return self.tokens_NxM[i, self.mask_NxM[i] > 0]


class Policy(Protocol):
    def sample(self, prompts: Prompts, key, *, max_new_tokens: int, temperature: float,
               row_ids_N: Optional[np.ndarray] = None) -> Completions:
        """y_i ~ pi(.|x_i) drawn from (key, row_ids_N[i]) alone (row_ids_N None: 0..N-1)."""

    def logprob(self, prompts: Prompts, tokens_NxM: np.ndarray, mask_NxM: np.ndarray) -> np.ndarray:
        """log pi(y | x) [N] float64 at temperature 1, summed over mask."""

    def next_logprobs(self, prompts: Prompts, tokens_NxM: np.ndarray) -> np.ndarray:
        """log pi(. | x, y_<n) for n = 0..M: [N, M + 1, V] float64 (only `exact_model_report` needs it)."""


# ----------------------------------------------------------------------------------------- policies


class ModelPolicy:
    """A Decoder (or (graphdef, params)) through the KV-cache sampler and teacher-forced `score`.

    Rows go through in chunks of `batch_size` (the last chunk padded), so one program is compiled
    per (batch_size, prompt length, max_new_tokens); each row samples with its global id (the
    sampler's `row_ids_B`), so the chunking never changes a completion.

    step_bias_NxV (optional, float32 [n, V], 0 allowed / -inf forbidden): added to the logits of
    completion step t, row min(t, n - 1) (the last row repeats for every later step), in `sample`,
    `logprob` and `next_logprobs` alike, so the policy IS softmax(logits_t + bias): a policy trained
    with a vocabulary mask is sampled and scored as trained with its mask as one row [1, V], e.g.
    `ModelPolicy(model, eos_id=2, step_bias_NxV=np.where(allowed_V, 0.0, -np.inf)[None])`.
    `with_step_bias` adds another bias (e.g. `format.format_bias`, the projection on a format)."""

    def __init__(self, model, *, eos_id: Optional[int], pad_id: int = 0, batch_size: int = 512,
                 step_bias_NxV: Optional[np.ndarray] = None):
        if not isinstance(model, tuple):
            graphdef, state = nnx.split(model)
            model = (graphdef, nnx.to_pure_dict(state))
        self.model = model
        self.eos_id, self.pad_id, self.batch_size = eos_id, int(pad_id), int(batch_size)
        if step_bias_NxV is not None:
            step_bias_NxV = np.asarray(step_bias_NxV, np.float32)
            if step_bias_NxV.ndim != 2 or step_bias_NxV.shape[0] < 1:
                raise ValueError(f"ModelPolicy step_bias_NxV must be [n >= 1, V]; got shape {step_bias_NxV.shape}")
        self.step_bias_NxV = step_bias_NxV

    @functools.cached_property
    def vocab_size(self) -> int:
        return int(nnx.merge(*self.model).cfg.vocab_size)

    def with_step_bias(self, extra_NxV: np.ndarray) -> "ModelPolicy":
        """The same model with bias self.step_bias_NxV + extra_NxV per step (rows expanded as above)."""
        extra_NxV = np.asarray(extra_NxV, np.float32)
        if self.step_bias_NxV is not None:
            n = max(len(extra_NxV), len(self.step_bias_NxV))
            extra_NxV = _bias_rows(self.step_bias_NxV, n) + _bias_rows(extra_NxV, n)
        return ModelPolicy(self.model, eos_id=self.eos_id, pad_id=self.pad_id, batch_size=self.batch_size,
                           step_bias_NxV=extra_NxV)

    def _bias(self, m: int) -> Optional[np.ndarray]:
        return None if self.step_bias_NxV is None else _bias_rows(self.step_bias_NxV, m)

    def _chunks(self, n: int):
        size = max(1, min(self.batch_size, n))
        for start in range(0, n, size):
            rows = np.arange(start, start + size)
            yield start, min(n, start + size) - start, np.minimum(rows, n - 1)

    def sample(self, prompts: Prompts, key, *, max_new_tokens: int, temperature: float = 1.0,
               row_ids_N: Optional[np.ndarray] = None) -> Completions:
        n = prompts.lens_B.shape[0]
        ids_N = _row_ids(row_ids_N, n)
        tokens = [np.zeros((0, max_new_tokens), np.int32)]
        mask, logps = [np.zeros((0, max_new_tokens), np.float32)], [np.zeros((0,))]
        for _, keep, rows in self._chunks(n):
            s = sampler.sample(self.model, prompts.tokens_BxP[rows], prompts.lens_B[rows], key,
                               max_new_tokens=max_new_tokens, temperature=temperature, eos_id=self.eos_id,
                               pad_id=self.pad_id, row_ids_B=ids_N[rows], step_bias_NxV=self._bias(max_new_tokens))
            s = jax.device_get(s)
            tokens.append(s.tokens_BxN[:keep])
            mask.append(s.mask_BxN[:keep])
            logps.append(s.sample_logps_BxN[:keep].astype(np.float64).sum(axis=1))
        return Completions(np.concatenate(tokens), np.concatenate(mask), np.concatenate(logps))

    def logprob(self, prompts: Prompts, tokens_NxM: np.ndarray, mask_NxM: np.ndarray) -> np.ndarray:
        out = [np.zeros((0,))]
        for _, keep, rows in self._chunks(tokens_NxM.shape[0]):
            lp = sampler.score(self.model, prompts.tokens_BxP[rows], prompts.lens_B[rows], tokens_NxM[rows],
                               mask_NxM[rows], step_bias_NxV=self._bias(tokens_NxM.shape[1]))
            out.append(np.asarray(lp, np.float64)[:keep].sum(axis=1))
        return np.concatenate(out)

    def next_logprobs(self, prompts: Prompts, tokens_NxM: np.ndarray) -> np.ndarray:
        out = []
        bias = self._bias(tokens_NxM.shape[1] + 1)
        for _, keep, rows in self._chunks(tokens_NxM.shape[0]):
            lp = _next_logprobs(self.model[1], prompts.tokens_BxP[rows], prompts.lens_B[rows], tokens_NxM[rows],
                                bias, graphdef=self.model[0])
            out.append(np.asarray(lp, np.float64)[:keep])
        return np.concatenate(out)


def _bias_rows(step_bias_NxV: np.ndarray, m: int) -> np.ndarray:
    """Rows min(t, n - 1) for steps t = 0..m-1: [m, V] float32."""
    return np.asarray(step_bias_NxV, np.float32)[np.minimum(np.arange(m), len(step_bias_NxV) - 1)]


def _row_ids(row_ids_N: Optional[np.ndarray], n: int) -> np.ndarray:
    ids_N = np.arange(n) if row_ids_N is None else np.asarray(row_ids_N)
    if ids_N.shape != (n,) or not np.issubdtype(ids_N.dtype, np.integer):
        raise ValueError(f"row_ids_N must be integers of shape [N={n}]; got {ids_N.dtype} {ids_N.shape}")
    return ids_N.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("m",))
def _row_bits(key, row_ids_N, *, m):
    return jax.vmap(lambda r: jax.random.bits(jax.random.fold_in(key, r), (m, 2), jnp.uint32))(row_ids_N)


def row_uniforms(key, row_ids_N: np.ndarray, m: int) -> np.ndarray:
    """u [N, m] float64 uniform on [0, 1) with 53 random bits; row i from fold_in(key, row_ids_N[i]) alone."""
    if len(row_ids_N) == 0:
        return np.zeros((0, m))
    bits = np.asarray(_row_bits(key, jnp.asarray(row_ids_N, jnp.int32), m=m)).astype(np.uint64)
    return ((bits[..., 0] >> 5) * 2**26 + (bits[..., 1] >> 6)) / 2.0**53


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _next_logprobs(params, prompts_BxP, lens_B, tokens_BxM, step_bias_NxV, *, graphdef):
    """log softmax of the logits (+ step_bias_NxV [M + 1, V] if given) after the prompt and after each
    of the M tokens: [B, M + 1, V] float32."""
    model = nnx.merge(graphdef, params)
    (b, p), m = prompts_BxP.shape, tokens_BxM.shape[1]
    pos_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    pos = jnp.concatenate([pos_BxP, lens_B[:, None] + jnp.arange(m, dtype=jnp.int32)], axis=1)
    seg = jnp.concatenate([(pos_BxP < lens_B[:, None]).astype(jnp.int32), jnp.ones((b, m), jnp.int32)], axis=1)
    hidden = model(jnp.concatenate([prompts_BxP, tokens_BxM], axis=1), positions_BxT=pos, segment_ids_BxT=seg)
    src = jnp.concatenate([lens_B[:, None] - 1, p + jnp.broadcast_to(jnp.arange(m), (b, m))], axis=1)
    logits_BxNxV = model.logits(jnp.take_along_axis(hidden, src[..., None], axis=1))
    if step_bias_NxV is not None:
        logits_BxNxV = logits_BxNxV + step_bias_NxV[None]
    return jax.nn.log_softmax(logits_BxNxV, axis=-1)


class MarkovPolicy:
    """A `synthetic_exact.TabularPolicy` in model token ids: T content tokens (content +
    token_offset) then EOS with probability 1; any other completion has log-prob -inf."""

    def __init__(self, policy: synthetic_exact.TabularPolicy, *, token_offset: int = synthetic.TOKEN_OFFSET,
                 eos_id: int = synthetic.EOS_ID, pad_id: int = synthetic.PAD_ID):
        self.policy, self.offset, self.eos_id, self.pad_id = policy, token_offset, eos_id, pad_id

    def _last_state(self, prompts: Prompts) -> np.ndarray:
        rows = np.arange(prompts.lens_B.shape[0])
        last = prompts.tokens_BxP[rows, prompts.lens_B - 1].astype(np.int64) - self.offset
        bad = np.flatnonzero((last < 0) | (last >= self.policy.vocab_size))
        if bad.size:
            raise ValueError(f"prompt {bad[0]}: last token id {last[bad[0]] + self.offset} is not a content token "
                             f"(ids {self.offset}..{self.offset + self.policy.vocab_size - 1})")
        return last

    def sample(self, prompts: Prompts, key, *, max_new_tokens: int, temperature: float = 1.0,
               row_ids_N: Optional[np.ndarray] = None) -> Completions:
        """Inverse-CDF draws: step t of row i uses `row_uniforms(key, row_ids_N, T)[i, t]`."""
        logp = self.policy.log_probs_TxVxV()
        if temperature > 0:
            q = synthetic_exact.TabularPolicy.from_logits(logp / temperature).probs_TxVxV
        else:  # greedy: a point mass on the argmax
            q = np.eye(self.policy.vocab_size)[np.argmax(logp, axis=-1)]
        n, n_t = prompts.lens_B.shape[0], self.policy.completion_len
        u_NxT = row_uniforms(key, _row_ids(row_ids_N, n), n_t)
        m = min(max_new_tokens, n_t + 1)
        tokens = np.full((n, max_new_tokens), self.pad_id, np.int32)
        mask = np.zeros((n, max_new_tokens), np.float32)
        mask[:, :m] = 1.0
        logps, prev = np.zeros(n), self._last_state(prompts)
        cdf = np.cumsum(q, axis=-1)
        for t in range(min(m, n_t)):
            u = u_NxT[:, t] * cdf[t, prev, -1]
            y = np.minimum((cdf[t, prev] <= u[:, None]).sum(axis=1), self.policy.vocab_size - 1)
            with np.errstate(divide="ignore"):
                logps += np.log(q[t, prev, y])
            tokens[:, t], prev = y + self.offset, y
        if m > n_t:
            tokens[:, n_t] = self.eos_id
        return Completions(tokens, mask, logps)

    def logprob(self, prompts: Prompts, tokens_NxM: np.ndarray, mask_NxM: np.ndarray) -> np.ndarray:
        n_t, v = self.policy.completion_len, self.policy.vocab_size
        n, m = tokens_NxM.shape
        live = mask_NxM > 0
        y = tokens_NxM.astype(np.int64) - self.offset
        content = (y >= 0) & (y < v)
        steps = np.arange(m)[None, :]
        ok = np.where(steps < n_t, content, tokens_NxM == self.eos_id) & (steps <= n_t)
        yc = np.where(content, y, 0)
        prev = np.concatenate([self._last_state(prompts)[:, None], yc[:, :-1]], axis=1)
        with np.errstate(divide="ignore"):
            table = self.policy.log_probs_TxVxV()[np.minimum(steps, n_t - 1), prev, yc]
        per_token = np.where(ok, np.where(steps < n_t, table, 0.0), -np.inf)
        return np.where(live, per_token, 0.0).sum(axis=1)

    def next_logprobs(self, prompts: Prompts, tokens_NxM: np.ndarray) -> np.ndarray:
        """Over ids 0..offset+V-1: the table for n < T after content tokens, EOS with probability 1
        at n = T and after anything unreachable."""
        n_t, v = self.policy.completion_len, self.policy.vocab_size
        n, m = tokens_NxM.shape
        y = tokens_NxM.astype(np.int64) - self.offset
        reach = np.cumprod(np.concatenate([np.ones((n, 1), bool), (y >= 0) & (y < v)], axis=1), axis=1) > 0
        prev = np.concatenate([self._last_state(prompts)[:, None], np.clip(y, 0, v - 1)], axis=1)
        out = np.full((n, m + 1, self.offset + v), -np.inf)
        out[..., self.eos_id] = 0.0
        for k in range(min(m + 1, n_t)):
            with np.errstate(divide="ignore"):
                table = np.log(self.policy.probs_TxVxV[k, prev[:, k]])
            out[reach[:, k], k, :] = -np.inf
            out[reach[:, k], k, self.offset: self.offset + v] = table[reach[:, k]]
        return out
