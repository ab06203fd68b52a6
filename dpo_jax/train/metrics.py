"""Metric names, the FLOP model, aggregation, and writers (JSONL + TensorBoard).

Names follow TRL where it has them (`loss`, `rewards/chosen`, `rewards/rejected`,
`rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`, `grad_norm`,
`learning_rate`), plus `grad_weight/mean`, `grad_weight/saturated_frac`, `logratio/mean`,
`tokens_per_s`, `mfu`.

FLOP model (per step): 6 N per trained token (forward + backward) + 2 N per reference token
(forward only), where N counts the matmul parameters of the decoder including the unembedding,
plus attention scores: 12 L H E per trained token-key pair and 4 L H E per reference one
(QK^T and AV, forward 2x2, backward twice that), with the causal pairs counted exactly.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from dpo_jax import paths
from dpo_jax.train import trackers as trackers_lib

# bf16 dense peak FLOP/s per chip, for MFU on accelerators (CPU: a matmul is measured instead).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}


def matmul_params(cfg) -> int:
    """Parameters that take part in matmuls per token (embedding lookups excluded, unembedding in)."""
    d, h, k, e, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    attn = d * h * e + 2 * d * k * e + h * e * d
    mlp = (3 if cfg.gated_mlp else 2) * d * f
    return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def attention_pairs(segment_ids_BxT: np.ndarray, positions_BxT: np.ndarray, branch_ids_BxT: np.ndarray) -> int:
    """Number of (query, key) pairs the attention rule of docs/design.md admits (host, numpy)."""
    seg, pos, br = (np.asarray(a) for a in (segment_ids_BxT, positions_BxT, branch_ids_BxT))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    causal = pos[:, None, :] <= pos[:, :, None]
    branch = (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
    return int(np.sum(same & causal & branch))


def step_flops(cfg, batch: Mapping[str, np.ndarray], *, reference_forward: bool) -> float:
    """Model FLOPs of one training step on `batch` (host arrays): 6 N per trained token (2 N per
    frozen-reference token) + 12 (4) L H E per attended pair, N = matmul parameters; with
    `logit_slots_BxC` the unembedding (D V of N) counts only at the filled slots, where it runs."""
    tokens = float(np.sum(np.asarray(batch["segment_ids_BxT"]) > 0))
    pairs = attention_pairs(batch["segment_ids_BxT"], batch["positions_BxT"], batch["branch_ids_BxT"])
    n, he = matmul_params(cfg), cfg.num_layers * cfg.num_heads * cfg.head_dim
    unembed = cfg.hidden_size * cfg.vocab_size
    logit_positions = float(np.sum(np.asarray(batch["logit_slots_BxC"]) >= 0)) if "logit_slots_BxC" in batch else tokens
    per_pass = (n - unembed) * tokens + unembed * logit_positions  # multiply-adds of one forward
    train = 6.0 * per_pass + 12.0 * he * pairs
    ref = (2.0 * per_pass + 4.0 * he * pairs) if reference_forward else 0.0
    return train + ref


def device_peak_flops(measure_cpu: bool = True) -> float:
    """The bf16 dense peak of one device, times the device count; on CPU a measured float32 matmul."""
    dev = jax.devices()[0]
    for key, peak in PEAK_FLOPS.items():
        if key.lower() in dev.device_kind.lower():
            return peak * jax.device_count()
    return measured_matmul_flops() if measure_cpu else 0.0


def measured_matmul_flops(n: int = 2048, repeats: int = 5, clock=time.perf_counter) -> float:
    """FLOPs of a float32 n x n matmul on the default device per second of `clock` (wall time; or
    e.g. `time.process_time`, CPU time of all threads), best of `repeats`."""
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    return 2.0 * n**3 / best_time(jax.jit(lambda x: x @ x), a, repeats=repeats, clock=clock)


def best_time(fn, *args, repeats: int = 5, clock=time.perf_counter) -> float:
    """The shortest of `repeats` timed calls of fn(*args) (blocked until ready), after one untimed
    call that compiles it."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        jax.block_until_ready(fn(*args))
        best = min(best, clock() - t)
    return best


class Mean:
    """Weighted running means of scalar metrics (weights: real pairs per batch)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, metrics: Mapping[str, Any], weight: float = 1.0) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight
        self.weight += weight

    def result(self) -> dict[str, float]:
        return {k: v / max(self.weight, 1e-12) for k, v in self.sums.items()}


class Writer:
    """Appends one JSON object per logged step to workdir/metrics.jsonl and mirrors it to TensorBoard
    and to the experiment trackers (`train/trackers.py`: `trackers`, plus W&B when the `wandb`
    section of config.logging is enabled; `run_config` is the config recorded with the W&B run).
    Only an enabled writer (process 0) creates trackers. W&B cannot delete points: `drop_rows` and
    `truncate_after` rewrite metrics.jsonl only, and a resumed run logs its re-run steps again."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True,
                 trackers: Sequence[Any] = (), wandb: Optional[Mapping[str, Any]] = None, run_config: Any = None):
        self.enabled = enabled
        self.path = paths.join(workdir, "metrics.jsonl")
        self._tb = None
        self.trackers: list = []
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

            self._tb = SummaryWriter(paths.tensorboard_logdir(paths.join(workdir, "tensorboard")))
        if enabled:
            self.trackers = list(trackers) + trackers_lib.make_trackers(workdir, wandb, run_config)

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{prefix + k: _scalar(v) for k, v in metrics.items()}}
        paths.append_text(self.path, json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        for tracker in self.trackers:
            tracker.log(int(step), {k: _scalar(v) for k, v in metrics.items()}, prefix)

    def drop_rows(self, drop: Callable[[dict], bool]) -> None:
        """Rewrite the file without the rows `drop` selects (a resumed stage rewrites its rows past
        the checkpoint, so the file holds each step once) and without a row cut short by a kill."""
        if not self.enabled or not paths.exists(self.path):
            return
        rows = [line + "\n" for line in paths.read_text(self.path).splitlines()
                if (row := _row(line)) is not None and not drop(row)]
        paths.write_text(self.path, "".join(rows))

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (and a row cut short by a killed process)."""
        self.drop_rows(lambda row: row["step"] > step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _row(line: str) -> Optional[dict]:
    """One JSONL row with its step; None for a blank, partial or malformed line."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _scalar(v: Any):
    v = np.asarray(v)
    return float(v) if v.dtype.kind == "f" else int(v) if v.dtype.kind in "iub" else str(v)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def summary_line(metrics: Mapping[str, Any], keys=("loss", "rewards/accuracies", "rewards/margins",
                                                    "tokens_per_s")) -> str:
    return "  ".join(f"{k}={float(metrics[k]):.4g}" for k in keys if k in metrics)


def fetch_members(tree: Any, members: int = 0) -> list[dict]:
    """Device -> host of a metrics dict; with fused members (arrays [K]) one dict per member."""
    host = jax.device_get(tree)
    if not members:
        return [{k: float(v) for k, v in host.items()}]
    return [{k: float(np.asarray(v)[i]) for k, v in host.items()} for i in range(members)]


def fetch(tree: Optional[Any]) -> Optional[dict]:
    """Device -> host of a metrics dict (called one step late, so the device never waits)."""
    return None if tree is None else {k: float(v) for k, v in jax.device_get(tree).items()}


def memory_figures(compiled) -> dict[str, int]:
    """Bytes of a compiled function's `memory_analysis()`: temp, argument, output, alias, and the
    peak = temp + argument + output - alias."""
    m = compiled.memory_analysis()
    out = {"temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "alias": m.alias_size_in_bytes}
    out["peak"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out
