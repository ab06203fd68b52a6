"""`python -m launch.sweep ... --fused`: train each group of fusable sweep members as one program.

Members that differ only in loss hyper-parameters (beta, loss weights, variant parameters; see
`dpo_jax.train.members`) share one data pipeline and one reference forward, their policies stacked and
vmapped; each member still writes its own workdir (config, metrics, final/, report.json). Groups
run one after the other in this process; a group whose members all finished is skipped, and a
re-launched group resumes from its checkpoints (in the first member's workdir).
ROOT/manifest.json is the plain sweep's (`manifest.write_manifest`: every member's name, workdir,
overrides, the command of the equivalent separate run, status, return code, seconds, log), so
`launch.aggregate ROOT` reads a fused sweep as it reads a plain one; each member's log,
ROOT/logs/NAME.log, holds its group's start, the log records that reach the root logger (absl
warnings and errors) and the outcome. `--dry_run` prints, per group, the command that
trains that group alone and, as comments, the separate run each member equals.
"""

from __future__ import annotations

import logging as std_logging
import os
import shlex
import time
from typing import Callable, Optional, Sequence

from dpo_jax import multihost, runner
from dpo_jax.train import members, preemption
from launch import manifest as sweep_manifest
from launch import sweep_plan


def member_configs(config_spec: str, runs) -> list:
    """The resolved config of every run (the sweep's base config with the run's overrides)."""
    path, arg = sweep_plan.split_config_spec(config_spec)
    base = sweep_plan.load_config_module(path).get_config(arg)
    out = []
    for r in runs:
        overrides = dict(r.overrides)
        if r.sft_model_dir:
            overrides["sft.model_dir"] = r.sft_model_dir
        out.append(sweep_plan.apply_overrides(base, overrides, where=f"sweep member {r.name!r}: "))
    return out


def plan(config_spec: str, runs) -> list[list[int]]:
    """Indices of the runs of each fused group, in sweep order."""
    return members.groups(member_configs(config_spec, runs))


def run(config_spec: str, runs: Sequence, *, dry_run: bool = False, root: Optional[str] = None,
        meta: Optional[dict] = None, listed: Optional[Sequence] = None,
        group_command: Optional[Callable[[list], list]] = None) -> int:
    """Train every unfinished group; returns the number of groups that failed. With `root`, writes
    root/manifest.json (listing `listed`, default `runs`) as runs start and end, and root/logs/."""

    configs = member_configs(config_spec, runs)
    listed = list(listed if listed is not None else runs)
    state = sweep_manifest.initial_state(root, [*listed, *runs]) if root else {
        r.name: {"status": sweep_plan.run_status(r)} for r in [*listed, *runs]}
    manifest = (lambda: sweep_manifest.write_manifest(root, listed, state, meta or {})) if root and not dry_run else None
    failed = 0
    if manifest:
        os.makedirs(sweep_manifest.log_dir(root), exist_ok=True)
        manifest()
    for group in members.groups(configs):
        names = [runs[i].name for i in group]
        if all(state[n]["status"] == "finished" for n in names):
            print(f"# skip (finished): fused group {names}")
            continue
        if dry_run:
            print(f"# fused group of {len(group)}: {names}")
            if group_command:
                print(shlex.join(group_command(names)))
            for i in group:
                print(f"#   {runs[i].name} equals: {runs[i].command_line()}")
            continue
        logs = [os.path.join(sweep_manifest.log_dir(root), f"{n}.log") for n in names] if manifest else []
        handlers = [_log_to(path, names) for path in logs]
        for n, path in zip(names, logs or [None] * len(names)):
            state[n].update(status="running", log=path)
        if manifest:
            manifest()
        t0, rc = time.time(), 0
        try:
            runner.run_group([configs[i] for i in group], [runs[i].workdir for i in group])
            print(f"fused group {names}: finished in {time.time() - t0:.0f} s")
        except (ValueError, FloatingPointError) as e:
            failed, rc = failed + 1, 1
            print(f"fused group {names}: failed: {e}")
        except preemption.Preempted as e:  # resume by running the same command again
            rc = multihost.PREEMPTED_EXIT
            print(f"fused group {names}: {e}")
            raise SystemExit(multihost.PREEMPTED_EXIT) from e
        except KeyboardInterrupt:
            rc = 130
            raise
        finally:
            for h in handlers:
                std_logging.getLogger().removeHandler(h)
                h.close()
            for i in group:
                status = sweep_plan.run_status(runs[i])
                status = status if status == "finished" else ("failed" if rc == 1 else "interrupted")
                state[runs[i].name].update(status=status, returncode=rc, seconds=round(time.time() - t0, 1))
            for n, path in zip(names, logs):
                with open(path, "a") as f:
                    f.write(f"=== {state[n]['status']} ({rc}) in {state[n]['seconds']:.0f} s: {n}\n")
            if manifest:
                manifest()
    return failed


def _log_to(path: str, names: Sequence[str]) -> std_logging.Handler:
    """A handler copying the group's log records (absl's included) to `path`, after a header line."""
    with open(path, "a") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} fused group {list(names)}\n")
    handler = std_logging.FileHandler(path)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    std_logging.getLogger().addHandler(handler)
    return handler
