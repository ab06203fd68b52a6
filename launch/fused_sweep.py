"""`python -m launch.sweep ... --fused`: train each group of fusable sweep members as one program.

Members that differ only in loss hyper-parameters (beta, loss weights, variant parameters; see
`dpo_jax.train.members`) share one data pipeline and one reference forward, their policies stacked and
vmapped; each member still writes its own workdir (config, metrics, final/, report.json). Groups
run one after the other in this process; a group whose members all finished is skipped, and a
re-launched group resumes from its checkpoints (in the first member's workdir).
"""

from __future__ import annotations

import time
from typing import Sequence

from dpo_jax import multihost, runner
from dpo_jax.train import members, preemption
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


def run(config_spec: str, runs: Sequence, *, dry_run: bool = False) -> int:
    """Train every unfinished group; returns the number of groups that failed."""
    configs = member_configs(config_spec, runs)
    failed = 0
    for group in members.groups(configs):
        names = [runs[i].name for i in group]
        if all(sweep_plan.run_status(runs[i]) == "finished" for i in group):
            print(f"# skip (finished): fused group {names}")
            continue
        if dry_run:
            print(f"# fused group of {len(group)}: {names}")
            continue
        t0 = time.time()
        try:
            runner.run_group([configs[i] for i in group], [runs[i].workdir for i in group])
            print(f"fused group {names}: finished in {time.time() - t0:.0f} s")
        except (ValueError, FloatingPointError) as e:
            failed += 1
            print(f"fused group {names}: failed: {e}")
        except preemption.Preempted as e:  # resume by running the same command again
            print(f"fused group {names}: {e}")
            raise SystemExit(multihost.PREEMPTED_EXIT) from e
    return failed
