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
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from dpo_jax import losses, multihost, paths, sharding
from dpo_jax.data import batching, layouts, list_layouts, pipeline
from dpo_jax.train import checkpoint, metrics, preemption, step


class NonFiniteError(FloatingPointError):
    """A step was not finite and train.on_nonfinite='stop', or more than train.max_skipped_steps
    steps in a row were not finite under 'skip'."""


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
    train_source: str = ""  # where the rows come from, as messages and drop reports name it
    eval_source: str = ""
    data_reports: dict = dataclasses.field(default_factory=dict)  # 'train' / 'eval' -> pipeline.drop_report


def compiled_steps(step_cfg: step.StepConfig, state_sh, mesh, batch_keys):
    b_sh = {k: sharding.batch_sharding(mesh, 1 if k.endswith("_P") else 2) for k in batch_keys}
    rep = sharding.replicated(mesh)
    train = jax.jit(sharding.traced_under(mesh, functools.partial(step.train_step, step_cfg)),
                    in_shardings=(state_sh, b_sh, rep), out_shardings=(state_sh, rep), donate_argnums=(0,))
    evaluate = jax.jit(sharding.traced_under(mesh, functools.partial(step.eval_step, step_cfg)),
                       in_shardings=(state_sh, b_sh, rep), out_shardings=rep)
    return train, evaluate


def evaluate_batches(eval_fn, state, batches, hp, mesh, members: int = 0) -> list[dict[str, float]]:
    """Pair-weighted means of the eval metrics over every eval batch, one dict per member, with
    `pairs`: the number of pairs scored."""
    means = [metrics.Mean() for _ in range(max(members, 1))]
    for local in batches:
        for mean, m in zip(means, metrics.fetch_members(eval_fn(state, sharding.global_batch(local, mesh), hp),
                                                          members)):
            if m["pairs"] > 0:
                mean.add(m, weight=m.pop("pairs"))
    return [{**mean.result(), "pairs": float(mean.weight)} for mean in means]


def fit(stage: Stage, state, state_sh, step_cfg: step.StepConfig, mesh, config, *, writers: list[metrics.Writer],
        preempt: preemption.PreemptionFlag, peak_flops: float):
    """Train `stage` to its last step (resuming from its latest checkpoint); returns (state, final
    evals): one writer and one final eval per fused member (one for a plain run)."""
    tc = config.train
    members = step_cfg.members
    tx_steps = stage.steps * stage.optim_cfg.grad_accum
    batch_keys = (layouts.BATCH_KEYS + tuple(f"{k}_P" for k in stage.data_cfg.pair_scalars)
                  + ((layouts.SLOTS_KEY,) if stage.data_cfg.logit_slots else ())
                  + (list_layouts.LIST_KEYS if stage.data_cfg.list_size else ()))
    train_fn, eval_fn = compiled_steps(step_cfg, state_sh, mesh, batch_keys)
    train_iter = pipeline.make_train_iterator(
        stage.train_rows, stage.tokenize_fn, stage.data_cfg, agree=multihost.agree_max,
        pair_offset=sharding.process_pair_offset(mesh, stage.data_cfg.pairs_per_batch))
    eval_batches = None
    if stage.eval_rows is not None:
        eval_batches, stage.data_reports["eval"] = pipeline.make_eval_batches(
            stage.eval_rows, stage.eval_tokenize_fn or stage.tokenize_fn, stage.eval_data_cfg,
            pair_offset=sharding.process_pair_offset(mesh, stage.eval_data_cfg.pairs_per_batch),
            source=stage.eval_source, strict=config.data.strict)
        log_drops(stage.data_reports["eval"])
    ckpt = checkpoint.Checkpointer(paths.join(stage.workdir, "checkpoints"), keep=tc.keep_checkpoints,
                                   every=tc.checkpoint_every)
    start, restored_extra = 0, {}
    restored = restore(ckpt, state, state_sh, train_iter) if ckpt.latest_step() is not None else None
    if restored is not None:
        state, restored_extra = restored
        start = int(jax.device_get(state.step))
        logging.warning("stage %r: resumed from step %d of %d (%s)", stage.name, start, tx_steps, ckpt.directory)
    for writer in writers:  # this stage's rows past the checkpoint are written again (all of them from 0)
        writer.drop_rows(lambda row: row_stage(row) == stage.name and (start == 0 or row["step"] > start))
        if start == 0:
            writer.write(0, data_metrics(stage.data_reports), prefix=f"{stage.name}/data/")
    model_cfg = nnx.merge(step_cfg.graphdef, state.params if state.base_params is None else state.base_params).cfg
    ref_forward = stage.ref_mode in ("frozen", "sync", "base")
    hp = stage.hp
    bar = Progress(stage.name, start, tx_steps, every=tc.log_every) if tc.progress and multihost.is_main_process() \
        else None
    window = {"tokens": 0.0, "flops": 0.0, "t": time.perf_counter()}
    pending = None

    skipped = {"total": int(restored_extra.get("skipped_steps", 0)), "in_a_row": 0}

    def handle(done_step: int, m_dev, flops: float):
        fetched = metrics.fetch_members(m_dev, members)
        bad_members = [k for k, m in enumerate(fetched) if m["nonfinite"] > 0]
        if bad_members:
            msg = nonfinite_message(stage.name, done_step, fetched, bad_members, members)
            if tc.on_nonfinite == "stop":
                raise NonFiniteError(f"{msg}; stopping (train.on_nonfinite='stop'); {_last_good(ckpt)}")
            skipped["total"] += 1
            skipped["in_a_row"] += 1
            if skipped["in_a_row"] > tc.max_skipped_steps:
                raise NonFiniteError(f"{msg}; {skipped['in_a_row']} non-finite steps in a row, more than "
                                     f"train.max_skipped_steps={tc.max_skipped_steps}; stopping; {_last_good(ckpt)}")
            logging.warning("%s; skipped (train.on_nonfinite='skip'; %d skipped so far)", msg, skipped["total"])
        else:
            skipped["in_a_row"] = 0
        if skipped["total"]:
            for m in fetched:
                m["skipped_steps"] = float(skipped["total"])
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
            bar.update(done_step, fetched[0])

    try:
        for s in range(start, tx_steps):
            if preempt.reached():  # every process, every step: the same step everywhere
                if pending is not None:
                    handle(*pending)
                    pending = None
                save(ckpt, s, state, train_iter, force=True, skipped_steps=skipped["total"])
                ckpt.wait()
                raise preemption.Preempted(f"{stage.name}: preempted at step {s}: checkpoint saved; run the same "
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
                save(ckpt, s + 1, state, train_iter, skipped_steps=skipped["total"])
        if pending is not None:
            handle(*pending)
        if tx_steps > start or ckpt.latest_step() is None:
            save(ckpt, tx_steps, state, train_iter, force=True, skipped_steps=skipped["total"])
    finally:  # in-flight saves complete even when the loop stops on an error (a failed save raises here)
        ckpt.close()
    if bar is not None:
        bar.close()
    if skipped["total"]:
        logging.warning("stage %r: %d of %d steps were non-finite and skipped", stage.name, skipped["total"],
                        tx_steps)
    final_evals = (evaluate_batches(eval_fn, state, eval_batches, hp, mesh, members) if eval_batches
                   else [{} for _ in range(max(members, 1))])
    return state, final_evals


def log_drops(report: dict) -> None:
    """The drop report's one line, where the user sees it when rows were dropped."""
    (logging.warning if report.get("dropped") else logging.info)("%s", pipeline.drop_summary(report))


def data_metrics(reports: dict) -> dict[str, float]:
    """Per split ('train', 'eval'): rows kept, dropped, and dropped per reason (numbers only)."""
    out = {}
    for split, report in reports.items():
        for key, value in report.items():
            if key in ("kept", "dropped") or key.startswith("dropped/"):
                out[f"{split}/{key}"] = float(value)
    return out


def row_stage(row: dict) -> str:
    """The stage that logged a metrics.jsonl row: 'sft' (every key under sft/) or 'train'."""
    return "sft" if all(k.startswith("sft/") for k in row if k != "step") else "train"


def nonfinite_message(stage_name: str, done_step: int, fetched: list[dict], bad_members: list[int],
                      members: int) -> str:
    """What was not finite at `done_step`: the loss, the gradient norm, or (both finite) the update
    (the parameters or optimizer state it would have written)."""
    parts = []
    for k in bad_members:
        m = fetched[k]
        bad = [key for key in ("loss", "grad_norm") if not np.isfinite(m[key])]
        what = ", ".join(f"{key}={m[key]}" for key in bad) if bad else "updated parameters or optimizer state"
        parts.append((f"member {k}: " if members else "") + what)
    return (f"{stage_name}: step {done_step}: non-finite {'; '.join(parts)}; the update was not applied")


def _last_good(ckpt: checkpoint.Checkpointer) -> str:
    """Where a rerun resumes: the newest checkpoint of the stage (only finite states are committed)."""
    latest = ckpt.latest_step()
    if latest is None:
        return f"this stage has no checkpoint yet in {ckpt.directory}: a rerun starts it afresh"
    return f"the newest checkpoint, step {latest} in {ckpt.directory}, holds a finite state"


def save(ckpt: checkpoint.Checkpointer, step_: int, state, train_iter, *, force: bool = False,
         skipped_steps: int = 0) -> None:
    """Checkpoint the state and the data position; every process's iterator state also goes into
    `extra` (`data_states`), so that another process count can resume (`restore`)."""
    if force or ckpt.should_save(step_):
        extra = {"data_states": multihost.allgather_json(train_iter.get_state()), "skipped_steps": skipped_steps}
        ckpt.save(step_, state, train_iter, extra=extra, force=force)


def restore(ckpt: checkpoint.Checkpointer, state, state_sh, train_iter):
    """(state, extra) of the newest intact checkpoint, or None when there is none: the state in this
    run's shardings (orbax reshards: another mesh or process count restores too), and the data
    position: this process's own iterator state, or, when the checkpoint was written by another
    number of processes, its equivalent (`batching.reshard_state`). Damaged steps are moved aside
    (`Checkpointer.restore_latest`)."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)

    def carry_over(step_, extra):
        states = extra.get("data_states")
        if not states:
            raise ValueError(f"checkpoint {ckpt.directory}/{step_} holds no data iterator state for "
                             f"{jax.process_count()} processes and none to carry over")
        train_iter.set_state(batching.reshard_state(states, train_iter.get_state(), jax.process_index(),
                                                    jax.process_count()))
        logging.warning("resumed step %d, written by %d processes, on %d", step_, len(states), jax.process_count())

    found = ckpt.restore_latest(abstract, train_iter, data_fallback=carry_over)
    if found is None:
        logging.warning("no intact checkpoint in %s: the stage starts over", ckpt.directory)
        return None
    _, state, extra = found
    return state, extra


class Progress:
    """A stage's progress on process 0, with that stage's metrics (`PROGRESS_KEYS`): a tqdm bar when
    stderr is a terminal with a width; otherwise (a log file, a batch job, a terminal of no columns)
    one plain line every `every` steps and at the last step."""

    def __init__(self, name: str, start: int, total: int, *, every: int, stream=None):
        self.name, self.total, self.every = name, total, max(every, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.keys = PROGRESS_KEYS.get(name, PROGRESS_KEYS["train"])
        self.bar = None
        if _terminal_columns(self.stream) > 0:
            self.bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True, mininterval=1.0,
                            file=self.stream)

    def update(self, step_: int, m: dict) -> None:
        line = metrics.summary_line(m, keys=self.keys)
        if self.bar is not None:
            self.bar.set_postfix_str(line, refresh=False)
            self.bar.update(1)
        elif step_ % self.every == 0 or step_ == self.total:
            print(f"{self.name}: step {step_}/{self.total}  {line}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


PROGRESS_KEYS = {"sft": ("loss", "tokens_per_s"),
                 "train": ("loss", "rewards/accuracies", "rewards/margins", "tokens_per_s")}


def _terminal_columns(stream) -> int:
    """The width of the terminal `stream` writes to; 0 when it is not a terminal."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (AttributeError, OSError, ValueError):
        return 0
