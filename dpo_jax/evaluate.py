"""Evaluation of a trained policy: sampled reward, KL to the reference, win rate, and, in the
synthetic world, the exact optimum and the reward-KL frontier.

Sampled (N = prompts x samples_per_prompt completions y ~ pi(.|x), here at `temperature`):
  sample/kl      = mean_i [log pi(y_i|x_i) - log pi_ref(y_i|x_i)]  (unbiased for KL(pi || pi_ref));
                   log pi is the log-prob of the distribution actually sampled (the sampler's
                   `sample_logps`: temperature 1 gives the policy itself), log pi_ref is
                   teacher-forced (`sampler.score`), both summed over the completion incl. EOS.
  sample/kl_stderr, sample/reward_stderr: conditional on the eval prompts,
                   sqrt(sum_x s_x^2 / S) / B with s_x the spread of the S samples of prompt x
                   (pooled std / sqrt(N) when S = 1).
  sample/reward, sample/reward_ref: mean reward of the policy's and of the reference's samples
                   (the reference is sampled the same way, same prompts, same temperature).
  sample/win_rate = mean_ij [1(r(pi sample j of x_i) > r(ref sample j of x_i)) + 1/2 1(=)].
  sample/malformed_frac(_ref): see the reward sources.
Synthetic world (all exact values average the start state x_k over the EVAL PROMPTS, i.e. its
empirical law, so they are comparable with the sampled numbers on the same prompts):
  exact/reward, exact/kl = E[r], KL(pi*_beta || pi_ref) of the exact optimum at the run's beta;
  exact/reward_ref = E_{pi_ref}[r]; frontier/reward_at_kl = max{E[r]: KL <= sample/kl};
  frontier/regret = frontier/reward_at_kl - sample/reward;
  frontier/regret_frac = regret / (frontier/reward_at_kl - exact/reward_ref).
  The frontier is measured against the world's pi_ref while sample/kl is against the run's
  reference model (the SFT model); sample/kl_world and sample/kl_ref_world estimate
  KL(pi || pi_ref) and KL(reference model || pi_ref) from the well-formed samples.
`exact_model_report` computes the trained transformer's exact KL and E[r] over the whole tree of
completions the sampler can draw (small worlds only), to validate the sampled estimates.

A policy is anything with `sample`, `logprob` (and `next_logprobs` for the exact path): `ModelPolicy`
wraps a Decoder, `MarkovPolicy` a `synthetic.TabularPolicy` (e.g. pi*_beta) in model token ids.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.data import synthetic
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
    def sample(self, prompts: Prompts, key, *, max_new_tokens: int, temperature: float) -> Completions: ...

    def logprob(self, prompts: Prompts, tokens_NxM: np.ndarray, mask_NxM: np.ndarray) -> np.ndarray:
        """log pi(y | x) [N] float64 at temperature 1, summed over mask."""

    def next_logprobs(self, prompts: Prompts, tokens_NxM: np.ndarray) -> np.ndarray:
        """log pi(. | x, y_<n) for n = 0..M: [N, M + 1, V] float64 (only `exact_model_report` needs it)."""


# ----------------------------------------------------------------------------------------- policies


class ModelPolicy:
    """A Decoder (or (graphdef, params)) through the KV-cache sampler and teacher-forced `score`.

    Rows go through in chunks of `batch_size` (the last chunk padded), so one program is compiled
    per (batch_size, prompt length, max_new_tokens)."""

    def __init__(self, model, *, eos_id: Optional[int], pad_id: int = 0, batch_size: int = 512):
        if not isinstance(model, tuple):
            graphdef, state = nnx.split(model)
            model = (graphdef, nnx.to_pure_dict(state))
        self.model = model
        self.eos_id, self.pad_id, self.batch_size = eos_id, int(pad_id), int(batch_size)

    def _chunks(self, n: int):
        size = min(self.batch_size, n)
        for start in range(0, n, size):
            rows = np.arange(start, start + size)
            yield start, min(n, start + size) - start, np.minimum(rows, n - 1)

    def sample(self, prompts: Prompts, key, *, max_new_tokens: int, temperature: float = 1.0) -> Completions:
        n = prompts.lens_B.shape[0]
        tokens, mask, logps = [], [], []
        for c, (_, keep, rows) in enumerate(self._chunks(n)):
            s = sampler.sample(self.model, prompts.tokens_BxP[rows], prompts.lens_B[rows], jax.random.fold_in(key, c),
                               max_new_tokens=max_new_tokens, temperature=temperature, eos_id=self.eos_id,
                               pad_id=self.pad_id)
            s = jax.device_get(s)
            tokens.append(s.tokens_BxN[:keep])
            mask.append(s.mask_BxN[:keep])
            logps.append(s.sample_logps_BxN[:keep].astype(np.float64).sum(axis=1))
        return Completions(np.concatenate(tokens), np.concatenate(mask), np.concatenate(logps))

    def logprob(self, prompts: Prompts, tokens_NxM: np.ndarray, mask_NxM: np.ndarray) -> np.ndarray:
        out = []
        for _, keep, rows in self._chunks(tokens_NxM.shape[0]):
            lp = sampler.score(self.model, prompts.tokens_BxP[rows], prompts.lens_B[rows], tokens_NxM[rows],
                               mask_NxM[rows])
            out.append(np.asarray(lp, np.float64)[:keep].sum(axis=1))
        return np.concatenate(out)

    def next_logprobs(self, prompts: Prompts, tokens_NxM: np.ndarray) -> np.ndarray:
        out = []
        for _, keep, rows in self._chunks(tokens_NxM.shape[0]):
            lp = _next_logprobs(self.model[1], prompts.tokens_BxP[rows], prompts.lens_B[rows], tokens_NxM[rows],
                                graphdef=self.model[0])
            out.append(np.asarray(lp, np.float64)[:keep])
        return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _next_logprobs(params, prompts_BxP, lens_B, tokens_BxM, *, graphdef):
    """log softmax of the logits after the prompt and after each of the M tokens: [B, M + 1, V] float32."""
    model = nnx.merge(graphdef, params)
    (b, p), m = prompts_BxP.shape, tokens_BxM.shape[1]
    pos_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    pos = jnp.concatenate([pos_BxP, lens_B[:, None] + jnp.arange(m, dtype=jnp.int32)], axis=1)
    seg = jnp.concatenate([(pos_BxP < lens_B[:, None]).astype(jnp.int32), jnp.ones((b, m), jnp.int32)], axis=1)
    hidden = model(jnp.concatenate([prompts_BxP, tokens_BxM], axis=1), positions_BxT=pos, segment_ids_BxT=seg)
    src = jnp.concatenate([lens_B[:, None] - 1, p + jnp.broadcast_to(jnp.arange(m), (b, m))], axis=1)
    return jax.nn.log_softmax(model.logits(jnp.take_along_axis(hidden, src[..., None], axis=1)), axis=-1)


class MarkovPolicy:
    """A `synthetic.TabularPolicy` in model token ids: T content tokens (content + token_offset)
    then EOS with probability 1; any other completion has log-prob -inf."""

    def __init__(self, policy: synthetic.TabularPolicy, *, token_offset: int = synthetic.TOKEN_OFFSET,
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

    def sample(self, prompts: Prompts, key, *, max_new_tokens: int, temperature: float = 1.0) -> Completions:
        logp = self.policy.log_probs_TxVxV()
        if temperature > 0:
            q = synthetic.TabularPolicy.from_logits(logp / temperature).probs_TxVxV
        else:  # greedy: a point mass on the argmax
            q = np.eye(self.policy.vocab_size)[np.argmax(logp, axis=-1)]
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        n, n_t = prompts.lens_B.shape[0], self.policy.completion_len
        m = min(max_new_tokens, n_t + 1)
        tokens = np.full((n, max_new_tokens), self.pad_id, np.int32)
        mask = np.zeros((n, max_new_tokens), np.float32)
        mask[:, :m] = 1.0
        logps, prev = np.zeros(n), self._last_state(prompts)
        cdf = np.cumsum(q, axis=-1)
        for t in range(min(m, n_t)):
            u = rng.random(n) * cdf[t, prev, -1]
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


# ----------------------------------------------------------------------------------------- estimators


def mean_stderr(values_BxS: np.ndarray) -> tuple[float, float]:
    """(mean, standard error conditional on the B prompts) of S samples per prompt."""
    v = np.asarray(values_BxS, np.float64)
    mean = float(v.mean())
    if not np.isfinite(mean):
        return mean, float("nan")
    b, s = v.shape
    if s >= 2:
        return mean, float(np.sqrt(v.var(axis=1, ddof=1).sum() / s) / b)
    return mean, float(v.std(ddof=1) / np.sqrt(b)) if b > 1 else float("nan")


def win_values(reward_BxS: np.ndarray, reward_ref_BxS: np.ndarray) -> np.ndarray:
    """1 where the policy's sample beats the reference's paired sample, 1/2 on ties, else 0."""
    return (reward_BxS > reward_ref_BxS) + 0.5 * (reward_BxS == reward_ref_BxS)


# ----------------------------------------------------------------------------------------- rewards


class SyntheticReward:
    """The world's true reward of model-token completions.

    Well-formed: exactly T content tokens then EOS. Otherwise the completion is malformed and
    scored on its longest prefix of content tokens (at most T): r = sum_{t<=m} W[y_{t-1}, y_t] +
    (T - m) min W, i.e. each missing step gets the worst one-step reward (so breaking the format
    never beats completing it); content tokens past T count nothing.
    """

    def __init__(self, world: synthetic.World, *, token_offset: int = synthetic.TOKEN_OFFSET,
                 eos_id: int = synthetic.EOS_ID):
        self.world, self.offset, self.eos_id = world, token_offset, eos_id

    def __call__(self, prompt_ids: Sequence[np.ndarray], completion_ids: Sequence[np.ndarray]):
        w, n_t, v = self.world.reward_VxV, self.world.completion_len, self.world.vocab_size
        rewards, malformed = np.zeros(len(completion_ids)), np.zeros(len(completion_ids), bool)
        for i, (x, c) in enumerate(zip(prompt_ids, completion_ids)):
            prev = int(x[-1]) - self.offset
            if not 0 <= prev < v:
                raise ValueError(f"prompt {i}: last token id {int(x[-1])} is not a content token")
            y = np.asarray(c, np.int64) - self.offset
            content = (y >= 0) & (y < v)
            m = int(np.argmin(content)) if not content.all() else len(y)
            m = min(m, n_t)
            path = np.concatenate([[prev], y[:m]])
            rewards[i] = w[path[:-1], path[1:]].sum() + (n_t - m) * w.min()
            malformed[i] = not (len(c) == n_t + 1 and m == n_t and int(c[n_t]) == self.eos_id)
        return rewards, malformed


class _TextReward:
    """Base of the text sources: decodes ids; malformed = the completion did not end with EOS."""

    def __init__(self, tok):
        self.tok = tok

    def texts(self, prompt_ids, completion_ids):
        dec = lambda ids: self.tok.decode([int(t) for t in ids], skip_special_tokens=True)  # noqa: E731
        return [dec(x) for x in prompt_ids], [dec(c) for c in completion_ids]

    def malformed(self, completion_ids) -> np.ndarray:
        eos = self.tok.eos_token_id
        return np.asarray([len(c) == 0 or int(c[-1]) != eos for c in completion_ids], bool)


class CallableReward(_TextReward):
    """`module:function`, called as fn(prompts: list[str], completions: list[str]) -> floats."""

    def __init__(self, spec: str, tok):
        super().__init__(tok)
        module, _, name = spec.partition(":")
        try:
            self.fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"config.eval.reward={spec!r}: cannot import {name!r} from {module!r} ({e})") \
                from None

    def __call__(self, prompt_ids, completion_ids):
        prompts, completions = self.texts(prompt_ids, completion_ids)
        out = np.asarray(self.fn(prompts, completions), np.float64)
        if out.shape != (len(completions),):
            raise ValueError(f"reward function {self.fn.__name__} returned shape {out.shape}, "
                             f"want ({len(completions)},)")
        return out, self.malformed(completion_ids)


class ModelReward(_TextReward):
    """A Hugging Face sequence-classification reward model (one label) on CPU torch; it scores the
    decoded prompt + completion text with its own tokenizer."""

    def __init__(self, path: str, tok, batch_size: int = 64):
        import torch  # pylint: disable=g-import-not-at-top
        import transformers  # pylint: disable=g-import-not-at-top

        super().__init__(tok)
        self.torch, self.batch_size = torch, batch_size
        self.rm_tok = transformers.AutoTokenizer.from_pretrained(path)
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path}: num_labels={self.model.config.num_labels}, "
                             "want 1 (a scalar reward)")
        if self.rm_tok.pad_token is None:
            self.rm_tok.pad_token = self.rm_tok.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.rm_tok.pad_token_id
        self.rm_tok.padding_side = "right"

    def __call__(self, prompt_ids, completion_ids):
        joint = [self.tok.decode([int(t) for t in np.concatenate([x, c])], skip_special_tokens=True)
                 for x, c in zip(prompt_ids, completion_ids)]
        out = []
        for i in range(0, len(joint), self.batch_size):
            enc = self.rm_tok(joint[i: i + self.batch_size], return_tensors="pt", padding=True)
            with self.torch.no_grad():
                out.append(self.model(**enc).logits[:, 0].double().numpy())
        return np.concatenate(out), self.malformed(completion_ids)


def make_reward(spec: str, *, tok=None, world: Optional[synthetic.World] = None):
    """config.eval.reward -> a reward source, or None: '' = the synthetic world's true reward
    (None outside it), an existing directory = a reward model, else 'module:function'."""
    if not spec:
        return SyntheticReward(world, eos_id=tok.eos_token_id if tok is not None else synthetic.EOS_ID) \
            if world is not None else None
    if os.path.isdir(spec):
        return ModelReward(spec, tok)
    if ":" in spec:
        return CallableReward(spec, tok)
    raise ValueError(f"config.eval.reward={spec!r}: expected '', a reward-model directory or 'module:function'")


# ----------------------------------------------------------------------------------------- reports


def _rewards(reward_fn, prompts: Prompts, comps: Completions, s: int):
    """(rewards_BxS, malformed_BxS) of completions laid out prompt-major."""
    b = prompts.lens_B.shape[0]
    r, bad = reward_fn([prompts.ids(i // s) for i in range(b * s)], [comps.ids(i) for i in range(b * s)])
    return np.asarray(r, np.float64).reshape(b, s), np.asarray(bad, bool).reshape(b, s)


def synthetic_report(world: synthetic.World, beta: float, last_tokens_B: np.ndarray, sampled_kl: float,
                     sampled_reward: float) -> dict[str, float]:
    """exact/* of pi*_beta and frontier/* at the sampled KL, with x_k weighted as in the eval prompts."""
    prompts = np.asarray(last_tokens_B, np.int64)[:, None]
    star, ref = synthetic.optimal_policy(world, beta), synthetic.reference_policy(world)
    out = {"exact/reward": synthetic.expected_reward(world, star, prompts),
           "exact/kl": synthetic.kl_to_ref(world, star, prompts),
           "exact/reward_ref": synthetic.expected_reward(world, ref, prompts)}
    kl = min(max(sampled_kl, 0.0), 1e12) if not np.isnan(sampled_kl) else 0.0  # noise can make it < 0
    at_kl = float(synthetic.frontier_reward_at_kl(world, kl, prompts)[0])
    gain = at_kl - out["exact/reward_ref"]
    out.update({"frontier/reward_at_kl": at_kl, "frontier/regret": at_kl - sampled_reward,
                "frontier/regret_frac": (at_kl - sampled_reward) / gain if gain > 0 else float("nan")})
    return out


def _world_kl(world, prompts: Prompts, comps: Completions, malformed_BxS, logps_N, s: int, offset: int):
    """mean over well-formed samples of log q(y) - log pi_ref(y) (the world's pi_ref), or nan."""
    good = ~malformed_BxS.reshape(-1)
    if not good.any():
        return float("nan")
    world_lp = MarkovPolicy(synthetic.reference_policy(world), token_offset=offset).logprob(
        prompts.repeat(s), comps.tokens_NxM, comps.mask_NxM)
    return float(np.mean((logps_N - world_lp)[good]))


def exact_model_report(policy: Policy, reference: Policy, prompts: Prompts, world: synthetic.World, *,
                       vocab: int, token_offset: int = synthetic.TOKEN_OFFSET, eos_id: int = synthetic.EOS_ID,
                       max_sequences: int = 70_000, block_rows: int = 1 << 15) -> dict[str, float]:
    """Exact KL(pi || pi_ref) and E[r] (the `SyntheticReward` rules) of the completion law that the
    sampled evaluation draws from (up to T + 1 tokens, stopping at EOS), per prompt, averaged.

    Enumerates the (vocab - 1)^T non-EOS prefixes y of length T over the model's `vocab` ids and, by
    the chain rule over the tree of prefixes (each prefix y_<n counted once),
      KL(x) = sum_n sum_{y_<n} pi(y_<n | x) KL(pi(. | x, y_<n) || pi_ref(. | x, y_<n)),
      E[r](x) = sum_{n<T} sum_{content y_<n} pi(y_<n | x) [sum_{a content} pi(a | .) W[y_{n-1}, a]
                + pi(not content | .) (T - n) min W].
    exact_model/mass (the total probability of all leaves) is 1 up to rounding;
    exact_model/well_formed is the probability of T content tokens then EOS."""
    v, n_t = world.vocab_size, world.completion_len
    k = vocab - 1
    if k ** n_t > max_sequences:
        raise ValueError(f"exact_model_report: (vocab - 1)^T = {k}^{n_t} = {k ** n_t} prefixes per prompt exceeds "
                         f"max_sequences={max_sequences} (synthetic.completion_len or the vocabulary is too large)")
    ids = np.array([i for i in range(vocab) if i != eos_id])
    seq_CxT = ids[np.stack(np.unravel_index(np.arange(k ** n_t), (k,) * n_t), axis=1)].astype(np.int32)
    content_CxT = (seq_CxT >= token_offset) & (seq_CxT < token_offset + v)
    y_CxT = np.where(content_CxT, seq_CxT - token_offset, 0)
    dedup_N1 = float(k) ** -(n_t - np.arange(n_t + 1))  # prefix y_<n is shared by k^(T-n) sequences
    w, c = world.reward_VxV, seq_CxT.shape[0]
    stats = {"kl": [], "reward": [], "mass": [], "well_formed": []}
    for b in range(prompts.lens_B.shape[0]):
        def tree(pol):
            blocks = [seq_CxT[i: i + block_rows] for i in range(0, c, block_rows)]
            out = np.concatenate([pol.next_logprobs(Prompts(np.repeat(prompts.tokens_BxP[b: b + 1], len(x), 0),
                                                            np.repeat(prompts.lens_B[b: b + 1], len(x))), x)
                                  for x in blocks])[..., :vocab]
            return np.pad(out, ((0, 0), (0, 0), (0, vocab - out.shape[-1])), constant_values=-np.inf)

        lp, lr = tree(policy), tree(reference)
        p = np.exp(lp)  # [C, T + 1, vocab]
        taken = np.take_along_axis(lp[:, :n_t], seq_CxT[..., None], axis=-1)[..., 0]
        prefix_CxN1 = np.exp(np.concatenate([np.zeros((c, 1)), np.cumsum(taken, axis=1)], axis=1))
        with np.errstate(invalid="ignore"):
            kl_n = np.where(p > 0, p * (lp - lr), 0.0).sum(-1)
        all_content = np.concatenate([np.ones((c, 1), bool), np.cumprod(content_CxT, axis=1) > 0], axis=1)
        prev = np.concatenate([np.full((c, 1), int(prompts.ids(b)[-1]) - token_offset), y_CxT], axis=1)[:, :n_t]
        p_content = p[:, :n_t, token_offset: token_offset + v]  # [C, T, V]
        step_r = (p_content * w[prev]).sum(-1) + (1 - p_content.sum(-1)) * (n_t - np.arange(n_t)) * w.min()
        weight = prefix_CxN1 * dedup_N1
        stats["kl"].append((weight * kl_n).sum())
        stats["reward"].append((weight[:, :n_t] * all_content[:, :n_t] * step_r).sum())
        stats["mass"].append(prefix_CxN1[:, n_t].sum() + (weight[:, :n_t] * p[:, :n_t, eos_id]).sum())
        stats["well_formed"].append((prefix_CxN1[:, n_t] * all_content[:, n_t] * p[:, n_t, eos_id]).sum())
    return {f"exact_model/{key}": float(np.mean(val)) for key, val in stats.items()}


@dataclasses.dataclass
class Evaluator:
    """Sampled evaluation of policies against one reference on fixed prompts (the reference's samples
    are drawn once and reused; keys are fixed, so repeated calls share their randomness).

    `evaluator(policy)` -> the sample/* (and, with a world, exact/* and frontier/*) metrics; a
    policy is a `Policy`, a Decoder or (graphdef, params). Call it every N steps or at the end.
    """

    reference: Any
    prompts: Prompts
    reward: Optional[Callable] = None
    world: Optional[synthetic.World] = None
    beta: Optional[float] = None
    samples_per_prompt: int = 4
    max_new_tokens: int = 0  # 0: T + 1 in the synthetic world, else 128
    temperature: float = 1.0
    seed: int = 0
    eos_id: Optional[int] = synthetic.EOS_ID
    pad_id: int = synthetic.PAD_ID
    token_offset: int = synthetic.TOKEN_OFFSET
    batch_size: int = 512

    def __post_init__(self):
        if self.samples_per_prompt < 1:
            raise ValueError(f"config.eval.samples_per_prompt={self.samples_per_prompt}; must be >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"config.eval.temperature={self.temperature}; must be >= 0")
        if not self.max_new_tokens:
            self.max_new_tokens = self.world.completion_len + 1 if self.world is not None else 128
        self.reference = self.as_policy(self.reference)
        self._ref = None

    def as_policy(self, p) -> Policy:
        if hasattr(p, "sample") and hasattr(p, "logprob"):
            return p
        return ModelPolicy(p, eos_id=self.eos_id, pad_id=self.pad_id, batch_size=self.batch_size)

    def draw(self, policy: Policy, stream: int) -> Completions:
        key = jax.random.fold_in(jax.random.key(self.seed), stream)
        return policy.sample(self.prompts.repeat(self.samples_per_prompt), key, max_new_tokens=self.max_new_tokens,
                             temperature=self.temperature)

    def _reference_stats(self):
        if self._ref is None:
            comps = self.draw(self.reference, 1)
            rew = _rewards(self.reward, self.prompts, comps, self.samples_per_prompt) if self.reward else None
            self._ref = (comps, rew)
        return self._ref

    def __call__(self, policy) -> dict[str, float]:
        policy, s, b = self.as_policy(policy), self.samples_per_prompt, self.prompts.lens_B.shape[0]
        comps = self.draw(policy, 0)
        ref_lp = self.reference.logprob(self.prompts.repeat(s), comps.tokens_NxM, comps.mask_NxM)
        kl, kl_se = mean_stderr((comps.logps_N - ref_lp).reshape(b, s))
        out = {"sample/kl": kl, "sample/kl_stderr": kl_se, "sample/num_prompts": float(b),
               "sample/length": float(comps.mask_NxM.sum(1).mean())}
        if self.reward is None:
            return out
        ref_comps, (r_ref, bad_ref) = self._reference_stats()
        r, bad = _rewards(self.reward, self.prompts, comps, s)
        out["sample/reward"], out["sample/reward_stderr"] = mean_stderr(r)
        out["sample/win_rate"], out["sample/win_rate_stderr"] = mean_stderr(win_values(r, r_ref))
        out.update({"sample/reward_ref": float(r_ref.mean()), "sample/malformed_frac": float(bad.mean()),
                    "sample/malformed_frac_ref": float(bad_ref.mean())})
        if self.world is not None and isinstance(self.reward, SyntheticReward):  # the frontier's own reward
            last = self.prompts.tokens_BxP[np.arange(b), self.prompts.lens_B - 1].astype(np.int64) - self.token_offset
            if self.beta is not None:
                out.update(synthetic_report(self.world, self.beta, last, kl, out["sample/reward"]))
            out["sample/kl_world"] = _world_kl(self.world, self.prompts, comps, bad, comps.logps_N, s,
                                               self.token_offset)
            ref_own = self.reference.logprob(self.prompts.repeat(s), ref_comps.tokens_NxM, ref_comps.mask_NxM)
            out["sample/kl_ref_world"] = _world_kl(self.world, self.prompts, ref_comps, bad_ref, ref_own, s,
                                                   self.token_offset)
        optional = ("sample/kl_world", "sample/kl_ref_world", "frontier/regret_frac")  # undefined -> left out
        return {k: v for k, v in out.items() if not (k in optional and np.isnan(v))}


# ----------------------------------------------------------------------------------------- a run


def reference_model(config, workdir: str, tok):
    """The run's initial reference: config.reference.path, else the SFT model (config.sft.model_dir
    or workdir/sft/model),
    else the initial policy (rebuilt: loaded from config.model.path or re-initialized from the seed).
    For reference.mode='sync' this is the reference before any sync; for 'none' / 'base' the policy
    the run started from."""
    from dpo_jax import build  # pylint: disable=g-import-not-at-top
    from dpo_jax.models import hf  # pylint: disable=g-import-not-at-top

    if config.reference.path:
        return hf.load_model(config.reference.path, dtype=config.model.dtype, param_dtype=config.model.param_dtype)
    sft = config.sft.model_dir or os.path.join(workdir, "sft", "model")  # a sweep shares one SFT model
    if config.sft.steps > 0 and os.path.exists(os.path.join(sft, "config.json")):
        return build.policy(config, tok, path=sft)
    return build.policy(config, tok)


def make_evaluator(config, workdir: str, files, tok, rows, tokenize_fn: Callable) -> Evaluator:
    """The Evaluator of a run: the first config.eval.num_prompts prompts of `rows` (the eval split),
    the reward of config.eval.reward, the synthetic world of files.world_dir, beta = config.loss.beta."""
    e = config.eval
    world = synthetic.load_world(files.world_dir) if getattr(files, "world_dir", None) else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return Evaluator(reference=reference_model(config, workdir, tok),
                     prompts=tokenize_prompts(rows, tokenize_fn, e.num_prompts, pad),
                     reward=make_reward(e.reward, tok=tok, world=world), world=world, beta=float(config.loss.beta),
                     samples_per_prompt=e.samples_per_prompt, max_new_tokens=e.max_new_tokens,
                     temperature=float(e.temperature), seed=config.seed, eos_id=tok.eos_token_id, pad_id=pad)


def final_report(config, workdir: str, files, tok, policy, stage) -> dict[str, float]:
    """The sampled report of the final policy on the stage's eval prompts (its train rows if none)."""
    rows = stage.eval_rows if stage.eval_rows is not None else stage.train_rows
    return make_evaluator(config, workdir, files, tok, rows, stage.tokenize_fn)(policy)
