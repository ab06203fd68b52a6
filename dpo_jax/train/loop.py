"""The loop of one stage: (stage, state) -> the trained state, checkpoints, metrics, final evals.

`fit` jit-compiles the step once per batch shape with explicit in/out shardings and a donated
state, fetches metrics one step late so the device never waits, evaluates every
`train.eval_every` steps, checkpoints (state + data iterator) every `train.checkpoint_every` steps
and at a preemption (the same step on every process), and resumes from the latest checkpoint. A
non-finite step is never applied; with train.on_nonfinite='stop' the loop stops on it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from dpo_jax import losses, multihost, sharding
from dpo_jax.data import batching, layouts, pipeline
from dpo_jax.train import checkpoint, metrics, step


class NonFiniteError(FloatingPointError):
    """Raised when a step's loss or gradient is not finite and train.on_nonfinite='stop'."""


@dataclasses.dataclass
class Stage:
    """One training stage: its objective, optimizer, data, and where it writes."""

    name: str
    workdir: str
    objective: losses.Objective
    hp: dict
    steps: int
    optim_cfg: Any
    ref_mode: str
    train_rows: Any
    eval_rows: Any
    tokenize_fn: Callable
    data_cfg: pipeline.DataConfig
    eval_data_cfg: pipeline.DataConfig
    eval_tokenize_fn: Optional[Callable] = None  # defaults to tokenize_fn


def compiled_steps(step_cfg: step.StepConfig, state_sh, mesh, batch_keys):
    b_sh = {k: sharding.batch_sharding(mesh, 1 if k.endswith("_P") else 2) for k in batch_keys}
    rep = sharding.replicated(mesh)
    train = jax.jit(functools.partial(step.train_step, step_cfg), in_shardings=(state_sh, b_sh, rep),
                    out_shardings=(state_sh, rep), donate_argnums=(0,))
    evaluate = jax.jit(functools.partial(step.eval_step, step_cfg), in_shardings=(state_sh, b_sh, rep),
                       out_shardings=rep)
    return train, evaluate


def evaluate_batches(eval_fn, state, batches, hp, mesh, members: int = 0) -> list[dict[str, float]]:
    """Pair-weighted means of the eval metrics over every eval batch, one dict per member."""
    means = [metrics.Mean() for _ in range(max(members, 1))]
    for local in batches:
        for mean, m in zip(means, metrics.fetch_members(eval_fn(state, sharding.global_batch(local, mesh), hp),
                                                          members)):
            if m["pairs"] > 0:
                mean.add(m, weight=m.pop("pairs"))
    out = [mean.result() for mean in means]
    for o in out:
        o.pop("pairs", None)
    return out


def fit(stage: Stage, state, state_sh, step_cfg: step.StepConfig, mesh, config, *, writers: list[metrics.Writer],
        preempt: checkpoint.PreemptionFlag, peak_flops: float):
    """Train `stage` to its last step (resuming from its latest checkpoint); returns (state, final
    evals): one writer and one final eval per fused member (one for a plain run)."""
    tc = config.train
    members = step_cfg.members
    tx_steps = stage.steps * stage.optim_cfg.grad_accum
    batch_keys = (layouts.BATCH_KEYS + tuple(f"{k}_P" for k in stage.data_cfg.pair_scalars)
                  + ((layouts.SLOTS_KEY,) if stage.data_cfg.logit_slots else ()))
    train_fn, eval_fn = compiled_steps(step_cfg, state_sh, mesh, batch_keys)
    train_iter = pipeline.make_train_iterator(
        stage.train_rows, stage.tokenize_fn, stage.data_cfg, agree=multihost.agree_max,
        pair_offset=sharding.process_pair_offset(mesh, stage.data_cfg.pairs_per_batch))
    eval_batches = None
    if stage.eval_rows is not None:
        eval_batches, report = pipeline.make_eval_batches(
            stage.eval_rows, stage.eval_tokenize_fn or stage.tokenize_fn, stage.eval_data_cfg,
            pair_offset=sharding.process_pair_offset(mesh, stage.eval_data_cfg.pairs_per_batch))
    ckpt = checkpoint.Checkpointer(os.path.join(stage.workdir, "checkpoints"), keep=tc.keep_checkpoints,
                                   every=tc.checkpoint_every)
    start = 0
    if ckpt.latest_step() is not None:
        state = restore(ckpt, state, state_sh, train_iter)
        start = int(jax.device_get(state.step))
        logging.info("%s: resumed from step %d", stage.name, start)
    for writer in writers:  # this stage's rows past the checkpoint are written again (all of them from 0)
        writer.drop_rows(lambda row: row_stage(row) == stage.name and (start == 0 or row["step"] > start))
        if eval_batches is not None and start == 0:
            writer.write(0, {"eval_rows_kept": report["kept"]}, prefix=f"{stage.name}/data/")
    model_cfg = nnx.merge(step_cfg.graphdef, state.params if state.base_params is None else state.base_params).cfg
    ref_forward = stage.ref_mode in ("frozen", "sync", "base")
    hp = stage.hp
    bar = _progress(tc.progress, start, tx_steps, stage.name)
    window = {"tokens": 0.0, "flops": 0.0, "t": time.perf_counter()}
    pending = None

    def handle(done_step: int, m_dev, flops: float):
        fetched = metrics.fetch_members(m_dev, members)
        for k, m in enumerate(fetched):
            if m["nonfinite"] > 0:
                bad = [key for key in ("loss", "grad_norm") if not np.isfinite(m[key])] or ["loss"]
                who = f" (member {k})" if members else ""
                msg = (f"{stage.name}: step {done_step}{who}: non-finite {', '.join(bad)} "
                       f"({ {key: m[key] for key in bad} }); the update was not applied")
                if tc.on_nonfinite == "stop":
                    raise NonFiniteError(msg + "; stopping (train.on_nonfinite='stop'); the last checkpoint is intact")
                logging.warning("%s; skipped (train.on_nonfinite='skip')", msg)
        window["tokens"] += fetched[0]["tokens/input"]  # the step's own count: every process's rows
        window["flops"] += flops * max(members, 1) * jax.process_count()  # processes lay out equal shapes
        if done_step % tc.log_every == 0 or done_step == tx_steps:
            elapsed = max(time.perf_counter() - window["t"], 1e-9)
            for writer, m in zip(writers, fetched):
                m["tokens_per_s"] = window["tokens"] / elapsed
                m["mfu"] = window["flops"] / elapsed / peak_flops if peak_flops else 0.0
                writer.write(done_step, m, prefix=f"{stage.name}/" if stage.name != "train" else "")
            window.update(tokens=0.0, flops=0.0, t=time.perf_counter())
        if bar is not None:
            bar.set_postfix_str(metrics.summary_line(fetched[0]), refresh=False)
            bar.update(1)

    try:
        for s in range(start, tx_steps):
            if preempt.reached():  # every process, every step: the same step everywhere
                if pending is not None:
                    handle(*pending)
                    pending = None
                save(ckpt, s, state, train_iter, force=True)
                ckpt.wait()
                raise checkpoint.Preempted(f"{stage.name}: preempted at step {s}: checkpoint saved; run the same "
                                           f"command again to resume")
            local = next(train_iter)
            flops = metrics.step_flops(model_cfg, local, reference_forward=ref_forward)
            state, m_dev = train_fn(state, sharding.global_batch(local, mesh), hp)
            if pending is not None:
                handle(*pending)
            pending = (s + 1, m_dev, flops)
            if stage.ref_mode == "sync" and (s + 1) % config.reference.sync_every == 0:
                state = jax.jit(step.sync_reference, donate_argnums=(0,), out_shardings=state_sh)(
                    state, config.reference.sync_alpha)
            if eval_batches and tc.eval_every and (s + 1) % tc.eval_every == 0:
                for writer, ev in zip(writers, evaluate_batches(eval_fn, state, eval_batches, hp, mesh, members)):
                    writer.write(s + 1, ev, prefix=f"{stage.name}/eval/" if stage.name != "train" else "eval/")
            if ckpt.should_save(s + 1):
                handle(*pending)  # never checkpoint past an unseen non-finite step
                pending = None
                save(ckpt, s + 1, state, train_iter)
        if pending is not None:
            handle(*pending)
        if tx_steps > start or ckpt.latest_step() is None:
            save(ckpt, tx_steps, state, train_iter, force=True)
    finally:  # in-flight saves complete even when the loop stops on an error
        ckpt.wait()
        ckpt.close()
    if bar is not None:
        bar.close()
    final_evals = (evaluate_batches(eval_fn, state, eval_batches, hp, mesh, members) if eval_batches
                   else [{} for _ in range(max(members, 1))])
    return state, final_evals


def row_stage(row: dict) -> str:
    """The stage that logged a metrics.jsonl row: 'sft' (every key under sft/) or 'train'."""
    return "sft" if all(k.startswith("sft/") for k in row if k != "step") else "train"


def save(ckpt: checkpoint.Checkpointer, step_: int, state, train_iter, *, force: bool = False) -> None:
    """Checkpoint the state and the data position; every process's iterator state also goes into
    `extra` (`data_states`), so that another process count can resume (`restore`)."""
    if force or ckpt.should_save(step_):
        ckpt.save(step_, state, train_iter, extra={"data_states": multihost.allgather_json(train_iter.get_state())},
                  force=force)


def restore(ckpt: checkpoint.Checkpointer, state, state_sh, train_iter):
    """The latest checkpoint's state, in this run's shardings (orbax reshards: another mesh or
    process count restores too), and the data position: this process's own iterator state, or,
    when the checkpoint was written by another number of processes, its equivalent
    (`batching.reshard_state`)."""
    latest = ckpt.latest_step()
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
    own = ckpt.has_data_state(latest)
    state, extra = ckpt.restore(abstract, train_iter if own else None, step=latest)
    if not own:
        states = extra.get("data_states")
        if not states:
            raise ValueError(f"checkpoint {ckpt.directory}/{latest} holds no data iterator state for "
                             f"{jax.process_count()} processes and none to carry over")
        train_iter.set_state(batching.reshard_state(states, train_iter.get_state(), jax.process_index(),
                                                    jax.process_count()))
        logging.warning("resumed step %d, written by %d processes, on %d", latest, len(states), jax.process_count())
    return state


def _progress(enabled: bool, start: int, total: int, name: str):
    if not enabled or jax.process_index() != 0:
        return None
    return tqdm(total=total, initial=start, desc=name, dynamic_ncols=True, mininterval=1.0)
