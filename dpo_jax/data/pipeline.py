"""Preference data pipeline: sources (HF ``datasets``), train/eval split, the grain iterator.

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
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import threading
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from dpo_jax.data import batching, layouts

Row = Mapping[str, Any]
TokenizeFn = Callable[[Row], "dict | None"]

FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
DROP_TOKENIZE = "tokenize"  # the tokenize callable returned None
DROP_TOO_LONG = "too_long"  # the example fits no batch of the layout


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

    def max_row_length(self) -> int:
        """The longest row an example can need: 2 * max_length when prompts are shared."""
        shared = self.layout == "prefix" or (self.layout == "packed" and self.share_prefix)
        return 2 * self.max_length if shared else self.max_length

    def layout_spec(self) -> layouts.LayoutSpec:
        """The batch shapes these settings give (validated)."""
        longest = self.max_row_length()
        buckets = tuple(sorted(self.buckets)) or layouts.power_of_two_buckets(
            longest, min(self.min_bucket, longest)
        )
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


# ----------------------------------------------------------------------------- sources


def load_rows(
    path: str, *, split: str = "train", name: str | None = None, cache_dir: str | None = None
):
    """One split of a dataset as a ``datasets.Dataset``.

    A local file is read by extension (json/jsonl/parquet/csv/arrow), a directory written by
    ``save_to_disk`` with ``load_from_disk`` (a ``DatasetDict`` gives its ``split``), any other
    local directory with ``load_dataset(path)``; only a path that does not exist locally is taken
    as a hub id.
    """
    import datasets  # pylint: disable=g-import-not-at-top

    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in FILE_BUILDERS:
            raise ValueError(f"data path {path!r}: unknown extension {ext!r}, expected {sorted(FILE_BUILDERS)}")
        loaded = datasets.load_dataset(FILE_BUILDERS[ext], data_files=path, cache_dir=cache_dir)
    elif os.path.isdir(path):
        saved = any(
            os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")
        )
        if saved:
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(path, name, cache_dir=cache_dir)
    else:
        loaded = datasets.load_dataset(path, name, split=split, cache_dir=cache_dir)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"data path {path!r}: no split {split!r}, has {sorted(loaded)}")
        loaded = loaded[split]
    return loaded


def split_fraction(rows, fraction: float, seed: int):
    """(train, eval): a seeded random ``fraction`` of rows (at least one) goes to eval."""
    n = len(rows)
    num_eval = max(1, int(round(fraction * n)))
    if num_eval >= n:
        raise ValueError(f"eval_fraction={fraction} leaves no training rows out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    eval_idx, train_idx = np.sort(perm[:num_eval]), np.sort(perm[num_eval:])
    if hasattr(rows, "select"):
        return rows.select(train_idx), rows.select(eval_idx)
    return [rows[i] for i in train_idx], [rows[i] for i in eval_idx]


def load_splits(config: DataConfig):
    """(train rows, eval rows or None) from ``config.path`` by named split or by fraction."""
    config.validate()
    if not config.path:
        raise ValueError("DataConfig.path is empty: name a local file, a saved dataset or a hub id")
    kw = dict(name=config.name, cache_dir=config.cache_dir)
    train = load_rows(config.path, split=config.train_split, **kw)
    if config.eval_split:
        return train, load_rows(config.path, split=config.eval_split, **kw)
    if config.eval_fraction:
        return split_fraction(train, config.eval_fraction, config.split_seed)
    return train, None


# ----------------------------------------------------------------------------- tokenize step


@dataclasses.dataclass(frozen=True)
class _Prepare:
    """row -> (example, None) or (None, drop reason). Picklable for worker processes."""

    tokenize_fn: TokenizeFn
    spec: layouts.LayoutSpec

    def classify(self, row: Row) -> tuple[dict | None, str | None]:
        example = self.tokenize_fn(row)
        if example is None:
            return None, DROP_TOKENIZE
        if not self.spec.fits(example):
            return None, DROP_TOO_LONG
        return example, None

    def __call__(self, row: Row) -> dict | None:
        return self.classify(row)[0]


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


class _PerThreadCopies:
    """Calls a private deep copy of ``step`` in each thread, so per-instance drop counters
    (``step.drops``, e.g. ``tokenize.RowTokenizer``) count exactly; ``drops()`` merges them."""

    def __init__(self, step: TokenizeFn):
        self._step, self._local, self._lock, self._copies = step, threading.local(), threading.Lock(), []

    def __call__(self, row: Row):
        step = getattr(self._local, "step", None)
        if step is None:
            step = self._local.step = copy.deepcopy(self._step)
            with self._lock:
                self._copies.append(step)
        return step(row)

    def drops(self) -> dict[str, Any]:
        dropped, events = collections.Counter(), collections.Counter()
        for step in self._copies:
            counts = step.drops.as_dict()
            dropped.update(counts.get("dropped", {}))
            events.update(counts.get("events", {}))
        return {"dropped": dropped, "events": events}


def tokenize_all(
    rows: Sequence[Row], tokenize_fn: TokenizeFn, config: DataConfig
) -> tuple[list[dict], dict[str, Any]]:
    """(kept examples in row order, report) after one pass over every row.

    Drops are counted by reason: ``too_long`` (fits no batch of the layout), and the reasons of
    the tokenize step's own ``drops`` counter when it has one (``formats.DropCounter``), else
    ``tokenize``. The step's counted events (e.g. truncations) go to ``events``.
    """
    counted = hasattr(tokenize_fn, "drops")
    step = _PerThreadCopies(tokenize_fn) if counted else tokenize_fn
    prepare = _Prepare(step, config.layout_spec())
    ds = grain.MapDataset.source(rows).map(prepare.classify)
    kept, dropped, tokens = [], collections.Counter(), 0
    for example, reason in ds.to_iter_dataset(_read_options(config)):
        if reason is not None:
            dropped[reason] += 1
            continue
        kept.append(example)
        tokens += sum(prepare.spec.segment_lengths(example))
    events: dict[str, int] = {}
    if counted:
        counts = step.drops()
        unexplained = dropped.pop(DROP_TOKENIZE, 0) - sum(counts["dropped"].values())
        dropped.update(counts["dropped"])
        if unexplained > 0:
            dropped[DROP_TOKENIZE] = unexplained
        events = dict(sorted(counts["events"].items()))
    report = {
        "rows_read": len(rows),
        "kept": len(kept),
        "dropped": dict(sorted(dropped.items())),
        "events": events,
        "layout_tokens": tokens,
    }
    return kept, report


def make_row_step(tokenizer: Any, config: DataConfig, format_config=None, strict: bool = False):
    """The standard row step: ``formats.RowNormalizer`` then ``tokenize.PairTokenizer``.

    Sequences are truncated to ``config.max_length`` (``max_prompt_length``, ``truncation_mode``
    as in ``tokenize``), so every example fits the default buckets / packed rows.
    """
    from dpo_jax.data import formats, tokenize  # pylint: disable=g-import-not-at-top

    return tokenize.RowTokenizer(
        tokenizer,
        format_config or formats.FormatConfig(),
        strict=strict,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        truncation_mode=config.truncation_mode,
    )


def data_report(rows: Sequence[Row], tokenize_fn: TokenizeFn, config: DataConfig) -> dict[str, Any]:
    """Rows read, kept, dropped by reason, the step's events, laid-out tokens (one full pass)."""
    return tokenize_all(rows, tokenize_fn, config)[1]


def make_eval_batches(
    rows: Sequence[Row],
    tokenize_fn: TokenizeFn,
    config: DataConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    pair_offset: int | None = None,
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """(this process's eval batches, report): no shuffle, every kept example exactly once.

    Kept example k goes to process k % process_count. Every process returns the same number of
    batches (filled up with batches of ``pair_mask_P`` = 0), so a multi-host eval loop never
    waits on a process that ran out. Every process tokenizes every row, so each knows every
    process's groups and derives the global batch plans without communicating; pairs are numbered
    from ``pair_offset`` (default ``process_index * pairs_per_batch``).
    """
    process_index, process_count = _process_info(process_index, process_count)
    spec = config.layout_spec()
    offset = process_index * spec.num_pairs if pair_offset is None else pair_offset
    kept, report = tokenize_all(rows, tokenize_fn, config)
    groups = [list(layouts.pack_groups(kept[q::process_count], spec)) for q in range(process_count)]
    num_batches = max(len(g) for g in groups)
    batches = []
    for j in range(num_batches):
        parts = [g[j] if j < len(g) else [] for g in groups]
        plan = spec.plan(np.max([spec.batch_stats(part) for part in parts], axis=0))
        batches.append(spec(parts[process_index], plan, offset))
    return batches, report

