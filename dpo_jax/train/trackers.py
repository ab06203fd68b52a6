"""Experiment trackers that mirror the metrics of `metrics.Writer` (config.logging).

Weights & Biases (`config.logging.wandb`): one W&B run per workdir, named after the workdir, with
the run's resolved config. Its id is kept in workdir/wandb_run_id, so a resumed run (a restart in
the same workdir) continues the same W&B run. W&B writes its own files to a local directory: the
workdir, or for a bucket workdir (`gs://...`) `paths.local_dir(workdir, "wandb")` on this machine.
wandb is an optional extra (`pip install 'dpo_jax[tracking]'`), imported only when enabled.

Steps: the stages count their steps from 0 (the SFT stage, then training), so every metric is
plotted against a step axis of its prefix (`step` for training, `eval/step`, `sft/step`, ...,
declared with `define_metric`) while W&B's own step just counts the log calls. W&B cannot delete
logged points: after a resume the steps between the checkpoint and the kill are logged again
(metrics.jsonl is rewritten to hold each step once, W&B keeps both points at those steps; with
a deterministic run they carry the same values).
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Mapping, Optional

from dpo_jax import paths

RUN_ID_FILE = "wandb_run_id"
MODES = ("online", "offline", "disabled")


def run_id(workdir: str) -> str:
    """The W&B run id of `workdir`: read from workdir/wandb_run_id, created there on first use."""
    path = paths.join(workdir, RUN_ID_FILE)
    if paths.exists(path):
        rid = paths.read_text(path).strip()
        if rid:
            return rid
    rid = uuid.uuid4().hex[:16]
    paths.write_text(path, rid + "\n")
    return rid


def _import_wandb():
    try:
        import wandb  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("config.logging.wandb.enabled=True needs the wandb package: "
                          "pip install 'dpo_jax[tracking]' (or pip install wandb), "
                          "or set --config.logging.wandb.enabled=False") from e
    return wandb


def _as_dict(config: Any) -> dict:
    if config is None:
        return {}
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


class WandbTracker:
    """Logs scalar metrics of one workdir to a W&B run (see the module docstring)."""

    def __init__(self, workdir: str, cfg: Mapping[str, Any], run_config: Any = None):
        mode = cfg.get("mode", "online")
        if mode not in MODES:
            raise ValueError(f"config.logging.wandb.mode={mode!r}: expected one of {MODES}")
        wandb = _import_wandb()
        workdir = os.path.abspath(workdir) if paths.is_local(workdir) else workdir.rstrip("/")
        self.run_id = run_id(workdir)
        wandb_dir = workdir if paths.is_local(workdir) else paths.local_dir(workdir, "wandb")
        os.makedirs(wandb_dir, exist_ok=True)
        self._axes: dict[str, str] = {}  # metric key -> its step axis, once declared
        self.run = wandb.init(project=cfg.get("project") or "dpo_jax", entity=cfg.get("entity") or None,
                              name=workdir.rstrip("/").rsplit("/", 1)[-1], config=_as_dict(run_config),
                              dir=wandb_dir, mode=mode, tags=list(cfg.get("tags") or ()), id=self.run_id,
                              resume="allow")

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Logs the numeric scalars of `metrics` (keys prefixed) at `step` of the prefix's step axis."""
        axis = prefix + "step"
        row = {prefix + k: v for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not row:
            return
        for key in row:
            if key not in self._axes:
                self.run.define_metric(key, step_metric=axis)
                self._axes[key] = axis
        self.run.log({axis: int(step), **row})

    def close(self) -> None:
        self.run.finish()


def make_trackers(workdir: str, logging_cfg: Optional[Mapping[str, Any]], run_config: Any = None) -> list:
    """The trackers `logging_cfg` (config.logging, or its `wandb` section) enables for `workdir`."""
    if not logging_cfg:
        return []
    cfg = logging_cfg["wandb"] if "wandb" in logging_cfg else logging_cfg
    return [WandbTracker(workdir, cfg, run_config)] if cfg.get("enabled", False) else []
