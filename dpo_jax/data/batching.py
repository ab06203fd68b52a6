"""The last stages of the train pipeline, as grain iterators: packed grouping, and the layout of each
group with the batch plan every process agrees on; and carrying an iterator's position over to
another number of processes.

    examples -> groups of P (`as_list` in grain's batch; `PackedGroupDataset` for packing)
             -> `LayoutDataset`: batch stats -> agree (max over processes) -> plan -> layout

The iterator states are grain's: ``{"next_index": k}`` (k rows of this process's shard read,
dropped ones included), nested under ``parent`` by the packed grouping.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np

from dpo_jax.data import layouts


class PackedGroupIterator(grain.DatasetIterator):
    """Closes a packed group when P examples are in or the next one no longer fits.

    The example that did not fit is kept for the next batch; the state is the parent's state
    from before that example was read, so restoring reads it again.
    """

    def __init__(self, parent: grain.DatasetIterator, spec: layouts.LayoutSpec, drop_remainder: bool):
        super().__init__(parent)
        self._spec = spec
        self._drop_remainder = drop_remainder
        self._pending = None
        self._pending_state = None

    def __next__(self) -> list:
        spec, group = self._spec, []
        packer = layouts.FirstFitPacker(spec.num_rows, spec.row_length)
        if self._pending is not None:
            packer.add(spec.segment_lengths(self._pending))
            group.append(self._pending)
            self._pending = self._pending_state = None
        exhausted = False
        while len(group) < spec.num_pairs:
            state = self._parent.get_state()
            try:
                example = next(self._parent)
            except StopIteration:
                exhausted = True
                break
            if packer.add(spec.segment_lengths(example)) is None:
                self._pending, self._pending_state = example, state
                break
            group.append(example)
        if not group or (exhausted and self._drop_remainder):
            raise StopIteration
        return group

    def get_state(self) -> dict[str, Any]:
        state = self._pending_state if self._pending is not None else self._parent.get_state()
        return {"parent": state}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None


class PackedGroupDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, spec: layouts.LayoutSpec, drop_remainder: bool):
        super().__init__(parent)
        self._spec = spec
        self._drop_remainder = drop_remainder

    def __iter__(self) -> PackedGroupIterator:
        return PackedGroupIterator(self._parent.__iter__(), self._spec, self._drop_remainder)


def local_agree(stats: np.ndarray) -> np.ndarray:
    return stats


class LayoutIterator(grain.DatasetIterator):
    """Lays out each group of examples with the plan every process agrees on (see the module
    docstring). A process that ran out of examples still takes part in the agreement, so every
    process stops at the same batch."""

    def __init__(self, parent: grain.DatasetIterator, spec: layouts.LayoutSpec, agree, pair_offset: int):
        super().__init__(parent)
        self._spec, self._agree, self._pair_offset = spec, agree, pair_offset

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            group, exhausted = next(self._parent), 0
        except StopIteration:
            group, exhausted = [], 1
        merged = self._agree(np.append(self._spec.batch_stats(group), exhausted))
        if merged[-1]:
            raise StopIteration
        return self._spec(group, self._spec.plan(merged[:-1]), self._pair_offset)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class LayoutDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, spec: layouts.LayoutSpec, agree, pair_offset: int):
        super().__init__(parent)
        self._spec, self._agree, self._pair_offset = spec, agree, pair_offset

    def __iter__(self) -> LayoutIterator:
        return LayoutIterator(self._parent.__iter__(), self._spec, self._agree, self._pair_offset)


def as_list(examples) -> list:
    return list(examples)


POSITION_KEY = "next_index"  # grain's position in this process's shard (rows read, dropped ones included)


def reshard_state(states: Sequence[Mapping[str, Any]], template: Mapping[str, Any], process_index: int,
                  process_count: int) -> dict[str, Any]:
    """The train iterator state of process `process_index` of `process_count` that continues where
    the `states` of a run with `len(states)` processes stopped (a checkpoint restored on another
    process count). Process i of n at position k_i has read rows k_i n of the global order
    (exact when every k_i is equal, i.e. no process dropped more rows than another; else it
    restarts at the slowest process, re-reading at most the difference); the new processes split
    that position evenly. Epoch boundaries agree when the row count divides by both counts.
    `template` is this process's own (fresh) state, whose structure is kept."""
    positions = [_position(s) for s in states]
    if not positions or min(positions) < 0 or _position(template) < 0:
        raise ValueError(f"data iterator states {list(states)[:2]}...: no {POSITION_KEY!r} to carry over to "
                         f"{process_count} processes")
    done = min(positions) * len(states)
    return _with_position(template, done // process_count)


def _position(state) -> int:
    if isinstance(state, Mapping):
        if POSITION_KEY in state:
            return int(state[POSITION_KEY])
        for value in state.values():
            found = _position(value)
            if found >= 0:
                return found
    return -1


def _with_position(state, position: int):
    if not isinstance(state, Mapping):
        return state
    if POSITION_KEY in state:
        return {**state, POSITION_KEY: int(position)}
    return {k: _with_position(v, position) for k, v in state.items()}
