"""Data pipeline: checkpointable grain iterator, process shards, buckets, eval, drop reports."""

import json

import numpy as np
import pytest

from dpo_jax.data import pipeline as P
from dpo_jax.data import sources as S

ID0 = 1000  # row i's prompt starts with token ID0 + i: the id a batch carries back


def _rows(n, seed=0, long_every=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        draw = lambda hi: rng.integers(1, 50, rng.integers(1, hi)).tolist()  # noqa: E731
        rows.append({"prompt": [ID0 + i] + draw(6), "chosen": draw(9), "rejected": draw(9)})
        if long_every and i % long_every == long_every - 1:
            rows[-1]["chosen"] = [7] * 60
    return rows


def keep_all(row):
    """A row -> example step: int32 arrays, completions with an EOS (2) appended."""
    return {
        "prompt_ids": np.asarray(row["prompt"], np.int32),
        "chosen_ids": np.asarray(list(row["chosen"]) + [2], np.int32),
        "rejected_ids": np.asarray(list(row["rejected"]) + [2], np.int32),
    }


def tokenize(row):
    """``keep_all``, but drops (returns None for) rows whose id is 3 mod 7."""
    return None if (row["prompt"][0] - ID0) % 7 == 3 else keep_all(row)


def _kept_ids(n):
    return [i for i in range(n) if i % 7 != 3]


def _batch_ids(batch, pair_offset=0):
    """Row ids of the real pairs of a batch, in pair order (any layout); the batch numbers its
    pairs from `pair_offset` (its process's first pair in the global batch)."""
    ids = {}
    first = batch["positions_BxT"] == 0
    for row, col in zip(*np.nonzero(first & (batch["segment_ids_BxT"] > 0))):
        p = int(batch["pair_ids_BxT"][row, col])
        ids.setdefault(p, int(batch["tokens_BxT"][row, col]) - ID0)
    real = np.flatnonzero(batch["pair_mask_P"]) + pair_offset
    assert sorted(ids) == real.tolist()
    return [ids[p] for p in real]


def _same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _config(**kw):
    base = dict(pairs_per_batch=4, max_length=32, min_bucket=8, num_epochs=3, seed=3)
    return P.DataConfig(**{**base, **kw})


def _iterator(rows, config, pi=0, pc=1):
    return P.make_train_iterator(rows, tokenize, config, process_index=pi, process_count=pc)


@pytest.mark.parametrize(
    "layout,kw",
    [("standard", {}), ("prefix", {"num_threads": 2}), ("packed", {"pack_rows": 2, "pack_length": 24})],
)
def test_checkpoint_restore_mid_epoch_and_across_epochs(layout, kw):
    rows = _rows(30)
    config = _config(layout=layout, **kw)
    full = list(_iterator(rows, config))
    per_epoch = len(_kept_ids(30)) / 4
    assert len(full) >= 2 * per_epoch
    # Mid-epoch 1, just before the first epoch boundary, inside epoch 2.
    for k in (2, int(per_epoch), int(per_epoch) + 3):
        it = _iterator(rows, config)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # what grain's orbax handler stores
        restored = _iterator(rows, config)
        restored.set_state(state)
        _same(list(restored), full[k:])


def test_epochs_reshuffle_and_cover_every_kept_row():
    rows = _rows(24)
    config = _config(pairs_per_batch=5, num_epochs=2, drop_remainder=False)
    ids = [i for b in _iterator(rows, config) for i in _batch_ids(b)]
    kept = _kept_ids(24)
    first, second = ids[: len(kept)], ids[len(kept) :]
    assert sorted(first) == kept and sorted(second) == kept
    assert first != second, "each epoch must be a new permutation"
    assert first != kept, "rows must be shuffled"
    again = [i for b in _iterator(rows, config) for i in _batch_ids(b)]
    assert again == ids, "same seed, same order"
    other = [i for b in _iterator(rows, _config(pairs_per_batch=5, num_epochs=2, drop_remainder=False, seed=4)) for i in _batch_ids(b)]
    assert other != ids


@pytest.mark.parametrize("layout", ["standard", "packed"])
def test_two_processes_see_disjoint_shards_covering_each_epoch(layout):
    n, epochs, pairs = 48, 3, 3  # 24 rows per process and epoch = 8 full batches of 3 pairs
    rows = _rows(n)
    config = _config(layout=layout, pairs_per_batch=pairs, num_epochs=epochs, num_threads=2)
    per_process = []
    for pi in range(2):
        it = P.make_train_iterator(rows, keep_all, config, process_index=pi, process_count=2)
        per_process.append([i for b in it for i in _batch_ids(b, pi * config.pairs_per_batch)])
        assert len(per_process[-1]) == epochs * n // 2
    for epoch in range(epochs):
        part = [ids[epoch * n // 2 : (epoch + 1) * n // 2] for ids in per_process]
        assert not set(part[0]) & set(part[1]), f"epoch {epoch}: shards overlap"
        assert sorted(part[0] + part[1]) == list(range(n)), f"epoch {epoch}: not covered once"
    assert per_process[0][: n // 2] != per_process[0][n // 2 : n], "epochs reshuffle"


def test_uneven_rows_give_equal_shards():
    rows = _rows(11)
    shards = [P.shard_rows(rows, seed=0, shuffle=True, num_epochs=1, process_index=i, process_count=3) for i in range(3)]
    ids = [[r["prompt"][0] - ID0 for r in s] for s in shards]
    assert [len(s) for s in ids] == [3, 3, 3]
    assert len(set(sum(ids, []))) == 9


def test_length_buckets_bound_the_number_of_shapes():
    rng = np.random.default_rng(1)
    rows = [
        {"prompt": [ID0 + i], "chosen": [5] * int(rng.integers(1, 20)), "rejected": [6] * int(2 ** rng.integers(0, 5))}
        for i in range(200)
    ]
    for layout in ("standard", "prefix"):
        config = _config(layout=layout, max_length=64, min_bucket=8, num_epochs=1)
        shapes = {b["tokens_BxT"].shape for b in _iterator(rows, config)}
        buckets = config.layout_spec().buckets
        assert buckets == (8, 16, 32, 64) + ((128,) if layout == "prefix" else ())  # 2 * max_length
        assert {s[1] for s in shapes} <= set(buckets)
        # prefix: 4 rows, or 8 standard rows for a batch that sharing the 1-token prompts would not shorten
        assert {s[0] for s in shapes} <= ({8} if layout == "standard" else {4, 8})
        for rows_B in {s[0] for s in shapes}:
            assert 1 <= len({s for s in shapes if s[0] == rows_B}) <= len(buckets), shapes
        assert len(shapes) > 1
    packed = _config(layout="packed", pack_rows=2, pack_length=40, num_epochs=1)
    assert {b["tokens_BxT"].shape for b in _iterator(rows, packed)} == {(2, 40)}


def test_too_long_examples_are_dropped_and_reported():
    rows = _rows(20, long_every=5)
    config = _config(max_length=32, num_epochs=1, drop_remainder=False)
    ids = [i for b in _iterator(rows, config) for i in _batch_ids(b)]
    too_long = {4, 9, 14, 19}
    assert sorted(ids) == sorted(set(_kept_ids(20)) - too_long)
    report = P.drop_report(rows, tokenize, config, "rows.jsonl")
    assert report["rows_read"] == 20
    assert P.drop_reasons(report) == {"tokenize": 3, "too_long": 4}
    assert report["dropped_rows/too_long"] == [4, 9, 14, 19] and report["dropped_rows/tokenize"] == [3, 10, 17]
    assert report["kept"] == 13 and report["dropped"] == 7
    assert P.drop_summary(report) == (
        "rows.jsonl: dropped 7 of 20 rows: too_long 4 (rows 4, 9, 14, 19), tokenize 3 (rows 3, 10, 17)")
    with pytest.raises(P.formats.RowError, match=r"^rows.jsonl row 3: the tokenize step dropped the row \(tokenize\)$"):
        P.drop_report(rows, tokenize, config, "rows.jsonl", strict=True)
    with pytest.raises(P.formats.RowError, match=r"^rows.jsonl row 4: the example fits no batch of the layout"):
        P.drop_report(rows, keep_all, config, "rows.jsonl", strict=True)


@pytest.mark.parametrize("layout", ["standard", "prefix", "packed"])
def test_eval_batches_cover_every_example_once(layout):
    rows = _rows(23)
    config = _config(layout=layout, pairs_per_batch=4, pack_rows=2, pack_length=24)
    all_ids, counts = [], []
    for pi in range(2):
        batches, report = P.make_eval_batches(rows, tokenize, config, process_index=pi, process_count=2)
        counts.append(len(batches))
        ids = [i for b in batches for i in _batch_ids(b, pi * config.pairs_per_batch)]
        assert ids == sorted(ids), "eval keeps row order"
        all_ids += ids
        shapes = {b["pair_mask_P"].shape for b in batches}
        assert shapes == {(4,)}
    assert counts[0] == counts[1], "every process runs the same number of eval batches"
    assert sorted(all_ids) == _kept_ids(23)
    assert {k: v for k, v in report.items() if k != "layout_tokens"} == {
        "source": None, "rows_read": 23, "kept": 20, "dropped": 3, "dropped/tokenize": 3,
        "dropped_rows/tokenize": [3, 10, 17],
    }
    single, _ = P.make_eval_batches(rows, tokenize, config, process_index=0, process_count=1)
    assert [i for b in single for i in _batch_ids(b)] == _kept_ids(23)
    if layout == "standard":
        assert len(single) == 5 and single[-1]["pair_mask_P"].tolist() == [1, 1, 1, 1]
        padded, _ = P.make_eval_batches(rows[:20], tokenize, config, process_index=0, process_count=1)
        assert padded[-1]["pair_mask_P"].tolist() == [1, 0, 0, 0]  # 17 kept rows = 4 * 4 + 1


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="eval_fraction"):
        P.DataConfig(eval_fraction=1.5).validate()
    with pytest.raises(ValueError, match="num_epochs"):
        P.DataConfig(num_epochs=0).validate()
    with pytest.raises(ValueError, match="layout must be one of"):
        P.DataConfig(layout="ragged").validate()
    with pytest.raises(ValueError, match="process_index=2"):
        P.make_train_iterator(_rows(4), tokenize, _config(), process_index=2, process_count=2)
    with pytest.raises(ValueError, match="DataConfig.path"):
        S.load_splits(P.DataConfig())


def test_report_counts_by_reason():
    rows = _rows(14)
    report = P.drop_report(rows, tokenize, _config())
    assert P.drop_reasons(report) == {"tokenize": 2} and report["kept"] == 12
    assert json.loads(json.dumps(report)) == report
    spec = _config().layout_spec()
    tokens = sum(sum(spec.segment_lengths(tokenize(r))) for r in rows if tokenize(r) is not None)
    assert report["layout_tokens"] == tokens


@pytest.mark.parametrize("num_threads", [0, 3])
def test_row_step_from_formats_and_tokenize(trl_fixture_dir, tmp_path, num_threads):
    """The fixture's text pairs through RowTokenizer: drop reasons reach the report, batches hold its ids."""
    from transformers import AutoTokenizer

    from dpo_jax.data.tokenize import RowTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trl_fixture_dir / "policy")
    config = _config(max_length=24, layout="prefix", num_epochs=1, drop_remainder=False, num_threads=num_threads)
    rows = S.load_rows(str(trl_fixture_dir / "pairs.jsonl"), cache_dir=str(tmp_path))
    bad = [{"prompt": "w1 ", "chosen": "w2", "rejected": "w2"}]
    rows = bad + [dict(r) for r in rows]
    step = P.make_row_step(tokenizer, config)
    reference = RowTokenizer(tokenizer, max_length=24)
    expected = [reference(r) for r in rows]
    want = reference.drops.as_dict()
    kept, report = P.tokenize_all(rows, step, config)
    assert report["rows_read"] == 17 and report["kept"] == want["kept"] == len(kept)
    assert P.drop_reasons(report) == want["dropped"] and report["dropped_rows/chosen_equals_rejected"] == [0]
    long_rows = [i for i, e in enumerate(expected) if e is None and i > 0]
    assert report["dropped_rows/prompt_fills_max_length"] == long_rows[: P.ROWS_LISTED]
    assert {k: v for k, v in report.items() if k.startswith("events/")} == {
        f"events/{k}": v for k, v in want["events"].items()}
    assert step.drops.as_dict()["seen"] == 0, "the report pass leaves the caller's counters alone"
    kept_expected = [e for e in expected if e is not None]
    for got, ref in zip(kept, kept_expected):
        assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in ref.items()}
    # Train batches carry exactly these examples (prefix layout: chosen tokens after the prompt).
    seen = []
    for batch in P.make_train_iterator(rows, step, config, process_index=0, process_count=1):
        for p in np.flatnonzero(batch["pair_mask_P"]):  # prefix layout: row p holds pair p
            on = (batch["branch_ids_BxT"][p] == 1) & (batch["loss_mask_BxT"][p] > 0)
            seen.append(tuple(batch["targets_BxT"][p][on].tolist()))
    assert sorted(seen) == sorted(tuple(e["chosen_ids"].tolist()) for e in kept_expected)


def test_unpaired_examples_one_row_each():
    rows = [{"prompt": [ID0 + i, 5], "completion": [6] * (1 + i % 4), "label": i % 3 == 0} for i in range(10)]

    def unpaired(row):
        return {
            "prompt_ids": np.asarray(row["prompt"], np.int32),
            "completion_ids": np.asarray(row["completion"] + [2], np.int32),
            "label": np.asarray(row["label"]),
        }

    config = _config(pairs_per_batch=4, num_epochs=1, drop_remainder=False)
    batches = list(P.make_train_iterator(rows, unpaired, config, process_index=0, process_count=1))
    assert [b["tokens_BxT"].shape[0] for b in batches] == [4, 4, 4]
    labels = {}
    for b in batches:
        for p in np.flatnonzero(b["pair_mask_P"]):
            branches = set(b["branch_ids_BxT"][p][b["loss_mask_BxT"][p] > 0].tolist())
            labels[int(b["tokens_BxT"][p, 0]) - ID0] = branches
    assert labels == {i: {1} if i % 3 == 0 else {2} for i in range(10)}


def test_orbax_saves_and_restores_the_iterator_with_grains_handler(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    rows = _rows(30)
    config = _config(layout="packed", pack_rows=2, pack_length=24)
    full = list(_iterator(rows, config))
    it = _iterator(rows, config)
    for _ in range(7):
        next(it)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    restored = _iterator(rows, config)
    manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _same(list(restored), full[7:])
