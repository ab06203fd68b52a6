"""Batch layouts: tokenized examples -> the batch dict of docs/design.md (host side, numpy).

An example is a paired dict ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` or an unpaired dict
``{"prompt_ids", "completion_ids", "label"}`` of 1-D integer arrays (completions already end with
EOS). Each example becomes one or more *segments*: contiguous runs of tokens that share a segment
id in their row. Inside a segment, with prompt x (length n), completion c (length a):

    sequence segment  tokens  x_0 .. x_{n-2} x_{n-1} c_0 .. c_{a-1}  positions 0 .. n+a-1
                      branch  0 ...    0     k       k   ...   k      (k = 1 chosen, 2 rejected)
                      target[t] = tokens[t+1] (0 at the end), loss_mask[t] = 1 iff n-1 <= t <= n+a-2
    prefix segment    [x_0 .. x_{n-2}] [x_{n-1} c_0 .. c_{a-1}] [x_{n-1} r_0 .. r_{b-1}]
                      branch 0         branch 1                 branch 2
                      positions 0..n-2, n-1..n-1+a, n-1..n-1+b (the rejected branch restarts)

so every target is the next token of the same branch, and completion token k of every layout is
predicted at position n-1+k from a position of the completion's branch (the last prompt token is
labelled with the branch in sequence segments too): splitting loss-masked log-probs by branch
gives the chosen and rejected sums in every layout. Layouts (P = pair capacity, padded pairs have ``pair_mask_P`` = 0):

* ``standard``: B = 2P rows, row p = sequence(x, chosen_p), row P+p = sequence(x, rejected_p),
  right-padded to T = the smallest length bucket >= the longest row;
* ``prefix``: B = P rows, row p = prefix segment of pair p, T bucketed the same way. A batch
  whose prefix rows would not save at least ``prefix_min_saving`` (default 10%) of the standard
  layout's padded tokens P T_prefix vs 2P T_standard (short prompts, bucket rounding) is laid out
  standard instead: the attention of the longer rows would cost more than the saving;
* ``packed``: a fixed number of rows of a fixed length; the segments (two sequence segments per
  pair, or one prefix segment with ``share_prefix``) are placed greedily first-fit in example
  order, segment ids 1..S per row, positions restarting at 0 in each segment.

With ``logit_slots``, a batch also carries ``logit_slots_BxC``: per row, the positions whose loss
mask is set (ascending; -1 pads), C = the smallest of T/4, T/2, 3T/4, T (rounded up to a multiple
of 8, at most T) that holds every row's count. Log-probs then need logits at B x C positions
instead of B x T (prompts and padding need none); the values are the same.

Several processes: each lays out its own examples, and the global batch is the concatenation of
the processes' rows (``sharding.global_batch``). So that it is the batch one process would have
laid out, every process lays out with the same ``BatchPlan`` (prefix or standard rows, T, C),
merged from every process's ``LayoutSpec.batch_stats`` by an elementwise max, and numbers its
pairs from its ``pair_offset`` (its first pair's index in the global batch): ``pair_ids_BxT`` are
GLOBAL indices into ``pair_mask_P`` of the global batch (local ones when the offset is 0).

Unpaired (KTO) examples: one sequence segment per example, branch 1 for desirable (label true),
branch 2 for undesirable; ``standard`` and ``prefix`` give one row per example (B = P), ``packed``
packs them; ``pair_ids``/``pair_mask_P`` index examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

PROMPT, CHOSEN, REJECTED = 0, 1, 2
LAYOUTS = ("standard", "prefix", "packed")
BATCH_KEYS = (
    "tokens_BxT",
    "positions_BxT",
    "segment_ids_BxT",
    "branch_ids_BxT",
    "targets_BxT",
    "loss_mask_BxT",
    "pair_ids_BxT",
    "pair_mask_P",
)
SLOTS_KEY = "logit_slots_BxC"

Example = Mapping[str, Any]


def power_of_two_buckets(max_length: int, min_length: int = 16) -> tuple[int, ...]:
    """(min_length, 2*min_length, ...) below max_length, then max_length itself."""
    if max_length < 1 or min_length < 1:
        raise ValueError(f"max_length and min_length must be >= 1, got {max_length}, {min_length}")
    buckets, b = [], min_length
    while b < max_length:
        buckets.append(b)
        b *= 2
    return tuple(buckets) + (max_length,)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length; ValueError when length exceeds the largest bucket."""
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise ValueError(f"sequence length {length} exceeds the largest length bucket {max(buckets)}")
    return min(fitting)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One sequence of a row before placement: five 1-D arrays of the same length."""

    tokens: np.ndarray
    positions: np.ndarray
    branches: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def _ids(example: Example, key: str, index: int | None) -> np.ndarray:
    where = "example" if index is None else f"example {index}"
    if key not in example:
        raise ValueError(f"{where}: missing key '{key}' (has {sorted(example)})")
    ids = np.asarray(example[key])
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"{where}: '{key}' must be a non-empty 1-D integer array, "
            f"got shape {ids.shape} dtype {ids.dtype}"
        )
    if ids.min() < 0:
        raise ValueError(f"{where}: '{key}' holds negative token ids")
    return ids.astype(np.int32)


def is_unpaired(example: Example) -> bool:
    """True for ``{"prompt_ids", "completion_ids", "label"}`` examples."""
    return "completion_ids" in example and "chosen_ids" not in example


def sequence_segment(prompt: np.ndarray, completion: np.ndarray, branch: int) -> Segment:
    """[prompt][completion]: targets shift by one, loss on the completion's tokens.

    The last prompt token carries ``branch`` (it predicts completion token 0).
    """
    n, a = len(prompt), len(completion)
    tokens = np.concatenate([prompt, completion]).astype(np.int32)
    branches = np.full(n + a, PROMPT, np.int32)
    branches[n - 1 :] = branch
    targets = np.zeros(n + a, np.int32)
    targets[:-1] = tokens[1:]
    loss_mask = np.zeros(n + a, np.float32)
    loss_mask[n - 1 : n + a - 1] = 1.0
    return Segment(tokens, np.arange(n + a, dtype=np.int32), branches, targets, loss_mask)


def prefix_segment(prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> Segment:
    """[prompt[:-1]][prompt[-1], chosen][prompt[-1], rejected] with per-branch positions."""
    n, a, b = len(prompt), len(chosen), len(rejected)
    last = prompt[-1:]
    tokens = np.concatenate([prompt[:-1], last, chosen, last, rejected]).astype(np.int32)
    positions = np.concatenate(
        [np.arange(n - 1), np.arange(n - 1, n + a), np.arange(n - 1, n + b)]
    ).astype(np.int32)
    branches = np.concatenate(
        [np.full(n - 1, PROMPT), np.full(a + 1, CHOSEN), np.full(b + 1, REJECTED)]
    ).astype(np.int32)
    targets = np.concatenate([prompt[1:], chosen, [0], rejected, [0]]).astype(np.int32)
    loss_mask = np.concatenate(
        [np.zeros(n - 1), np.ones(a), [0.0], np.ones(b), [0.0]]
    ).astype(np.float32)
    return Segment(tokens, positions, branches, targets, loss_mask)


def example_segments(example: Example, index: int = 0, share_prefix: bool = False) -> list[Segment]:
    """The segments of one example, in placement order (chosen before rejected)."""
    prompt = _ids(example, "prompt_ids", index)
    if is_unpaired(example):
        label = example.get("label")
        if label is None or np.ndim(label) != 0 or label not in (0, 1):
            raise ValueError(f"example {index}: 'label' must be a boolean (or 0/1), got {label!r}")
        branch = CHOSEN if bool(label) else REJECTED
        return [sequence_segment(prompt, _ids(example, "completion_ids", index), branch)]
    chosen = _ids(example, "chosen_ids", index)
    rejected = _ids(example, "rejected_ids", index)
    if share_prefix:
        return [prefix_segment(prompt, chosen, rejected)]
    return [sequence_segment(prompt, chosen, CHOSEN), sequence_segment(prompt, rejected, REJECTED)]


def empty_batch(num_rows: int, length: int, num_pairs: int, pad_id: int) -> dict[str, np.ndarray]:
    """`BATCH_KEYS` of B = num_rows rows of T = length pad tokens (segment 0) and P = num_pairs filler pairs."""
    batch = {k: np.zeros((num_rows, length), np.int32) for k in BATCH_KEYS if k.endswith("BxT")}
    batch["tokens_BxT"][:] = pad_id
    batch["loss_mask_BxT"] = np.zeros((num_rows, length), np.float32)
    batch["pair_mask_P"] = np.zeros((num_pairs,), np.float32)
    return batch


def place_segment(batch: dict, row: int, offset: int, seg: Segment, segment_id: int, pair_id: int) -> None:
    """Writes `seg` into `batch` at row `row`, columns offset.., as segment `segment_id` of pair `pair_id`."""
    cols = slice(offset, offset + len(seg))
    batch["tokens_BxT"][row, cols] = seg.tokens
    batch["positions_BxT"][row, cols] = seg.positions
    batch["segment_ids_BxT"][row, cols] = segment_id
    batch["branch_ids_BxT"][row, cols] = seg.branches
    batch["targets_BxT"][row, cols] = seg.targets
    batch["loss_mask_BxT"][row, cols] = seg.loss_mask
    batch["pair_ids_BxT"][row, cols] = pair_id


def _check_examples(examples: Sequence[Example], num_pairs: int) -> bool:
    """Validates the count and that the batch is all paired or all unpaired; returns unpaired."""
    if len(examples) > num_pairs:
        raise ValueError(f"{len(examples)} examples exceed the pair capacity num_pairs={num_pairs}")
    kinds = {is_unpaired(e) for e in examples}
    if len(kinds) > 1:
        raise ValueError("a batch mixes paired (chosen_ids) and unpaired (completion_ids) examples")
    return kinds == {True}


def fitted_length(longest: int, buckets: Sequence[int], length: int | None) -> int:
    """T: the bucket of the longest row, or the given `length` (a plan's), which must hold it."""
    need = bucket_length(longest, buckets)
    if length is None:
        return need
    if length < longest:
        raise ValueError(f"row length {length} is shorter than the longest row ({longest} tokens)")
    return int(length)


def standard_batch(
    examples: Sequence[Example], *, num_pairs: int, buckets: Sequence[int], pad_id: int = 0,
    length: int | None = None, pair_offset: int = 0,
) -> dict[str, np.ndarray]:
    """B = 2P rows (chosen rows, then rejected rows; P rows if unpaired), T = bucketed length
    (or `length`); pair p gets the id `pair_offset + p`."""
    unpaired = _check_examples(examples, num_pairs)
    segs = [example_segments(e, i) for i, e in enumerate(examples)]
    longest = max((len(s) for pair in segs for s in pair), default=1)
    num_rows = num_pairs if unpaired else 2 * num_pairs
    batch = empty_batch(num_rows, fitted_length(longest, buckets, length), num_pairs, pad_id)
    for p, pair in enumerate(segs):
        for k, seg in enumerate(pair):
            place_segment(batch, p + k * num_pairs, 0, seg, 1, pair_offset + p)
        batch["pair_mask_P"][p] = 1.0
    return batch


def prefix_batch(
    examples: Sequence[Example], *, num_pairs: int, buckets: Sequence[int], pad_id: int = 0,
    length: int | None = None, pair_offset: int = 0,
) -> dict[str, np.ndarray]:
    """B = P rows, row p = the prefix-shared segment of pair p, T = bucketed length (or `length`)."""
    _check_examples(examples, num_pairs)
    segs = [example_segments(e, i, share_prefix=True)[0] for i, e in enumerate(examples)]
    longest = max((len(s) for s in segs), default=1)
    batch = empty_batch(num_pairs, fitted_length(longest, buckets, length), num_pairs, pad_id)
    for p, seg in enumerate(segs):
        place_segment(batch, p, 0, seg, 1, pair_offset + p)
        batch["pair_mask_P"][p] = 1.0
    return batch


class FirstFitPacker:
    """Greedy first-fit of segments into ``num_rows`` rows of ``row_length`` tokens."""

    def __init__(self, num_rows: int, row_length: int):
        self.row_length = row_length
        self.free = [row_length] * num_rows
        self.count = [0] * num_rows

    def add(self, lengths: Sequence[int]) -> list[tuple[int, int, int]] | None:
        """Places all of ``lengths`` (row, offset, segment_id each) or none of them (None)."""
        free, count, places = list(self.free), list(self.count), []
        for length in lengths:
            row = next((r for r, f in enumerate(free) if length <= f), None)
            if row is None:
                return None
            count[row] += 1
            places.append((row, self.row_length - free[row], count[row]))
            free[row] -= length
        self.free, self.count = free, count
        return places


def packed_batch(
    examples: Sequence[Example],
    *,
    num_pairs: int,
    num_rows: int,
    row_length: int,
    share_prefix: bool = False,
    pad_id: int = 0,
    pair_offset: int = 0,
) -> dict[str, np.ndarray]:
    """``num_rows`` x ``row_length`` rows holding up to ``num_pairs`` examples, first-fit."""
    _check_examples(examples, num_pairs)
    batch = empty_batch(num_rows, row_length, num_pairs, pad_id)
    packer = FirstFitPacker(num_rows, row_length)
    for p, example in enumerate(examples):
        segs = example_segments(example, p, share_prefix)
        places = packer.add([len(s) for s in segs])
        if places is None:
            raise ValueError(
                f"example {p} (segment lengths {[len(s) for s in segs]}) does not fit in "
                f"{num_rows} rows of length {row_length} after examples 0..{p - 1}"
            )
        for seg, (row, offset, segment_id) in zip(segs, places):
            place_segment(batch, row, offset, seg, segment_id, pair_offset + p)
        batch["pair_mask_P"][p] = 1.0
    return batch


def slot_levels(length: int) -> tuple[int, ...]:
    """The allowed slot counts C of rows of length T: T/4, T/2, 3T/4, T rounded up to multiples of 8,
    at most T (few distinct C, so few compiled shapes)."""
    quarter = -(-length // 4)
    return tuple(sorted({min(length, -(-(k * quarter) // 8) * 8) for k in (1, 2, 3)} | {length}))


def slot_count(length: int, need: int) -> int:
    """C: the smallest of `slot_levels(length)` that holds `need` loss-masked positions."""
    return min(level for level in slot_levels(length) if level >= need)


def logit_slots(loss_mask_BxT: np.ndarray, slots: int | None = None) -> np.ndarray:
    """[B, C] int32: per row, the positions with loss mask > 0 in ascending order, then -1;
    C = `slots`, or the smallest of `slot_levels(T)` that holds the fullest row."""
    mask_BxT = np.asarray(loss_mask_BxT) > 0
    need = int(mask_BxT.sum(axis=1).max(initial=0))
    c = slot_count(mask_BxT.shape[1], need) if slots is None else int(slots)
    if c < need:
        raise ValueError(f"logit slots: C={c} cannot hold a row with {need} loss-masked positions")
    order_BxC = np.argsort(~mask_BxT, axis=1, kind="stable")[:, :c]  # masked positions first, ascending
    return np.where(np.take_along_axis(mask_BxT, order_BxC, axis=1), order_BxC, -1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    """Everything that fixes the batch shapes; calling it lays out a list of examples.

    ``num_pairs`` is the pair capacity P; ``buckets`` the allowed T of standard/prefix;
    ``num_rows``/``row_length`` the fixed shape of packed batches.
    """

    layout: str = "standard"
    num_pairs: int = 8
    buckets: tuple[int, ...] = power_of_two_buckets(1024)
    num_rows: int = 0
    row_length: int = 0
    share_prefix: bool = False
    pad_id: int = 0
    pair_scalars: tuple[str, ...] = ()  # per-example float fields carried into `<name>_P` (0 for filler)
    prefix_min_saving: float = 0.1  # prefix: lay a batch out standard unless prefix rows save this much
    logit_slots: bool = False  # add `logit_slots_BxC`: logits only where the loss mask is set

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not 0.0 <= self.prefix_min_saving < 1.0:
            raise ValueError(f"prefix_min_saving must be in [0, 1), got {self.prefix_min_saving}")
        if self.num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {self.num_pairs}")
        if self.layout == "packed":
            if self.num_rows < 1 or self.row_length < 1:
                raise ValueError(
                    f"packed layout needs num_rows >= 1 and row_length >= 1, "
                    f"got {self.num_rows}, {self.row_length}"
                )
        elif not self.buckets or min(self.buckets) < 1:
            raise ValueError(f"buckets must be a non-empty tuple of positive lengths, got {self.buckets}")

    def segment_lengths(self, example: Example) -> list[int]:
        """Lengths of the example's segments in this layout (validates the ids, builds nothing)."""
        n = len(_ids(example, "prompt_ids", None))
        if is_unpaired(example):
            return [n + len(_ids(example, "completion_ids", None))]
        a, b = (len(_ids(example, k, None)) for k in ("chosen_ids", "rejected_ids"))
        if self.share_prefix or self.layout == "prefix":
            return [n + a + b + 1]
        return [n + a, n + b]

    def fits(self, example: Example) -> bool:
        """Whether the example alone fits in a batch (its rows within the largest bucket)."""
        lengths = self.segment_lengths(example)
        if self.layout == "packed":
            return FirstFitPacker(self.num_rows, self.row_length).add(lengths) is not None
        return max(lengths) <= max(self.buckets)

    def batch_stats(self, examples: Sequence[Example]) -> np.ndarray:
        """int64 [4]: (T of prefix rows, T of standard rows, loss-masked positions of the fullest
        prefix row, of the fullest standard row) of these examples (T bucketed; packed: the row
        length and the fullest packed row). The stats of a union of groups are the elementwise max
        of theirs, so processes merge their stats by a max and each derive the same `plan`."""
        if self.layout == "packed":
            need = max(self._packed_row_counts(examples), default=0)
            return np.asarray([self.row_length, self.row_length, need, need], np.int64)
        standard = dataclasses.replace(self, layout="standard", share_prefix=False)
        prefix = dataclasses.replace(self, layout="prefix")
        longest = lambda spec: max((max(spec.segment_lengths(e)) for e in examples), default=1)  # noqa: E731
        counts = [_loss_counts(e) for e in examples]
        t_standard = bucket_length(longest(standard), self.buckets)
        t_prefix = bucket_length(longest(prefix), self.buckets) if self.layout == "prefix" else t_standard
        return np.asarray([t_prefix, t_standard,
                           max((sum(c) for c in counts), default=0), max((max(c) for c in counts), default=0)],
                          np.int64)

    def plan(self, stats) -> "BatchPlan":
        """The layout of a batch whose (merged) `batch_stats` are `stats`."""
        t_prefix, t_standard, need_prefix, need_standard = (int(x) for x in np.asarray(stats).reshape(-1))
        if self.layout == "packed":
            prefix_rows, length, need = False, self.row_length, need_prefix
        else:
            prefix_rows = self.layout == "prefix" and t_prefix <= (1.0 - self.prefix_min_saving) * 2 * t_standard
            length, need = (t_prefix, need_prefix) if prefix_rows else (t_standard, need_standard)
        return BatchPlan(prefix_rows=prefix_rows, length=length,
                         slots=slot_count(length, need) if self.logit_slots else 0)

    def __call__(self, examples: Sequence[Example], plan: "BatchPlan | None" = None,
                 pair_offset: int = 0) -> dict[str, np.ndarray]:
        """The batch of `examples`, laid out by `plan` (default: the plan of these examples alone),
        its pairs numbered from `pair_offset`."""
        plan = self.plan(self.batch_stats(examples)) if plan is None else plan
        batch = self._layout(examples, plan, pair_offset)
        if self.logit_slots:
            batch[SLOTS_KEY] = logit_slots(batch["loss_mask_BxT"], plan.slots)
        for key in self.pair_scalars:  # e.g. precomputed reference log-probs of each pair
            values = np.zeros((self.num_pairs,), np.float32)
            for p, example in enumerate(examples):
                if key not in example:
                    raise ValueError(f"example {p}: missing per-pair field {key!r} (has {sorted(example)})")
                values[p] = float(example[key])
            batch[f"{key}_P"] = values
        return batch

    def _layout(self, examples: Sequence[Example], plan: "BatchPlan", pair_offset: int) -> dict[str, np.ndarray]:
        if self.layout == "packed":
            return packed_batch(
                examples,
                num_pairs=self.num_pairs,
                num_rows=self.num_rows,
                row_length=self.row_length,
                share_prefix=self.share_prefix,
                pad_id=self.pad_id,
                pair_offset=pair_offset,
            )
        build = prefix_batch if plan.prefix_rows else standard_batch
        return build(examples, num_pairs=self.num_pairs, buckets=self.buckets, pad_id=self.pad_id,
                     length=plan.length, pair_offset=pair_offset)

    def prefix_saves(self, examples: Sequence[Example]) -> bool:
        """Whether prefix rows, P x T_prefix, save at least `prefix_min_saving` of the standard
        layout's 2P x T_standard padded tokens (T: the bucketed longest row of each layout)."""
        return dataclasses.replace(self, layout="prefix").plan(self.batch_stats(examples)).prefix_rows

    def _packed_row_counts(self, examples: Sequence[Example]) -> list[int]:
        """Loss-masked positions per packed row, placing `examples` first-fit."""
        packer, rows = FirstFitPacker(self.num_rows, self.row_length), [0] * self.num_rows
        for example in examples:
            places = packer.add(self.segment_lengths(example))
            if places is None:  # the layout itself reports it
                break
            counts = _loss_counts(example)
            counts = [sum(counts)] if len(places) == 1 and len(counts) == 2 else counts
            for (row, _, _), count in zip(places, counts):
                rows[row] += count
        return rows


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """What every process must agree on to lay out its share of one global batch: prefix rows
    (else standard; prefix layout only), the row length T and the logit slots C (0: none)."""

    prefix_rows: bool
    length: int
    slots: int


def _loss_counts(example: Example) -> list[int]:
    """Loss-masked positions of each sequence of an example: its completions' lengths."""
    if is_unpaired(example):
        return [len(_ids(example, "completion_ids", None))]
    return [len(_ids(example, k, None)) for k in ("chosen_ids", "rejected_ids")]


def pack_groups(examples, spec: LayoutSpec):
    """Splits a stream of examples into consecutive batches' worth (lists) for ``spec``.

    Standard/prefix: groups of ``num_pairs``. Packed: a group closes when it holds ``num_pairs``
    examples or the next example no longer fits first-fit. Every example must ``spec.fits``.
    """
    group: list = []
    packer = FirstFitPacker(spec.num_rows, spec.row_length) if spec.layout == "packed" else None
    for i, example in enumerate(examples):
        if packer is not None:
            lengths = spec.segment_lengths(example)
            if packer.add(lengths) is None:
                if group:
                    yield group
                group, packer = [], FirstFitPacker(spec.num_rows, spec.row_length)
                if packer.add(lengths) is None:
                    raise ValueError(f"example {i} (segment lengths {lengths}) fits no packed batch")
        group.append(example)
        if len(group) == spec.num_pairs:
            yield group
            group = []
            if packer is not None:
                packer = FirstFitPacker(spec.num_rows, spec.row_length)
    if group:
        yield group
