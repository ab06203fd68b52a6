"""Batched autoregressive sampling with the KV cache, and teacher-forced scoring of completions.

Prompts are RIGHT-padded (what the data pipeline produces): row b holds its `prompt_lens_B[b]`
tokens in slots [0, len_b) and padding after. The prefill writes all P slots into the cache with
positions 0..P-1 and segment id 1 on the prompt, 0 on the padding (never attended: see the
attention rule in `transformer.py`). Generated token n of row b goes to cache slot P + n with
position len_b + n, so each row decodes exactly as if it were alone, whatever the other rows'
lengths. Decoding runs in one `jax.lax.while_loop` that exits when every row has emitted EOS or
after `max_new_tokens` tokens; a row that stopped emits `pad_id` with mask 0.

Randomness is per row: token n of row b is drawn with fold_in(fold_in(key, n), row_ids_B[b]),
so a row's completion depends only on (key, its global row id, the model, its prompt), never on
the batch around it or on how rows are split into batches or processes (row_ids_B defaults to
0..B-1).

One compiled program per (graphdef, batch B, prompt length P, max_new_tokens, with or without a
step bias): temperature, top-k, top-p, EOS and pad ids, the key, the row ids, the prompts and their
lengths are traced, so changing them never recompiles. `prompt_buckets` right-pads P up to a
bucket to bound the number of programs. `trace_count()` counts traces (tests guard against
recompiles with it).

Step bias (optional, `sample` and `score`): step_bias_NxV float32 [N, V] is added to the logits
of completion step n (the prediction of completion token n) before the temperature and the
filters: logits_n <- logits_n + step_bias_NxV[n]. 0 allows a token, -inf forbids it (every row must
allow at least one), so the policy IS the biased distribution softmax(logits_n + bias_n): it is
what `sample` draws from and what `logps_BxN`, `sample_logps_BxN` and `score` measure (e.g. a
format mask that allows some tokens at each step, or a constant vocabulary mask repeated on every
row). Its values are traced: changing them never recompiles.

Log-probs (float32), with logits the biased logits when a step bias is given:
  logps_BxN[b, n]        = log softmax(logits)[y_n]          (the model at temperature 1, unfiltered)
  sample_logps_BxN[b, n] = log q(y_n), q = softmax(filter(logits / temperature)), the distribution
                           actually sampled from (0 for greedy, temperature 0).
KL(pi || pi_ref) is then estimated as mean_y sum_n mask (logps - score(ref, ..., y)).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax import logprobs
from dpo_jax.models.transformer import Decoder, init_cache

MAX_EOS_IDS = 8
_TRACES: collections.Counter = collections.Counter()


def trace_count(name: str | None = None) -> int:
    """How many times `sample` ('sample') / `score` ('score') were traced (None: both)."""
    return sum(_TRACES.values()) if name is None else _TRACES[name]


class Samples(NamedTuple):
    """Sampled completions; N = max_new_tokens.

    tokens_BxN: int32 sampled ids, pad_id after a row stopped; logps_BxN: float32 log-probs of the
    tokens under the model at temperature 1 (0 where mask is 0); sample_logps_BxN: float32
    log-probs under the temperature/top-k/top-p distribution sampled from (0 for greedy);
    mask_BxN: float32, 1 for generated tokens up to and including EOS; lengths_B: int32 number of
    generated tokens (sum of mask); finished_B: bool, the row emitted EOS.
    """

    tokens_BxN: jax.Array
    logps_BxN: jax.Array
    sample_logps_BxN: jax.Array
    mask_BxN: jax.Array
    lengths_B: jax.Array
    finished_B: jax.Array


# ----------------------------------------------------------------------------- pure token choice


def filter_logits(logits_BxV, temperature, top_k, top_p):
    """logits / temperature with every token outside the top-k and outside the nucleus set to -inf.

    top_k = 0 keeps all; the nucleus is the smallest set of most likely tokens (under the
    temperature-scaled, top-k-filtered softmax) whose mass reaches top_p, i.e. token of rank i is
    kept iff the mass of the tokens ranked before it is < top_p (rank 0 always kept). Ties with the
    last kept logit are kept. temperature 0 is treated as 1 here (greedy is decided by the caller).
    All three may be traced scalars; the sort is skipped when top_k == 0 and top_p >= 1.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    scaled_BxV = logits_BxV / jnp.where(temperature > 0, temperature, 1.0)
    vocab = scaled_BxV.shape[-1]

    def truncate(s_BxV):
        sorted_BxV = -jnp.sort(-s_BxV, axis=-1)
        ranks_V = jnp.arange(vocab)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        in_k_BxV = jnp.broadcast_to(ranks_V < k, sorted_BxV.shape)
        probs_BxV = jax.nn.softmax(jnp.where(in_k_BxV, sorted_BxV, -jnp.inf), axis=-1)
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        keep_BxV = in_k_BxV & ((before_BxV < top_p) | (ranks_V == 0))
        n_keep_B = jnp.sum(keep_BxV, axis=-1)
        threshold_B = jnp.take_along_axis(sorted_BxV, (n_keep_B - 1)[:, None], axis=-1)
        return jnp.where(s_BxV >= threshold_B, s_BxV, -jnp.inf)

    return jax.lax.cond((top_k > 0) | (top_p < 1), truncate, lambda s: s, scaled_BxV)


def choose_tokens(logits_BxV, key, temperature, top_k, top_p, row_ids_B=None):
    """(token_B, logp_B, sample_logp_B): y ~ softmax(filter_logits(...)), or argmax when
    temperature == 0; logp = log softmax(logits)[y]; sample_logp = log q(y) (0 when greedy).

    row_ids_B: row b draws with its own key fold_in(key, row_ids_B[b]), independent of the other
    rows; None: one draw for the whole batch with `key`."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    greedy = jnp.asarray(temperature, jnp.float32) <= 0
    filtered_BxV = filter_logits(logits_BxV, temperature, top_k, top_p)
    if row_ids_B is None:
        drawn_B = jax.random.categorical(key, filtered_BxV, axis=-1)
    else:
        keys_B = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids_B)
        drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV)
    token_B = jnp.where(greedy, jnp.argmax(logits_BxV, axis=-1), drawn_B).astype(jnp.int32)
    pick = lambda lp_BxV: jnp.take_along_axis(lp_BxV, token_B[:, None], axis=-1)[:, 0]  # noqa: E731
    logp_B = pick(jax.nn.log_softmax(logits_BxV, axis=-1))
    sample_logp_B = jnp.where(greedy, 0.0, pick(jax.nn.log_softmax(filtered_BxV, axis=-1)))
    return token_B, logp_B, sample_logp_B


# ----------------------------------------------------------------------------- argument handling


def _split_model(model) -> tuple[Any, Any, Any]:
    """A Decoder, or (graphdef, params) with params a pure dict or nnx.State -> (graphdef, params, cfg)."""
    if isinstance(model, Decoder):
        graphdef, state = nnx.split(model)
        return graphdef, nnx.to_pure_dict(state), model.cfg
    if isinstance(model, tuple) and len(model) == 2:
        graphdef, params = model
        return graphdef, params, nnx.merge(graphdef, params).cfg
    raise ValueError(f"model must be a Decoder or a (graphdef, params) tuple; got {type(model).__name__}")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_prompts(prompts_BxP, prompt_lens_B):
    if np.ndim(prompts_BxP) != 2:
        raise ValueError(f"prompts_BxP must be 2-D [B, P]; got shape {np.shape(prompts_BxP)}")
    B, P = np.shape(prompts_BxP)
    if np.shape(prompt_lens_B) != (B,):
        raise ValueError(f"prompt_lens_B must have shape [B] = ({B},); got {np.shape(prompt_lens_B)}")
    if not jnp.issubdtype(jnp.asarray(prompts_BxP).dtype, jnp.integer):
        raise ValueError(f"prompts_BxP must hold integer token ids; got dtype {jnp.asarray(prompts_BxP).dtype}")
    if _is_concrete(prompt_lens_B):
        lens = np.asarray(prompt_lens_B)
        bad = np.flatnonzero((lens < 1) | (lens > P))
        if bad.size:
            raise ValueError(f"prompt_lens_B[{bad[0]}] = {lens[bad[0]]}: each prompt needs 1..P={P} tokens")
    return B, P


def _eos_ids(eos_id, cfg) -> np.ndarray:
    """The stop ids as int32 [MAX_EOS_IDS], filled with -1 (matches no token): traced, never static."""
    eos = cfg.eos_token_id if eos_id is None else eos_id
    eos = () if eos is None else (eos,) if isinstance(eos, (int, np.integer)) else tuple(eos)
    if any(not 0 <= int(e) < cfg.vocab_size for e in eos):
        raise ValueError(f"eos_id {eos} must lie in [0, vocab_size={cfg.vocab_size})")
    if len(eos) > MAX_EOS_IDS:
        raise ValueError(f"eos_id: at most {MAX_EOS_IDS} stop ids; got {len(eos)}")
    return np.asarray([*map(int, eos)] + [-1] * (MAX_EOS_IDS - len(eos)), np.int32)


def _check_knobs(temperature, top_k, top_p, max_new_tokens):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    checks = (("temperature", temperature, lambda v: v >= 0, ">= 0"),
              ("top_k", top_k, lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
              ("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1]"))
    for name, value, ok, want in checks:
        if _is_concrete(value) and np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar; got shape {np.shape(value)}")
        if _is_concrete(value) and not ok(float(value)):
            raise ValueError(f"{name} must be {want}; got {value}")


def _check_step_bias(step_bias_NxV, n: int, vocab: int):
    """None, or the bias as float32 [n, vocab]: finite or -inf, each row allowing some token."""
    if step_bias_NxV is None:
        return None
    if np.shape(step_bias_NxV) != (n, vocab):
        raise ValueError(f"step_bias_NxV must have shape [N={n}, V={vocab}] (completion steps x vocabulary); "
                         f"got {np.shape(step_bias_NxV)}")
    bias = jnp.asarray(step_bias_NxV, jnp.float32)
    if _is_concrete(bias):
        host = np.asarray(bias)
        if np.isnan(host).any() or (host == np.inf).any():
            raise ValueError("step_bias_NxV must be finite or -inf (a forbidden token); got NaN or +inf")
        dead = np.flatnonzero(np.isneginf(host).all(axis=1))
        if dead.size:
            raise ValueError(f"step_bias_NxV row {dead[0]} forbids every token (all -inf)")
    return bias


def _bucket(P: int, buckets: Sequence[int] | None) -> int:
    if not buckets:
        return P
    fitting = [int(b) for b in buckets if int(b) >= P]
    if not fitting:
        raise ValueError(f"prompt length {P} exceeds the largest of prompt_buckets {sorted(buckets)}")
    return min(fitting)


# ----------------------------------------------------------------------------- sampling


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _sample(params, prompts_BxP, prompt_lens_B, row_ids_B, key, temperature, top_k, top_p, eos_E, pad_id,
            step_bias_NxV, *, graphdef, max_new_tokens):
    _TRACES["sample"] += 1
    model = nnx.merge(graphdef, params)
    B, P = prompts_BxP.shape
    N = max_new_tokens
    lens_B = prompt_lens_B.astype(jnp.int32)

    positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    segments_BxP = (positions_BxP < lens_B[:, None]).astype(jnp.int32)
    cache = init_cache(model.cfg, B, P + N - 1)
    hidden_BxPxD, cache = model(prompts_BxP, positions_BxT=positions_BxP, segment_ids_BxT=segments_BxP,
                                cache=cache, cache_index=0)
    last_Bx1xD = jnp.take_along_axis(hidden_BxPxD, (lens_B - 1)[:, None, None], axis=1)
    logits_BxV = model.logits(last_Bx1xD)[:, 0]

    def record(c, t, logits_BxV):
        if step_bias_NxV is not None:
            logits_BxV = logits_BxV + jax.lax.dynamic_index_in_dim(step_bias_NxV, t, keepdims=False)[None]
        token_B, logp_B, slogp_B = choose_tokens(logits_BxV, jax.random.fold_in(key, t), temperature, top_k, top_p,
                                                   row_ids_B)
        live_B = ~c["done_B"]
        token_B = jnp.where(live_B, token_B, pad_id)
        put = lambda arr, col: jax.lax.dynamic_update_slice_in_dim(arr, col[:, None], t, axis=1)  # noqa: E731
        hit_B = jnp.any(token_B[:, None] == eos_E[None, :], axis=1)
        return dict(c, t=t + 1, done_B=c["done_B"] | (live_B & hit_B),
                    tokens_BxN=put(c["tokens_BxN"], token_B),
                    logps_BxN=put(c["logps_BxN"], jnp.where(live_B, logp_B, 0.0)),
                    sample_logps_BxN=put(c["sample_logps_BxN"], jnp.where(live_B, slogp_B, 0.0)),
                    mask_BxN=put(c["mask_BxN"], live_B.astype(jnp.float32)))

    zeros = jnp.zeros((B, N), jnp.float32)
    carry = dict(t=jnp.int32(0), cache=cache, done_B=jnp.zeros((B,), bool),
                 tokens_BxN=jnp.full((B, N), pad_id, jnp.int32), logps_BxN=zeros, sample_logps_BxN=zeros,
                 mask_BxN=zeros)
    carry = record(carry, jnp.int32(0), logits_BxV)

    def body(c):
        t = c["t"]  # token t-1 goes to cache slot P + t - 1 at position len + t - 1; then choose token t
        prev_Bx1 = jax.lax.dynamic_slice_in_dim(c["tokens_BxN"], t - 1, 1, axis=1)
        hidden_Bx1xD, cache = model(prev_Bx1, positions_BxT=(lens_B + t - 1)[:, None],
                                    segment_ids_BxT=jnp.ones((B, 1), jnp.int32), cache=c["cache"],
                                    cache_index=P + t - 1)
        return record(dict(c, cache=cache), t, model.logits(hidden_Bx1xD)[:, 0])

    carry = jax.lax.while_loop(lambda c: (c["t"] < N) & ~jnp.all(c["done_B"]), body, carry)
    return Samples(carry["tokens_BxN"], carry["logps_BxN"], carry["sample_logps_BxN"], carry["mask_BxN"],
                   jnp.sum(carry["mask_BxN"], axis=1).astype(jnp.int32), carry["done_B"])


def sample(model, prompts_BxP, prompt_lens_B, key, *, max_new_tokens: int, temperature=1.0, top_k=0, top_p=1.0,
           eos_id: int | Sequence[int] | None = None, pad_id: int = 0,
           prompt_buckets: Sequence[int] | None = None, row_ids_B=None, step_bias_NxV=None) -> Samples:
    """Sample up to `max_new_tokens` tokens after each right-padded prompt (see the module doc).

    model: a Decoder or (graphdef, params). prompts_BxP: int, row b's prompt in [0, len_b);
    prompt_lens_B: 1 <= len_b <= P. key: a jax PRNG key; token n of row b is drawn with
    fold_in(fold_in(key, n), row_ids_B[b]). row_ids_B: int [B], the rows' global ids (None: 0..B-1):
    sampling rows in any batches with their ids gives the same completions as sampling them at once.
    temperature 0 = greedy; top_k 0 = off; top_p 1 = off. eos_id: an id or ids that stop a row
    (None: the model config's eos_token_id; () never stops). prompt_buckets: pad P up to the
    smallest bucket >= P so that prompt lengths share compiled programs. step_bias_NxV: None or float32
    [max_new_tokens, vocab_size], added to the logits of completion step n (see the module doc).
    """
    graphdef, params, cfg = _split_model(model)
    B, P = _check_prompts(prompts_BxP, prompt_lens_B)
    _check_knobs(temperature, top_k, top_p, max_new_tokens)
    if not 0 <= int(pad_id) < cfg.vocab_size:
        raise ValueError(f"pad_id {pad_id} must lie in [0, vocab_size={cfg.vocab_size})")
    P_bucket = _bucket(P, prompt_buckets)
    if cfg.position == "learned" and P_bucket + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt length {P_bucket} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings} of a learned-position model")
    row_ids_B = jnp.arange(B, dtype=jnp.int32) if row_ids_B is None else jnp.asarray(row_ids_B)
    if row_ids_B.shape != (B,) or not jnp.issubdtype(row_ids_B.dtype, jnp.integer):
        raise ValueError(f"row_ids_B must be integers of shape [B={B}]; got {row_ids_B.dtype} {row_ids_B.shape}")
    step_bias_NxV = _check_step_bias(step_bias_NxV, int(max_new_tokens), cfg.vocab_size)
    prompts_BxP = jnp.asarray(prompts_BxP, jnp.int32)
    if P_bucket > P:
        prompts_BxP = jnp.pad(prompts_BxP, ((0, 0), (0, P_bucket - P)), constant_values=int(pad_id))
    return _sample(params, prompts_BxP, jnp.asarray(prompt_lens_B, jnp.int32), row_ids_B.astype(jnp.int32), key,
                   jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                   jnp.asarray(top_p, jnp.float32), jnp.asarray(_eos_ids(eos_id, cfg)), jnp.int32(pad_id),
                   step_bias_NxV, graphdef=graphdef, max_new_tokens=int(max_new_tokens))


# ----------------------------------------------------------------------------- teacher-forced scoring


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(params, prompts_BxP, prompt_lens_B, completions_BxN, mask_BxN, step_bias_NxV, *, graphdef):
    _TRACES["score"] += 1
    model = nnx.merge(graphdef, params)
    (B, P), N = prompts_BxP.shape, completions_BxN.shape[1]
    lens_B = prompt_lens_B.astype(jnp.int32)
    prompt_pos_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    n_N = jnp.arange(N, dtype=jnp.int32)
    tokens = jnp.concatenate([prompts_BxP, completions_BxN], axis=1)
    positions = jnp.concatenate([prompt_pos_BxP, lens_B[:, None] + n_N], axis=1)
    segments = jnp.concatenate([(prompt_pos_BxP < lens_B[:, None]).astype(jnp.int32),
                                jnp.ones((B, N), jnp.int32)], axis=1)
    hidden_BxTxD = model(tokens, positions_BxT=positions, segment_ids_BxT=segments)
    # completion token n is predicted at prompt slot len - 1 (n = 0) or completion slot P + n - 1
    src_BxN = jnp.where(n_N == 0, lens_B[:, None] - 1, P + n_N - 1)
    hidden_BxNxD = jnp.take_along_axis(hidden_BxTxD, src_BxN[..., None], axis=1)
    if step_bias_NxV is None:
        w_DxV, b_V = model.unembedding()
        logps_BxN = logprobs.token_logps(hidden_BxNxD, w_DxV, completions_BxN, bias_V=b_V)
    else:
        logps_BxNxV = jax.nn.log_softmax(model.logits(hidden_BxNxD) + step_bias_NxV[None], axis=-1)
        logps_BxN = jnp.take_along_axis(logps_BxNxV, completions_BxN[..., None], axis=-1)[..., 0]
    return jnp.where(mask_BxN > 0, logps_BxN, 0.0)


def score(model, prompts_BxP, prompt_lens_B, completions_BxN, mask_BxN, step_bias_NxV=None):
    """Teacher-forced log-probs [B, N] float32 of `completions_BxN` after each right-padded prompt
    under `model` (a Decoder or (graphdef, params)): log softmax(logits)[y_n] at position len + n,
    0 where mask_BxN is 0. Same layout as `Samples`, e.g. `score(ref, p, l, s.tokens_BxN, s.mask_BxN)`.
    step_bias_NxV: None or float32 [N, vocab_size], added to the logits of step n as in `sample`
    (a forbidden token scores -inf); the biased path materializes the [B, N, V] logits."""
    graphdef, params, cfg = _split_model(model)
    B, P = _check_prompts(prompts_BxP, prompt_lens_B)
    for name, x in (("completions_BxN", completions_BxN), ("mask_BxN", mask_BxN)):
        if np.ndim(x) != 2 or np.shape(x)[0] != B:
            raise ValueError(f"{name} must be 2-D [B={B}, N]; got shape {np.shape(x)}")
    if np.shape(mask_BxN) != np.shape(completions_BxN):
        raise ValueError(f"mask_BxN must have the shape of completions_BxN {np.shape(completions_BxN)}; "
                         f"got {np.shape(mask_BxN)}")
    if cfg.position == "learned" and P + np.shape(completions_BxN)[1] > cfg.max_position_embeddings:
        raise ValueError(f"prompt length {P} + completion length {np.shape(completions_BxN)[1]} exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings} of a learned-position model")
    step_bias_NxV = _check_step_bias(step_bias_NxV, np.shape(completions_BxN)[1], cfg.vocab_size)
    return _score(params, jnp.asarray(prompts_BxP, jnp.int32), jnp.asarray(prompt_lens_B, jnp.int32),
                  jnp.asarray(completions_BxN, jnp.int32), jnp.asarray(mask_BxN), step_bias_NxV, graphdef=graphdef)
