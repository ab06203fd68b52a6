"""Row schemas -> canonical records: each format, implicit prompts, detection, bad input."""

import pickle

import pytest

from dpo_jax.data.formats import (
    DropCounter,
    FormatConfig,
    FormatError,
    Pair,
    RowError,
    RowNormalizer,
    Unpaired,
    detect_format,
    normalize_rows,
    split_implicit_text,
)


def _msg(role, content):
    return {"role": role, "content": content}


def test_standard_pair():
    (rec,) = normalize_rows([{"prompt": "Q: 2+2? ", "chosen": "4", "rejected": "5", "id": 7}])
    assert rec == Pair("Q: 2+2? ", "4", "5", conversational=False)


def test_hh_implicit_prompt_splits_after_the_last_assistant_marker():
    # Both answers start with "Yes, it is": the character-level common prefix runs into the answers,
    # the split must still be right after the final "\n\nAssistant:".
    dialogue = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: Sure?\n\nAssistant:"
    row = {"chosen": dialogue + " Yes, it is 4.", "rejected": dialogue + " Yes, it is 5!"}
    (rec,) = normalize_rows([row])
    assert rec.prompt == dialogue
    assert (rec.chosen, rec.rejected) == (" Yes, it is 4.", " Yes, it is 5!")
    assert rec.prompt + rec.chosen == row["chosen"]


def test_implicit_prompt_without_marker_follows_trl_rule():
    # TRL's extract_prompt: the longest common prefix, a trailing space moved to the completions.
    assert split_implicit_text("The sky is blue", "The sky is red", None) == ("The sky is", " blue", " red")
    assert split_implicit_text("ab", "ac", "\n\nAssistant:") == ("a", "b", "c")
    (rec,) = normalize_rows([{"chosen": "The sky is blue", "rejected": "The sky is red"}])
    assert (rec.prompt, rec.chosen, rec.rejected) == ("The sky is", " blue", " red")


def test_conversational_explicit_and_implicit_prompt():
    user = _msg("user", "Hi?")
    good, bad = _msg("assistant", "Hello."), _msg("assistant", "Go away.")
    explicit = {"prompt": [user], "chosen": [good], "rejected": [bad]}
    implicit = {"chosen": [user, good], "rejected": [user, bad]}
    for row in (explicit, implicit):
        (rec,) = normalize_rows([row])
        assert rec == Pair((user,), (good,), (bad,), conversational=True)
        assert detect_format(row) == "conversational"


def test_unpaired_text_and_conversational():
    rows = [
        {"prompt": "Q ", "completion": "A", "label": True},
        {"prompt": "Q ", "completion": "B", "label": 0},
    ]
    assert normalize_rows(rows) == [Unpaired("Q ", "A", True), Unpaired("Q ", "B", False)]
    conv = {"prompt": [_msg("user", "Q")], "completion": [_msg("assistant", "A")], "label": False}
    (rec,) = normalize_rows([conv])
    assert rec.conversational and rec.label is False and rec.completion == (_msg("assistant", "A"),)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "standard"),
        ({"chosen": "pa", "rejected": "pb"}, "implicit_prompt"),
        (
            {"prompt": [_msg("user", "p")], "chosen": [_msg("assistant", "a")], "rejected": []},
            "conversational",
        ),
        ({"chosen": [_msg("user", "p")], "rejected": [_msg("user", "q")]}, "conversational"),
        ({"prompt": "p", "completion": "a", "label": True}, "unpaired"),
    ],
)
def test_auto_detection(row, expected):
    assert detect_format(row) == expected


def test_custom_column_names():
    cfg = FormatConfig(prompt="question", chosen="good", rejected="bad")
    (rec,) = normalize_rows([{"question": "q ", "good": "y", "bad": "n"}], cfg)
    assert rec == Pair("q ", "y", "n")


def test_missing_column_error_lists_found_columns_and_schemas():
    cfg = FormatConfig(format="standard")
    with pytest.raises(FormatError) as err:
        normalize_rows(
            [
                {"prompt": "p", "chosen": "a", "rejected": "b"},
                {"question": "p", "chosen": "a", "rejected": "b"},
            ],
            cfg,
        )
    msg = str(err.value)
    assert not isinstance(err.value, (KeyError, IndexError)) and isinstance(err.value, ValueError)
    assert "row 1" in msg and "['prompt']" in msg
    assert "['chosen', 'question', 'rejected']" in msg
    for schema in ("standard:", "implicit_prompt:", "conversational:", "unpaired:"):
        assert schema in msg
    with pytest.raises(FormatError, match=r"columns found \['text'\]; accepted schemas: standard"):
        normalize_rows([{"text": "hello"}])
    with pytest.raises(ValueError, match="FormatConfig.format='pairs'"):
        FormatConfig(format="pairs")


BAD_ROWS = [
    {"prompt": "p ", "chosen": "a", "rejected": "b"},  # kept
    {"prompt": "p ", "chosen": None, "rejected": "b"},  # chosen_null
    {"prompt": "p ", "chosen": "a", "rejected": 3},  # rejected_not_string
    {"prompt": "", "chosen": "a", "rejected": "b"},  # prompt_empty
    {"prompt": "p ", "chosen": "  \n", "rejected": "b"},  # chosen_empty
    {"prompt": "p ", "chosen": "same", "rejected": "same"},  # chosen_equals_rejected
    {"prompt": "p ", "chosen": "a", "rejected": "same"},  # kept
    {"prompt": "p ", "chosen": "x", "rejected": "x"},  # chosen_equals_rejected
]


def test_drops_are_counted_by_reason():
    drops = DropCounter()
    recs = normalize_rows(BAD_ROWS, drops=drops)
    assert recs == [Pair("p ", "a", "b"), Pair("p ", "a", "same")]
    summary = drops.as_dict()
    assert summary["seen"] == 8 and summary["kept"] == 2 and drops.n_dropped == 6
    assert summary["dropped"] == {
        "chosen_empty": 1,
        "chosen_equals_rejected": 2,
        "chosen_null": 1,
        "prompt_empty": 1,
        "rejected_not_string": 1,
    }
    assert summary["first_row"]["chosen_equals_rejected"] == 5


def test_bad_messages_labels_and_implicit_rows_are_dropped():
    user = _msg("user", "Hi")
    rows = [
        {"chosen": [user, _msg("assistant", "a")], "rejected": [user, {"role": "assistant"}]},  # no content
        {"chosen": [user, _msg("assistant", "a")], "rejected": "text"},  # rejected_not_messages
        {"chosen": [_msg("user", "x"), _msg("assistant", "a")], "rejected": [user, _msg("assistant", "a")]},
        {"chosen": [user, _msg("assistant", "a")], "rejected": [user]},  # rejected_empty after the split
    ]
    drops = DropCounter()
    assert normalize_rows(rows, drops=drops) == []
    assert dict(drops.dropped) == {
        "rejected_bad_message": 1,
        "rejected_not_messages": 1,
        "no_shared_prompt": 1,
        "rejected_empty": 1,
    }
    drops = DropCounter()
    unpaired = [
        {"prompt": "p", "completion": "c", "label": "yes"},
        {"prompt": "p", "completion": "c", "label": 2},
    ]
    assert normalize_rows(unpaired, drops=drops) == []
    assert dict(drops.dropped) == {"label_not_bool": 2}
    drops = DropCounter()
    assert (
        normalize_rows(
            [{"chosen": "abc", "rejected": "xyz"}, {"chosen": "ab", "rejected": "abc"}], drops=drops
        )
        == []
    )
    assert dict(drops.dropped) == {"no_shared_prompt": 1, "chosen_empty": 1}


def test_strict_mode_names_row_and_field():
    with pytest.raises(RowError) as err:
        normalize_rows(BAD_ROWS, strict=True)
    assert str(err.value) == "row 1: field 'chosen' is null (chosen_null)"
    assert (err.value.row, err.value.field, err.value.reason) == (1, "chosen", "chosen_null")
    with pytest.raises(RowError, match=r"^row 1: field 'rejected' is int, expected a string \(rejected_not_string\)$"):
        normalize_rows(BAD_ROWS[:1] + BAD_ROWS[2:], strict=True)
    cfg = FormatConfig(prompt="q", chosen="good", rejected="bad")
    rows = [
        {"q": "p ", "good": "a", "bad": "b"},
        {"q": "p ", "good": "a", "bad": "b"},
        {"q": " ", "good": "a", "bad": "b"},
    ]
    with pytest.raises(RowError, match=r"^row 2: field 'q' is empty \(prompt_empty\)$"):
        normalize_rows(rows, cfg, strict=True)
    located = pickle.loads(pickle.dumps(RowError("is empty", "q", "prompt_empty", 2).at(source="pairs.jsonl")))
    assert str(located) == "pairs.jsonl row 2: field 'q' is empty (prompt_empty)" and located.row == 2


def test_drop_counter_merge_and_pickle():
    a, b = DropCounter(), DropCounter()
    normalize_rows(BAD_ROWS[:4], drops=a)
    normalize_rows(BAD_ROWS[4:], drops=b)
    whole = DropCounter()
    normalize_rows(BAD_ROWS, drops=whole)
    merged = a.merge(b)
    assert (merged.seen, merged.kept, merged.dropped) == (whole.seen, whole.kept, whole.dropped)
    norm = pickle.loads(pickle.dumps(RowNormalizer(FormatConfig(chosen="good"))))
    assert norm({"prompt": "p", "good": "a", "rejected": "b"}, 0) == Pair("p", "a", "b")
    with pytest.raises(FormatError, match="expected a mapping"):
        norm(["p", "a", "b"], 3)


def test_conversational_row_with_a_text_prompt_column_takes_the_shared_messages():
    """UltraFeedback-binarized / Tulu 3 rows: `prompt` is a string, chosen/rejected full conversations."""
    from dpo_jax.data import formats

    user = {"role": "user", "content": "hi"}
    row = {"prompt": "hi", "chosen": [user, {"role": "assistant", "content": "a"}],
           "rejected": [user, {"role": "assistant", "content": "b"}]}
    rec = formats.RowNormalizer()(row)
    assert rec is not None and rec.conversational
    assert list(rec.prompt) == [user]
    assert list(rec.chosen) == [{"role": "assistant", "content": "a"}]
