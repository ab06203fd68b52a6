"""Rows from files and datasets: ``load_rows`` reads one split (a local file, a ``save_to_disk``
directory, a hub id), ``load_splits`` the train and eval rows a ``pipeline.DataConfig`` names.

A file that cannot be read fails in ``load_rows`` with one line naming it (and the line, for JSON):
``DataFileError``. ``check_file`` runs the cheap checks first; ``diagnose_file`` scans a JSON / JSON
Lines file only after ``datasets`` failed to read it, for the first bad line.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Protocol

import numpy as np


FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}


class DataFileError(ValueError):
    """A data source that cannot be used; the message, one line, names it (and the line, for JSON)."""


def _is_local_path(path: str) -> bool:
    """A path meant as a local file: a data file extension, or an explicit absolute / relative path."""
    return os.path.splitext(path)[1].lower() in FILE_BUILDERS or path.startswith(("/", "./", "../", "~"))


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _unpaired_surrogate(value: Any) -> str | None:
    """The JSON escape of an unpaired surrogate in a string of `value` (valid JSON, not valid Unicode)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        return f"\\u{ord(err.object[err.start]):04x}"
    return None


def _surrogate_problem(escape: str) -> str:
    return f"a string holds the unpaired surrogate {escape}, which is not valid Unicode"


_EXTRA_DATA = "Extra data"  # json's message for a second value after the first: JSON Lines


def _scan_document(path: str) -> tuple[int | None, str] | None:
    """(line, problem) of a file read as one JSON document (an array of row objects), or None."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return data.count(b"\n", 0, err.start) + 1, f"not UTF-8 text (byte {data[err.start]:#04x})"
    if not text.strip():
        return None, "the file holds only whitespace"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == _EXTRA_DATA:
            return _scan_lines(path, document=False)
        return err.lineno, f"invalid JSON: {err.msg} (column {err.colno})"
    rows = value if isinstance(value, list) else [value]
    if not rows:
        return None, "no rows (an empty JSON array)"
    for k, row in enumerate(rows):
        if not isinstance(row, dict):
            return None, f"item {k} of the array is {_json_kind(row)}, expected an object (one row)"
    escape = _unpaired_surrogate(value)
    if escape:
        at = re.search(re.escape(escape), text, re.IGNORECASE)
        return (text.count("\n", 0, at.start()) + 1 if at else None), _surrogate_problem(escape)
    return None


def _scan_lines(path: str, document: bool = True) -> tuple[int | None, str] | None:
    """(line, problem) of a file read as JSON Lines (one row object per line), or None. `document`:
    a file whose first value opens an array is read as one JSON document instead."""
    rows = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as err:
                return n, f"not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1})"
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                if document and rows == 0 and line.lstrip().startswith("["):  # one document, several lines
                    return _scan_document(path)
                return n, f"invalid JSON: {err.msg} (column {err.colno})"
            if document and isinstance(value, list) and rows == 0:
                return _scan_document(path)
            if not isinstance(value, dict):
                return n, f"{_json_kind(value)}, expected an object (one row per line)"
            escape = _unpaired_surrogate(value)
            if escape:
                return n, _surrogate_problem(escape)
            rows += 1
    return None if rows else (None, "the file holds only blank lines")


def _root_cause(err: BaseException) -> str:
    """`Type: first line` of the first exception in `err`'s chain not raised by `datasets` itself."""
    chain, seen = [], err
    while seen is not None and len(chain) < 16:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    pick = next((e for e in chain if not type(e).__module__.startswith("datasets")), err)
    text = str(pick).strip().splitlines()
    return f"{type(pick).__name__}: {text[0]}" if text else type(pick).__name__


def check_file(path: str) -> None:
    """Cheap checks before reading a local data file: it exists, its extension is known, it is not empty."""
    if not os.path.exists(path):
        raise DataFileError(f"{path}: no such file or directory")
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and ext not in FILE_BUILDERS:
        raise DataFileError(f"{path}: unknown extension {ext!r}, expected one of {sorted(FILE_BUILDERS)}")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DataFileError(f"{path}: the file is empty")


def diagnose_file(path: str) -> str | None:
    """Why a local JSON / JSON Lines file cannot be read as rows, in one line naming it and the line:
    the first of invalid UTF-8, invalid JSON, a row that is not an object, an unpaired surrogate, no
    rows; None when the scan finds none of these (or for other formats). Reads the whole file."""
    ext = os.path.splitext(path)[1].lower()
    if FILE_BUILDERS.get(ext) != "json":
        return None
    found = _scan_document(path) if ext == ".json" else _scan_lines(path)
    if found is None:
        return None
    line, problem = found
    return f"{path}{f' line {line}' if line else ''}: {problem}"


def load_rows(
    path: str, *, split: str = "train", name: str | None = None, cache_dir: str | None = None
):
    """One split of a dataset as a ``datasets.Dataset``.

    A local file is read by extension (json/jsonl/parquet/csv/arrow), a directory written by
    ``save_to_disk`` with ``load_from_disk`` (a ``DatasetDict`` gives its ``split``), any other
    local directory with ``load_dataset(path)``; a path that does not exist locally is a hub id,
    unless it names a data file (a known extension, or a path starting with /, ./, ../ or ~).
    A missing, empty, unreadable or row-less file raises ``DataFileError`` naming it (``check_file``
    first; ``diagnose_file`` only when ``datasets`` fails, so a file that loads is not scanned).
    """
    import datasets  # pylint: disable=g-import-not-at-top

    if os.path.isfile(path) or _is_local_path(path):
        check_file(path)
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        try:
            loaded = datasets.load_dataset(FILE_BUILDERS[ext], data_files=path, cache_dir=cache_dir)
        except Exception as err:  # pylint: disable=broad-except  # any reader failure, diagnosed
            problem = diagnose_file(path)
            if problem:
                raise DataFileError(problem) from None
            raise DataFileError(f"{path}: cannot be read as {ext[1:]}: {_root_cause(err)}") from err
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
    if len(loaded) == 0:
        raise DataFileError(f"{path}: no rows in split {split!r}")
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


class SplitConfig(Protocol):
    """What ``load_splits`` reads of its config (``pipeline.DataConfig`` has these fields)."""

    @property
    def path(self) -> str: ...

    @property
    def name(self) -> str | None: ...

    @property
    def train_split(self) -> str: ...

    @property
    def eval_split(self) -> str | None: ...

    @property
    def eval_fraction(self) -> float: ...

    @property
    def split_seed(self) -> int: ...

    @property
    def cache_dir(self) -> str | None: ...

    def validate(self) -> None: ...


def load_splits(config: SplitConfig):
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
