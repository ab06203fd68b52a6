"""Listwise rows -> list examples (data/list_tokenize.py) and through the pipeline: the three schemas
tokenize as pairs do (BOS once, EOS appended, truncation per sequence; a response starts with its
own space, as a pair's completion does), bad rows are dropped and
counted by reason with their row numbers (or raise naming the row and field when strict), and the
grain train iterator lays lists out and resumes exactly."""

import json

import numpy as np
import pytest

from dpo_jax.data import formats, list_tokenize
from dpo_jax.data import pipeline as P
from tests.data.test_bad_files import BOS, EOS, tokenizer, w  # noqa: F401  (tokenizer: a fixture)


def _tok(tokenizer, **kw):
    kw.setdefault("max_length", 64)
    return list_tokenize.ListRowTokenizer(tokenizer, kw.pop("list_size", 4), **kw)


def test_the_three_schemas(tokenizer):  # noqa: F811
    tok = _tok(tokenizer)
    scored = tok({"prompt": "w1 w2", "responses": [" w3", " w4 w5", " w6"], "scores": [1, 3, 2.5]})
    np.testing.assert_array_equal(scored["prompt_ids"], [BOS, w(1), w(2)])
    assert [r.tolist() for r in scored["response_ids"]] == [[w(3), EOS], [w(4), w(5), EOS], [w(6), EOS]]
    np.testing.assert_array_equal(scored["scores"], [1.0, 3.0, 2.5])
    uf = tok({"instruction": "w1", "completions": [{"response": " w2", "overall_score": 7},
                                                   {"response": " w3", "overall_score": 4.5}]})
    np.testing.assert_array_equal(uf["scores"], [7.0, 4.5])
    ranked = tok({"prompt": "w1", "ranking": [" w2", " w3", " w4"]})
    np.testing.assert_array_equal(ranked["scores"], [2.0, 1.0, 0.0])
    assert tok.drops.kept == 3 and tok.drops.seen == 3


def test_truncation_per_sequence(tokenizer):  # noqa: F811
    ex = _tok(tokenizer, max_length=5)({"prompt": "w1 w2", "responses": [" w3 w4 w5 w6", " w7"], "scores": [0, 1]})
    assert [r.tolist() for r in ex["response_ids"]] == [[w(3), w(4)], [w(7), EOS]]  # 3 prompt ids + 2


BAD = [
    ({"prompt": "w1", "responses": ["w2", None], "scores": [1, 0]}, list_tokenize.DROP_LIST_MALFORMED,
     "responses[1]"),
    ({"prompt": "w1", "responses": ["w2", "w3", "w4"], "scores": [1, 0, 2]}, list_tokenize.DROP_LIST_TOO_MANY,
     None),
    ({"prompt": "w1", "responses": ["w2", "w3"], "scores": [1, 1]}, list_tokenize.DROP_LIST_ALL_TIED, None),
    ({"prompt": "w1", "responses": ["w2", "w3"], "scores": ["high", 1]}, list_tokenize.DROP_LIST_MALFORMED,
     "scores[0]"),
]


@pytest.mark.parametrize("row,reason,field", BAD)
def test_bad_rows_are_dropped_by_reason_or_raise_when_strict(tokenizer, row, reason, field):  # noqa: F811
    tok = _tok(tokenizer, list_size=2)
    assert tok(row, 7) is None
    assert tok.drops.as_dict()["dropped"] == {reason: 1} and tok.drops.first_row[reason] == 7
    with pytest.raises(formats.RowProblem) as err:
        _tok(tokenizer, list_size=2, strict=True)(row, 7)
    assert "row 7" in str(err.value) and (field is None or field in str(err.value)), str(err.value)


def test_a_row_of_no_listwise_schema_raises_naming_its_keys(tokenizer):  # noqa: F811
    with pytest.raises(formats.FormatError, match=r"row 3.*fits no listwise schema.*\['chosen', 'prompt'\]"):
        _tok(tokenizer)({"prompt": "w1", "chosen": "w2"}, 3)


def _rows(n):
    rng = np.random.default_rng(0)
    words = lambda k: " ".join(f"w{i}" for i in rng.integers(0, 20, k))  # noqa: E731
    return [{"prompt": words(3), "responses": [" " + words(rng.integers(1, 5)) for _ in range(int(rng.integers(2, 5)))],
             "scores": [float(s) for s in rng.permutation(4)[:4]]} for _ in range(n)]


def test_pipeline_reports_drops_and_resumes_lists_exactly(tokenizer):  # noqa: F811
    rows = _rows(40)
    for row in rows:
        row["scores"] = row["scores"][:len(row["responses"])]
    rows[5]["scores"] = [1.0] * len(rows[5]["responses"])  # all tied: dropped
    cfg = P.DataConfig(pairs_per_batch=4, layout="prefix", max_length=16, list_size=4, seed=3, num_epochs=None)
    step = P.make_row_step(tokenizer, cfg)
    report = P.drop_report(rows, step, cfg, "lists.jsonl")
    assert report["kept"] == 39 and report[f"dropped_rows/{list_tokenize.DROP_LIST_ALL_TIED}"] == [5]
    it = P.make_train_iterator(rows, step, cfg, process_index=0, process_count=1)
    first = next(it)
    assert first["scores_PxK"].shape == (4, 4) and first["tokens_BxT"].shape[0] == 4
    np.testing.assert_array_equal(first["pair_mask_P"], 1.0)
    assert (first["slot_mask_PxK"].sum(1) >= 2).all()
    state = json.loads(json.dumps(it.get_state()))
    after = [next(it) for _ in range(3)]
    resumed = P.make_train_iterator(rows, step, cfg, process_index=0, process_count=1)
    resumed.set_state(state)
    for a, b in zip(after, [next(resumed) for _ in range(3)]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
