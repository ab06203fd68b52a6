"""Checkpoints: the train state, the grain iterator's position and a little JSON, per step.

One ``orbax.checkpoint.CheckpointManager`` holds, in ``<directory>/<step>/``, three items:

    state/   the TrainState pytree (params, opt_state, ref_params, rng, step): orbax
             ``StandardSave``; restored into the shardings of an abstract target
    data/    the grain ``DatasetIterator`` state, ``process_<i>-of-<n>.json`` per process
             (grain's own orbax handler, ``grain.checkpoint.CheckpointSave``); optional
    extra/   a JSON dict of loop metadata (last logged step, ...)

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<t>/`` and renames it to
``<step>/`` only once every item is on disk (on object stores it writes ``commit_success.txt``
last instead), so a crash mid-save leaves the previous step the latest valid one; leftover
temporary directories are ignored and removed when the next ``Checkpointer`` opens the directory.

Saves are asynchronous by default: ``save`` returns once the arrays are copied to host memory and
the iterator state is written (the state may then be donated or changed), the files are written
in a background thread, and ``wait()`` blocks until the step is final on disk.

Preemption: ``install_sigterm_handler`` gives a ``PreemptionFlag`` whose ``reached()``, asked by
the loop at every step boundary, says when to save and stop. One process: a SIGTERM (and SIGINT)
sets it. Several processes must all save the SAME step: after ``jax.distributed.initialize()``
JAX's coordination service owns SIGTERM (a C handler that a Python one would replace, breaking
it), a notice on any process reaches all of them, and
``multihost_utils.reached_preemption_sync_point(n)`` (orbax's ``reached_preemption``), called by
every process at every boundary with an increasing n, is True on all of them at the same n, about
a second after the signal. A preempted run then exits with ``multihost.PREEMPTED_EXIT``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

STATE, DATA, EXTRA = "state", "data", "extra"


class Checkpointer:
    """Saves and restores (state, data iterator, extra) per step in ``directory``.

    ``keep``: how many most recent steps stay on disk (0 keeps all). ``every``: ``should_save``
    is true at multiples of it (0: never; the loop then saves with ``force=True``).
    ``async_save``: write files in a background thread (``wait()`` joins it).
    """

    def __init__(self, directory, *, keep: int = 3, every: int = 0, async_save: bool = True):
        if keep < 0:
            raise ValueError(f"checkpoint keep={keep}: must be >= 0 (0 keeps every step)")
        if every < 0:
            raise ValueError(f"checkpoint every={every}: must be >= 0 (0: only forced saves)")
        directory = os.fspath(directory)
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = directory
        self.keep, self.every = keep, every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        handlers = {STATE: ocp.StandardCheckpointHandler(), EXTRA: ocp.JsonCheckpointHandler(),
                    DATA: grain.checkpoint.CheckpointHandler()}
        self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

    # ------------------------------------------------------------------ queries

    def should_save(self, step: int) -> bool:
        """True at the periodic steps: every > 0 and step % every == 0."""
        return self.every > 0 and int(step) % self.every == 0

    def latest_step(self) -> int | None:
        """The newest finalized step (temporary, half-written steps do not count), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every finalized step on disk, ascending."""
        return sorted(self._manager.all_steps())

    def has_data_state(self, step: int) -> bool:
        """Whether ``step`` holds this process's data iterator state (grain names it by process
        index and count: a checkpoint of another process count does not)."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (epath.Path(self.directory) / str(int(step)) / DATA / name).exists()

    # ------------------------------------------------------------------ save / restore

    def save(self, step: int, state, data_iterator=None, extra: dict | None = None, *,
             force: bool = False) -> bool:
        """Starts saving ``step``; True if a save started.

        Without ``force`` only periodic steps (``should_save``) are saved. A step already on disk
        is never written again (False), so a forced final save after a periodic one is harmless.
        """
        step = int(step)
        if not force and not self.should_save(step):
            return False
        if step in self._manager.all_steps():
            return False
        items = {STATE: ocp.args.StandardSave(state), EXTRA: ocp.args.JsonSave(_json_copy(extra))}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(_check_iterator(data_iterator))
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """(state, extra) of ``step`` (default: the latest); sets ``data_iterator``'s state.

        ``abstract_state`` is the target pytree: ``jax.ShapeDtypeStruct`` leaves with the wanted
        ``.sharding`` (None: the default device, single process only), or concrete ``jax.Array``
        leaves whose shape, dtype and sharding are used. NumPy/Python leaves restore as such.
        """
        self.wait()
        available = self.all_steps()
        if step is None:
            if not available:
                raise ValueError(f"no finalized checkpoint in {self.directory}")
            step = available[-1]
        step = int(step)
        if step not in available:
            raise ValueError(f"checkpoint step={step} not in {self.directory}; steps on disk: {available}")
        target = abstract_target(abstract_state)
        _check_shapes(target, self._manager.item_metadata(step)[STATE], step)
        items = {STATE: ocp.args.StandardRestore(target), EXTRA: ocp.args.JsonRestore()}
        if data_iterator is not None:
            if not (epath.Path(self.directory) / str(step) / DATA).exists():
                raise ValueError(f"checkpoint step={step} in {self.directory} holds no data iterator "
                                 f"state (saved with data_iterator=None)")
            items[DATA] = grain.checkpoint.CheckpointRestore(_check_iterator(data_iterator))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE], dict(restored[EXTRA] or {})

    # ------------------------------------------------------------------ lifetime

    def wait(self) -> None:
        """Blocks until every started save is final on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers


def abstract_target(tree):
    """``tree`` with each ``jax.Array`` replaced by its ``ShapeDtypeStruct`` (sharding kept) and a
    missing sharding filled with the default device (single process only)."""

    def leaf(path, x):
        if isinstance(x, jax.ShapeDtypeStruct):
            if x.sharding is not None:
                return x
            if jax.process_count() > 1:
                raise ValueError(f"abstract_state{jax.tree_util.keystr(path)}: ShapeDtypeStruct without "
                                 f"a sharding; with several processes every leaf needs one")
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _check_shapes(target, metadata, step: int) -> None:
    """Raises ValueError naming the first target leaf whose shape differs from the stored one."""
    stored = ocp.tree.to_flat_dict(metadata.tree, sep="/")
    for path, x in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = "/".join(_key_name(p) for p in path)
        meta = stored.get(name)
        shape = getattr(x, "shape", None)
        if meta is None or shape is None or getattr(meta, "shape", None) is None:
            continue  # structure differences are reported by orbax
        stored_shape = tuple(meta.shape)
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            stored_shape = stored_shape[: len(shape)]  # typed keys are stored as their key data
        if stored_shape != tuple(shape):
            raise ValueError(f"checkpoint step={step}: state{jax.tree_util.keystr(path)} is stored with "
                             f"shape {tuple(meta.shape)}, the restore target asks for {tuple(shape)}")


def _json_copy(extra: dict | None) -> dict:
    """A detached JSON copy of ``extra`` (the caller may change its dict after ``save``)."""
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise ValueError(f"checkpoint extra must be a dict, got {type(extra).__name__}")
    try:
        return json.loads(json.dumps(extra, default=_json_default))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint extra is not JSON-serializable: {e}") from e


def _json_default(x):
    if isinstance(x, (np.generic, np.ndarray)) or (isinstance(x, jax.Array) and x.ndim == 0):
        return np.asarray(x).tolist()
    raise TypeError(f"{type(x).__name__} value {x!r}")


def _check_iterator(it):
    if not isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator)):
        raise ValueError(f"data_iterator must be a grain DatasetIterator or DataLoaderIterator, "
                         f"got {type(it).__name__}")
    return it


# ---------------------------------------------------------------------- preemption


class Preempted(Exception):
    """Training stopped after saving a checkpoint because of a preemption notice (SIGTERM)."""


class PreemptionFlag:
    """``requested`` turns True when one of ``signals`` arrives (``signum`` says which); a second
    SIGINT raises KeyboardInterrupt. ``uninstall()`` puts the previous handlers back. With
    ``coordinated`` (several processes under ``jax.distributed``) SIGTERM is left to JAX's
    preemption service and ``reached()`` asks its sync point."""

    def __init__(self, signals=(signal.SIGTERM,), coordinated: bool = False):
        self.requested = False
        self.signum: int | None = None
        self.coordinated = coordinated
        self._boundaries = 0
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("install_sigterm_handler must be called from the main thread")
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def reached(self) -> bool:
        """Whether to save and stop at this step boundary; call it at every boundary, on every
        process (with several processes it is a sync point, True everywhere at the same call)."""
        self._boundaries += 1
        if self.coordinated:
            return bool(multihost_utils.reached_preemption_sync_point(self._boundaries)) or self.requested
        return self.requested

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "PreemptionFlag":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()


def install_sigterm_handler(*, sigint: bool = False) -> PreemptionFlag:
    """A ``PreemptionFlag`` set by SIGTERM (and SIGINT if ``sigint``); under ``jax.distributed``
    one that asks JAX's preemption sync point and leaves SIGTERM to JAX (module docstring)."""
    coordinated = jax.distributed.is_initialized() and jax.process_count() > 1
    signals = (signal.SIGINT,) if sigint else ()
    if not coordinated:
        signals = (signal.SIGTERM,) + signals
    return PreemptionFlag(signals, coordinated=coordinated)
