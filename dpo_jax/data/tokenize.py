"""Tokenization of canonical records (`formats.Pair`, `formats.Unpaired`) with TRL 1.16's rules.

Text records, as TRL's `DPOTrainer._prepare_dataset`:
- the EOS token (as text) is appended to each completion unless it already ends with it;
- `ids(prompt)` and `ids(prompt + completion)` come from the tokenizer's default call (with its own
  special tokens, e.g. a BOS; a BOS doubled by a prompt that already starts with it is removed);
- the completion ids are the joint ids after the prompt ids.
Conversational records (messages):
- prompt ids: the chat template over the prompt messages with `add_generation_prompt=True`, so the
  assistant header belongs to the prompt;
- joint ids: the chat template over prompt + completion messages. `apply_chat_template` tokenizes
  with `add_special_tokens=False`, so BOS/EOS come from the template only (no doubled BOS, no EOS
  appended).

Boundary: when the joint ids do not start with the prompt ids (a merge across the boundary,
whitespace normalization, a template that re-renders earlier turns), the completion starts where
they diverge. With d = the shortest common-prefix length over the pair's completions,
`prompt = prompt_ids[:d]` and `completion = joint[d:]`, so `prompt + completion` is exactly the joint
tokenization and the prompt stays shared (TRL slices at `len(prompt_ids)` instead). A
`BoundaryWarning` is issued once per instance; every such row counts as the event
`prompt_boundary_mismatch`. Without a mismatch the ids equal TRL's.

Truncation (L = `max_length`, Lp = `max_prompt_length`; `truncation_mode` picks the end kept):
- keep_start (TRL 1.16's default): the prompt keeps its first Lp tokens; each sequence keeps its
  first L tokens, i.e. completions keep their first L - len(prompt) tokens (as TRL 1.16 per row). A
  pair whose prompt alone fills L (len(prompt) >= L) is dropped: `prompt_fills_max_length`.
- keep_end: the prompt keeps its last Lp tokens, then loses its start until the longest completion
  fits in L (TRL 1.16 keeps the last L tokens of each sequence; with one shared prompt, the shorter
  completion's sequence keeps the same prompt as the longer's). Completions are never cut from the
  front: a pair whose longest completion alone fills L is dropped: `completion_fills_max_length`.
Other drops: `prompt_ids_empty`, `<field>_ids_empty`, `chosen_ids_equal_rejected_ids` (nothing to
prefer once tokenized and truncated). Counts live in `self.drops` (a `formats.DropCounter`); the
reason names are `formats`'s. With `strict=True` a drop raises `formats.RowError` naming the field.

Output per pair: `{"prompt_ids", "chosen_ids", "rejected_ids"}`, per unpaired record
`{"prompt_ids", "completion_ids", "label"}`: 1-D int32 arrays (label: a 0-d bool array).
`RowTokenizer` chains `formats.RowNormalizer` and `PairTokenizer`: raw row -> example | None.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from dpo_jax.data import formats
from dpo_jax.data.formats import DropCounter, FormatConfig, Pair, Record, RowError, RowNormalizer, Unpaired

TRUNCATION_MODES = ("keep_start", "keep_end")


class BoundaryWarning(UserWarning):
    """The tokenized prompt is not a prefix of the tokenized prompt + completion."""


class Dropped(Exception):
    """A dropped pair (raised by `truncate_ids` and `PairTokenizer`'s checks): `reason` is the drop
    counter's key, `field` the record field at fault and `detail` what is wrong with it (for `strict`)."""

    def __init__(self, reason: str, field: str | None = None, detail: str = "was dropped"):
        super().__init__(reason)
        self.reason, self.field, self.detail = reason, field, detail


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):  # stops at the shorter
        if x != y:
            break
        n += 1
    return n


def truncate_ids(
    prompt: list[int],
    completions: list[list[int]],
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str,
    names: Sequence[str] = ("chosen", "rejected"),
) -> tuple[list[int], list[list[int]]]:
    """Apply the truncation rules of the module doc; raises `Dropped(reason)` when a pair can't fit
    (`names`: the fields of `completions`, for its message)."""
    keep_end = truncation_mode == "keep_end"
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:] if keep_end else prompt[:max_prompt_length]
    if max_length is None:
        return prompt, completions
    if keep_end:
        lengths = [len(c) for c in completions]
        longest = max(lengths)
        if longest >= max_length:
            raise Dropped(formats.DROP_COMPLETION_FILLS_MAX_LENGTH, names[lengths.index(longest)],
                          f"has {longest} tokens, filling max_length={max_length} (keep_end never cuts a completion)")
        room = max_length - longest
        return (prompt[-room:] if len(prompt) > room else prompt), completions
    room = max_length - len(prompt)
    if room < 1:
        raise Dropped(formats.DROP_PROMPT_FILLS_MAX_LENGTH, "prompt",
                      f"has {len(prompt)} tokens, filling max_length={max_length} with no room for a completion")
    return prompt, [c[:room] for c in completions]


class PairTokenizer:
    """Callable record -> dict of int32 arrays | None (dropped); see the module doc for the rules.

    Handles `Pair` and `Unpaired` records. Pure given the tokenizer apart from `self.drops` and the
    warn-once flag; picklable (for grain `MapTransform`s; each worker process keeps its own counts).
    `strict`: a drop raises `formats.RowError` (the field named by its record role) instead.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        truncation_mode: str = "keep_start",
        drops: DropCounter | None = None,
        strict: bool = False,
    ):
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode={truncation_mode!r}: expected one of {TRUNCATION_MODES}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(
                f"max_length={max_length!r}: expected None or an int >= 2 (a prompt and a completion token)"
            )
        if max_prompt_length is not None and (
            not isinstance(max_prompt_length, int) or max_prompt_length < 1
        ):
            raise ValueError(f"max_prompt_length={max_prompt_length!r}: expected None or an int >= 1")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.drops = drops if drops is not None else DropCounter()
        self.strict = strict
        self._warned = False

    def __call__(self, record: Record, index: int | None = None) -> dict[str, np.ndarray] | None:
        if isinstance(record, Pair):
            names, completions = ("chosen", "rejected"), (record.chosen, record.rejected)
        elif isinstance(record, Unpaired):
            names, completions = ("completion",), (record.completion,)
        else:
            raise ValueError(
                f"PairTokenizer expects a formats.Pair or formats.Unpaired, got {type(record).__name__}"
            )
        self.drops.seen += 1
        try:
            prompt_ids, completion_ids = self.encode(
                record.prompt, completions, record.conversational, names
            )
        except Dropped as d:
            if self.strict:
                raise RowError(d.detail, d.field, d.reason, index) from None
            self.drops.drop(d.reason, index)
            return None
        self.drops.kept += 1
        out = {"prompt_ids": np.asarray(prompt_ids, np.int32)}
        for name, ids in zip(names, completion_ids, strict=True):
            out[f"{name}_ids"] = np.asarray(ids, np.int32)
        if isinstance(record, Unpaired):
            out["label"] = np.asarray(record.label, np.bool_)
        return out

    def encode(
        self, prompt, completions, conversational: bool, names
    ) -> tuple[list[int], list[list[int]]]:
        """(prompt ids, ids of each completion) of one prompt and any number of completions, by the
        module's rules (boundary, truncation); raises `Dropped` naming the field (`names`)."""
        if conversational:
            prompt_ids, joints = self._encode_chat(prompt, completions)
        else:
            prompt_ids, joints = self._encode_text(prompt, completions)
        prefix = [common_prefix_len(prompt_ids, j) for j in joints]
        if min(prefix) < len(prompt_ids):
            self.drops.event("prompt_boundary_mismatch")
            self._warn(prompt_ids, joints[prefix.index(min(prefix))])
        d = min(prefix)
        prompt_ids, completion_ids = prompt_ids[:d], [j[d:] for j in joints]
        if not prompt_ids:
            raise Dropped(formats.field_reason("prompt", formats.IDS_EMPTY), "prompt", "tokenizes to no ids")
        for name, ids in zip(names, completion_ids, strict=True):
            if not ids:
                raise Dropped(formats.field_reason(name, formats.IDS_EMPTY), name,
                              "tokenizes to no ids after the shared prompt")
        n_prompt, n_comp = len(prompt_ids), [len(c) for c in completion_ids]
        prompt_ids, completion_ids = truncate_ids(
            prompt_ids, completion_ids, self.max_length, self.max_prompt_length, self.truncation_mode, names
        )
        if len(prompt_ids) < n_prompt:
            self.drops.event("prompt_truncated")
        if [len(c) for c in completion_ids] != n_comp:
            self.drops.event("completion_truncated")
        if len(completion_ids) == 2 and completion_ids[0] == completion_ids[1]:
            raise Dropped(formats.DROP_IDS_EQUAL, names[0],
                          f"has the same ids as field {names[1]!r} once tokenized and truncated")
        return prompt_ids, completion_ids

    def _encode_text(self, prompt: str, completions) -> tuple[list[int], list[list[int]]]:
        tok = self.tokenizer
        eos = getattr(tok, "eos_token", None)
        if not eos:
            raise ValueError(
                "the tokenizer has no eos_token: text completions need one appended (set tokenizer.eos_token)"
            )
        texts = [prompt] + [prompt + (c if c.endswith(eos) else c + eos) for c in completions]
        ids = [self._single_bos(list(x)) for x in tok(texts)["input_ids"]]
        return ids[0], ids[1:]

    def _single_bos(self, ids: list[int]) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids

    def _encode_chat(self, prompt: tuple, completions) -> tuple[list[int], list[list[int]]]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise ValueError(
                "a conversational record needs a tokenizer with a chat template "
                "(tokenizer.chat_template is None)"
            )
        render = tok.apply_chat_template
        prompt_ids = render(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=False)
        joints = [list(render(list(prompt) + list(c), tokenize=True, return_dict=False)) for c in completions]
        return list(prompt_ids), joints

    def _warn(self, prompt_ids: list[int], joint: list[int]) -> None:
        if self._warned:
            return
        self._warned = True
        d = common_prefix_len(prompt_ids, joint)
        warnings.warn(
            f"the tokenized prompt ({len(prompt_ids)} ids) is not a prefix of the tokenized "
            f"prompt + completion: they diverge at id {d} (prompt {prompt_ids[d : d + 3]} vs joint "
            f"{joint[d : d + 3]}); the completion starts there and the prompt is cut to the shared "
            "prefix. Counted as event 'prompt_boundary_mismatch'; warned once per PairTokenizer.",
            BoundaryWarning,
            stacklevel=4,
        )


class RowTokenizer:
    """Raw row -> tokenized example | None: `formats.RowNormalizer`, then `PairTokenizer`.

    The pipeline's per-row callable. `drops` is the combined report: rows seen by the normalizer,
    kept by the tokenizer, drops of both stages by reason, the tokenizer's events. `strict`: any drop
    raises `formats.RowError` naming the row (when given) and the column at fault.
    """

    def __init__(
        self, tokenizer: Any, config: FormatConfig = FormatConfig(), strict: bool = False, **tokenize_kwargs
    ):
        self.normalize = RowNormalizer(config, strict=strict)
        self.tokenize = PairTokenizer(tokenizer, strict=strict, **tokenize_kwargs)
        self.strict = strict

    def __call__(self, row, index: int | None = None) -> dict[str, np.ndarray] | None:
        record = self.normalize(row, index)
        if record is None:
            return None
        try:
            return self.tokenize(record, index)
        except RowError as err:  # name the column, not the record field
            column = getattr(self.normalize.config, err.field, err.field) if err.field else None
            raise err.at(field=column) from None

    @property
    def drops(self) -> DropCounter:
        a, b = self.normalize.drops, self.tokenize.drops
        out = DropCounter().merge(a).merge(b)
        out.seen, out.kept = a.seen, b.kept
        return out
