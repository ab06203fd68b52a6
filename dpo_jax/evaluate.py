"""Evaluation of a trained policy by sampling: reward, KL to the reference, win rate.

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
Synthetic world: the report adds the exact optimum and the frontier at sample/kl
(`evaluate_exact.synthetic_report`: exact/*, frontier/*). The frontier is measured against the
world's pi_ref while sample/kl is against the run's reference model (the SFT model);
sample/kl_world and sample/kl_ref_world estimate KL(pi || pi_ref) and KL(reference model || pi_ref)
from the well-formed samples.

Policies (`ModelPolicy`, `MarkovPolicy`) and prompts live in `evaluate_policies`, the exact reports
(`synthetic_report`, `exact_model_report`) in `evaluate_exact`; both are re-exported here.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from dpo_jax.data import synthetic
from dpo_jax.evaluate_exact import exact_model_report, synthetic_report  # noqa: F401  (re-exported)
from dpo_jax.evaluate_policies import (  # noqa: F401  (re-exported: the policies and prompts of the evaluation)
    Completions,
    MarkovPolicy,
    ModelPolicy,
    Policy,
    Prompts,
    make_prompts,
    tokenize_prompts,
)


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


def _world_kl(world, prompts: Prompts, comps: Completions, malformed_BxS, logps_N, s: int, offset: int):
    """mean over well-formed samples of log q(y) - log pi_ref(y) (the world's pi_ref), or nan."""
    good = ~malformed_BxS.reshape(-1)
    if not good.any():
        return float("nan")
    world_lp = MarkovPolicy(synthetic.reference_policy(world), token_offset=offset).logprob(
        prompts.repeat(s), comps.tokens_NxM, comps.mask_NxM)
    return float(np.mean((logps_N - world_lp)[good]))


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
