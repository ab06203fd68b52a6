"""A run, from config to report: `run(config, workdir)` is a group of one; `run_group(configs,
workdirs)` is the one path for single and fused runs (members that differ only in loss
hyper-parameters, trained as one program): validate, start the processes, mesh, data files, the
SFT stage, the preference stage, then per member the sampled evaluation, the export and
report.json."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Optional, Sequence

import jax
from absl import logging

import dpo_jax
from dpo_jax import build, config_check, multihost, paths, sharding
from dpo_jax.evaluation import plots, sampled
from dpo_jax.train import members, metrics, preemption, stages, step
from dpo_jax.train.loop import Stage


def initialize_distributed(config) -> None:
    """Start `jax.distributed` when launched as several processes (`multihost`), with the config's
    timeouts."""
    d = config.distributed
    multihost.maybe_initialize_distributed(heartbeat_timeout_s=d.heartbeat_timeout_s,
                                           initialization_timeout_s=d.initialization_timeout_s)


def write_run_info(config, workdir: str) -> None:
    """workdir/config.json (the resolved config) and run_info.json (version, git revision)."""
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
    if jax.process_index() != 0:
        return
    paths.write_text(paths.join(workdir, "config.json"), config_json(config))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(dpo_jax.__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    info = {"dpo_jax_version": dpo_jax.__version__, "git_revision": rev, "jax_version": jax.__version__,
            "devices": [d.device_kind for d in jax.devices()][:1] + [f"x{jax.device_count()}"],
            "process_count": jax.process_count()}
    paths.write_text(paths.join(workdir, "run_info.json"), json.dumps(info, indent=2))


def finished_report(config, workdir: str) -> Optional[dict]:
    """The report of a finished run of this very config in `workdir` (its config.json equals this
    config, and report.json, written last, exists), else None. A changed config (more steps, say)
    resumes from the checkpoints instead."""
    report, stored = paths.join(workdir, "report.json"), paths.join(workdir, "config.json")
    if not (paths.exists(report) and paths.exists(stored)):
        return None
    if paths.read_text(stored) != config_json(config):
        return None
    return json.loads(paths.read_text(report))


def config_json(config) -> str:
    """The resolved config as workdir/config.json holds it."""
    return config.to_json_best_effort(indent=2, sort_keys=True)


def run(config, workdir: str) -> dict:
    """Validate, build, (SFT,) train, export and evaluate; returns the report written to report.json."""
    return run_group([config], [workdir])[0]


def run_group(configs: Sequence, workdirs: Sequence[str]) -> list[dict]:
    """Train `configs` as one program and return their reports. One config is a plain run; several
    must form one fusable group (`members.groups`: they differ only in loss hyper-parameters), and
    each member then writes the workdir layout of a separate run, while the shared checkpoints of
    the fused state live in the first member's workdir (re-running the group resumes it)."""
    if not configs or len(configs) != len(workdirs):
        raise ValueError(f"run_group needs one workdir per config; got {len(configs)} configs, {len(workdirs)} workdirs")
    if any(c.get("online") is not None and c.online.rounds > 0 for c in configs):
        raise ValueError("config.online.rounds > 0 is online DPO (dpo_jax.online.run, which dpo_jax.main calls): "
                         "it trains one run at a time and cannot be a fused member")
    if len(members.groups(configs)) != 1:
        raise ValueError("fused members may differ only in loss hyper-parameters (loss.beta, loss.weights, "
                         "loss.<variant parameters>); these configs differ in more")
    for c in configs:
        config_check.validate(c)
    done = [finished_report(c, w) for c, w in zip(configs, workdirs)]
    if all(r is not None for r in done):
        logging.warning("%s: finished already (report.json of this config): nothing was run or written",
                        ", ".join(workdirs))
        return done
    c0, fused = configs[0], len(configs) > 1
    step.check_members(len(configs) if fused else 0, has_lora=c0.model.lora.rank > 0, ref_mode=c0.reference.mode)
    hps = [config_check.loss_hparams(c) for c in configs]
    initialize_distributed(c0)
    config_check.check_devices(c0, jax.device_count(), jax.process_count())  # after start-up: asks for devices
    mesh = sharding.make_mesh(c0.mesh.shape)
    for c, w in zip(configs, workdirs):
        write_run_info(c, w)
    files = build.data_files(c0, workdirs[0])
    tok = build.tokenizer(files.tokenizer)
    writers = [metrics.Writer(w, enabled=multihost.is_main_process(), wandb=c.logging.wandb, run_config=c)
               for c, w in zip(configs, workdirs)]
    peak = c0.train.peak_flops or metrics.device_peak_flops()
    preempt = preemption.install_sigterm_handler()
    try:
        model = build.policy(c0, tok, mesh=mesh)
        if c0.sft.steps > 0:
            model = stages.sft_stage(c0, workdirs[0], files, tok, model, mesh, writers[0], preempt, peak)
        reference = build.reference(c0, model, mesh=mesh)
        stage = stages.make_stage(c0, "train", workdirs[0], objective=config_check.objective(c0),
                                  hp=members.stack_hparams(hps) if fused else hps[0], steps=c0.train.steps,
                                  optim_cfg=c0.optim, ref_mode=c0.reference.mode, train_path=files.train,
                                  eval_path=files.eval, tok=tok, batch_size=c0.data.batch_size)
        trained, _, evals = stages.run_stage(c0, stage, model, reference, mesh, writers[0], preempt, peak,
                                             tokenizer_dir=files.tokenizer, writers=writers if fused else None)
    finally:
        preempt.uninstall()
    if not fused:
        trained, evals = [trained], [evals]
    # One evaluation reference for every member: the SFT model, if any, was trained in the first one's workdir.
    reference = build.evaluation_reference(c0, workdirs[0], tok) if c0.eval.num_prompts > 0 else None
    return [finish_run(c, w, m, e, files, tok, stage, writer, reference)
            for c, w, m, e, writer in zip(configs, workdirs, trained, evals, writers)]


def finish_run(config, workdir: str, trained, final_eval: dict, files, tok, stage: Stage, writer, reference) -> dict:
    """The end of a run: sampled evaluation against `reference` (`build.evaluation_reference`; None when
    config.eval.num_prompts is 0), the exported policy, report.json (returned)."""
    report = {"steps": config.train.steps, "loss": config.loss.name,
              **{f"eval/{k}": v for k, v in final_eval.items()}}
    if "eval/rewards/accuracies" in report:
        report["eval/accuracy"] = report["eval/rewards/accuracies"]
    for split, drops in stage.data_reports.items():  # rows read, kept, dropped by reason (first row numbers)
        report.update({f"data/{split}/{k}": v for k, v in drops.items() if k != "source"})
    if config.eval.num_prompts > 0:  # sampled reward, KL, win rate, frontier: every process samples its share
        report.update(sampled.final_report(config, files, tok, trained, stage, reference=reference,
                                           logit_bias_V=build.logit_bias(config, trained.cfg.vocab_size)))
    if multihost.is_main_process():
        if config.train.export_final:
            stages.export_model(trained, paths.join(workdir, "final"), tokenizer_dir=files.tokenizer)
        writer.write(config.train.steps, {k: v for k, v in report.items() if isinstance(v, float)})
        plots.write_run_plot(config, workdir, report, files.eval)  # workdir/plots/reward_kl.png
        paths.write_text(paths.join(workdir, "report.json"), json.dumps(report, indent=2, sort_keys=True))
    writer.close()
    return report
