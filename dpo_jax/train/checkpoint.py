"""Checkpoints: the train state, the grain iterator's position and a little JSON, per step.

One ``orbax.checkpoint.CheckpointManager`` holds, in ``<directory>/<step>/``, three items:

    state/   the TrainState pytree (params, opt_state, ref_params, rng, step, loss_state): orbax
             ``StandardSave``; restored into the shardings of an abstract target
    data/    the grain ``DatasetIterator`` state, ``process_<i>-of-<n>.json`` per process
             (grain's own orbax handler, ``grain.checkpoint.CheckpointSave``); optional
    extra/   a JSON dict of loop metadata (last logged step, ...)

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<t>/`` and renames it to
``<step>/`` only once every item is on disk (on object stores it writes ``commit_success.txt``
last instead), so a crash mid-save leaves the previous step the latest valid one; leftover
temporary directories are ignored, and removed (by process 0) before opening a ``Checkpointer``
returns.

Saves are asynchronous by default: ``save`` returns once the arrays are copied to host memory and
the iterator state is written (the state may then be donated or changed), the files are written
in a background thread, and ``wait()`` blocks until the step is final on disk. A failed background
write (disk full, ...) is raised by the next ``save`` or ``wait`` as one ``CheckpointError`` whose
one-line message names the step and the cause, chained from the original. A state with a NaN or
inf in a floating leaf is never saved (ValueError before anything is written) nor restored.

Recovery: ``restore_latest`` tries the steps newest-first and returns the first intact one. A step
that fails to restore (any exception: a truncated or empty file, a missing or garbled iterator
state, an empty state directory) or holds a non-finite state is damaged: it is moved aside, never
deleted, to ``<directory>/corrupt/<step>-<exception type>`` (not a step name: orbax no longer lists
it, and never prunes it), named in one warning line. A target that disagrees with a readable
checkpoint (tree structure or shapes: the run's config changed) raises ``TargetMismatch`` and moves
nothing. Several processes pick the same step: they list the same steps from the shared disk and a
step failing on any of them is damaged on all; process 0 alone moves it (see ``restore_latest``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dpo_jax import multihost

STATE, DATA, EXTRA = "state", "data", "extra"
CORRUPT = "corrupt"  # <directory>/corrupt/<step>-<reason>: damaged steps moved aside
_MESSAGE_CHARS = 240  # longest exception message quoted in a warning or CheckpointError


class CheckpointError(RuntimeError):
    """A checkpoint save failed (raised by the next ``save`` or ``wait`` after a background
    failure); the message names the step and the cause, the original is chained."""


class TargetMismatch(ValueError):
    """The restore target disagrees with a readable checkpoint (tree structure or shape): the
    run's configuration changed; the checkpoint is not damaged and stays where it is."""


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
        self._pending: int | None = None  # the step of the last save started
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        handlers = {STATE: ocp.StandardCheckpointHandler(), EXTRA: ocp.JsonCheckpointHandler(),
                    DATA: grain.checkpoint.CheckpointHandler()}
        self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
        # orbax removes temporary directories in a background thread that only its first save
        # waits for; waiting here makes an opened directory a clean one.
        getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()

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
        A failed earlier save raises CheckpointError first (without blocking when nothing is
        written now); a non-finite floating leaf in ``state`` raises ValueError, nothing written.
        """
        step = int(step)
        if not force and not self.should_save(step):
            if not self._manager.is_saving_in_progress():
                self.wait()  # a finished background save: raises its error, if any
            return False
        self.wait()
        if step in self._manager.all_steps():
            return False
        bad = _nonfinite_leaf(state)
        if bad is not None:
            raise ValueError(f"checkpoint step={step}: state{bad} holds a non-finite value (NaN or inf); "
                             f"not saved")
        items = {STATE: ocp.args.StandardSave(state), EXTRA: ocp.args.JsonSave(_json_copy(extra))}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(_check_iterator(data_iterator))
        self._pending = step
        try:
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            self._pending = None
            raise CheckpointError(f"checkpoint of step {step} failed: {_one_line(e)}") from e
        return bool(started)

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """(state, extra) of ``step`` (default: the latest); sets ``data_iterator``'s state.

        ``abstract_state`` is the target pytree: ``jax.ShapeDtypeStruct`` leaves with the wanted
        ``.sharding`` (None: the default device, single process only), or concrete ``jax.Array``
        leaves whose shape, dtype and sharding are used. NumPy/Python leaves restore as such.
        A target that disagrees with the stored tree raises TargetMismatch; a damaged step raises
        whatever reading it raised, or ValueError for a non-finite state (``restore_latest``
        moves such a step aside instead).
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
        return self._restore_step(abstract_target(abstract_state), data_iterator, step)

    def restore_latest(self, abstract_state, data_iterator=None, *,
                       data_fallback: Callable[[int, dict], None] | None = None):
        """(step, state, extra) of the newest intact step, or None when no step is intact.

        Steps are tried newest-first (``restore``'s arguments). A step that raises, or without
        this process's data iterator state when ``data_iterator`` is given, is damaged: it is
        moved aside (module docstring) with a warning and the next older one is tried; a failed
        try leaves ``data_iterator`` where it was. ``data_fallback(step, extra)``, if given, is
        called for a step without this process's iterator state (another process count wrote
        it): it sets the iterator from ``extra`` or raises (the step is then damaged).
        TargetMismatch is raised at once, nothing moved.

        Several processes: each lists the same steps from the shared disk and a step counts as
        damaged when it failed on any process (one small all-gather per step tried), so all pick
        the same step; process 0 alone moves the damaged ones, the others wait for it (barrier)
        and re-read the step list. A restore that hangs or fails inside orbax's own collectives
        on only some processes is not covered.
        """
        self.wait()
        target = abstract_target(abstract_state)
        position = data_iterator.get_state() if data_iterator is not None else None
        damaged: list[tuple[int, Exception]] = []
        found = None
        for step in reversed(self.all_steps()):
            try:
                state, extra = self._restore_own_or_fallback(target, data_iterator, data_fallback, step)
                error = None
            except TargetMismatch:
                raise
            except Exception as e:  # pylint: disable=broad-exception-caught  (any damage)
                error = e
            if multihost.agree_max([error is not None])[0]:
                if data_iterator is not None:
                    data_iterator.set_state(position)
                damaged.append((step, error or RuntimeError("failed on another process")))
                continue
            found = (step, state, extra)
            break
        self._set_aside(damaged, found[0] if found else None)
        return found

    # ------------------------------------------------------------------ lifetime

    def wait(self) -> None:
        """Blocks until every started save is final on disk; a failed one raises CheckpointError
        (once)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            step, self._pending = self._pending, None
            raise CheckpointError(f"checkpoint of step {step} failed: {_one_line(e)}") from e

    def close(self) -> None:
        """Waits for pending saves (raising a failed one's CheckpointError) and releases the
        manager's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _restore_step(self, target, data_iterator, step: int):
        """(state, extra) of ``step`` into ``target`` (an ``abstract_target``), checked: the tree
        and shapes against the stored metadata before reading, every float finite after."""
        metadata = self._manager.item_metadata(step)[STATE]
        if metadata is None:
            raise ValueError(f"checkpoint step={step}: no readable state metadata in {self.directory}/{step}/{STATE}")
        _check_tree(target, metadata, step)
        _check_shapes(target, metadata, step)
        items = {STATE: ocp.args.StandardRestore(target), EXTRA: ocp.args.JsonRestore()}
        if data_iterator is not None:
            if not (epath.Path(self.directory) / str(step) / DATA).exists():
                raise ValueError(f"checkpoint step={step} in {self.directory} holds no data iterator "
                                 f"state (saved with data_iterator=None)")
            items[DATA] = grain.checkpoint.CheckpointRestore(_check_iterator(data_iterator))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = restored[STATE]
        bad = _nonfinite_leaf(state)
        if bad is not None:
            raise ValueError(f"checkpoint step={step}: state{bad} holds a non-finite value (NaN or inf)")
        return state, dict(restored[EXTRA] or {})

    def _restore_own_or_fallback(self, target, data_iterator, data_fallback, step: int):
        """``_restore_step`` with this process's iterator state, or without it and then
        ``data_fallback`` when the step has none (no fallback: ValueError)."""
        own = data_iterator is None or self.has_data_state(step)
        if not own and data_fallback is None:
            raise ValueError(f"checkpoint step={step} holds no data iterator state of process "
                             f"{jax.process_index()} of {jax.process_count()}")
        state, extra = self._restore_step(target, data_iterator if own else None, step)
        if not own:
            data_fallback(step, extra)
        return state, extra

    def _set_aside(self, damaged: list[tuple[int, Exception]], used: int | None) -> None:
        """Moves each damaged step to ``corrupt/<step>-<reason>`` (process 0; the others wait) with
        one warning line each; then every process re-reads the step list. ``used``: the step
        restored instead (None: none intact)."""
        if not damaged:
            return
        outcome = f"using step {used}" if used is not None else "no intact step is left"
        multihost.barrier("checkpoint_set_aside_start")
        for step, error in damaged:
            reason = _one_line(error)
            if jax.process_index() == 0:
                where = self._move_aside(step, type(error).__name__)
                logging.warning("checkpoint step %d is damaged; moved to %s (%s); %s", step, where, reason, outcome)
            else:
                logging.warning("checkpoint step %d is damaged (%s); process 0 moves it aside; %s", step, reason,
                                outcome)
        multihost.barrier("checkpoint_set_aside_done")
        self._manager.reload()

    def _move_aside(self, step: int, reason: str) -> str:
        """Renames ``<step>/`` to a new ``corrupt/<step>-<reason>[-<n>]``; returns the new path."""
        root = epath.Path(self.directory) / CORRUPT
        root.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in reason).strip("-").lower() or "error"
        dest, n = root / f"{step}-{slug}", 1
        while dest.exists():
            dest, n = root / f"{step}-{slug}-{n}", n + 1
        (epath.Path(self.directory) / str(step)).rename(dest)
        return os.fspath(dest)


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


def _check_tree(target, metadata, step: int) -> None:
    """Raises TargetMismatch when the target's leaves and the stored ones differ (None leaves and
    empty containers store nothing), naming the first leaf that only one of them has."""
    stored = set(ocp.tree.to_flat_dict(metadata.tree, sep="/"))
    wanted = set(ocp.tree.to_flat_dict(target, sep="/"))
    if stored != wanted:
        missing, unexpected = sorted(wanted - stored), sorted(stored - wanted)
        raise TargetMismatch(f"checkpoint step={step}: the restore target's tree differs from the stored one: "
                             f"{len(missing)} leaves not stored (first: {missing[:1]}), {len(unexpected)} stored "
                             f"leaves not in the target (first: {unexpected[:1]})")


def _check_shapes(target, metadata, step: int) -> None:
    """Raises TargetMismatch naming the first target leaf whose shape differs from the stored one."""
    stored = ocp.tree.to_flat_dict(metadata.tree, sep="/")
    for path, x in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = "/".join(_key_name(p) for p in path)
        meta = stored.get(name)
        shape = getattr(x, "shape", None)
        if meta is None or shape is None or getattr(meta, "shape", None) is None:
            continue  # structure differences are reported by _check_tree
        stored_shape = tuple(meta.shape)
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            stored_shape = stored_shape[: len(shape)]  # typed keys are stored as their key data
        if stored_shape != tuple(shape):
            raise TargetMismatch(f"checkpoint step={step}: state{jax.tree_util.keystr(path)} is stored with "
                                 f"shape {tuple(meta.shape)}, the restore target asks for {tuple(shape)}")


def _is_float(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


@jax.jit
def _first_nonfinite(leaves):
    """The index of the first leaf holding a NaN or inf, -1 if none (a scalar: replicated)."""
    finite = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])
    return jnp.where(jnp.all(finite), -1, jnp.argmin(finite))


def _first_nonfinite_on(leaves) -> int:
    """``_first_nonfinite`` of leaves on one device set; leaf by leaf where their device orders
    differ (one jitted computation needs one)."""
    try:
        return int(jax.device_get(_first_nonfinite(leaves)))
    except ValueError:  # incompatible device assignments
        return next((i for i, x in enumerate(leaves) if not bool(jnp.all(jnp.isfinite(x)))), -1)


def _nonfinite_leaf(tree) -> str | None:
    """The key path (``keystr``) of the first floating leaf of ``tree`` holding a NaN or inf, or
    None. One jitted reduction per device set (leaves are checked where they live; host leaves
    with NumPy)."""
    groups: dict[Any, list] = {}
    for order, (path, x) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        if _is_float(x):
            devices = frozenset(x.sharding.device_set) if isinstance(x, jax.Array) else None
            groups.setdefault(devices, []).append((order, path, x))
    bad = []
    for devices, leaves in groups.items():
        if devices is None:
            i = next((i for i, (*_, x) in enumerate(leaves) if not np.all(np.isfinite(np.asarray(x)))), -1)
        else:
            i = _first_nonfinite_on([x for *_, x in leaves])
        if i >= 0:
            bad.append(leaves[i][:2])
    return jax.tree_util.keystr(min(bad, key=lambda b: b[0])[1]) if bad else None


def _one_line(e: BaseException) -> str:
    """``Type: message`` on one line, the message cut to _MESSAGE_CHARS."""
    message = " ".join(str(e).split())
    if len(message) > _MESSAGE_CHARS:
        message = message[: _MESSAGE_CHARS - 3] + "..."
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


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
