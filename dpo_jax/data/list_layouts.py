"""Batches of ranked lists: one prompt shared by K scored responses (the listwise losses' data).

A list example is ``{"prompt_ids": [n], "response_ids": (K' arrays), "scores": float [K']}`` with
2 <= K' <= K (K = the batch's list size; a shorter list leaves its last slots empty). Response k
(0-based) is branch k + 1 of its list. The K-branch list segment puts the prompt once:

    list segment  [x_0 .. x_{n-2}] [x_{n-1} c1_0 .. c1_{a1-1}] ... [x_{n-1} cK_0 .. cK_{aK-1}]
                  branch 0         branch 1                        branch K
                  positions 0..n-2, then n-1 .. n-1+a_k for each branch (each restarts)

the K-branch form of `layouts.prefix_segment` (K = 2 is that segment): every target is the next
token of the same branch, so `logprobs.branch_logps` over the loss-masked positions gives each
response's summed log-prob. Layouts (P = list capacity):

* ``standard``: B = K P rows, row k P + p = the sequence segment (prompt, response k) of list p;
* ``prefix``: B = P rows, row p = the list segment of list p (the prompt encoded once);
* ``packed``: fixed rows, filled first-fit with each list's segments (one list segment with
  ``share_prefix``, else its K' sequence segments).

Besides `layouts.BATCH_KEYS` (``pair_ids_BxT`` index lists, ``pair_mask_P`` marks real lists) a
batch carries ``scores_PxK`` (0 in empty slots) and ``slot_mask_PxK`` (1 for real responses).
`ListLayoutSpec` has the interface of `layouts.LayoutSpec`, so the pipeline lays lists out as pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dpo_jax.data import layouts
from dpo_jax.data.layouts import PROMPT, BatchPlan, Example, FirstFitPacker, Segment

LIST_KEYS = ("scores_PxK", "slot_mask_PxK")


def list_segment(prompt: np.ndarray, completions: Sequence[np.ndarray]) -> Segment:
    """The K-branch segment of a prompt and its K >= 1 completions (see the module docstring)."""
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 1 or prompt.size == 0 or not completions:
        raise ValueError("a list segment needs a non-empty 1-D prompt and at least one completion")
    n, last = len(prompt), prompt[-1:]
    tokens, positions, branches, targets, mask = [prompt[:-1]], [np.arange(n - 1)], [np.full(n - 1, PROMPT)], \
        [prompt[1:]], [np.zeros(n - 1)]
    for k, completion in enumerate(completions, start=1):
        c = np.asarray(completion, np.int32)
        if c.ndim != 1 or c.size == 0:
            raise ValueError(f"completion {k} of a list segment must be a non-empty 1-D array")
        tokens.append(np.concatenate([last, c]))
        positions.append(np.arange(n - 1, n + len(c)))
        branches.append(np.full(len(c) + 1, k))
        targets.append(np.concatenate([c, [0]]))
        mask.append(np.concatenate([np.ones(len(c)), [0.0]]))
    cat = lambda parts, dt: np.concatenate(parts).astype(dt)  # noqa: E731
    return Segment(cat(tokens, np.int32), cat(positions, np.int32), cat(branches, np.int32),
                   cat(targets, np.int32), cat(mask, np.float32))


def list_parts(example: Example, index: int | None = None) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(prompt ids, response ids, scores float32) of a list example, validated; errors name the example."""
    where = "list example" if index is None else f"list example {index}"
    missing = [k for k in ("prompt_ids", "response_ids", "scores") if k not in example]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing} (has {sorted(example)})")

    def ids(value, key):
        a = np.asarray(value)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer) or a.min() < 0:
            raise ValueError(f"{where}: {key!r} must be a non-empty 1-D array of token ids >= 0, "
                             f"got shape {a.shape} dtype {a.dtype}")
        return a.astype(np.int32)

    responses = [ids(r, f"response_ids[{k}]") for k, r in enumerate(example["response_ids"])]
    scores = np.asarray(example["scores"], np.float32).reshape(-1)
    if len(responses) < 2 or len(scores) != len(responses) or not np.all(np.isfinite(scores)):
        raise ValueError(f"{where}: needs >= 2 responses and one finite score each, got {len(responses)} "
                         f"responses and scores {scores.tolist()}")
    return ids(example["prompt_ids"], "prompt_ids"), responses, scores


def list_segments(prompt: np.ndarray, responses: Sequence[np.ndarray], share_prefix: bool = False) -> list[Segment]:
    """The segments of one list (`list_parts`), in placement order: its list segment, or K'
    sequence segments."""
    if share_prefix:
        return [list_segment(prompt, responses)]
    return [layouts.sequence_segment(prompt, r, k) for k, r in enumerate(responses, start=1)]


@dataclasses.dataclass(frozen=True)
class ListLayoutSpec:
    """The batch shapes of ranked lists (``num_pairs`` = list capacity P, ``list_size`` = K slots);
    calling it lays out a list of list examples. The interface of `layouts.LayoutSpec`."""

    layout: str = "prefix"
    num_pairs: int = 8
    list_size: int = 4
    buckets: tuple[int, ...] = layouts.power_of_two_buckets(4096)
    num_rows: int = 0
    row_length: int = 0
    share_prefix: bool = True
    pad_id: int = 0
    logit_slots: bool = False

    def __post_init__(self):
        if self.layout not in layouts.LAYOUTS:
            raise ValueError(f"layout must be one of {layouts.LAYOUTS}, got {self.layout!r}")
        if self.num_pairs < 1:
            raise ValueError(f"num_pairs (lists per batch) must be >= 1, got {self.num_pairs}")
        if self.list_size < 2:
            raise ValueError(f"list_size must be >= 2 (responses per list), got {self.list_size}")
        if self.layout == "packed" and (self.num_rows < 1 or self.row_length < 1):
            raise ValueError(f"packed layout needs num_rows >= 1 and row_length >= 1, got {self.num_rows}, "
                             f"{self.row_length}")
        if self.layout != "packed" and (not self.buckets or min(self.buckets) < 1):
            raise ValueError(f"buckets must be a non-empty tuple of positive lengths, got {self.buckets}")

    @property
    def shared(self) -> bool:
        """Whether a list's prompt is encoded once (its list segment) rather than K' times."""
        return self.layout == "prefix" or (self.layout == "packed" and self.share_prefix)

    def segment_lengths(self, example: Example) -> list[int]:
        prompt, responses, _ = list_parts(example)
        n = len(prompt)
        if self.shared:
            return [n - 1 + sum(len(r) + 1 for r in responses)]
        return [n + len(r) for r in responses]

    def _loss_counts(self, example: Example) -> list[int]:
        counts = [len(r) for r in list_parts(example)[1]]
        return [sum(counts)] if self.shared else counts

    def fits(self, example: Example) -> bool:
        """Whether the example alone fits a batch: at most K responses, rows within the layout."""
        if len(list_parts(example)[1]) > self.list_size:
            return False
        lengths = self.segment_lengths(example)
        if self.layout == "packed":
            return FirstFitPacker(self.num_rows, self.row_length).add(lengths) is not None
        return max(lengths) <= max(self.buckets)

    def batch_stats(self, examples: Sequence[Example]) -> np.ndarray:
        """int64 [4] as `layouts.LayoutSpec.batch_stats` (T twice, the fullest row's loss count twice);
        processes merge them by an elementwise max."""
        if self.layout == "packed":
            packer, rows = FirstFitPacker(self.num_rows, self.row_length), [0] * self.num_rows
            for example in examples:
                places = packer.add(self.segment_lengths(example))
                if places is None:
                    break
                for (row, _, _), count in zip(places, self._loss_counts(example)):
                    rows[row] += count
            need = max(rows, default=0)
            return np.asarray([self.row_length, self.row_length, need, need], np.int64)
        longest = max((max(self.segment_lengths(e)) for e in examples), default=1)
        t = layouts.bucket_length(longest, self.buckets)
        need = max((max(self._loss_counts(e)) for e in examples), default=0)
        return np.asarray([t, t, need, need], np.int64)

    def plan(self, stats) -> BatchPlan:
        length, need = int(np.asarray(stats).reshape(-1)[0]), int(np.asarray(stats).reshape(-1)[2])
        return BatchPlan(prefix_rows=self.layout == "prefix", length=length,
                         slots=layouts.slot_count(length, need) if self.logit_slots else 0)

    def __call__(self, examples: Sequence[Example], plan: BatchPlan | None = None,
                 pair_offset: int = 0) -> dict[str, np.ndarray]:
        """The batch of `examples` laid out by `plan` (default: theirs alone), lists numbered from
        `pair_offset` (a process's first list in the global batch)."""
        if len(examples) > self.num_pairs:
            raise ValueError(f"{len(examples)} lists exceed the list capacity num_pairs={self.num_pairs}")
        p_cap, k_cap = self.num_pairs, self.list_size
        parsed = [list_parts(example, p) for p, example in enumerate(examples)]  # errors name the example
        for p, (_, responses, _) in enumerate(parsed):
            if len(responses) > k_cap:
                raise ValueError(f"list example {p}: {len(responses)} responses exceed list_size={k_cap}")
        plan = self.plan(self.batch_stats(examples)) if plan is None else plan
        segments = [list_segments(prompt, responses, self.shared) for prompt, responses, _ in parsed]
        num_rows = {"standard": k_cap * p_cap, "prefix": p_cap, "packed": self.num_rows}[self.layout]
        length = plan.length if self.layout == "packed" else layouts.fitted_length(
            max((len(seg) for segs in segments for seg in segs), default=1), self.buckets, plan.length)
        batch = layouts.empty_batch(num_rows, length, p_cap, self.pad_id)
        batch["scores_PxK"] = np.zeros((p_cap, k_cap), np.float32)
        batch["slot_mask_PxK"] = np.zeros((p_cap, k_cap), np.float32)
        packer = FirstFitPacker(self.num_rows, self.row_length) if self.layout == "packed" else None
        for p, ((_, _, scores), segs) in enumerate(zip(parsed, segments)):
            if packer is not None:
                places = packer.add([len(s) for s in segs])
                if places is None:
                    raise ValueError(f"list example {p} (segment lengths {[len(s) for s in segs]}) does not fit "
                                     f"in {self.num_rows} rows of length {self.row_length} after lists 0..{p - 1}")
            elif self.shared:
                places = [(p, 0, 1)]
            else:
                places = [(k * p_cap + p, 0, 1) for k in range(len(segs))]
            for seg, (row, offset, segment_id) in zip(segs, places):
                layouts.place_segment(batch, row, offset, seg, segment_id, pair_offset + p)
            batch["pair_mask_P"][p] = 1.0
            batch["scores_PxK"][p, :len(scores)] = scores
            batch["slot_mask_PxK"][p, :len(scores)] = 1.0
        if self.logit_slots:
            batch[layouts.SLOTS_KEY] = layouts.logit_slots(batch["loss_mask_BxT"], plan.slots)
        return batch
