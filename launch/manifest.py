"""A sweep's manifest (root/manifest.json: every run with its overrides, command and status) and
its log directory, shared by the plain and the fused sweep. The root may be a local path or a
bucket URI (`dpo_jax.paths`)."""

from __future__ import annotations

import json
from typing import Sequence

from dpo_jax import paths
from launch.sweep_plan import Run, run_status


def write_manifest(root: str, runs: Sequence[Run], state: dict, meta: dict) -> str:
    """root/manifest.json (written whole, a local path or a bucket URI): the sweep's runs with
    overrides, commands and status."""
    paths.path(root).mkdir(parents=True, exist_ok=True)
    out = {**meta, "runs": [{"name": r.name, "workdir": r.workdir, "overrides": r.overrides,
                             "sft_model_dir": r.sft_model_dir, "command": r.command,
                             "env": r.env, "command_line": r.command_line(), **state.get(r.name, {})}
                            for r in runs]}
    path = paths.join(root, "manifest.json")
    paths.write_text(path, json.dumps(out, indent=2, default=str))
    return path


def log_dir(root: str) -> str:
    """Where the runs' output goes: root/logs, on this machine when root is a bucket (a child
    process's stdout is a local file; `paths.local_dir`)."""
    return paths.local_dir(root, "logs")


def initial_state(root: str, runs: Sequence[Run]) -> dict[str, dict]:
    """{name: {status}} of the runs as their workdirs stand, with what an earlier launch recorded in
    root/manifest.json (return code, seconds, log) about those finished since."""
    state = {r.name: {"status": run_status(r)} for r in runs}
    previous = paths.join(root, "manifest.json")
    if paths.exists(previous):
        for old in json.loads(paths.read_text(previous)).get("runs", []):
            if state.get(old.get("name"), {}).get("status") == "finished" and old.get("status") == "finished":
                state[old["name"]].update({k: old[k] for k in ("returncode", "seconds", "log") if k in old})
    return state
