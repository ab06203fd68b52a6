"""Bad data files, end to end (``load_rows`` -> ``make_row_step`` -> ``drop_report``): each either
fails with one line naming the file (and the line, for JSON), or reports its drops exactly.

The corpus is written per test (``tmp_path``); rows are JSON Lines unless named otherwise. Row
numbers are 0-based positions among the rows read, JSON line numbers 1-based lines of the file.
"""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from dpo_jax.data import formats
from dpo_jax.data import pipeline as P
from dpo_jax.data import sources as S

BOS, EOS, UNK = 1, 2, 3
W0 = 6  # token id of "w0"; "wi" is W0 + i
SCHEMAS = formats.FormatConfig().schemas()


def w(i: int) -> int:
    return W0 + i


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level over w0..w19 (anything else is <unk>), whitespace split, a BOS per call, a chat template."""
    vocab = {"<pad>": 0, "<s>": BOS, "</s>": EOS, "<unk>": UNK, "<|user|>": 4, "<|assistant|>": 5}
    vocab.update({f"w{i}": w(i) for i in range(20)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    hf.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return hf


def _write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:  # rows
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content), encoding="utf-8")
    return str(path)


def _config(**kw) -> P.DataConfig:
    return P.DataConfig(**{"pairs_per_batch": 2, "max_length": 16, "min_bucket": 8, **kw})


def _load(path: str, tmp_path):
    return S.load_rows(path, cache_dir=str(tmp_path / "cache"))


def _report(path, tokenizer, tmp_path, *, fmt="auto", strict=False, columns=None, **kw):
    """The drop report of a file through the standard row step."""
    config = _config(**kw)
    step = P.make_row_step(tokenizer, config, formats.FormatConfig(format=fmt, **(columns or {})), strict=strict)
    return P.drop_report(_load(path, tmp_path), step, config, path, strict=strict)


def _drops(report) -> dict:
    return {k: v for k, v in report.items() if k.startswith("dropped")}


def _pair(prompt="w1 ", chosen="w2", rejected="w3"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


LONG_PROMPT = " ".join(f"w{i}" for i in range(16)) + " "  # BOS + 16 ids: fills max_length=16

# One row per bad value, with the reason it is dropped under.
MIXED = [
    (_pair(), None),
    ({"prompt": "w1 ", "rejected": "w3"}, "chosen_null"),  # key absent from the line: datasets reads null
    (_pair(chosen=None), "chosen_null"),
    (_pair(chosen=3), "chosen_not_string"),
    (_pair(prompt=["w1"]), "prompt_not_string"),
    (_pair(chosen=""), "chosen_empty"),
    (_pair(rejected=" \n\t"), "rejected_empty"),
    (_pair(chosen="w2 w4", rejected="w2 w4"), "chosen_equals_rejected"),
    (_pair(prompt=LONG_PROMPT), "prompt_fills_max_length"),
    (_pair(chosen={"text": "w2"}), "chosen_not_string"),
    (_pair(prompt="w1 w2 "), None),
]


@pytest.mark.parametrize("num_threads", [0, 2])
def test_every_bad_value_is_dropped_and_counted_with_its_rows(tokenizer, tmp_path, num_threads):
    path = _write(tmp_path, "pairs.jsonl", [row for row, _ in MIXED])
    report = _report(path, tokenizer, tmp_path, num_threads=num_threads)
    assert (report["source"], report["rows_read"], report["kept"]) == (path, 11, 2)
    assert _drops(report) == {
        "dropped": 9,
        "dropped/chosen_empty": 1, "dropped_rows/chosen_empty": [5],
        "dropped/chosen_equals_rejected": 1, "dropped_rows/chosen_equals_rejected": [7],
        "dropped/chosen_not_string": 2, "dropped_rows/chosen_not_string": [3, 9],
        "dropped/chosen_null": 2, "dropped_rows/chosen_null": [1, 2],
        "dropped/prompt_fills_max_length": 1, "dropped_rows/prompt_fills_max_length": [8],
        "dropped/prompt_not_string": 1, "dropped_rows/prompt_not_string": [4],
        "dropped/rejected_empty": 1, "dropped_rows/rejected_empty": [6],
    }
    assert {r: [i for i, (_, why) in enumerate(MIXED) if why == r] for r in P.drop_reasons(report)} == {
        k.split("/", 1)[1]: v for k, v in report.items() if k.startswith("dropped_rows/")
    }
    assert json.loads(json.dumps(report)) == report
    assert P.drop_summary(report) == (
        f"{path}: dropped 9 of 11 rows: chosen_not_string 2 (rows 3, 9), chosen_null 2 (rows 1, 2), "
        "chosen_empty 1 (row 5), chosen_equals_rejected 1 (row 7), prompt_fills_max_length 1 (row 8), "
        "prompt_not_string 1 (row 4), rejected_empty 1 (row 6)"
    )


def test_more_rows_than_listed_end_with_dots(tokenizer, tmp_path):
    rows = [_pair(chosen="") if i % 2 else _pair() for i in range(16)]
    report = _report(_write(tmp_path, "pairs.jsonl", rows), tokenizer, tmp_path)
    assert report["dropped/chosen_empty"] == 8 and report["dropped_rows/chosen_empty"] == [1, 3, 5, 7, 9]
    assert P.drop_summary(report).endswith(": dropped 8 of 16 rows: chosen_empty 8 (rows 1, 3, 5, 7, 9, ...)")


@pytest.mark.parametrize(
    "row,field,detail,reason",
    [
        ({"prompt": "w1 ", "rejected": "w3"}, "chosen", "is null", "chosen_null"),
        (_pair(chosen=""), "chosen", "is empty", "chosen_empty"),
        (_pair(chosen=3), "chosen", "is int, expected a string", "chosen_not_string"),
        (_pair(chosen="w2", rejected="w2"), "chosen", "equals field 'rejected'", "chosen_equals_rejected"),
        (_pair(prompt=LONG_PROMPT), "prompt", "has 17 tokens, filling max_length=16 with no room for a completion",
         "prompt_fills_max_length"),
    ],
)
def test_strict_raises_at_the_first_bad_row_naming_file_row_and_field(tokenizer, tmp_path, row, field, detail,
                                                                       reason):
    path = _write(tmp_path, "pairs.jsonl", [_pair(), _pair(), row, _pair(chosen="")])
    with pytest.raises(formats.RowError) as err:
        _report(path, tokenizer, tmp_path, strict=True)
    assert str(err.value) == f"{path} row 2: field '{field}' {detail} ({reason})"
    assert (err.value.source, err.value.row, err.value.field, err.value.reason) == (path, 2, field, reason)


def test_strict_names_the_configured_column(tokenizer, tmp_path):
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    rows = [{"question": "w1 ", "good": "w2", "bad": "w3"}, {"question": LONG_PROMPT, "good": "w2", "bad": "w3"}]
    path = _write(tmp_path, "pairs.jsonl", rows)
    with pytest.raises(formats.RowError, match=r" row 1: field 'question' has 17 tokens"):
        _report(path, tokenizer, tmp_path, strict=True, columns=columns)
    rows[1] = {"question": "w1 ", "good": " ", "bad": "w3"}
    path = _write(tmp_path, "other.jsonl", rows)
    with pytest.raises(formats.RowError, match=r"^.*other.jsonl row 1: field 'good' is empty \(chosen_empty\)$"):
        _report(path, tokenizer, tmp_path, strict=True, columns=columns)


def test_a_column_absent_from_the_file_fails_naming_it(tokenizer, tmp_path):
    path = _write(tmp_path, "pairs.jsonl", [{"prompt": "w1 ", "chosen": "w2"}] * 3)
    with pytest.raises(formats.FormatError) as err:
        _report(path, tokenizer, tmp_path, fmt="standard")
    assert str(err.value) == (
        f"{path} row 0: missing column(s) ['rejected'] for format 'standard'; columns found: ['chosen', 'prompt']; "
        f"accepted schemas: {SCHEMAS}"
    )
    with pytest.raises(formats.FormatError) as err:
        _report(path, tokenizer, tmp_path)  # format "auto"
    assert str(err.value) == (
        f"{path} row 0: cannot detect the format: columns found ['chosen', 'prompt']; accepted schemas: {SCHEMAS}"
    )


def test_every_row_bad_fails_naming_the_file_and_reasons(tokenizer, tmp_path):
    path = _write(tmp_path, "pairs.jsonl", [_pair(chosen=""), _pair(chosen="w2", rejected="w2"), _pair(rejected="")])
    with pytest.raises(S.DataFileError) as err:
        _report(path, tokenizer, tmp_path)
    assert str(err.value) == (
        f"{path}: dropped all 3 rows: chosen_empty 1 (row 0), chosen_equals_rejected 1 (row 1), "
        "rejected_empty 1 (row 2); no rows left"
    )
    config = _config()
    step = P.make_row_step(tokenizer, config)
    with pytest.raises(S.DataFileError, match=r"eval.jsonl: dropped all 3 rows: .*; no rows left$"):
        P.make_eval_batches(_load(path, tmp_path), step, config, process_index=0, process_count=1,
                            source="eval.jsonl")


def test_control_characters_and_odd_unicode_are_kept_when_they_tokenize(tokenizer, tmp_path):
    rows = [
        _pair("w1\u0000 w2 ", "w3\u0007", "w4"),  # NUL and BEL stick to their word: <unk>
        _pair("w1\u00a0w2\tw3\r\nw4 ", "w5\u200b", "w6 \U0001f600"),  # NBSP/tab/CRLF split; ZWSP sticks; emoji <unk>
        _pair("\u001b[31mw1 ", "w\u0335", "\ufffd w2"),  # ANSI escape, combining overlay, replacement char
        _pair("w1 ", "\u200b", "\u00a0w2"),  # a zero-width space is not whitespace: a completion of <unk>
        _pair("w1\u202e w2 ", "\u0301w3", "w3\ufeff"),  # both completions are a lone <unk>: identical ids
        _pair("w1 ", "\u00a0", "w2"),  # only a no-break space: whitespace, so empty
    ]
    path = _write(tmp_path, "pairs.jsonl", rows)
    config = _config()
    kept, report = P.tokenize_all(_load(path, tmp_path), P.make_row_step(tokenizer, config), config, source=path)
    assert _drops(report) == {
        "dropped": 2,
        "dropped/chosen_empty": 1, "dropped_rows/chosen_empty": [5],
        "dropped/chosen_ids_equal_rejected_ids": 1, "dropped_rows/chosen_ids_equal_rejected_ids": [4],
    }
    assert [{k: v.tolist() for k, v in e.items()} for e in kept] == [
        {"prompt_ids": [BOS, UNK, w(2)], "chosen_ids": [UNK, EOS], "rejected_ids": [w(4), EOS]},
        {"prompt_ids": [BOS, w(1), w(2), w(3), w(4)], "chosen_ids": [UNK, EOS], "rejected_ids": [w(6), UNK, EOS]},
        {"prompt_ids": [BOS, UNK], "chosen_ids": [UNK, EOS], "rejected_ids": [UNK, w(2), EOS]},
        {"prompt_ids": [BOS, w(1)], "chosen_ids": [UNK, EOS], "rejected_ids": [w(2), EOS]},
    ]
    assert not any(k.startswith("events/") for k in report), "no prompt boundary moved"


def test_wrong_message_schema_in_conversational_rows(tokenizer, tmp_path):
    user = {"role": "user", "content": "w1"}

    def said(content):
        return [user, {"role": "assistant", "content": content}]

    rows = [
        {"chosen": said("w2"), "rejected": said("w3")},
        {"chosen": [user, {"role": "assistant", "text": "w2"}], "rejected": said("w3")},  # "text", not "content"
        {"chosen": "w2", "rejected": said("w3")},  # a string, not messages
        {"chosen": said("w2"), "rejected": [user, {"content": "w3"}]},  # no role
        {"chosen": [user, "w2"], "rejected": said("w3")},  # a message that is a string
        {"chosen": said("w2"), "rejected": [{"role": "user", "content": "w4"}, {"role": "assistant", "content": "w3"}]},
    ]
    path = _write(tmp_path, "chat.jsonl", rows)
    report = _report(path, tokenizer, tmp_path)
    assert (report["rows_read"], report["kept"]) == (6, 1)
    assert _drops(report) == {
        "dropped": 5,
        "dropped/chosen_bad_message": 2, "dropped_rows/chosen_bad_message": [1, 4],
        "dropped/chosen_not_messages": 1, "dropped_rows/chosen_not_messages": [2],
        "dropped/no_shared_prompt": 1, "dropped_rows/no_shared_prompt": [5],
        "dropped/rejected_bad_message": 1, "dropped_rows/rejected_bad_message": [3],
    }
    with pytest.raises(formats.RowError) as err:
        _report(path, tokenizer, tmp_path, strict=True)
    assert str(err.value).startswith(
        f"{path} row 1: field 'chosen' message 1 is not {{'role': str, 'content': str}}: "
    ) and str(err.value).endswith(" (chosen_bad_message)")


@pytest.mark.parametrize(
    "name,content,error",
    [
        ("pairs.jsonl", "", ": the file is empty"),
        ("pairs.json", "", ": the file is empty"),
        ("pairs.parquet", "", ": the file is empty"),
        ("pairs.csv", "", ": the file is empty"),
        ("pairs.jsonl", "\n  \n\n", ": the file holds only blank lines"),
        ("pairs.json", " \n", ": the file holds only whitespace"),
        ("pairs.json", "[]", ": no rows (an empty JSON array)"),
        ("pairs.jsonl", json.dumps(_pair()) + "\n" + json.dumps(_pair()) + '\n{"prompt": "w1", "chosen": "w2", "rej',
         " line 3: invalid JSON: Unterminated string starting at (column 34)"),
        ("pairs.json", "[" + json.dumps(_pair()) + ",\n " + json.dumps(_pair()) + ',\n {"prompt": "w1", "chosen"',
         " line 3: invalid JSON: Expecting ':' delimiter (column 27)"),
        ("pairs.jsonl", json.dumps(_pair()) + "\n" + json.dumps(_pair()) + " x\n",
         " line 2: invalid JSON: Extra data (column 53)"),
        ("pairs.jsonl", json.dumps(_pair()) + "\n[1, 2]\n", " line 2: an array, expected an object (one row per line)"),
        ("pairs.json", "[" + json.dumps(_pair()) + ", 3]",
         ": item 1 of the array is a number, expected an object (one row)"),
        ("pairs.json", json.dumps(_pair()) + "\n" + json.dumps(_pair())[:-1] + "\n",  # JSON Lines in a .json file
         " line 2: invalid JSON: Expecting ',' delimiter (column 1)"),
        ("pairs.jsonl", json.dumps(_pair()) + "\n" + json.dumps(_pair(chosen="w2\ud800")) + "\n",
         " line 2: a string holds the unpaired surrogate \\ud800, which is not valid Unicode"),
        ("pairs.json", "[" + json.dumps(_pair()) + ",\n" + json.dumps(_pair(chosen="\udc00")) + "]",
         " line 2: a string holds the unpaired surrogate \\udc00, which is not valid Unicode"),
        ("pairs.parquet", "not parquet", ": cannot be read as parquet: ArrowInvalid: Parquet magic bytes not found in "
         "footer. Either the file is corrupted or this is not a parquet file."),
        ("pairs.csv", 'prompt,chosen,rejected\nw1,w2,w3\nw1,"w2,w3\n',
         ": cannot be read as csv: ParserError: Error tokenizing data. C error: EOF inside string starting at row 2"),
    ],
)
def test_unreadable_files_fail_with_one_line_naming_the_file(tmp_path, name, content, error):
    path = _write(tmp_path, name, content)
    with pytest.raises(S.DataFileError) as err:
        _load(path, tmp_path)
    assert str(err.value) == path + error
    assert "\n" not in str(err.value)


def test_invalid_utf8_fails_at_its_row_or_line(tokenizer, tmp_path):
    """``datasets`` loads invalid UTF-8 unchecked: the row fails when it is decoded, in the pass of
    ``drop_report``; a scan after a failed load (``diagnose_file``) names the line."""
    content = (json.dumps(_pair()) + "\n").encode() + b'{"prompt": "w1 ", "chosen": "caf\xe9", "rejected": "w3"}\n'
    path = _write(tmp_path, "pairs.jsonl", content)
    with pytest.raises(formats.RowProblem) as err:
        _report(path, tokenizer, tmp_path)
    assert str(err.value) == (
        f"{path} row 1: cannot be decoded: 'utf-8' codec can't decode byte 0xe9 in position 3: unexpected end of data"
    )
    assert S.diagnose_file(path) == f"{path} line 2: not UTF-8 text (byte 0xe9 at column 33)"
    json_path = _write(tmp_path, "pairs.json", b"[\n" + content.replace(b"}\n{", b"},\n{") + b"]")
    assert S.diagnose_file(json_path) == f"{json_path} line 3: not UTF-8 text (byte 0xe9)"


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "no_dir/pairs.json"])
def test_a_missing_file_fails_naming_it(tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(S.DataFileError) as err:
        _load(path, tmp_path)
    assert str(err.value) == f"{path}: no such file or directory"
    with pytest.raises(S.DataFileError, match=r"^\./nowhere: no such file or directory$"):
        S.load_rows("./nowhere")


def test_a_good_file_is_not_scanned_and_keeps_every_row(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(S, "diagnose_file", lambda path: pytest.fail("scanned a file that loads"))
    path = _write(tmp_path, "pairs.jsonl", [_pair(prompt=f"w{i} ") for i in range(4)])
    report = _report(path, tokenizer, tmp_path)
    assert _drops(report) == {"dropped": 0} and report["kept"] == 4
    assert P.drop_summary(report) == f"{path}: kept all 4 rows"
