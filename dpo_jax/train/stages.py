"""The stages of a run: building a stage from the config (data, tokenization, objective), the SFT
stage that trains the synthetic world's reference, precomputing reference log-probs, and running a
stage (its state, step and loop) to a trained model."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Optional

import jax
import numpy as np
from flax import nnx

from dpo_jax import build, config_check, losses, multihost, paths, sharding
from dpo_jax.data import formats, pipeline
from dpo_jax.data import sources as data_sources
from dpo_jax.models import hf, lora
from dpo_jax.train import members, optim, reference_cache, step
from dpo_jax.train import state as train_state
from dpo_jax.train.loop import Stage, fit, log_drops


def make_stage(config, name: str, workdir: str, *, objective, hp, steps, optim_cfg, ref_mode, train_path,
               eval_path, tok, batch_size, unpaired_label: bool = False) -> Stage:
    lists = objective.batch_kind == "lists"
    data_cfg = build.data_config(config, train_path, pairs=batch_size, lists=lists)
    if steps == 0 and not eval_path and not config.data.eval_split:  # evaluate-only: every row, no hold-out
        data_cfg = dataclasses.replace(data_cfg, eval_fraction=0.0)
    train_rows, eval_rows = data_sources.load_splits(data_cfg)
    if eval_path:
        eval_rows = data_sources.load_rows(eval_path)
    elif steps == 0 and eval_rows is None:
        eval_rows = train_rows
    fmt = config.data.format
    if unpaired_label:  # SFT rows {"prompt", "completion"}: every completion is desirable
        train_rows = train_rows.map(lambda _: {"label": True})
        eval_rows = eval_rows.map(lambda _: {"label": True}) if eval_rows is not None else None
        fmt = "unpaired"
    sources = {"train": _source(train_path, data_cfg, "train"),
               "eval": eval_path or _source(train_path, data_cfg, "eval")}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        if rows is not None:  # 'auto' is resolved from the first row, as the row normalizer resolves it
            detected = fmt if fmt != "auto" else formats.detect_format(rows[0], formats.FormatConfig(format=fmt))
            where = "config.data.format" if fmt != "auto" else f"{sources[split]}: detected format"
            config_check.check_format_for_losses(detected, objective, where=where)
    tokenize_fn = pipeline.make_row_step(tok, data_cfg, formats.FormatConfig(format=fmt), strict=config.data.strict)
    report = pipeline.drop_report(train_rows, tokenize_fn, data_cfg, sources["train"], strict=config.data.strict)
    log_drops(report)
    eval_cfg = build.data_config(config, train_path, pairs=config.data.eval_batch_size, eval_split=True, lists=lists)
    return Stage(name=name, workdir=workdir, objective=objective, hp=hp, steps=steps, optim_cfg=optim_cfg,
                 ref_mode=ref_mode, train_rows=train_rows, eval_rows=eval_rows, tokenize_fn=tokenize_fn,
                 data_cfg=data_cfg, eval_data_cfg=eval_cfg, train_source=sources["train"],
                 eval_source=sources["eval"], data_reports={"train": report})


def _source(path: str, data_cfg: pipeline.DataConfig, split: str) -> str:
    """How drop reports name a split: the file, and the part of it a split or held-out fraction takes
    (row numbers then count within that part)."""
    if split == "train" and data_cfg.eval_fraction:
        return f"{path} (train part, {1 - data_cfg.eval_fraction:g} of split {data_cfg.train_split!r})"
    if split == "eval" and data_cfg.eval_fraction:
        return f"{path} (held-out {data_cfg.eval_fraction:g} of split {data_cfg.train_split!r})"
    if split == "eval" and data_cfg.eval_split:
        return f"{path} (split {data_cfg.eval_split!r})"
    return path


def precompute_reference(config, stage: Stage, reference, step_cfg: step.StepConfig, mesh, tokenizer_dir: str) -> Stage:
    """reference.mode='precomputed': cached reference log-probs attached to every train and eval example."""
    graphdef, ref_state = nnx.split(reference)
    ref_params = nnx.to_pure_dict(ref_state)
    rules = sharding.check_rules(config.mesh.rules)
    placed = jax.device_put(ref_params, sharding.param_shardings(ref_params, graphdef, mesh, rules))
    ref_logps = lambda p, b: step.model_logps(dataclasses.replace(step_cfg, graphdef=graphdef), p, b)  # noqa: E731
    logps = jax.jit(sharding.traced_under(mesh, ref_logps),
                    out_shardings=sharding.replicated(mesh))  # every process reads every value
    cache_dir = config.reference.cache_dir or paths.join(stage.workdir, "ref_cache")
    settings = {k: getattr(stage.data_cfg, k) for k in ("max_length", "max_prompt_length", "truncation_mode")}
    settings.update(format=config.data.format, chunk=(config.logprobs.chunk_size, config.logprobs.vocab_chunk_size))
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


def run_stage(config, stage: Stage, model, reference, mesh, writer, preempt, peak_flops, tokenizer_dir="",
              writers=None):
    """Build the state and step of `stage`, train it, and return (trained model, state, final eval).
    With `writers` (one per fused member; `stage.hp` then holds arrays [K]) the K members are
    trained as one program and lists of models and final evals are returned."""
    num_members = len(writers) if writers else 0
    tx, lr = optim.make_optimizer(stage.optim_cfg, stage.steps)
    lora_cfg = lora_config(config) if stage.name == "train" else None
    state, state_sh, graphdef = train_state.init_state(
        model, reference if stage.ref_mode in ("frozen", "sync") else None, tx, mesh, config.seed, lora_cfg,
        rules=sharding.check_rules(config.mesh.rules), loss_state=stage.objective.init_state())
    if num_members:
        state, state_sh = members.stack_state(state, state_sh, num_members)
    step_cfg = step.StepConfig(graphdef=graphdef, objective=stage.objective, tx=tx, lr=lr, ref_mode=stage.ref_mode,
                               grad_accum=stage.optim_cfg.grad_accum,
                               chunk_size=config.logprobs.chunk_size, vocab_chunk_size=config.logprobs.vocab_chunk_size,
                               lora=lora_cfg, members=num_members,
                               logit_bias_V=build.logit_bias(config, model.cfg.vocab_size))
    if stage.ref_mode == "precomputed":
        stage = precompute_reference(config, stage, reference, dataclasses.replace(step_cfg, members=0), mesh,
                                     tokenizer_dir)
    state, final_evals = fit(stage, state, state_sh, step_cfg, mesh, config, writers=writers or [writer],
                             preempt=preempt, peak_flops=peak_flops)
    params = multihost.fetch_to_host(step.policy_params(step_cfg, state.params, state.base_params))
    if num_members:
        return [nnx.merge(graphdef, members.member(params, k)) for k in range(num_members)], state, final_evals
    return nnx.merge(graphdef, params), state, final_evals[0]


def lora_config(config) -> Optional[lora.LoraConfig]:
    l = config.model.lora
    return lora.LoraConfig(rank=l.rank, alpha=l.alpha, targets=tuple(l.targets)) if l.rank > 0 else None


def sft_stage(config, workdir, files, tok, model, mesh, writer, preempt, peak_flops):
    """Train the SFT reference once: its export (config.sft.model_dir, default workdir/sft/model) is
    reused on resume and by every run that names the same directory."""
    out = build.sft_model_dir(config, workdir)
    if paths.exists(paths.join(out, "config.json")):
        return build.policy(config, tok, path=paths.local_copy(out))
    optim_cfg = config.optim.copy_and_resolve_references()
    with optim_cfg.unlocked():
        optim_cfg.update(lr=config.sft.lr, warmup_steps=config.sft.warmup_steps, schedule="constant", grad_accum=1)
    objective = losses.Objective(("sft",))
    stage = make_stage(config, "sft", paths.join(workdir, "sft"), objective=objective,
                       hp={**objective.params(), "beta": np.float32(config.loss.beta)}, steps=config.sft.steps,
                       optim_cfg=optim_cfg, ref_mode="none", train_path=files.sft, eval_path=None, tok=tok,
                       batch_size=config.sft.batch_size, unpaired_label=True)
    trained, _, _ = run_stage(config, stage, model, None, mesh, writer, preempt, peak_flops)
    if multihost.is_main_process() and paths.is_local(out):
        tmp = f"{out}.tmp-{os.getpid()}"  # atomic: readers never see a half-written model
        hf.export_model(trained, tmp, tokenizer_dir=files.tokenizer)
        if not os.path.exists(out):
            os.replace(tmp, out)
    elif multihost.is_main_process() and not paths.exists(paths.join(out, "config.json")):
        export_model(trained, out, tokenizer_dir=files.tokenizer)  # config.json, the mark of a whole model, last
    multihost.barrier("dpo_jax.train.sft_stage.export")
    return trained


def export_model(model, out, *, tokenizer_dir=None) -> None:
    """`hf.export_model` to `out` on any filesystem: a bucket URI is written to a local temporary
    directory first, then copied (`paths.upload_dir`, config.json last)."""
    if paths.is_local(out):
        hf.export_model(model, out, tokenizer_dir=tokenizer_dir)
        return
    os.makedirs(paths.local_root(), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-", dir=paths.local_root()) as tmp:
        hf.export_model(model, tmp, tokenizer_dir=tokenizer_dir)
        paths.upload_dir(tmp, out)
