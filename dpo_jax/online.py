"""Online (iterative) DPO: rounds of sampling from the current policy, labelling, and training.

Round n = 1..N (config.online):
  1. prompts: P = online.prompts_per_round rows of the train file, rows (n - 1) P .. n P - 1
     (cyclically), tokenized as in training;
  2. K = online.samples_per_prompt completions y_1..y_K ~ pi_{n-1}(.|x) from the sampler at
     online.temperature; pi_0 is the initial policy (the SFT model when the run trains one);
  3. a labeller (`Labeller`) makes one pair per prompt: `BradleyTerryLabeller` draws a, b
     (a != b, uniform) and prefers y_a with probability sigmoid(r(x, y_a) - r(x, y_b)), or iff
     r(x, y_a) >= r(x, y_b) with online.label='argmax'; r is any reward source of
     `sampled.make_reward` (the world's true reward, 'module:function', a reward-model directory);
  4. the pairs are written to workdir/online/round_n/pairs.jsonl, and a preference stage of
     train.steps steps trains pi_{n-1} on them against pi_ref = pi_0 (online.reference='fixed')
     or pi_{n-1} (online.reference='last_round'), with a fresh optimizer;
  5. workdir/online/round_n is the round's run directory: checkpoints, metrics.jsonl, final/
     (pi_n, the next round's initial policy), round.json and report.json, the sampled evaluation
     of pi_n against pi_0 (so sample/kl and frontier/* are comparable over rounds).
A round with a report.json is finished and is not redone; a round cut short reuses its pairs file
and resumes from its checkpoints. workdir/report.json holds online/round_n/<key> for every round
(ROUND_KEYS, online/round_n/pairs = labelled pairs so far) and the last round's report as the
ordinary keys. Pairs are text (standard format): a completion is decoded with its special tokens
skipped and its EOS dropped, and the pipeline appends EOS again, so a completion that ran past the
length limit without EOS is trained as if it had ended there.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Protocol, Sequence

import jax
import numpy as np

from dpo_jax import build, config_check, multihost, paths, runner, sharding
from dpo_jax.data import formats, pipeline, synthetic
from dpo_jax.data import sources as data_sources
from dpo_jax.data.synthetic import LABEL_CHOICES
from dpo_jax.evaluation import sampled
from dpo_jax.evaluation.policies import Completions, ModelPolicy, Prompts, make_prompts
from dpo_jax.train import metrics, preemption, stages

REFERENCES = ("fixed", "last_round")
ROUND_KEYS = ("sample/reward", "sample/reward_stderr", "sample/kl", "sample/kl_stderr", "sample/win_rate",
              "sample/malformed_frac", "frontier/reward_at_kl", "frontier/regret", "frontier/regret_frac",
              "projected/kl", "projected/reward", "projected/regret_frac", "eval/loss", "eval/accuracy")
SAMPLE_STREAM = 7919  # fold_in(key(seed), SAMPLE_STREAM + n): round n's completions (evaluation uses 0-2)


# ----------------------------------------------------------------------------------------- labelling


def bradley_terry_probability(r_a, r_b) -> np.ndarray:
    """P(y_a preferred to y_b) = sigmoid(r_a - r_b), written with tanh so it never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * (np.asarray(r_a, np.float64) - np.asarray(r_b, np.float64))))


class Labels(NamedTuple):
    """One pair per prompt: indices into its K completions and their rewards (float64)."""

    chosen_B: np.ndarray
    rejected_B: np.ndarray
    reward_chosen_B: np.ndarray
    reward_rejected_B: np.ndarray


class Labeller(Protocol):
    def __call__(self, prompt_ids: Sequence[np.ndarray], completion_ids: Sequence[Sequence[np.ndarray]],
                 rng: np.random.Generator) -> Labels:
        """One labelled pair out of each prompt's K >= 2 completions (ids without padding)."""


class BradleyTerryLabeller:
    """A scalar reward r(prompt_ids, completion_ids) -> (rewards, malformed) (a `sampled.make_reward`
    source) turned into preferences: pair (a, b) with a uniform and b uniform among the others;
    y_a chosen with probability sigmoid(r_a - r_b) ('bradley_terry') or iff r_a >= r_b ('argmax').
    Draw order from `rng`: a [B], the offset of b [B], then the B label uniforms (bradley_terry)."""

    def __init__(self, reward, label: str = "bradley_terry"):
        if label not in LABEL_CHOICES:
            raise ValueError(f"config.online.label={label!r}; allowed: {LABEL_CHOICES}")
        self.reward, self.label = reward, label

    def __call__(self, prompt_ids, completion_ids, rng):
        b, k = len(completion_ids), len(completion_ids[0]) if completion_ids else 0
        if k < 2:
            raise ValueError(f"the labeller needs K >= 2 completions per prompt, got {k}")
        a_B = rng.integers(k, size=b)
        b_B = (a_B + rng.integers(1, k, size=b)) % k
        prompts = list(prompt_ids) * 2
        comps = [completion_ids[i][a_B[i]] for i in range(b)] + [completion_ids[i][b_B[i]] for i in range(b)]
        r = np.asarray(self.reward(prompts, comps)[0], np.float64) if b else np.zeros(0)
        r_a, r_b = r[:b], r[b:]
        first = r_a >= r_b if self.label == "argmax" else rng.random(b) < bradley_terry_probability(r_a, r_b)
        return Labels(np.where(first, a_B, b_B), np.where(first, b_B, a_B), np.where(first, r_a, r_b),
                      np.where(first, r_b, r_a))


def make_labeller(config, tok, world) -> Labeller:
    """online.reward ('' = eval.reward: in the synthetic world its true reward) through `online.label`."""
    spec = config.online.reward or config.eval.reward
    reward = sampled.make_reward(spec, tok=tok, world=world)
    if reward is None:
        raise ValueError("online DPO needs a reward: set config.online.reward (or config.eval.reward) to "
                         "'module:function' or a reward-model directory outside the synthetic world")
    return BradleyTerryLabeller(reward, config.online.label)


# ----------------------------------------------------------------------------------------- one round's pairs


def round_prompts(rows, tokenize_fn, start: int, n: int, pad_id: int) -> tuple[list, Prompts]:
    """(prompt fields, Prompts) of the rows start, start + 1, ... (cyclically) that tokenize, n of them at most."""
    texts, ids = [], []
    for i in range(len(rows)):
        row = rows[(start + i) % len(rows)]
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"online prompts: row {(start + i) % len(rows)} has no text 'prompt' (online DPO "
                             "writes standard-format pairs: prompt, chosen and rejected as text)")
        example = tokenize_fn(row)
        if example is not None:
            texts.append(row["prompt"])
            ids.append(np.asarray(example["prompt_ids"], np.int32))
        if len(ids) == n:
            break
    if not ids:
        raise ValueError("online prompts: no row of the train file survived tokenization")
    return texts, make_prompts(ids, pad_id)


def completion_text(tok, ids) -> str:
    """A sampled completion as data text: the trailing EOS dropped (the pipeline appends it), special
    tokens skipped, as the text reward sources decode it."""
    ids = [int(t) for t in ids]
    if ids and ids[-1] == tok.eos_token_id:
        ids = ids[:-1]
    return tok.decode(ids, skip_special_tokens=True)


def label_round(policy: ModelPolicy, prompts: Prompts, texts: list, labeller: Labeller, tok, *, k: int, key,
                rng: np.random.Generator, max_new_tokens: int, temperature: float) -> list[dict]:
    """K samples per prompt from `policy`, one labelled pair each: rows {prompt, chosen, rejected,
    reward_chosen, reward_rejected}."""
    b = prompts.lens_B.shape[0]
    comps: Completions = policy.sample(prompts.repeat(k), key, max_new_tokens=max_new_tokens,
                                       temperature=temperature, row_ids_N=np.arange(b * k))
    per_prompt = [[comps.ids(i * k + j) for j in range(k)] for i in range(b)]
    labels = labeller([prompts.ids(i) for i in range(b)], per_prompt, rng)
    return [{"prompt": texts[i], "chosen": completion_text(tok, per_prompt[i][labels.chosen_B[i]]),
             "rejected": completion_text(tok, per_prompt[i][labels.rejected_B[i]]),
             "reward_chosen": float(labels.reward_chosen_B[i]), "reward_rejected": float(labels.reward_rejected_B[i])}
            for i in range(b)]


def write_jsonl(path: str, rows: list[dict]) -> None:
    """All rows at once (a reader never sees a part of the file)."""
    paths.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def count_rows(path: str) -> int:
    return sum(1 for line in paths.read_text(path).splitlines() if line.strip())


# ----------------------------------------------------------------------------------------- the loop


def check(config) -> None:
    """The online section's rules, before anything compiles."""
    o = config.online
    config_check._choice("online.reference", o.reference, REFERENCES)  # pylint: disable=protected-access
    config_check._choice("online.label", o.label, LABEL_CHOICES)  # pylint: disable=protected-access
    if o.samples_per_prompt < 2:
        raise ValueError(f"config.online.samples_per_prompt={o.samples_per_prompt}; must be >= 2 (a pair)")
    if o.prompts_per_round < 0:
        raise ValueError(f"config.online.prompts_per_round={o.prompts_per_round}; must be >= 0 (0: the train "
                         "rows split over the rounds)")
    if not config.train.export_final:
        raise ValueError("config.train.export_final=False: online rounds start from the previous round's "
                         "exported policy (workdir/online/round_n/final); set it to True")


def round_config(config):
    """What a round's config.json holds: the run's config with online.rounds = 0 (adding rounds keeps
    the finished ones)."""
    c = config.copy_and_resolve_references()
    c.online.rounds = 0
    return c


def run(config, workdir: str) -> dict:
    """The online loop of the module doc; returns (and writes) workdir/report.json."""
    config_check.validate(config)
    check(config)
    done = runner.finished_report(config, workdir)
    if done is not None:
        return done
    runner.initialize_distributed(config)
    config_check.check_devices(config, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(config.mesh.shape)
    runner.write_run_info(config, workdir)
    files = build.data_files(config, workdir)
    tok = build.tokenizer(files.tokenizer)
    main = multihost.is_main_process()
    peak = config.train.peak_flops or metrics.device_peak_flops()
    writer = metrics.Writer(workdir, enabled=main, wandb=config.logging.wandb, run_config=config)
    preempt = preemption.install_sigterm_handler()
    try:
        if config.sft.steps > 0:  # pi_0: trained once, exported to sft.model_dir or workdir/sft/model
            stages.sft_stage(config, workdir, files, tok, build.policy(config, tok, mesh=mesh), mesh, writer,
                             preempt, peak)
        reports = _rounds(config, workdir, files, tok, mesh, preempt, peak)
    finally:
        preempt.uninstall()
    report = dict(reports[-1][1])
    for n, (pairs, r) in enumerate(reports, start=1):
        keys = {f"online/round_{n}/{k}": r[k] for k in ROUND_KEYS if isinstance(r.get(k), float)}
        keys[f"online/round_{n}/pairs"] = float(pairs)
        writer.write(n, keys)
        report.update(keys)
    report.update({"online/rounds": len(reports), "online/pairs": float(reports[-1][0]),
                   "online/reference": config.online.reference,
                   "online/final_model": paths.join(round_dir(workdir, len(reports)), "final")})
    if main:
        paths.write_text(paths.join(workdir, "report.json"), json.dumps(report, indent=2, sort_keys=True))
    writer.close()
    return report


def round_dir(workdir: str, n: int) -> str:
    return paths.join(workdir, "online", f"round_{n}")


def _rounds(config, workdir, files, tok, mesh, preempt, peak) -> list[tuple[int, dict]]:
    """Every round, finished ones read back: [(labelled pairs so far, round report)]."""
    o, rc = config.online, round_config(config)
    eval_ref = build.evaluation_reference(config, workdir, tok)  # as an offline run's: pi_0 or reference.path
    data_cfg = build.data_config(config, files.train, pairs=config.data.batch_size)
    fmt = formats.FormatConfig(format=config.data.format)
    tokenize_fn = pipeline.make_row_step(tok, data_cfg, fmt, strict=False)
    rows = data_sources.load_rows(files.train, split=config.data.train_split, name=config.data.name)
    per_round = o.prompts_per_round or max(1, len(rows) // o.rounds)
    world = synthetic.load_world(files.world_dir) if files.world_dir else None
    labeller = make_labeller(config, tok, world)
    e = config.eval
    max_new = e.max_new_tokens or (world.completion_len + 1 if world is not None else 128)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out, total = [], 0
    for n in range(1, o.rounds + 1):
        rdir = round_dir(workdir, n)
        stored = paths.join(rdir, "config.json")
        if paths.exists(stored) and paths.read_text(stored) != runner.config_json(rc):
            raise ValueError(f"{rdir} holds a round of another config: start the changed run in a new workdir")
        report_path, pairs_path = paths.join(rdir, "report.json"), paths.join(rdir, "pairs.jsonl")
        if paths.exists(report_path) and paths.exists(pairs_path):  # finished: not redone
            total += count_rows(pairs_path)
            out.append((total, json.loads(paths.read_text(report_path))))
            continue
        runner.write_run_info(rc, rdir)
        prev = paths.join(round_dir(workdir, n - 1), "final") if n > 1 else None
        model = build.policy(config, tok, path=paths.local_copy(prev), mesh=mesh) if prev else \
            initial_policy(config, workdir, tok, mesh)
        if not paths.exists(pairs_path):
            texts, prompts = round_prompts(rows, tokenize_fn, (n - 1) * per_round, per_round, pad)
            bias = build.logit_bias(config, model.cfg.vocab_size)  # the run's vocabulary mask, if any
            policy = ModelPolicy(model, eos_id=tok.eos_token_id, pad_id=pad,
                                 step_bias_NxV=None if bias is None else bias[None])
            key = jax.random.fold_in(jax.random.key(config.seed), SAMPLE_STREAM + n)
            pairs = label_round(policy, prompts, texts, labeller, tok, k=o.samples_per_prompt, key=key,
                                rng=np.random.default_rng([config.seed, n]), max_new_tokens=max_new,
                                temperature=float(o.temperature))
            if multihost.is_main_process():
                write_jsonl(pairs_path, pairs)
            multihost.barrier(f"dpo_jax.online.pairs_{n}")
        total += count_rows(pairs_path)
        out.append((total, _train_round(config, workdir, rdir, n, pairs_path, files, tok, mesh, model, eval_ref,
                                        prev, preempt, peak, total)))
    return out


def initial_policy(config, workdir: str, tok, mesh=None):
    """pi_0: the SFT model (sft.model_dir or workdir/sft/model) when the run trains one, else the
    policy of config.model (loaded or initialized from the seed)."""
    if config.sft.steps > 0:
        sft = build.sft_model_dir(config, workdir)
        return build.policy(config, tok, path=paths.local_copy(sft), mesh=mesh)
    return build.policy(config, tok, mesh=mesh)


def _train_round(config, workdir, rdir, n, pairs_path, files, tok, mesh, model, eval_ref, prev, preempt, peak,
                 total) -> dict:
    """Train pi_{n-1} (`model`) on the round's pairs against the round's reference (a copy of
    pi_{n-1} for 'last_round' after round 1, else reference.path or pi_0); write round.json, final/,
    report.json (the evaluation against `eval_ref`)."""
    last = config.online.reference == "last_round" and n > 1
    if last:  # build.reference copies the given model unless reference.path is set
        reference = build.reference(_without_reference_path(config), model, mesh=mesh)
    else:
        reference = build.reference(config, model if n == 1 else initial_policy(config, workdir, tok, mesh), mesh=mesh)
    main = multihost.is_main_process()
    if main:
        fixed = config.reference.path or ("sft model" if config.sft.steps > 0 else "initial policy")
        info = {"round": n, "pairs": pairs_path, "labelled_pairs": count_rows(pairs_path), "pairs_so_far": total,
                "initial_policy": prev or "pi_0", "reference": (prev or "pi_0") if last else f"pi_0 ({fixed})"}
        paths.write_text(paths.join(rdir, "round.json"), json.dumps(info, indent=2))
    local_pairs = pairs_path if paths.is_local(pairs_path) else os.path.join(paths.local_copy(rdir), "pairs.jsonl")
    stage = stages.make_stage(config, "train", rdir, objective=config_check.objective(config),
                              hp=config_check.loss_hparams(config), steps=config.train.steps, optim_cfg=config.optim,
                              ref_mode=config.reference.mode, train_path=local_pairs, eval_path=files.eval, tok=tok,
                              batch_size=config.data.batch_size)
    writer = metrics.Writer(rdir, enabled=main, wandb=config.logging.wandb, run_config=config)
    trained, _, evals = stages.run_stage(config, stage, model, reference, mesh, writer, preempt, peak,
                                         tokenizer_dir=files.tokenizer)
    return runner.finish_run(config, rdir, trained, evals, files, tok, stage, writer, eval_ref)


def _without_reference_path(config):
    c = config.copy_and_resolve_references()
    c.reference.path = ""
    return c
