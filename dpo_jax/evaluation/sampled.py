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
  sample/malformed_kl_share = sum_{i malformed} d_i / sum_i d_i, d_i = log pi(y_i|x_i) - log pi_ref(y_i|x_i)
                   (the share of sample/kl that malformed samples carry; left out when sum_i d_i = 0).
Synthetic world (`format` defines the format, its breakdown and the projection):
  optimum/*, frontier/*: the exact optimum (with a beta) and the frontier at sample/kl
                   (`exact.synthetic_report`). The frontier is measured against the world's pi_ref
                   while sample/kl is against the run's reference model (the SFT model).
  sample/malformed/{past_length, early_eos, special_token}: the kind of each malformed sample (the
                   first position that leaves the format decides); they sum to sample/malformed_frac.
  sample/kl_world, sample/kl_ref_world: KL(q(.|wf) || world pi_ref) of the policy's and of the
                   reference model's law conditioned on well-formed samples,
                   = mean_{wf} [log q(y) - log pi_world(y)] - log(1 - malformed_frac).
  projected/*: the policy masked to the format (`format.projected`), sampled the same way (its own
                   stream) and measured against the world's pi_ref and the frontier.

Sharded over processes (`Evaluator.shard`, `gather`): each samples and scores its block of the N
rows, the per-row values are gathered, and every process reports what one process would.

Policies (`ModelPolicy`, `MarkovPolicy`) and prompts live in `policies`, the exact reports
(`synthetic_report`, `exact_model_report`) in `exact`. The run's reference model is the caller's
(`build.evaluation_reference`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from dpo_jax import multihost
from dpo_jax.data import synthetic, synthetic_exact
from dpo_jax.evaluation.exact import frontier_point, synthetic_report
from dpo_jax.evaluation.format import (WELL_FORMED, breakdown, conditional_kl, kl_share, malformed_kinds,
                                       projected)
from dpo_jax.evaluation.policies import Completions, MarkovPolicy, ModelPolicy, Policy, Prompts, tokenize_prompts


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

    Well-formed: exactly T content tokens then EOS. Otherwise the completion is malformed (of the kind
    `kinds` names, see `format`) and scored on its longest prefix of content tokens (at most T):
    r = sum_{t<=m} W[y_{t-1}, y_t] + (T - m) min W, i.e. each missing step gets the worst one-step
    reward (so breaking the format never beats completing it); content tokens past T count nothing.
    """

    def __init__(self, world: synthetic_exact.World, *, token_offset: int = synthetic.TOKEN_OFFSET,
                 eos_id: int = synthetic.EOS_ID):
        self.world, self.offset, self.eos_id = world, token_offset, eos_id
        self.format_kw = dict(completion_len=world.completion_len, vocab_size=world.vocab_size,
                              token_offset=token_offset, eos_id=eos_id)

    def kinds(self, completion_ids: Sequence[np.ndarray]) -> np.ndarray:
        """`format.malformed_kind` of each completion: int [N], 0 = well-formed."""
        return malformed_kinds(completion_ids, **self.format_kw)

    def __call__(self, prompt_ids: Sequence[np.ndarray], completion_ids: Sequence[np.ndarray]):
        w, n_t, v = self.world.reward_VxV, self.world.completion_len, self.world.vocab_size
        rewards = np.zeros(len(completion_ids))
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
        return rewards, self.kinds(completion_ids) != WELL_FORMED


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
    """`module:function`, called as fn(prompts: list[str], completions: list[str]) -> floats. Importing
    the module runs its code: name only modules you trust."""

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
    decoded prompt + completion text with its own tokenizer. Weights load from safetensors only
    (a pickled `pytorch_model.bin` could run code): a directory without them is an error."""

    def __init__(self, path: str, tok, batch_size: int = 64):
        # torch and transformers' PyTorch models are heavy and needed by this reward source only.
        import torch  # pylint: disable=g-import-not-at-top
        import transformers  # pylint: disable=g-import-not-at-top

        super().__init__(tok)
        self.torch, self.batch_size = torch, batch_size
        self.rm_tok = transformers.AutoTokenizer.from_pretrained(path)
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(  # never a pickle
            path, dtype=torch.float32, use_safetensors=True).eval()
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


def make_reward(spec: str, *, tok=None, world: Optional[synthetic_exact.World] = None):
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


def _identity(rows: np.ndarray) -> np.ndarray:
    return rows


def _judged(reward_fn, prompts: Prompts, comps: Completions) -> dict[str, np.ndarray]:
    """Per-row reward (float64) and malformed flag (bool) of the rows' completions; with a reward that
    names them (`SyntheticReward.kinds`), the malformed kind (`format`) as malformed_kind."""
    n = prompts.lens_B.shape[0]
    completions = [comps.ids(i) for i in range(n)]
    r, bad = reward_fn([prompts.ids(i) for i in range(n)], completions) if n else (np.zeros((0,)), np.zeros((0,)))
    out = {"reward": np.asarray(r, np.float64).reshape(n), "malformed": np.asarray(bad, bool).reshape(n)}
    if hasattr(reward_fn, "kinds"):
        out["malformed_kind"] = np.asarray(reward_fn.kinds(completions), np.float64).reshape(n)
    return out


@dataclasses.dataclass
class Evaluator:
    """Sampled evaluation of policies against one reference on fixed prompts (the reference's samples
    are drawn once and reused; keys are fixed, so repeated calls share their randomness).

    `evaluator(policy)` -> the sample/* (and, with a world, optimum/*, frontier/* and projected/*)
    metrics; a policy is a `Policy`, a Decoder or (graphdef, params). Call it every N steps or at the end.

    Sharded: the N = B x S prompt-major rows are split into `count` contiguous blocks
    (`multihost.process_share`); shard (index, count) samples and scores block `index` only
    (`local_rows`), `gather` concatenates every shard's per-row arrays in shard order (in lockstep
    on every shard), and `report` computes the metrics from the N gathered rows. Row i is drawn
    from (seed, i) alone, so every shard returns the report of one unsharded evaluation.
    """

    reference: Any
    prompts: Prompts
    reward: Optional[Callable] = None
    world: Optional[synthetic_exact.World] = None
    beta: Optional[float] = None
    samples_per_prompt: int = 4
    max_new_tokens: int = 0  # 0: T + 1 in the synthetic world, else 128
    temperature: float = 1.0
    seed: int = 0
    eos_id: Optional[int] = synthetic.EOS_ID
    pad_id: int = synthetic.PAD_ID
    token_offset: int = synthetic.TOKEN_OFFSET
    batch_size: int = 512
    shard: tuple[int, int] = (0, 1)  # (index, count)
    gather: Callable[[np.ndarray], np.ndarray] = _identity  # local rows -> every shard's rows, in shard order
    logit_bias_V: Optional[np.ndarray] = None  # the run's vocabulary bias (`build.logit_bias`): every model sampled with it

    def __post_init__(self):
        if self.samples_per_prompt < 1:
            raise ValueError(f"config.eval.samples_per_prompt={self.samples_per_prompt}; must be >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"config.eval.temperature={self.temperature}; must be >= 0")
        index, count = self.shard
        if not 0 <= index < count:
            raise ValueError(f"Evaluator shard={self.shard}: want (index, count) with 0 <= index < count")
        if not self.max_new_tokens:
            self.max_new_tokens = self.world.completion_len + 1 if self.world is not None else 128
        self.reference = self.as_policy(self.reference)
        self._ref = None

    @property
    def num_rows(self) -> int:
        """N = prompts x samples_per_prompt."""
        return int(self.prompts.lens_B.shape[0]) * self.samples_per_prompt

    def as_policy(self, p) -> Policy:
        if hasattr(p, "sample") and hasattr(p, "logprob"):
            return p
        bias = None if self.logit_bias_V is None else np.asarray(self.logit_bias_V, np.float32)[None]
        return ModelPolicy(p, eos_id=self.eos_id, pad_id=self.pad_id, batch_size=self.batch_size, step_bias_NxV=bias)

    def draw(self, policy: Policy, stream: int, rows: slice = slice(None)) -> Completions:
        """The completions of rows `rows` of the N (stream 0: the policy's, 1: the reference's)."""
        key = jax.random.fold_in(jax.random.key(self.seed), stream)
        ids_N = np.arange(self.num_rows)[rows]
        return policy.sample(self.prompts.repeat(self.samples_per_prompt).select(ids_N), key,
                             max_new_tokens=self.max_new_tokens, temperature=self.temperature, row_ids_N=ids_N)

    def _share(self) -> tuple[slice, Prompts]:
        rows = multihost.process_share(self.num_rows, *self.shard)
        return rows, self.prompts.repeat(self.samples_per_prompt).select(rows)

    def _with_world(self) -> bool:
        return self.world is not None and isinstance(self.reward, SyntheticReward)  # the frontier's own reward

    def _world_logps(self, prompts: Prompts, comps: Completions) -> np.ndarray:
        world_ref = MarkovPolicy(synthetic_exact.reference_policy(self.world), token_offset=self.token_offset)
        return world_ref.logprob(prompts, comps.tokens_NxM, comps.mask_NxM)

    def local_rows(self, policy) -> dict[str, np.ndarray]:
        """This shard's per-row arrays of the policy's samples: logp (the sampled distribution's),
        ref_logp, length; with a reward, reward and malformed; in the world, malformed_kind, world_logp
        and, for a policy that can be projected, proj_logp, proj_world_logp and proj_reward of the
        projected policy's samples (stream 2)."""
        policy = self.as_policy(policy)
        rows, prompts = self._share()
        comps = self.draw(policy, 0, rows)
        out = {"logp": comps.logps_N, "ref_logp": self.reference.logprob(prompts, comps.tokens_NxM, comps.mask_NxM),
               "length": comps.mask_NxM.sum(axis=1)}
        if self.reward is not None:
            out.update(_judged(self.reward, prompts, comps))
            if self._with_world():
                out["world_logp"] = self._world_logps(prompts, comps)
                out.update(self._projected_rows(policy, rows, prompts))
        return out

    def _projected_rows(self, policy: Policy, rows: slice, prompts: Prompts) -> dict[str, np.ndarray]:
        proj = projected(policy, **self.reward.format_kw)
        if proj is None:
            return {}
        comps = self.draw(proj, 2, rows)
        return {"proj_logp": comps.logps_N, "proj_world_logp": self._world_logps(prompts, comps),
                "proj_reward": _judged(self.reward, prompts, comps)["reward"]}

    def local_reference_rows(self) -> dict[str, np.ndarray]:
        """This shard's per-row arrays of the reference's own samples: reward, malformed; in the world,
        own_logp (teacher-forced, temperature 1) and world_logp."""
        rows, prompts = self._share()
        comps = self.draw(self.reference, 1, rows)
        out = _judged(self.reward, prompts, comps)
        if self._with_world():
            out["own_logp"] = self.reference.logprob(prompts, comps.tokens_NxM, comps.mask_NxM)
            out["world_logp"] = self._world_logps(prompts, comps)
        return out

    def gathered(self, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every shard's rows of each array (keys in sorted order on every shard), N rows each."""
        out = {}
        for name in sorted(local):
            x = np.asarray(local[name])
            x = x.astype(bool) if x.dtype == bool else x.astype(np.float64)
            full = np.asarray(self.gather(x))
            if full.shape != (self.num_rows,):
                raise ValueError(f"Evaluator.gather returned shape {full.shape} for {name!r}; want every shard's "
                                 f"rows, ({self.num_rows},) (shard={self.shard})")
            out[name] = full
        return out

    def _reference_stats(self) -> dict[str, np.ndarray]:
        if self._ref is None:
            self._ref = self.gathered(self.local_reference_rows())
        return self._ref

    def __call__(self, policy) -> dict[str, float]:
        local = self.local_rows(policy)
        ref = self._reference_stats() if self.reward is not None else None
        return self.report(self.gathered(local), ref)

    def report(self, rows: dict[str, np.ndarray], ref: Optional[dict[str, np.ndarray]]) -> dict[str, float]:
        """The metrics of the N gathered rows (global, prompt-major order) of the policy and the reference."""
        s, b = self.samples_per_prompt, self.prompts.lens_B.shape[0]
        kl, kl_se = mean_stderr((rows["logp"] - rows["ref_logp"]).reshape(b, s))
        out = {"sample/kl": kl, "sample/kl_stderr": kl_se, "sample/num_prompts": float(b),
               "sample/length": float(rows["length"].mean())}
        if self.reward is None:
            return out
        r, bad = rows["reward"].reshape(b, s), rows["malformed"]
        r_ref, bad_ref = ref["reward"].reshape(b, s), ref["malformed"]
        out["sample/reward"], out["sample/reward_stderr"] = mean_stderr(r)
        out["sample/win_rate"], out["sample/win_rate_stderr"] = mean_stderr(win_values(r, r_ref))
        out.update({"sample/reward_ref": float(r_ref.mean()), "sample/malformed_frac": float(bad.mean()),
                    "sample/malformed_frac_ref": float(bad_ref.mean())})
        out["sample/malformed_kl_share"] = kl_share(rows["logp"] - rows["ref_logp"], bad)
        if self._with_world():
            out.update(self._world_report(rows, ref, out))
        optional = ("sample/kl_world", "sample/kl_ref_world", "sample/malformed_kl_share", "frontier/regret_frac",
                    "projected/regret_frac")  # undefined -> left out
        return {k: v for k, v in out.items() if not (k in optional and np.isnan(v))}

    def _world_report(self, rows: dict[str, np.ndarray], ref: dict[str, np.ndarray],
                      sampled: dict[str, float]) -> dict[str, float]:
        """optimum/*, frontier/*, the malformed breakdown, the world KLs and projected/* (module doc)."""
        s, b = self.samples_per_prompt, self.prompts.lens_B.shape[0]
        last = self.prompts.tokens_BxP[np.arange(b), self.prompts.lens_B - 1].astype(np.int64) - self.token_offset
        out = synthetic_report(self.world, self.beta, last, sampled["sample/kl"], sampled["sample/reward"])
        out.update(breakdown(rows["malformed_kind"]))
        out["sample/kl_world"] = conditional_kl(rows["logp"], rows["world_logp"], rows["malformed"])
        out["sample/kl_ref_world"] = conditional_kl(ref["own_logp"], ref["world_logp"], ref["malformed"])
        if "proj_logp" in rows:
            kl, kl_se = mean_stderr((rows["proj_logp"] - rows["proj_world_logp"]).reshape(b, s))
            reward, reward_se = mean_stderr(rows["proj_reward"].reshape(b, s))
            point = frontier_point(self.world, last, kl, reward, out["optimum/reward_ref"])
            out.update({"projected/kl": kl, "projected/kl_stderr": kl_se, "projected/reward": reward,
                        "projected/reward_stderr": reward_se, **{f"projected/{k}": v for k, v in point.items()}})
        return out


# ----------------------------------------------------------------------------------------- a run


def make_evaluator(config, files, tok, rows, tokenize_fn: Callable, *, reference,
                   shard: Optional[tuple[int, int]] = None, gather: Optional[Callable] = None,
                   logit_bias_V: Optional[np.ndarray] = None) -> Evaluator:
    """The Evaluator of a run against `reference` (a `Policy`, a Decoder or (graphdef, params): the run's
    reference model, `build.evaluation_reference`): the first config.eval.num_prompts prompts of `rows`
    (the eval split), the reward of config.eval.reward, the synthetic world of files.world_dir,
    beta = config.loss.beta; sharded over the processes (shard = (process index, process count),
    gather = `multihost.allgather_rows`) unless told otherwise; `logit_bias_V`: the bias the run trained
    its models with (`build.logit_bias`), so that they are sampled and scored as trained."""
    e = config.eval
    world = synthetic.load_world(files.world_dir) if getattr(files, "world_dir", None) else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return Evaluator(reference=reference,
                     prompts=tokenize_prompts(rows, tokenize_fn, e.num_prompts, pad),
                     reward=make_reward(e.reward, tok=tok, world=world), world=world, beta=float(config.loss.beta),
                     samples_per_prompt=e.samples_per_prompt, max_new_tokens=e.max_new_tokens,
                     temperature=float(e.temperature), seed=config.seed, eos_id=tok.eos_token_id, pad_id=pad,
                     shard=shard or (jax.process_index(), jax.process_count()),
                     gather=gather or multihost.allgather_rows, logit_bias_V=logit_bias_V)


def final_report(config, files, tok, policy, stage, *, reference, **shard_kw) -> dict[str, float]:
    """The sampled report of the final policy against `reference` on the stage's eval prompts (its train
    rows if none). Call it on every process: each samples its share of the rows and all return the
    same report (`shard_kw`: `shard`, `gather` of `make_evaluator`)."""
    rows = stage.eval_rows if stage.eval_rows is not None else stage.train_rows
    return make_evaluator(config, files, tok, rows, stage.tokenize_fn, reference=reference, **shard_kw)(policy)
