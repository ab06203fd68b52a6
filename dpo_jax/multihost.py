"""Several processes, one program: start-up, process-aware logs, host collectives, exit statuses.

Every process runs the same code on its own slice of the data (docs/launch.md). A job is
multi-process when its environment says so, and `maybe_initialize_distributed` then starts
`jax.distributed` (on CPU with the gloo collectives):

    JAX_COORDINATOR_ADDRESS=HOST:PORT [JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i]   (launch/local.py)
    SLURM_NTASKS > 1 under srun                                               (launch/slurm.sbatch)
    TPU_WORKER_HOSTNAMES with several workers                                  (launch/tpu_pod.sh)

Host collectives run in lockstep on every process; each is a no-op with one process:
`agree_max` (elementwise max of a small int vector: the batch shape every process pads to),
`allgather_rows` (rows of every process, concatenated in process order), `barrier`.

Exit statuses of `python -m dpo_jax.main`: 0 finished; `PREEMPTED_EXIT` (75, EX_TEMPFAIL) when a
SIGTERM stopped training after a checkpoint (run the same command again to resume); anything else
is a failure. A process whose peer died exits with `PEER_LOST_EXIT` once the coordination service
notices the missing heartbeats (`distributed.heartbeat_timeout_s`).
"""

from __future__ import annotations

import importlib.util
import json
import logging as py_logging
import os
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

PREEMPTED_EXIT = 75  # os.EX_TEMPFAIL: "temporary failure, try again": resume from the checkpoint
PEER_LOST_EXIT = 70  # os.EX_SOFTWARE: a peer process was lost; relaunch every process to resume

_TPU_WORKERS = "TPU_WORKER_HOSTNAMES"


def is_multiprocess_env(env=None) -> bool:
    """Whether the environment describes a job of several processes."""
    env = os.environ if env is None else env
    return ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1") or 1) > 1
            or len([h for h in env.get(_TPU_WORKERS, "").split(",") if h]) > 1)


def maybe_initialize_distributed(*, heartbeat_timeout_s: int = 100, initialization_timeout_s: int = 300) -> bool:
    """Start `jax.distributed` when the environment describes a multi-process job (see the module
    docstring); returns whether it did. `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` (set by the local
    launcher) are passed on; under SLURM and on TPU pods JAX detects them itself. A process that
    misses heartbeats for `heartbeat_timeout_s` is declared dead and the others stop."""
    if jax.distributed.is_initialized() or not is_multiprocess_env():
        return False
    env = os.environ
    kwargs = {}
    if "JAX_NUM_PROCESSES" in env or "JAX_PROCESS_ID" in env:
        try:
            kwargs = dict(num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
        except (KeyError, ValueError) as e:
            raise ValueError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must both be set to integers "
                             f"(got {env.get('JAX_NUM_PROCESSES')!r}, {env.get('JAX_PROCESS_ID')!r})") from e
    if _platform_is_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                               initialization_timeout=int(initialization_timeout_s), **kwargs)
    label_logs()
    return True


def _platform_is_cpu() -> bool:
    platforms = (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                          "jax_rocm60_plugin", "libtpu"))


class _ProcessLabel(py_logging.Filter):
    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def filter(self, record) -> bool:
        if not getattr(record, "_dpo_jax_labelled", False):
            record.msg = f"{self.label} {record.msg}"
            record._dpo_jax_labelled = True  # pylint: disable=protected-access
        return True


def label_logs() -> None:
    """Prefix every absl log line with `[process i/n]` when there are several processes."""
    if jax.process_count() < 2:
        return
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _ProcessLabel) for f in handler.filters):
        handler.addFilter(_ProcessLabel(f"[process {jax.process_index()}/{jax.process_count()}]"))


def is_main_process() -> bool:
    """Process 0 writes the files meant for people (metrics, reports, plots, exports)."""
    return jax.process_index() == 0


# ------------------------------------------------------------------------------ host collectives


def agree_max(values) -> np.ndarray:
    """Elementwise max over every process of a small int vector (the same length everywhere)."""
    local = np.asarray(values, np.int64).reshape(-1)
    if jax.process_count() == 1:
        return local
    gathered = np.asarray(multihost_utils.process_allgather(local.astype(np.int32)))
    return gathered.reshape(jax.process_count(), -1).max(axis=0).astype(np.int64)


def allgather_rows(rows: np.ndarray) -> np.ndarray:
    """Every process's `rows` (any row count, the same trailing shape and dtype everywhere),
    concatenated along axis 0 in process order."""
    rows = np.asarray(rows)
    if jax.process_count() == 1:
        return rows
    return np.concatenate(_gather_ragged(rows), axis=0)


def _gather_ragged(rows: np.ndarray) -> list[np.ndarray]:
    """Every process's `rows`, one array per process: the row counts, then the rows padded to the
    longest (8-byte and bool dtypes travel as bytes: the collectives run without 64-bit types)."""
    counts = np.asarray(multihost_utils.process_allgather(np.int32(rows.shape[0]))).reshape(-1)
    padded = np.zeros((int(counts.max()), *rows.shape[1:]), rows.dtype)
    padded[: rows.shape[0]] = rows
    wire = padded.view(np.uint8) if padded.dtype.itemsize == 8 or padded.dtype == bool else padded
    gathered = np.asarray(multihost_utils.process_allgather(wire)).reshape(len(counts), *wire.shape)
    gathered = gathered.view(padded.dtype).reshape(len(counts), *padded.shape)
    return [gathered[i, : counts[i]] for i in range(len(counts))]


def barrier(name: str) -> None:
    """Every process waits here until all arrive (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_share(n: int, index: Optional[int] = None, count: Optional[int] = None) -> slice:
    """This process's contiguous block of `n` items (blocks in process order; sizes differ by <= 1)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))


def fetch_to_host(tree):
    """Host (numpy) copies of a pytree of arrays, one leaf at a time: an array sharded over
    several processes is gathered to every process (`process_allgather`), so the transient extra
    memory is one tensor, never the whole tree."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def allgather_json(value) -> list:
    """Every process's JSON-serializable `value`, as a list in process order."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
    return [json.loads(part.tobytes()) for part in _gather_ragged(data)]
