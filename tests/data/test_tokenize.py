"""Record tokenization: TRL 1.16 parity on the fixture, truncation, the boundary rule, chat templates."""

import json
import pickle
import warnings

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dpo_jax.data.formats import DropCounter, FormatConfig, Pair, RowError, Unpaired, normalize_rows
from dpo_jax.data.tokenize import BoundaryWarning, Dropped, PairTokenizer, RowTokenizer, truncate_ids

BOS, EOS, USER, ASSISTANT = 1, 2, 4, 5
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def fixture_tokenizer(trl_fixture_dir):
    return AutoTokenizer.from_pretrained(trl_fixture_dir / "policy")


@pytest.fixture(scope="module")
def chat_tokenizer():
    """Word-level; its default call adds a BOS; a chat template with BOS, EOS and role headers."""
    vocab = {"<pad>": 0, "<s>": BOS, "</s>": EOS, "<unk>": 3, "<|user|>": USER, "<|assistant|>": ASSISTANT}
    vocab.update({f"w{i}": 6 + i for i in range(20)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


@pytest.fixture(scope="module")
def merging_tokenizer():
    """BPE without pre-tokenization: "a" + "b" merge into "ab" across a prompt/completion boundary."""
    bpe = Tokenizer(models.BPE(vocab={"x": 0, "a": 1, "b": 2, "ab": 3, "</s>": 4}, merges=[("a", "b")]))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")


def w(*ids):
    """Text of fixture-tokenizer words: w(0, 5) -> "w0 w5" (token ids 4 and 9)."""
    return " ".join(f"w{i}" for i in ids)


def test_trl_parity_on_fixture_pairs(trl_fixture_dir, fixture_tokenizer):
    rows = [json.loads(line) for line in open(trl_fixture_dir / "pairs.jsonl")]
    reference = json.load(open(trl_fixture_dir / "trl_reference.json"))["pairs"]
    tokenize = PairTokenizer(fixture_tokenizer)
    outs = [tokenize(r) for r in normalize_rows(rows)]
    assert len(outs) == len(reference) == 16
    for i, (out, ref) in enumerate(zip(outs, reference, strict=True)):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert out[key].dtype == np.int32, key
            assert out[key].tolist() == ref[key], (
                f"pair {i} {key} differs from tests/fixtures/trl_parity/trl_reference.json "
                "(TRL 1.16 DPOTrainer token ids, produced by make_reference.py)"
            )
    assert tokenize.drops.as_dict()["dropped"] == {} and tokenize.drops.kept == 16


def test_truncation_modes_and_lengths(fixture_tokenizer):
    pair = Pair(w(1, 2, 3, 4) + " ", w(5, 6, 7), w(8))  # 4 prompt ids; completions of 4 and 2 with EOS
    ids = lambda *words: [i + 4 for i in words]  # noqa: E731  (word wN is id N + 4)

    def run(**kw):
        out = PairTokenizer(fixture_tokenizer, **kw)(pair)
        return out["prompt_ids"].tolist(), out["chosen_ids"].tolist(), out["rejected_ids"].tolist()

    full = (ids(1, 2, 3, 4), ids(5, 6, 7) + [EOS], ids(8) + [EOS])
    assert run() == full
    assert run(max_length=8, truncation_mode="keep_start") == full
    # keep_start: each sequence keeps its first max_length ids; the completions are cut.
    assert run(max_length=6, truncation_mode="keep_start") == (ids(1, 2, 3, 4), ids(5, 6), ids(8) + [EOS])
    assert run(max_prompt_length=2, max_length=5, truncation_mode="keep_start") == (
        ids(1, 2),
        ids(5, 6, 7),
        ids(8) + [EOS],
    )
    # keep_end: the prompt keeps its end and loses its start until the longest completion fits.
    assert run(max_length=6, truncation_mode="keep_end") == (ids(3, 4), *full[1:])
    assert run(max_prompt_length=3, truncation_mode="keep_end") == (ids(2, 3, 4), *full[1:])
    assert run(max_prompt_length=3, max_length=6, truncation_mode="keep_end") == (ids(3, 4), *full[1:])


def test_unfit_pairs_are_dropped_and_counted(fixture_tokenizer):
    drops = DropCounter()
    pairs = [
        Pair(w(1, 2, 3, 4) + " ", w(5, 6, 7), w(8)),
        Pair(w(1, 2) + " ", w(5, 6), w(5, 7)),
        Pair(w(1) + " ", w(2), w(3)),
    ]
    keep_start = PairTokenizer(fixture_tokenizer, max_length=4, truncation_mode="keep_start", drops=drops)
    assert keep_start(pairs[0], index=0) is None  # the prompt alone fills max_length
    # prompt 2 ids: max_length 4 leaves [w5, w6] vs [w5, w7] (kept); max_length 3 leaves [w5] twice.
    assert keep_start(pairs[1], index=1)["chosen_ids"].tolist() == [9, 10]
    assert PairTokenizer(fixture_tokenizer, max_length=3, drops=drops)(pairs[1], index=2) is None
    assert keep_start(pairs[2], index=3) is not None
    keep_end = PairTokenizer(fixture_tokenizer, max_length=4, truncation_mode="keep_end", drops=drops)
    assert keep_end(pairs[0], index=4) is None  # chosen (3 words + EOS) alone fills max_length
    assert drops.as_dict()["dropped"] == {
        "prompt_fills_max_length": 1,
        "chosen_ids_equal_rejected_ids": 1,
        "completion_fills_max_length": 1,
    }
    assert drops.first_row == {
        "prompt_fills_max_length": 0,
        "chosen_ids_equal_rejected_ids": 2,
        "completion_fills_max_length": 4,
    }
    assert (drops.seen, drops.kept) == (5, 2)
    assert drops.events["completion_truncated"] == 2


def test_strict_drops_raise_naming_the_row_and_field(fixture_tokenizer):
    pair = Pair(w(1, 2, 3, 4) + " ", w(5, 6, 7), w(8))  # prompt: 4 ids; chosen: 3 ids + EOS
    with pytest.raises(RowError) as err:
        PairTokenizer(fixture_tokenizer, max_length=4, strict=True)(pair, index=3)
    assert str(err.value) == ("row 3: field 'prompt' has 4 tokens, filling max_length=4 with no room for a "
                              "completion (prompt_fills_max_length)")
    with pytest.raises(RowError, match=r"^field 'chosen' has 4 tokens, filling max_length=4 \(keep_end never cuts"):
        PairTokenizer(fixture_tokenizer, max_length=4, truncation_mode="keep_end", strict=True)(pair)
    same = Pair(w(1) + " ", w(5, 6), w(5, 7))
    with pytest.raises(RowError, match=r"^row 0: field 'chosen' has the same ids as field 'rejected' once tokenized"):
        PairTokenizer(fixture_tokenizer, max_length=2, strict=True)(same, index=0)
    drops = DropCounter()
    assert PairTokenizer(fixture_tokenizer, max_length=2, drops=drops)(same, index=0) is None
    assert dict(drops.dropped) == {"chosen_ids_equal_rejected_ids": 1}
    # RowTokenizer names the configured column, not the record field.
    row = {"question": w(1, 2, 3, 4) + " ", "good": w(5), "bad": w(6)}
    step = RowTokenizer(fixture_tokenizer, FormatConfig(prompt="question", chosen="good", rejected="bad"),
                        strict=True, max_length=4)
    with pytest.raises(RowError, match=r"^row 7: field 'question' has 4 tokens"):
        step(row, 7)
    assert step.strict and pickle.loads(pickle.dumps(step)).tokenize.strict


@hypothesis.given(
    prompt=st.lists(st.integers(0, 9), min_size=1, max_size=12),
    completions=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=12), min_size=1, max_size=2),
    max_length=st.none() | st.integers(2, 20),
    max_prompt_length=st.none() | st.integers(1, 12),
    mode=st.sampled_from(["keep_start", "keep_end"]),
)
@hypothesis.settings(max_examples=200, deadline=None)
def test_truncate_ids_invariants(prompt, completions, max_length, max_prompt_length, mode):
    try:
        p, cs = truncate_ids(prompt, completions, max_length, max_prompt_length, mode)
    except Dropped as d:
        p_len = min(len(prompt), max_prompt_length or len(prompt))
        if mode == "keep_start":
            assert d.reason == "prompt_fills_max_length" and p_len >= max_length
        else:
            assert d.reason == "completion_fills_max_length" and max(map(len, completions)) >= max_length
        return
    assert 1 <= len(p) <= (max_prompt_length or len(prompt))
    assert p == (prompt[len(prompt) - len(p) :] if mode == "keep_end" else prompt[: len(p)])
    for c, orig in zip(cs, completions, strict=True):
        assert len(c) >= 1 and c == orig[: len(c)]
        assert max_length is None or len(p) + len(c) <= max_length
        if mode == "keep_end":
            assert c == orig  # keep_end never cuts completions


def test_boundary_merge_warns_once_and_completion_starts_at_divergence(merging_tokenizer):
    x, a, ab, eos = 0, 1, 3, 4
    tokenize = PairTokenizer(merging_tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = tokenize(
            Pair("xa", "b", "x")
        )  # "xa"=[x, a]; "xab</s>"=[x, ab, </s>]; "xax</s>"=[x, a, x, </s>]
        second = tokenize(Pair("xxa", "bx", "bb"))
        clean = tokenize(Pair("x", "a", "b"))
    boundary = [c for c in caught if issubclass(c.category, BoundaryWarning)]
    assert len(boundary) == 1, [str(c.message) for c in caught]
    assert "diverge at id 1" in str(boundary[0].message)
    assert first["prompt_ids"].tolist() == [x]
    assert first["chosen_ids"].tolist() == [ab, eos]
    assert first["rejected_ids"].tolist() == [a, x, eos]
    # prompt + completion is exactly the joint tokenization for both completions.
    for out, pair in ((first, ("xa", "b", "x")), (second, ("xxa", "bx", "bb"))):
        for key, text in (("chosen_ids", pair[1]), ("rejected_ids", pair[2])):
            joint = merging_tokenizer(pair[0] + text + "</s>")["input_ids"]
            assert out["prompt_ids"].tolist() + out[key].tolist() == joint
    assert clean["prompt_ids"].tolist() == [x] and clean["chosen_ids"].tolist() == [a, eos]
    assert tokenize.drops.events["prompt_boundary_mismatch"] == 2
    # Everything merged into the first token: no prompt id is left, the pair is dropped.
    assert tokenize(Pair("a", "b", "x")) is None and tokenize.drops.dropped["prompt_ids_empty"] == 1


def test_conversational_chat_template_no_duplicate_bos_eos(chat_tokenizer):
    user = {"role": "user", "content": "w1 w2"}
    pair = Pair(
        (user,), ({"role": "assistant", "content": "w3"},), ({"role": "assistant", "content": "w4 w5"},), True
    )
    out = PairTokenizer(chat_tokenizer)(pair)
    w_id = lambda i: 6 + i  # noqa: E731
    assert out["prompt_ids"].tolist() == [BOS, USER, w_id(1), w_id(2), EOS, ASSISTANT]  # header in the prompt
    assert out["chosen_ids"].tolist() == [w_id(3), EOS]
    assert out["rejected_ids"].tolist() == [w_id(4), w_id(5), EOS]
    for key in ("chosen_ids", "rejected_ids"):
        seq = out["prompt_ids"].tolist() + out[key].tolist()
        assert seq.count(BOS) == 1 and seq[0] == BOS
        assert out[key].tolist().count(EOS) == 1 and seq[-2:] != [EOS, EOS]
    # The same rows through formats: HH-style conversational rows with an implicit prompt.
    row = {
        "chosen": [user, {"role": "assistant", "content": "w3"}],
        "rejected": [user, {"role": "assistant", "content": "w4 w5"}],
    }
    (rec,) = normalize_rows([row])
    again = PairTokenizer(chat_tokenizer)(rec)
    assert all(np.array_equal(again[k], out[k]) for k in out)


def test_text_path_keeps_one_bos_and_one_eos(chat_tokenizer):
    tokenize = PairTokenizer(chat_tokenizer)
    out = tokenize(Pair("w1 w2 ", "w3", "w4</s>"))  # the tokenizer adds a BOS; rejected already ends with EOS
    assert out["prompt_ids"].tolist() == [BOS, 7, 8]
    assert out["chosen_ids"].tolist() == [9, EOS] and out["rejected_ids"].tolist() == [10, EOS]
    again = tokenize(Pair("<s>w1 w2 ", "w3", "w4"))  # a prompt that already starts with the BOS text
    assert again["prompt_ids"].tolist() == [BOS, 7, 8]


def test_unpaired_records(chat_tokenizer, fixture_tokenizer):
    out = PairTokenizer(fixture_tokenizer, max_length=4)(Unpaired(w(1, 2) + " ", w(3, 4, 5), False))
    assert set(out) == {"prompt_ids", "completion_ids", "label"}
    assert out["prompt_ids"].tolist() == [5, 6] and out["completion_ids"].tolist() == [7, 8]
    assert out["label"].dtype == np.bool_ and not out["label"]
    conv = Unpaired(
        ({"role": "user", "content": "w1"},), ({"role": "assistant", "content": "w2"},), True, True
    )
    out = PairTokenizer(chat_tokenizer)(conv)
    assert (
        out["completion_ids"].tolist() == [8, EOS]
        and out["prompt_ids"].tolist()[-1] == ASSISTANT
        and out["label"]
    )


def test_bad_arguments_and_pickle(fixture_tokenizer):
    with pytest.raises(ValueError, match="truncation_mode='left'"):
        PairTokenizer(fixture_tokenizer, truncation_mode="left")
    with pytest.raises(ValueError, match="max_length=1"):
        PairTokenizer(fixture_tokenizer, max_length=1)
    with pytest.raises(ValueError, match="max_prompt_length=0"):
        PairTokenizer(fixture_tokenizer, max_prompt_length=0)
    with pytest.raises(ValueError, match="chat_template"):
        PairTokenizer(fixture_tokenizer)(
            Pair(
                ({"role": "user", "content": "w1"},),
                ({"role": "assistant", "content": "w2"},),
                ({"role": "assistant", "content": "w3"},),
                True,
            )
        )
    with pytest.raises(ValueError, match="expects a formats.Pair or formats.Unpaired, got dict"):
        PairTokenizer(fixture_tokenizer)({"prompt": "w1", "chosen": "w2", "rejected": "w3"})
    tokenize = PairTokenizer(fixture_tokenizer, max_length=6, truncation_mode="keep_end")
    clone = pickle.loads(pickle.dumps(tokenize))
    pair = Pair(w(1, 2, 3, 4) + " ", w(5, 6), w(7))
    a, b = tokenize(pair), clone(pair)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_row_tokenizer_chains_formats_and_tokenize(trl_fixture_dir, fixture_tokenizer):
    rows = [json.loads(line) for line in open(trl_fixture_dir / "pairs.jsonl")]
    reference = json.load(open(trl_fixture_dir / "trl_reference.json"))["pairs"]
    bad = [
        {"prompt": "w1 ", "chosen": 5, "rejected": "w2"},
        {"prompt": "w1 ", "chosen": "w2", "rejected": "w2"},
    ]
    fn = pickle.loads(pickle.dumps(RowTokenizer(fixture_tokenizer, max_length=16)))
    outs = [fn(r, i) for i, r in enumerate(bad + rows)]
    assert outs[:2] == [None, None]
    for out, ref in zip(outs[2:], reference, strict=True):  # keep_start: each sequence keeps its first 16 ids
        room = 16 - len(ref["prompt_ids"])
        if room < 1:
            assert out is None
            continue
        assert out["prompt_ids"].tolist() == ref["prompt_ids"]
        assert out["chosen_ids"].tolist() == ref["chosen_ids"][:room]
        assert out["rejected_ids"].tolist() == ref["rejected_ids"][:room]
    n_long = sum(len(ref["prompt_ids"]) >= 16 for ref in reference)
    assert 0 < n_long < 16
    report = fn.drops.as_dict()
    assert (report["seen"], report["kept"]) == (18, 16 - n_long)
    assert report["dropped"] == {
        "chosen_not_string": 1,
        "chosen_equals_rejected": 1,
        "prompt_fills_max_length": n_long,
    }
    assert (
        report["first_row"]["chosen_not_string"] == 0 and report["first_row"]["chosen_equals_rejected"] == 1
    )
    full = RowTokenizer(fixture_tokenizer)
    assert [full(r)["chosen_ids"].tolist() for r in rows] == [ref["chosen_ids"] for ref in reference]
