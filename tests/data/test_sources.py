"""Data sources: local files, saved datasets, named and fraction splits, then the train and eval path."""

import json

import pytest

from dpo_jax.data import pipeline as P
from dpo_jax.data import sources as S
from tests.data.test_pipeline import ID0, _batch_ids, _config, _iterator, _rows, tokenize


def _write_sources(tmp_path, rows):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    paths = {}
    paths["jsonl"] = tmp_path / "pairs.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["parquet"] = tmp_path / "pairs.parquet"
    ds.to_parquet(str(paths["parquet"]))
    paths["saved"] = tmp_path / "saved"
    ds.save_to_disk(str(paths["saved"]))
    paths["saved_dict"] = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": ds.select(range(8)), "test": ds.select(range(8, 10))}).save_to_disk(
        str(paths["saved_dict"])
    )
    return paths


def test_sources_read_local_files_and_saved_datasets(tmp_path):
    rows = _rows(10)
    paths = _write_sources(tmp_path, rows)
    cache = str(tmp_path / "cache")
    for kind in ("jsonl", "parquet", "saved"):
        loaded = S.load_rows(str(paths[kind]), cache_dir=cache)
        assert len(loaded) == 10, kind
        assert [dict(r) for r in loaded] == rows, kind
    config = P.DataConfig(path=str(paths["saved_dict"]), eval_split="test", cache_dir=cache)
    train, evaluation = S.load_splits(config)
    assert [r["prompt"][0] - ID0 for r in train] == list(range(8))
    assert [r["prompt"][0] - ID0 for r in evaluation] == [8, 9]
    with pytest.raises(ValueError, match="no split 'validation'"):
        S.load_rows(str(paths["saved_dict"]), split="validation")
    bad = tmp_path / "pairs.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unknown extension '.txt'"):
        S.load_rows(str(bad))
    # The whole path: a jsonl file -> fraction split -> train iterator and eval batches.
    config = _config(path=str(paths["jsonl"]), eval_fraction=0.2, split_seed=1, cache_dir=cache, num_epochs=1)
    train, evaluation = S.load_splits(config)
    assert len(train) == 8 and len(evaluation) == 2
    train_ids = {r["prompt"][0] - ID0 for r in train}
    eval_ids = {r["prompt"][0] - ID0 for r in evaluation}
    assert not train_ids & eval_ids and train_ids | eval_ids == set(range(10))
    again = S.load_splits(config)
    assert {r["prompt"][0] - ID0 for r in again[1]} == eval_ids, "split is seeded"
    ids = [i for b in _iterator(train, config) for i in _batch_ids(b)]
    assert set(ids) <= train_ids and len(ids) == 4  # 8 rows, drops 3 -> 7 kept -> one full batch
    batches, report = P.make_eval_batches(evaluation, tokenize, config, process_index=0, process_count=1)
    assert report["rows_read"] == 2
