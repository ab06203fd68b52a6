"""The training loop: (config, workdir) -> checkpoints, metrics, the exported policy and a report.

A run is one or two stages sharing `fit`: an optional SFT stage (the synthetic world trains its
reference this way) and the preference stage. `fit` jit-compiles the step once per batch shape
with explicit in/out shardings and a donated state, fetches metrics one step late so the device
never waits, evaluates every `train.eval_every` steps, checkpoints (state + data iterator) every
`train.checkpoint_every` steps and on SIGTERM, and resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

import dpo_jax
from dpo_jax import (build, checkpoint, config_check, fused, losses, metrics, multihost, optim, reference_cache, sharding,
                     step)
from dpo_jax.data import batching, layouts, pipeline
from dpo_jax.models import hf, lora


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


def initialize_distributed(config) -> None:
    """Start `jax.distributed` when launched as several processes (`multihost`), with the config's
    timeouts."""
    d = config.distributed
    multihost.maybe_initialize_distributed(heartbeat_timeout_s=d.heartbeat_timeout_s,
                                           initialization_timeout_s=d.initialization_timeout_s)


def write_run_info(config, workdir: str) -> None:
    """workdir/config.json (the resolved config) and run_info.json (version, git revision)."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(dpo_jax.__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    info = {"dpo_jax_version": dpo_jax.__version__, "git_revision": rev, "jax_version": jax.__version__,
            "devices": [d.device_kind for d in jax.devices()][:1] + [f"x{jax.device_count()}"],
            "process_count": jax.process_count()}
    with open(os.path.join(workdir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=2)


# ----------------------------------------------------------------------------------------------
# State and compiled steps.

def param_shardings(params: dict, graphdef, mesh) -> dict:
    """Pure dict of NamedShardings for the policy's parameters, from their logical axes."""
    state = nnx.merge(graphdef, params)
    return nnx.to_pure_dict(sharding.state_shardings(nnx.state(state, nnx.Param), mesh))


def init_state(model, reference, tx, mesh, seed: int, lora_cfg: Optional[lora.LoraConfig] = None):
    """(TrainState placed on the mesh, its shardings, graphdef). With `lora_cfg`, the trained params
    are fresh adapters and the model's weights become the frozen `base_params`."""
    graphdef, params_state = nnx.split(model)
    params = nnx.to_pure_dict(params_state)
    p_sh = param_shardings(params, graphdef, mesh)
    params = jax.device_put(params, p_sh)
    rep = sharding.replicated(mesh)
    base, base_sh = None, None
    if lora_cfg is not None:
        base, base_sh = params, p_sh
        params = lora.init_adapters(base, lora_cfg, jax.random.key(seed))
        is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
        p_sh = jax.tree.map(lambda names, a: jax.sharding.NamedSharding(
            mesh, sharding.logical_to_mesh(tuple(names), a.shape, mesh)), lora.adapter_logical_axes(params), params,
            is_leaf=is_spec)
        params = jax.device_put(params, p_sh)
    is_sh = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    opt_sh = optax.tree_utils.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), p_sh,
                                              transform_non_params=lambda _: rep, is_leaf=is_sh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    ref_params, ref_sh = None, None
    if reference is not None:
        ref_sh = base_sh or p_sh
        ref_params = jax.device_put(nnx.to_pure_dict(nnx.split(reference)[1]), ref_sh)
    state = step.TrainState(step=jax.device_put(jnp.int32(0), rep), params=params, opt_state=opt_state,
                            ref_params=ref_params, rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), rep),
                            base_params=base)
    shardings = step.TrainState(step=rep, params=p_sh, opt_state=opt_sh, ref_params=ref_sh, rng=rep,
                                base_params=base_sh)
    return state, shardings, graphdef


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


# ----------------------------------------------------------------------------------------------
# The loop.

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

    def handle(done_step: int, m_dev, tokens: float, flops: float):
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
        window["tokens"] += fetched[0].get("tokens/input", tokens)  # the step's own count: every process's rows
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
            tokens = float(np.sum(local["segment_ids_BxT"] > 0))
            state, m_dev = train_fn(state, sharding.global_batch(local, mesh), hp)
            if pending is not None:
                handle(*pending)
            pending = (s + 1, m_dev, tokens, flops)
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
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    return tqdm(total=total, initial=start, desc=name, dynamic_ncols=True, mininterval=1.0)


# ----------------------------------------------------------------------------------------------
# Stages of a run.

def make_stage(config, name: str, workdir: str, *, objective, hp, steps, optim_cfg, ref_mode, train_path,
               eval_path, tok, batch_size, unpaired_label: bool = False) -> Stage:
    from dpo_jax.data import formats  # pylint: disable=g-import-not-at-top

    data_cfg = build.data_config(config, train_path, pairs=batch_size)
    train_rows, eval_rows = pipeline.load_splits(data_cfg)
    if eval_path:
        eval_rows = pipeline.load_rows(eval_path)
    fmt = config.data.format
    if unpaired_label:  # SFT rows {"prompt", "completion"}: every completion is desirable
        train_rows = train_rows.map(lambda _: {"label": True})
        eval_rows = eval_rows.map(lambda _: {"label": True}) if eval_rows is not None else None
        fmt = "unpaired"
    tokenize_fn = pipeline.make_row_step(tok, data_cfg, formats.FormatConfig(format=fmt), strict=config.data.strict)
    check_rows_survive(train_rows, tokenize_fn, f"{name}: config.data.source={train_path!r}")
    eval_cfg = build.data_config(config, train_path, pairs=config.data.eval_batch_size, eval_split=True)
    return Stage(name=name, workdir=workdir, objective=objective, hp=hp, steps=steps, optim_cfg=optim_cfg,
                 ref_mode=ref_mode, train_rows=train_rows, eval_rows=eval_rows, tokenize_fn=tokenize_fn,
                 data_cfg=data_cfg, eval_data_cfg=eval_cfg)


def precompute_reference(config, stage: Stage, reference, step_cfg: step.StepConfig, mesh, tokenizer_dir: str) -> Stage:
    """reference.mode='precomputed': cached reference log-probs attached to every train and eval example."""
    graphdef, ref_state = nnx.split(reference)
    ref_params = nnx.to_pure_dict(ref_state)
    placed = jax.device_put(ref_params, param_shardings(ref_params, graphdef, mesh))
    logps = jax.jit(lambda p, b: step.model_logps(dataclasses.replace(step_cfg, graphdef=graphdef), p, b),
                    out_shardings=sharding.replicated(mesh))  # every process reads every value
    cache_dir = config.reference.cache_dir or os.path.join(stage.workdir, "ref_cache")
    settings = {k: getattr(stage.data_cfg, k) for k in ("max_length", "max_prompt_length", "truncation_mode")}
    settings.update(format=config.data.format, chunk=(config.train.chunk_size, config.train.vocab_chunk_size))
    spec = dataclasses.replace(stage.eval_data_cfg, layout="standard").layout_spec()
    fns = {}
    for name in ("train", "eval"):
        rows = getattr(stage, f"{name}_rows")
        if rows is None:
            continue
        indexed = reference_cache.IndexedRows(rows)
        key = reference_cache.cache_key(ref_params, tokenizer_dir, indexed, {**settings, "split": name})
        values = reference_cache.load_or_compute(cache_dir, key, lambda: reference_cache.compute(
            lambda b: logps(placed, b), indexed, stage.tokenize_fn, spec, lambda b: sharding.global_batch(b, mesh),
            process_index=jax.process_index(), process_count=jax.process_count()))
        setattr(stage, f"{name}_rows", indexed)
        fns[name] = reference_cache.AttachReference(stage.tokenize_fn, values)
    scalars = dict(pair_scalars=reference_cache.KEYS)
    return dataclasses.replace(stage, tokenize_fn=fns["train"], eval_tokenize_fn=fns.get("eval"),
                               data_cfg=dataclasses.replace(stage.data_cfg, **scalars),
                               eval_data_cfg=dataclasses.replace(stage.eval_data_cfg, **scalars))


def check_rows_survive(rows, tokenize_fn, where: str, probe: int = 256) -> None:
    """Fail fast (rather than let a repeating iterator search forever) when the first rows of a
    dataset are all dropped by formatting or tokenization; the error lists the drop reasons."""
    import copy  # pylint: disable=g-import-not-at-top

    if len(rows) == 0:
        raise ValueError(f"{where}: the dataset is empty")
    step = copy.deepcopy(tokenize_fn)  # keep the real counters untouched
    n = min(len(rows), probe)
    if all(step(rows[i]) is None for i in range(n)):
        drops = step.drops.as_dict() if hasattr(step, "drops") else {}
        raise ValueError(f"{where}: all of the first {n} rows were dropped; reasons: {drops.get('dropped', drops)}")


def run_stage(config, stage: Stage, model, reference, mesh, writer, preempt, peak_flops, tokenizer_dir="",
              writers=None):
    """Build the state and step of `stage`, train it, and return (trained model, state, final eval).
    With `writers` (one per fused member; `stage.hp` then holds arrays [K]) the K members are
    trained as one program and lists of models and final evals are returned."""
    members = len(writers) if writers else 0
    tx, lr = optim.make_optimizer(stage.optim_cfg, stage.steps)
    lora_cfg = lora_config(config) if stage.name == "train" else None
    state, state_sh, graphdef = init_state(model, reference if stage.ref_mode in ("frozen", "sync") else None,
                                           tx, mesh, config.seed, lora_cfg)
    if members:
        state, state_sh = fused.stack_state(state, state_sh, members)
    step_cfg = step.StepConfig(graphdef=graphdef, objective=stage.objective, tx=tx, lr=lr, ref_mode=stage.ref_mode,
                               grad_accum=stage.optim_cfg.grad_accum, capacity=config.train.capacity or None,
                               chunk_size=config.train.chunk_size, vocab_chunk_size=config.train.vocab_chunk_size,
                               lora=lora_cfg, members=members)
    if stage.ref_mode == "precomputed":
        stage = precompute_reference(config, stage, reference, dataclasses.replace(step_cfg, members=0), mesh,
                                     tokenizer_dir)
    state, final_evals = fit(stage, state, state_sh, step_cfg, mesh, config, writers=writers or [writer],
                             preempt=preempt, peak_flops=peak_flops)
    params = multihost.fetch_to_host(step.policy_params(step_cfg, state.params, state.base_params))
    if members:
        return [nnx.merge(graphdef, fused.member(params, k)) for k in range(members)], state, final_evals
    return nnx.merge(graphdef, params), state, final_evals[0]


def lora_config(config) -> Optional[lora.LoraConfig]:
    l = config.model.lora
    return lora.LoraConfig(rank=l.rank, alpha=l.alpha, targets=tuple(l.targets)) if l.rank > 0 else None


def sft_stage(config, workdir, files, tok, model, mesh, writer, preempt, peak_flops):
    """Train the SFT reference once: its export (config.sft.model_dir, default workdir/sft/model) is
    reused on resume and by every run that names the same directory."""
    out = config.sft.model_dir or os.path.join(workdir, "sft", "model")
    if os.path.exists(os.path.join(out, "config.json")):
        return build.policy(config, tok, path=out)
    optim_cfg = config.optim.copy_and_resolve_references()
    with optim_cfg.unlocked():
        optim_cfg.update(lr=config.sft.lr, warmup_steps=config.sft.warmup_steps, schedule="constant", grad_accum=1)
    objective = losses.Objective(("sft",))
    stage = make_stage(config, "sft", os.path.join(workdir, "sft"), objective=objective,
                       hp={**objective.params(), "beta": np.float32(config.loss.beta)}, steps=config.sft.steps,
                       optim_cfg=optim_cfg, ref_mode="none", train_path=files.sft, eval_path=None, tok=tok,
                       batch_size=config.sft.batch_size, unpaired_label=True)
    trained, _, _ = run_stage(config, stage, model, None, mesh, writer, preempt, peak_flops)
    if multihost.is_main_process():
        tmp = f"{out}.tmp-{os.getpid()}"  # atomic: readers never see a half-written model
        hf.export_model(trained, tmp, tokenizer_dir=files.tokenizer)
        if not os.path.exists(out):
            os.replace(tmp, out)
    multihost.barrier("dpo_jax.train.sft_stage.export")
    return trained


def run(config, workdir: str) -> dict:
    """Validate, build, (SFT,) train, export and evaluate; returns the report written to report.json."""
    config_check.validate(config)
    hp = config_check.loss_hparams(config)
    initialize_distributed(config)
    mesh = sharding.make_mesh(config.mesh.shape)
    sharding.check_batch_divisible(config.data.batch_size, mesh)
    write_run_info(config, workdir)
    files = build.data_files(config, workdir)
    tok = build.tokenizer(files.tokenizer)
    writer = metrics.Writer(workdir, enabled=jax.process_index() == 0)
    peak = config.train.peak_flops or metrics.device_peak_flops()
    preempt = checkpoint.install_sigterm_handler()
    try:
        model = build.policy(config, tok)
        if config.sft.steps > 0:
            model = sft_stage(config, workdir, files, tok, model, mesh, writer, preempt, peak)
        reference = build.reference(config, model)
        stage = make_stage(config, "train", workdir, objective=config_check.objective(config), hp=hp,
                           steps=config.train.steps, optim_cfg=config.optim, ref_mode=config.reference.mode,
                           train_path=files.train, eval_path=files.eval, tok=tok, batch_size=config.data.batch_size)
        trained, state, final_eval = run_stage(config, stage, model, reference, mesh, writer, preempt, peak,
                                               tokenizer_dir=files.tokenizer)
    finally:
        preempt.uninstall()
    return finish_run(config, workdir, trained, final_eval, files, tok, stage, writer)


def finish_run(config, workdir: str, trained, final_eval: dict, files, tok, stage: Stage, writer) -> dict:
    """The end of a run: sampled evaluation, the exported policy, report.json (returned)."""
    report = {"steps": config.train.steps, "loss": config.loss.name,
              **{f"eval/{k}": v for k, v in final_eval.items()}}
    if "eval/rewards/accuracies" in report:
        report["eval/accuracy"] = report["eval/rewards/accuracies"]
    if config.eval.num_prompts > 0:  # sampled reward, KL, win rate, frontier: every process samples its share
        from dpo_jax.evaluation import sampled  # pylint: disable=g-import-not-at-top

        reference = build.evaluation_reference(config, workdir, tok)
        report.update(sampled.final_report(config, files, tok, trained, stage, reference=reference))
    if multihost.is_main_process():
        if config.train.export_final:
            hf.export_model(trained, os.path.join(workdir, "final"), tokenizer_dir=files.tokenizer)
        writer.write(config.train.steps, {k: v for k, v in report.items() if isinstance(v, float)})
        with open(os.path.join(workdir, "report.json"), "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
    writer.close()
    return report
