"""Row schemas of preference data, normalized to one canonical record per row.

A row is a mapping (a dict from HF `datasets`, a JSON line). Four schemas are accepted; the column
names are configurable (`FormatConfig`):

| format            | columns                          | values                                      |
| ----------------- | -------------------------------- | ------------------------------------------- |
| `standard`        | prompt, chosen, rejected         | strings                                     |
| `implicit_prompt` | chosen, rejected                 | full texts sharing the prompt as a prefix   |
| `conversational`  | [prompt,] chosen, rejected       | lists of `{"role", "content"}` messages     |
| `unpaired`        | prompt, completion, label        | strings or message lists; `label` a bool    |
| `listwise`        | see `dpo_jax.data.listwise`      | K >= 2 responses with scores or a ranking   |

Paired rows become `Pair`, unpaired rows `Unpaired`; listwise rows are read by
`dpo_jax.data.list_tokenize` (the losses of ranked lists train on them). Conversational records keep their messages;
the tokenizer renders them with the chat template (`dpo_jax.data.tokenize`).

Implicit prompts (Anthropic HH and TRL's "implicit prompt" datasets) are split off as the longest
common prefix P of chosen and rejected:
- text: if P contains `FormatConfig.assistant_marker` (default `"\\n\\nAssistant:"`), the prompt ends
  right after the LAST marker in P, so it holds the whole dialogue up to the final assistant header
  and the completions start with the answers, even when both answers begin with the same words
  (HH: `prompt = "\\n\\nHuman: ...\\n\\nAssistant:"`, `chosen = " Sure, ..."`). Without the marker,
  TRL's `extract_prompt` rule: the prompt is P, less a trailing space, which goes to the completions.
- messages: the prompt is the longest common prefix of the two message lists (TRL's rule).

Bad input: a row that lacks a column its format needs raises `FormatError`, naming the row, the
columns found and the schemas accepted (`datasets` gives every row of a file the same columns, so
this means the column is absent from the whole file; a key absent from one line of a JSON Lines file
reads as null). A bad value (null, not a string, an empty or whitespace-only string, malformed
messages, a non-bool label, chosen == rejected, no shared prompt) drops the row; the `DropCounter`
counts drops by reason. With `strict=True` a bad value raises `RowError` naming the row and the field.

chosen == rejected is dropped (`chosen_equals_rejected`): such a pair carries no preference, and its
DPO loss is the constant log 2 with no gradient. TRL keeps such rows; here they are dropped and counted.

Drop reasons: this module owns every name a row can be dropped under (the `DropCounter` keys and the
`dropped/<reason>` keys of the pipeline's report): per field, `<field>_<kind>` (`field_reason`), with
the field one of prompt, chosen, rejected, completion; per row, the `DROP_*` constants.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Union

import numpy as np

FORMATS = ("standard", "implicit_prompt", "conversational", "unpaired", "listwise")
# The columns that mark a listwise row (K scored responses; parsed by `dpo_jax.data.listwise`).
LISTWISE_COLUMNS = ("completions", "responses", "ranking")

Message = dict  # {"role": str, "content": str, ...}: a chat message, kept as given.
Text = Union[str, tuple]  # a string, or a tuple of messages for conversational records


# ----------------------------------------------------------------------------- drop reasons

# Kinds of bad field, reported as `<field>_<kind>` (see `field_reason`).
NULL = "null"  # None: null in the file, or a key absent from one line of a JSON Lines file
NOT_STRING = "not_string"
NOT_MESSAGES = "not_messages"  # conversational: not a list of messages
BAD_MESSAGE = "bad_message"  # conversational: a message that is not {"role": str, "content": str}
EMPTY = "empty"  # an empty or whitespace-only string, no messages, or nothing left after the shared prompt
IDS_EMPTY = "ids_empty"  # tokenized to no ids (after the shared prompt, for a completion)
# Whole-row reasons.
DROP_CHOSEN_EQUALS_REJECTED = "chosen_equals_rejected"  # no preference to learn (see the module doc)
DROP_NO_SHARED_PROMPT = "no_shared_prompt"  # implicit prompt: chosen and rejected share no prefix
DROP_LABEL_NOT_BOOL = "label_not_bool"  # unpaired: the label is not a bool (or 0 / 1)
DROP_PROMPT_FILLS_MAX_LENGTH = "prompt_fills_max_length"  # keep_start: no room left for a completion
DROP_COMPLETION_FILLS_MAX_LENGTH = "completion_fills_max_length"  # keep_end: a completion alone fills it
DROP_IDS_EQUAL = "chosen_ids_equal_rejected_ids"  # identical once tokenized and truncated
DROP_TOKENIZE = "tokenize"  # a tokenize step without a drop counter returned None
DROP_TOO_LONG = "too_long"  # the example fits no batch of the layout


def field_reason(field: str, kind: str) -> str:
    """The drop reason of a bad `field` (prompt, chosen, rejected, completion) of this `kind`."""
    return f"{field}_{kind}"


class RowProblem(ValueError):
    """A bad row. The message names, where known, the source (a file), the row (0-based), the field,
    what is wrong with it and the drop reason: `pairs.jsonl row 4: field 'chosen' is empty (chosen_empty)`."""

    def __init__(self, detail: str, field: str | None = None, reason: str | None = None,
                 row: int | None = None, source: str | None = None):
        self.detail, self.field, self.reason, self.row, self.source = detail, field, reason, row, source
        super().__init__(self.message())

    def message(self) -> str:
        where = " ".join(x for x in (self.source, None if self.row is None else f"row {self.row}") if x)
        what = f"field {self.field!r} {self.detail}" if self.field else self.detail
        if self.reason:
            what += f" ({self.reason})"
        return f"{where}: {what}" if where else what

    def at(self, source: str | None = None, row: int | None = None, field: str | None = None) -> "RowProblem":
        """The same problem located in `source` at `row` (and named by column `field`), where given."""
        return type(self)(self.detail, field or self.field, self.reason,
                          self.row if row is None else row, source or self.source)

    def __reduce__(self):  # picklable across worker processes
        return type(self), (self.detail, self.field, self.reason, self.row, self.source)


class FormatError(RowProblem):
    """A row does not fit the schema of its format (a missing column, not a mapping)."""


class RowError(RowProblem):
    """A bad value in a row, raised instead of a drop when `strict=True`."""


@dataclasses.dataclass(frozen=True)
class FormatConfig:
    """Which schema the rows follow and the names of its columns.

    `format`: "auto" (from the columns of the first row seen, see `detect_format`) or one of
    `FORMATS`. `assistant_marker`: where implicit text prompts are split (None: TRL's rule only).
    """

    format: str = "auto"
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"
    assistant_marker: str | None = "\n\nAssistant:"

    def __post_init__(self):
        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(f"FormatConfig.format={self.format!r}: expected 'auto' or one of {FORMATS}")

    def schemas(self) -> str:
        """The accepted schemas, with this config's column names (for error messages)."""
        p, c, r = self.prompt, self.chosen, self.rejected
        return (
            f"standard: {p}, {c}, {r} (strings); "
            f"implicit_prompt: {c}, {r} (strings sharing the prompt as a prefix); "
            f"conversational: [{p},] {c}, {r} (lists of {{role, content}} messages); "
            f"unpaired: {p}, {self.completion}, {self.label} (strings or messages; {self.label} a bool); "
            f"listwise: instruction + completions (UltraFeedback), {p} + responses + scores, or {p} + ranking"
        )

    def required(self, fmt: str) -> tuple[str, ...]:
        """The columns format `fmt` needs."""
        return {
            "standard": (self.prompt, self.chosen, self.rejected),
            "implicit_prompt": (self.chosen, self.rejected),
            "conversational": (self.chosen, self.rejected),
            "unpaired": (self.prompt, self.completion, self.label),
            "listwise": (),  # one of several schemas; `listwise.parse_listwise_row` names what is missing
        }[fmt]


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference pair. Texts are strings, or tuples of messages when `conversational`."""

    prompt: Text
    chosen: Text
    rejected: Text
    conversational: bool = False


@dataclasses.dataclass(frozen=True)
class Unpaired:
    """One unpaired completion with a desirability label (KTO-style losses)."""

    prompt: Text
    completion: Text
    label: bool
    conversational: bool = False


Record = Union[Pair, Unpaired]


class DropCounter:
    """Counts rows seen, kept and dropped by reason, plus non-fatal events (e.g. truncations).

    One per transform instance; `merge` adds another's counts (e.g. from several workers) and
    `as_dict` gives the JSON-ready summary for the run's data report.
    """

    def __init__(self):
        self.seen = 0
        self.kept = 0
        self.dropped: collections.Counter = collections.Counter()
        self.events: collections.Counter = collections.Counter()
        self.first_row: dict[str, int] = {}  # reason -> index of the first row dropped for it

    def drop(self, reason: str, row_index: int | None = None) -> None:
        self.dropped[reason] += 1
        if row_index is not None:
            self.first_row.setdefault(reason, row_index)

    def event(self, name: str, n: int = 1) -> None:
        self.events[name] += n

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: "DropCounter") -> "DropCounter":
        self.seen += other.seen
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.events.update(other.events)
        for reason, i in other.first_row.items():
            self.first_row[reason] = min(i, self.first_row.get(reason, i))
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "events": dict(sorted(self.events.items())),
            "first_row": dict(sorted(self.first_row.items())),
        }

    def __repr__(self) -> str:
        return f"DropCounter({self.as_dict()})"


class _Bad(Exception):
    """Internal: a bad value; becomes a drop (or a RowError when strict)."""

    def __init__(self, reason: str, column: str, detail: str):
        super().__init__(detail)
        self.reason, self.column, self.detail = reason, column, detail


def is_messages(value: Any) -> bool:
    """True for a non-empty list/tuple whose items are all mappings with a 'role' key."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m for m in value)
    )


def detect_format(row: Mapping[str, Any], config: FormatConfig = FormatConfig()) -> str:
    """The format of `row` from its columns (and, for pairs, whether `chosen` holds messages).

    listwise if a column of `LISTWISE_COLUMNS` is present; unpaired if the completion and label
    columns are; else, with chosen and rejected:
    conversational if chosen is a list, standard if there is a prompt column, else implicit_prompt.
    """
    if not isinstance(row, Mapping):
        raise FormatError(f"expected a mapping of column -> value, got {type(row).__name__}")
    keys = set(row.keys())
    if keys & set(LISTWISE_COLUMNS):
        return "listwise"
    if config.completion in keys and config.label in keys:
        return "unpaired"
    if config.chosen in keys and config.rejected in keys:
        if isinstance(row[config.chosen], (list, tuple)):
            return "conversational"
        return "standard" if config.prompt in keys else "implicit_prompt"
    raise FormatError(
        f"cannot detect the format: columns found {sorted(keys)}; accepted schemas: {config.schemas()}"
    )


def _null(value: Any, role: str, column: str) -> None:
    if value is None:
        raise _Bad(field_reason(role, NULL), column, "is null")


def _text(value: Any, role: str, column: str) -> str:
    _null(value, role, column)
    if not isinstance(value, str):
        raise _Bad(field_reason(role, NOT_STRING), column, f"is {type(value).__name__}, expected a string")
    if not value.strip():
        raise _Bad(field_reason(role, EMPTY), column, "is empty")
    return value


def _messages(value: Any, role: str, column: str) -> tuple:
    _null(value, role, column)
    if not isinstance(value, (list, tuple)):
        raise _Bad(field_reason(role, NOT_MESSAGES), column,
                   f"is {type(value).__name__}, expected a list of messages")
    if not value:
        raise _Bad(field_reason(role, EMPTY), column, "is an empty list of messages")
    out = []
    for j, m in enumerate(value):
        ok = isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        if not ok:
            raise _Bad(
                field_reason(role, BAD_MESSAGE),
                column,
                f"message {j} is not {{'role': str, 'content': str}}: {m!r:.80}",
            )
        out.append(dict(m))
    return tuple(out)


def _value(value: Any, role: str, column: str, conversational: bool) -> Text:
    return _messages(value, role, column) if conversational else _text(value, role, column)


def _label(value: Any, column: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise _Bad(DROP_LABEL_NOT_BOOL, column, f"is {value!r:.40} ({type(value).__name__}), expected a bool")


def split_implicit_text(chosen: str, rejected: str, assistant_marker: str | None) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) from two full texts; see the module doc."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    common = chosen[:n]
    cut = common.rfind(assistant_marker) if assistant_marker else -1
    if cut >= 0:
        n = cut + len(assistant_marker)
    elif n > 0 and common[-1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def split_implicit_messages(chosen: tuple, rejected: tuple) -> tuple[tuple, tuple, tuple]:
    """(prompt, chosen, rejected) message tuples: the prompt is the longest common prefix."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


class RowNormalizer:
    """Callable row -> `Pair` | `Unpaired` | None (dropped); counts drops in `self.drops`.

    The format is fixed by `config.format`, or detected from the first row when "auto". Picklable,
    so it can run inside a grain `MapTransform` (each worker then holds its own counter).
    """

    def __init__(
        self, config: FormatConfig = FormatConfig(), strict: bool = False, drops: DropCounter | None = None
    ):
        self.config = config
        self.strict = strict
        self.drops = drops if drops is not None else DropCounter()
        self.format = None if config.format == "auto" else config.format

    def __call__(self, row: Mapping[str, Any], index: int | None = None) -> Record | None:
        cfg = self.config
        if not isinstance(row, Mapping):
            raise FormatError(f"expected a mapping of column -> value, got {type(row).__name__}", row=index)
        if self.format is None:
            try:
                self.format = detect_format(row, cfg)
            except FormatError as err:
                raise err.at(row=index) from None
        missing = [c for c in cfg.required(self.format) if c not in row]
        if missing:
            raise FormatError(
                f"missing column(s) {missing} for format {self.format!r}; columns found: "
                f"{sorted(row.keys())}; accepted schemas: {cfg.schemas()}",
                row=index,
            )
        self.drops.seen += 1
        try:
            record = self._normalize(row)
        except _Bad as bad:
            if self.strict:
                raise RowError(bad.detail, bad.column, bad.reason, index) from None
            self.drops.drop(bad.reason, index)
            return None
        self.drops.kept += 1
        return record

    def _normalize(self, row: Mapping[str, Any]) -> Record:
        cfg, fmt = self.config, self.format
        if fmt == "listwise":
            raise FormatError("listwise rows (K scored responses) train the losses of ranked lists "
                              "(plackett_luce, lipo_lambda); they are read by data.list_tokenize, not as pairs")
        if fmt == "unpaired":
            conv = is_messages(row[cfg.completion])
            prompt = _value(row[cfg.prompt], "prompt", cfg.prompt, conv)
            completion = _value(row[cfg.completion], "completion", cfg.completion, conv)
            return Unpaired(prompt, completion, _label(row[cfg.label], cfg.label), conv)
        conv = fmt == "conversational"
        chosen = _value(row[cfg.chosen], "chosen", cfg.chosen, conv)
        rejected = _value(row[cfg.rejected], "rejected", cfg.rejected, conv)
        if chosen == rejected:
            raise _Bad(DROP_CHOSEN_EQUALS_REJECTED, cfg.chosen, f"equals field {cfg.rejected!r}")
        # A conversational row whose prompt column is plain text (UltraFeedback, Tulu 3: the text of the
        # first user turn) takes its prompt from the messages chosen and rejected share, as TRL does.
        if fmt == "standard" or (conv and cfg.prompt in row and is_messages(row[cfg.prompt])):
            prompt = _value(row[cfg.prompt], "prompt", cfg.prompt, conv)
        elif conv:
            prompt, chosen, rejected = split_implicit_messages(chosen, rejected)
        else:
            prompt, chosen, rejected = split_implicit_text(chosen, rejected, cfg.assistant_marker)
        if not (prompt if conv else prompt.strip()):
            raise _Bad(
                DROP_NO_SHARED_PROMPT, cfg.chosen, f"shares no prompt prefix with field {cfg.rejected!r}"
            )
        for text, role, column in ((chosen, "chosen", cfg.chosen), (rejected, "rejected", cfg.rejected)):
            if not (text if conv else text.strip()):
                raise _Bad(field_reason(role, EMPTY), column, "is empty once the shared prompt is removed")
        return Pair(prompt, chosen, rejected, conv)


def normalize_rows(
    rows: Iterable[Mapping[str, Any]],
    config: FormatConfig = FormatConfig(),
    strict: bool = False,
    drops: DropCounter | None = None,
) -> list[Record]:
    """Normalize an iterable of rows (row indices count from 0); the dropped rows are left out."""
    norm = RowNormalizer(config, strict=strict, drops=drops)
    out = [norm(row, i) for i, row in enumerate(rows)]
    return [r for r in out if r is not None]
