"""Listwise rows (dpo_jax/data/listwise.py): parsing and its errors."""

import numpy as np
import pytest

from dpo_jax.data import listwise as LR
from dpo_jax.data.formats import FormatError


def uf_row(**over):
    row = {"instruction": "Name a colour.", "source": "evol_instruct",
           "completions": [{"response": "Red.", "overall_score": 7.5, "fine-grained_score": 4.25, "model": "a"},
                           {"response": "Blue.", "overall_score": 9, "fine-grained_score": 3.5, "model": "b"},
                           {"response": "Green", "overall_score": "6", "fine-grained_score": 4.75, "model": "c"}]}
    row.update(over)
    return row


def test_ultrafeedback_rows_default_to_overall_score():
    got = LR.parse_listwise_row(uf_row(), 0, "uf.jsonl")
    assert got == LR.ListRow("Name a colour.", ("Red.", "Blue.", "Green"), (7.5, 9.0, 6.0))
    fine = LR.parse_listwise_row(uf_row(), 0, "uf.jsonl", score_field="fine-grained_score")
    assert fine.scores == (4.25, 3.5, 4.75)
    # A completion without overall_score falls back to fine-grained_score.
    row = uf_row()
    del row["completions"][1]["overall_score"]
    assert LR.parse_listwise_row(row).scores == (7.5, 3.5, 6.0)


def test_scored_and_ranking_rows():
    got = LR.parse_listwise_row({"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 3.5, np.float32(1)]})
    assert got == LR.ListRow("p", ("a", "b", "c"), (1.0, 3.5, 1.0))
    got = LR.parse_listwise_row({"prompt": "p", "ranking": ["best", "mid", "worst"]})
    assert got == LR.ListRow("p", ("best", "mid", "worst"), (2.0, 1.0, 0.0))


@pytest.mark.parametrize("row,kw,field,what", [
    (uf_row(completions=[{"response": "Red.", "overall_score": 7}]), {}, "completions", "at least 2"),
    (uf_row(completions=[{"response": "Red.", "overall_score": 7},
                         {"response": "Blue.", "overall_score": "N/A"}]), {}, "completions[1].overall_score", "number"),
    (uf_row(completions=[{"response": "Red.", "overall_score": 7},
                         {"response": "Blue.", "overall_score": True}]), {}, "completions[1].overall_score", "number"),
    (uf_row(completions=[{"response": "Red.", "overall_score": 7}, {"overall_score": 8}]), {},
     "completions[1].response", "missing"),
    (uf_row(completions=[{"response": "Red.", "overall_score": 7}, {"response": "Blue."}]), {},
     "completions[1]", "no score"),
    (uf_row(), {"score_field": "helpfulness"}, "completions[0]", "no score"),
    ({"completions": uf_row()["completions"]}, {}, "instruction", "missing"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0]}, {}, "scores", "2 responses"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0, float("nan")]}, {}, "scores[1]", "finite"),
    ({"prompt": "p", "responses": ["a", "b"]}, {}, "scores", "missing"),
    ({"prompt": "p", "responses": ["a", ""], "scores": [1, 2]}, {}, "responses[1]", "empty"),
    ({"prompt": "p", "responses": "ab", "scores": [1, 2]}, {}, "responses", "list"),
    ({"prompt": 3, "ranking": ["a", "b"]}, {}, "prompt", "string"),
    ({"prompt": "p", "ranking": ["a"]}, {}, "ranking", "at least 2"),
])
def test_malformed_rows_name_source_row_and_field(row, kw, field, what):
    with pytest.raises(FormatError, match=what) as info:
        LR.parse_listwise_row(row, 17, "lists.jsonl", **kw)
    msg = str(info.value)
    assert msg.startswith("lists.jsonl row 17: ") and f"field {field!r}" in msg, msg
    assert info.value.row == 17 and info.value.source == "lists.jsonl" and info.value.field == field


def test_rows_of_no_schema():
    with pytest.raises(FormatError, match="lists.jsonl row 2: fits no listwise schema.*'chosen'"):
        LR.parse_listwise_row({"prompt": "p", "chosen": "a", "rejected": "b"}, 2, "lists.jsonl")
    with pytest.raises(FormatError, match="not a mapping"):
        LR.parse_listwise_row(["p", "a"], 0, "x")
