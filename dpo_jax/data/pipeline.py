"""Preference data pipeline: the grain iterator over the rows ``sources`` reads, the eval batches.

    rows -> seeded shuffle (a new permutation each epoch) -> shard by process -> repeat
         -> tokenize (a row -> example callable, optionally in threads / worker processes)
         -> drop (tokenizer said None, or too long for the layout) -> group P examples
         -> agree on the batch plan with the other processes -> layout

Sharding happens after the shuffle: in epoch e, process i of n takes positions i, i+n, ... of
permutation e restricted to its first floor(N/n)*n entries, so the processes see disjoint rows,
the same number of rows each, and together every row of the epoch (all of them when n divides N).
With several processes each lays out its own P examples of a global batch of n P, with the
batch plan (prefix or standard rows, T, C) merged from every process (``agree``: an elementwise
max over processes, ``multihost.agree_max``) and its pairs numbered from ``pair_offset``, so the
assembled global batch is the one a single process would have laid out (``layouts``). With no row
dropped, step s of n processes trains on the same pairs as step s of one process.
The train iterator is a ``grain.DatasetIterator``: ``get_state()``/``set_state()`` (JSON, what
grain's orbax checkpoint handler stores) restore it exactly, mid-epoch or across epochs.

No row is dropped silently: ``drop_report`` (one pass over every row, the pass ``tokenize_all`` and
the eval batches run) counts the dropped rows by reason (``formats``'s names) with the first row
numbers of each, and ``drop_summary`` says it in one line; a report that kept no row raises
``sources.DataFileError``.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import threading
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from dpo_jax.data import batching, formats, layouts, list_layouts, list_tokenize, sources, tokenize
from dpo_jax.data.formats import DROP_TOKENIZE, DROP_TOO_LONG

Row = Mapping[str, Any]
TokenizeFn = Callable[[Row], "dict | None"]

ROWS_LISTED = 5  # row numbers a drop report lists per reason


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the pipeline needs to know; an ml_collections config maps onto these fields.

    Sources: ``path`` (local file / ``save_to_disk`` dir / hub id), ``name`` (hub subset).
    Eval: ``eval_split`` (a named split) or ``eval_fraction`` of ``train_split`` (seeded by
    ``split_seed``). ``max_length`` bounds one sequence, prompt + completion (the tokenizer
    truncates to it, see ``make_row_step``); a prefix-shared row holds up to 2 * max_length
    tokens. Batches: ``pairs_per_batch`` = pair capacity P; T buckets default to powers of two
    from ``min_bucket`` up to the longest row; packed batches default to P rows of the longest
    row. ``num_epochs`` None repeats forever. ``num_threads`` tokenize in threads;
    ``worker_count`` > 0 lays out batches in grain worker processes (``mp_prefetch``: absl flags
    must be parsed, as under an absl main; close the iterator when done).
    """

    path: str = ""
    name: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    eval_fraction: float = 0.0
    split_seed: int = 0
    cache_dir: str | None = None
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    pairs_per_batch: int = 8
    drop_remainder: bool = True
    layout: str = "standard"
    max_length: int = 1024
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_start"
    min_bucket: int = 16
    buckets: tuple[int, ...] = ()
    pack_rows: int = 0
    pack_length: int = 0
    share_prefix: bool = False
    prefix_min_saving: float = 0.1  # prefix layout: a batch saving less (padded tokens) is laid out standard
    logit_slots: bool = False  # batches carry `logit_slots_BxC`: logits only at loss-masked positions
    pad_id: int = 0
    num_threads: int = 0
    prefetch_buffer_size: int = 64
    worker_count: int = 0
    pair_scalars: tuple[str, ...] = ()  # per-example floats carried into the batch as `<name>_P`
    list_size: int = 0  # K > 0: rows are ranked lists of up to K responses (`list_layouts`), P lists per batch

    def max_row_length(self) -> int:
        """The longest row an example can need: 2 * max_length when prompts are shared (a list's
        K responses: K * max_length)."""
        shared = self.layout == "prefix" or (self.layout == "packed" and (self.share_prefix or self.list_size))
        return (self.list_size or 2) * self.max_length if shared else self.max_length

    def layout_spec(self) -> "layouts.LayoutSpec | list_layouts.ListLayoutSpec":
        """The batch shapes these settings give (validated): pairs, or ranked lists (`list_size`)."""
        longest = self.max_row_length()
        buckets = tuple(sorted(self.buckets)) or layouts.power_of_two_buckets(
            longest, min(self.min_bucket, longest)
        )
        if self.list_size:
            if self.pair_scalars:
                raise ValueError(f"pair_scalars {self.pair_scalars} are per pair; batches of ranked lists "
                                 "carry none (a precomputed reference is for pairs)")
            return list_layouts.ListLayoutSpec(
                layout=self.layout, num_pairs=self.pairs_per_batch, list_size=self.list_size, buckets=buckets,
                num_rows=self.pack_rows or self.pairs_per_batch, row_length=self.pack_length or longest,
                share_prefix=True, pad_id=self.pad_id, logit_slots=self.logit_slots)
        return layouts.LayoutSpec(
            layout=self.layout,
            num_pairs=self.pairs_per_batch,
            buckets=buckets,
            num_rows=self.pack_rows or self.pairs_per_batch,
            row_length=self.pack_length or self.max_row_length(),
            share_prefix=self.share_prefix,
            pad_id=self.pad_id,
            pair_scalars=self.pair_scalars,
            prefix_min_saving=self.prefix_min_saving,
            logit_slots=self.logit_slots,
        )

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        check_eval_split(self.eval_split, self.eval_fraction)
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}")
        if self.num_threads < 0 or self.worker_count < 0:
            raise ValueError("num_threads and worker_count must be >= 0")
        self.layout_spec()


def check_eval_split(eval_split, eval_fraction: float, eval_source=None, *, key: str = "DataConfig") -> None:
    """The rules of the eval rows: `eval_fraction` in [0, 1), and at most one of `eval_split`,
    `eval_fraction` (and `eval_source`, where the caller has one) set. Messages name `key`
    (`config_check` passes 'config.data')."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"{key}.eval_fraction={eval_fraction}; must be in [0, 1)")
    given = {"eval_split": eval_split, "eval_fraction": eval_fraction}
    if eval_source is not None:
        given["eval_source"] = eval_source
    if sum(bool(v) for v in given.values()) > 1:
        raise ValueError(f"{key}: set at most one of {', '.join(given)}")


# ----------------------------------------------------------------------------- tokenize step


@dataclasses.dataclass(frozen=True)
class _Prepare:
    """row -> example, or None (the step dropped it, or it fits no batch). Picklable for worker processes."""

    tokenize_fn: TokenizeFn
    spec: layouts.LayoutSpec

    def __call__(self, row: Row) -> dict | None:
        example = self.tokenize_fn(row)
        return example if example is not None and self.spec.fits(example) else None


def _is_kept(example) -> bool:
    return example is not None


def _read_options(config: DataConfig) -> grain.ReadOptions:
    return grain.ReadOptions(
        num_threads=config.num_threads,
        prefetch_buffer_size=config.prefetch_buffer_size if config.num_threads else 0,
    )


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    return process_index, process_count


# ----------------------------------------------------------------------------- train


def shard_rows(rows, *, seed: int, shuffle: bool, num_epochs: int | None,
               process_index: int, process_count: int) -> grain.MapDataset:
    """This process's rows over all epochs: shuffle (per epoch), shard after it, repeat."""
    ds = grain.MapDataset.source(rows)
    n = len(ds)
    per_process = n // process_count
    if per_process == 0:
        raise ValueError(f"{n} rows cannot be sharded over {process_count} processes")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds[: per_process * process_count][process_index::process_count]
    return ds.repeat(num_epochs)


def train_dataset(
    rows: Sequence[Row],
    tokenize_fn: TokenizeFn,
    config: DataConfig,
    *,
    process_index: int,
    process_count: int,
    agree: Callable[[np.ndarray], np.ndarray] | None = None,
    pair_offset: int | None = None,
) -> grain.IterDataset:
    """The grain dataset of this process's train batches (dicts of docs/design.md arrays).

    ``agree`` merges batch stats over processes (None: this process alone); ``pair_offset`` is
    this process's first pair in the global batch (default ``process_index * pairs_per_batch``)."""
    config.validate()
    spec = config.layout_spec()
    ds = shard_rows(
        rows,
        seed=config.seed,
        shuffle=config.shuffle,
        num_epochs=config.num_epochs,
        process_index=process_index,
        process_count=process_count,
    )
    it_ds = ds.map(_Prepare(tokenize_fn, spec)).to_iter_dataset(_read_options(config))
    it_ds = it_ds.filter(_is_kept)
    if spec.layout == "packed":
        it_ds = batching.PackedGroupDataset(it_ds, spec, config.drop_remainder)
    else:
        it_ds = it_ds.batch(spec.num_pairs, drop_remainder=config.drop_remainder, batch_fn=batching.as_list)
    if config.worker_count:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    offset = process_index * spec.num_pairs if pair_offset is None else pair_offset
    return batching.LayoutDataset(it_ds, spec, agree or batching.local_agree, offset)


def make_train_iterator(
    rows: Sequence[Row],
    tokenize_fn: TokenizeFn,
    config: DataConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    agree: Callable[[np.ndarray], np.ndarray] | None = None,
    pair_offset: int | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator over train batches; process defaults to jax.process_*();
    ``agree`` / ``pair_offset`` as in ``train_dataset``."""
    process_index, process_count = _process_info(process_index, process_count)
    ds = train_dataset(
        rows, tokenize_fn, config, process_index=process_index, process_count=process_count,
        agree=agree, pair_offset=pair_offset,
    )
    return iter(ds)


# ----------------------------------------------------------------------------- eval, report


class _Classify:
    """row number -> (example, None), (None, drop reason) or (None, the `formats.RowProblem` it
    raised; a row that cannot be decoded, such as invalid UTF-8 in a file, is one too).

    A step with a drop counter (``step.drops``, a ``formats.DropCounter`` such as
    ``tokenize.RowTokenizer``'s, or a wrapper forwarding one) runs as a private deep copy per thread,
    so its counts are exact and the caller's stay untouched; a dropped row's reason is the one its
    copy's counter just counted. A step without one drops rows for ``DROP_TOKENIZE``.
    """

    def __init__(self, rows: Sequence[Row], step: TokenizeFn, spec: layouts.LayoutSpec):
        self._rows, self._step, self._spec, self._counted = rows, step, spec, hasattr(step, "drops")
        self._local, self._lock, self._copies = threading.local(), threading.Lock(), []

    def _thread_step(self) -> TokenizeFn:
        if not self._counted:
            return self._step
        step = getattr(self._local, "step", None)
        if step is None:
            step = self._local.step = copy.deepcopy(self._step)
            self._local.counts = collections.Counter()
            with self._lock:
                self._copies.append(step)
        return step

    def _reason(self) -> str:
        if not self._counted:
            return DROP_TOKENIZE
        counts = collections.Counter(self._local.step.drops.as_dict()["dropped"])
        new, self._local.counts = counts - self._local.counts, counts
        return min(new) if new else DROP_TOKENIZE

    def __call__(self, i: int):
        step = self._thread_step()
        try:
            row = self._rows[i]
        except UnicodeDecodeError as err:
            return None, formats.RowProblem(f"cannot be decoded: {err}", row=i)
        try:
            example = step(row)
        except formats.RowProblem as err:
            return None, err.at(row=i)
        if example is None:
            return None, self._reason()
        if not self._spec.fits(example):
            return None, DROP_TOO_LONG
        return example, None

    def events(self) -> dict[str, int]:
        """The counted steps' events (e.g. truncations), merged over threads."""
        events = collections.Counter()
        for step in self._copies:
            events.update(step.drops.as_dict().get("events", {}))
        return dict(sorted(events.items()))


_DROP_DETAILS = {DROP_TOO_LONG: "the example fits no batch of the layout",
                 DROP_TOKENIZE: "the tokenize step dropped the row"}


def tokenize_all(
    rows: Sequence[Row], tokenize_fn: TokenizeFn, config: DataConfig, *, source: str | None = None,
    strict: bool = False,
) -> tuple[list[dict], dict[str, Any]]:
    """(kept examples in row order, report) after one pass over every row (threads: ``num_threads``).

    The report (flat, JSON-ready): ``source``; ``rows_read``; ``kept``; ``dropped`` (the total);
    per reason ``dropped/<reason>`` (the count) and ``dropped_rows/<reason>`` (the first
    ``ROWS_LISTED`` row numbers: 0-based positions in ``rows``); ``events/<name>`` (the step's
    counted events, e.g. truncations); ``layout_tokens``. Reasons: the tokenize step's own (its
    ``drops`` counter, ``formats``'s names), ``too_long`` (fits no batch of the layout), else
    ``tokenize``. A ``formats.RowProblem`` the step raises (a missing column; any bad value of a
    ``strict`` step) is raised naming ``source`` and the row; ``strict`` also raises at a drop the
    step did not raise for (e.g. ``too_long``).
    """
    spec = config.layout_spec()
    classify = _Classify(rows, tokenize_fn, spec)
    ds = grain.MapDataset.range(len(rows)).map(classify)
    kept, counts, listed, tokens = [], collections.Counter(), collections.defaultdict(list), 0
    for i, (example, reason) in enumerate(ds.to_iter_dataset(_read_options(config))):
        if isinstance(reason, formats.RowProblem):
            raise reason.at(source=source)
        if reason is not None:
            if strict:
                raise formats.RowError(_DROP_DETAILS.get(reason, "the row was dropped"), None, reason, i, source)
            counts[reason] += 1
            if len(listed[reason]) < ROWS_LISTED:
                listed[reason].append(i)
            continue
        kept.append(example)
        tokens += sum(spec.segment_lengths(example))
    report: dict[str, Any] = {"source": source, "rows_read": len(rows), "kept": len(kept),
                              "dropped": sum(counts.values())}
    for reason in sorted(counts):
        report[f"dropped/{reason}"] = counts[reason]
        report[f"dropped_rows/{reason}"] = listed[reason]
    report.update({f"events/{name}": n for name, n in classify.events().items()})
    report["layout_tokens"] = tokens
    return kept, report


def drop_reasons(report: Mapping[str, Any]) -> dict[str, int]:
    """reason -> rows dropped for it, from a report of ``tokenize_all`` / ``drop_report``."""
    return {k.split("/", 1)[1]: v for k, v in report.items() if k.startswith("dropped/")}


def drop_summary(report: Mapping[str, Any]) -> str:
    """One line: ``pairs.jsonl: dropped 3 of 100 rows: chosen_empty 2 (rows 4, 17),
    chosen_equals_rejected 1 (row 9)``, reasons by count; ``...`` when more rows than listed."""
    head = f"{report['source']}: " if report.get("source") else ""
    n, dropped = report["rows_read"], report["dropped"]
    if not dropped:
        return f"{head}kept all {n} rows" if n else f"{head}no rows"
    parts = []
    for reason, count in sorted(drop_reasons(report).items(), key=lambda kv: (-kv[1], kv[0])):
        rows = report.get(f"dropped_rows/{reason}", [])
        more = ", ..." if count > len(rows) else ""
        parts.append(f"{reason} {count} ({'row' if count == 1 else 'rows'} {', '.join(map(str, rows))}{more})")
    what = f"dropped all {n} rows" if dropped == n else f"dropped {dropped} of {n} rows"
    return f"{head}{what}: {', '.join(parts)}"


def check_kept(report: Mapping[str, Any]) -> None:
    """Raises ``DataFileError`` (its ``drop_summary``) when a report kept no row."""
    if report["kept"] == 0:
        raise sources.DataFileError(f"{drop_summary(report)}; no rows left")


def make_row_step(tokenizer: Any, config: DataConfig, format_config=None, strict: bool = False):
    """The standard row step: ``formats.RowNormalizer`` then ``tokenize.PairTokenizer``; for ranked
    lists (``config.list_size`` > 0), ``list_tokenize.ListRowTokenizer``.

    Sequences are truncated to ``config.max_length`` (``max_prompt_length``, ``truncation_mode``
    as in ``tokenize``), so every example fits the default buckets / packed rows.
    """
    if config.list_size:
        return list_tokenize.ListRowTokenizer(
            tokenizer, config.list_size, max_length=config.max_length, max_prompt_length=config.max_prompt_length,
            truncation_mode=config.truncation_mode, strict=strict)
    return tokenize.RowTokenizer(
        tokenizer,
        format_config or formats.FormatConfig(),
        strict=strict,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        truncation_mode=config.truncation_mode,
    )


def drop_report(
    rows: Sequence[Row], tokenize_fn: TokenizeFn, config: DataConfig, source: str | None = None, *,
    strict: bool = False,
) -> dict[str, Any]:
    """The report of ``tokenize_all`` (one full pass: rows read, kept, dropped by reason with the first
    row numbers, events, laid-out tokens); raises ``DataFileError`` naming ``source`` and the reasons
    when no row is kept, and at the first bad row when ``strict`` (see ``tokenize_all``)."""
    report = tokenize_all(rows, tokenize_fn, config, source=source, strict=strict)[1]
    check_kept(report)
    return report


def make_eval_batches(
    rows: Sequence[Row],
    tokenize_fn: TokenizeFn,
    config: DataConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    pair_offset: int | None = None,
    source: str | None = None,
    strict: bool = False,
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """(this process's eval batches, report): no shuffle, every kept example exactly once.

    The report is ``drop_report``'s (``source``, ``strict`` as there): no kept row raises.

    Kept example k goes to process k % process_count. Every process returns the same number of
    batches (filled up with batches of ``pair_mask_P`` = 0), so a multi-host eval loop never
    waits on a process that ran out. Every process tokenizes every row, so each knows every
    process's groups and derives the global batch plans without communicating; pairs are numbered
    from ``pair_offset`` (default ``process_index * pairs_per_batch``).
    """
    process_index, process_count = _process_info(process_index, process_count)
    spec = config.layout_spec()
    offset = process_index * spec.num_pairs if pair_offset is None else pair_offset
    kept, report = tokenize_all(rows, tokenize_fn, config, source=source, strict=strict)
    check_kept(report)
    groups = [list(layouts.pack_groups(kept[q::process_count], spec)) for q in range(process_count)]
    num_batches = max(len(g) for g in groups)
    batches = []
    for j in range(num_batches):
        parts = [g[j] if j < len(g) else [] for g in groups]
        plan = spec.plan(np.max([spec.batch_stats(part) for part in parts], axis=0))
        batches.append(spec(parts[process_index], plan, offset))
    return batches, report

