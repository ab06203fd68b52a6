"""Shared pieces of the paper configs: steps from dataset sizes and the `runlocal` shrink.

`runlocal=1` turns a paper config into a seconds-long run on this machine with no download: a tiny
random model of the paper model's family (`model.path=''`, `model.arch`) and a tiny local dataset
written in the paper dataset's schema (column names, value types and split names of the hub
dataset), saved with `save_to_disk` together with a word-level tokenizer (chat template included)
built on the fly. The optimizer, loss and schedule stay the paper's; only sizes shrink.
Local data goes to `dir=PATH` if given, else to a fixed directory under the system temp dir; it is
written once (atomically) and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

# Special tokens of the tiny tokenizer; the chat template is a Zephyr-style one over these.
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TINY_ARCH = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=0,
                 max_position_embeddings=128, tie_embeddings=False)
SCHEMA_VERSION = 2  # bump when the tiny rows change, so stale local copies are not reused

_QUESTION = ("how do i bake bread at home what is a good name for a cat why is the sky blue can you "
             "help me plan a trip tell me about the moon write a short poem on rain").split()
_GOOD = ("sure here is a clear and kind answer with simple steps that should help you today thank you "
         "for asking").split()
_BAD = ("no i will not do that it is boring and you should figure it out yourself whatever").split()
_REVIEW = ("this movie film story was the acting plot i saw last night really").split()
_POSITIVE = ("wonderful great moving brilliant loved it beautiful fun superb").split()
_NEGATIVE = ("awful dull terrible boring hated it waste bad poor").split()
WORDS = tuple(dict.fromkeys(_QUESTION + _GOOD + _BAD + _REVIEW + _POSITIVE + _NEGATIVE
                            + ["Human:", "Assistant:"]))


def epoch_steps(rows: int, batch: int, epochs: int = 1) -> int:
    """Optimizer steps of `epochs` passes over `rows` pairs in full batches of `batch`."""
    return epochs * (rows // batch)


def warmup(steps: int, ratio: float) -> int:
    return int(round(ratio * steps))


# ----------------------------------------------------------------------------------------- rows

def _words(rng: np.random.Generator, pool, lo: int, hi: int) -> str:
    return " ".join(rng.choice(pool, size=int(rng.integers(lo, hi + 1))))


def _hh_row(rng, i):
    del i
    turns = int(rng.integers(1, 3))
    dialogue = "".join(f"\n\nHuman: {_words(rng, _QUESTION, 3, 6)}\n\nAssistant: {_words(rng, _GOOD, 3, 6)}"
                       for _ in range(turns - 1))
    dialogue += f"\n\nHuman: {_words(rng, _QUESTION, 3, 6)}\n\nAssistant:"
    return {"chosen": f"{dialogue} {_words(rng, _GOOD, 3, 8)}", "rejected": f"{dialogue} {_words(rng, _BAD, 3, 8)}"}


def _imdb_row(rng, i):
    del i
    return {"prompt": _words(rng, _REVIEW, 2, 8), "chosen": _words(rng, _POSITIVE, 3, 8),
            "rejected": _words(rng, _NEGATIVE, 3, 8)}


def _chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _ultrafeedback_row(rng, i):
    del i
    prompt, good, bad = _words(rng, _QUESTION, 3, 8), _words(rng, _GOOD, 3, 8), _words(rng, _BAD, 3, 8)
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
            "chosen": _chat(prompt, good), "rejected": _chat(prompt, bad), "messages": _chat(prompt, good),
            "score_chosen": float(rng.integers(7, 11)), "score_rejected": float(rng.integers(1, 7))}


def _argilla_row(rng, i):
    del i
    prompt, good, bad = _words(rng, _QUESTION, 3, 8), _words(rng, _GOOD, 3, 8), _words(rng, _BAD, 3, 8)
    return {"source": "evol_instruct", "prompt": prompt, "chosen": _chat(prompt, good),
            "chosen-rating": float(rng.integers(4, 6)), "chosen-model": "gpt-4", "rejected": _chat(prompt, bad),
            "rejected-rating": float(rng.integers(1, 4)), "rejected-model": "llama-2-7b-chat"}


def _tulu3_row(rng, i):
    prompt, good, bad = _words(rng, _QUESTION, 3, 8), _words(rng, _GOOD, 3, 8), _words(rng, _BAD, 3, 8)
    return {"id": f"tiny-{i}", "source": "tiny", "prompt": prompt, "chosen": _chat(prompt, good),
            "rejected": _chat(prompt, bad)}


# kind -> (row maker, {split: rows}): the schema and split names of the hub dataset it stands in for.
DATASETS = {
    "hh-rlhf": (_hh_row, {"train": 48, "test": 16}),                             # Anthropic/hh-rlhf
    "imdb-pairs": (_imdb_row, {"train": 80}),                           # pairs generated from stanfordnlp/imdb
    "ultrafeedback-binarized": (_ultrafeedback_row, {"train_prefs": 48, "test_prefs": 16}),
    "ultrafeedback-cleaned": (_argilla_row, {"train": 64}),  # argilla/ultrafeedback-binarized-preferences-cleaned
    "tulu3-preference": (_tulu3_row, {"train": 64}),         # allenai/llama-3.1-tulu-3-8b-preference-mixture
}


def _rows(kind: str, n: int, seed: int) -> list[dict]:
    make = DATASETS[kind][0]
    rng = np.random.default_rng(seed)
    return [make(rng, i) for i in range(n)]


# ----------------------------------------------------------------------------------------- files

def save_tokenizer(out_dir: str) -> str:
    """A word-level tokenizer over `WORDS` (whitespace split; specials and role tokens match anywhere)
    with `CHAT_TEMPLATE`; adds no BOS/EOS itself. Returns out_dir."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
    from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

    specials = (PAD, BOS, EOS, UNK) + ROLE_TOKENS
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out_dir)
    return out_dir


def local_dataset(kind: str, root: str = "") -> tuple[str, str]:
    """(dataset dir, tokenizer dir) of the tiny `kind` dataset under `root` (default: the temp dir),
    written once: a `save_to_disk` DatasetDict with the hub dataset's split names, and the tokenizer."""
    if kind not in DATASETS:
        raise ValueError(f"unknown local dataset {kind!r}; known: {', '.join(DATASETS)}")
    root = root or os.path.join(tempfile.gettempdir(), "dpo_jax_paper_data")
    final = os.path.join(root, f"{kind}-v{SCHEMA_VERSION}")
    paths = (os.path.join(final, "data"), os.path.join(final, "tokenizer"))
    if os.path.exists(os.path.join(final, "done.json")):
        return paths
    import datasets  # pylint: disable=g-import-not-at-top

    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    splits = DATASETS[kind][1]
    dd = datasets.DatasetDict({name: datasets.Dataset.from_list(_rows(kind, n, seed=j))
                               for j, (name, n) in enumerate(splits.items())})
    dd.save_to_disk(os.path.join(tmp, "data"))
    save_tokenizer(os.path.join(tmp, "tokenizer"))
    with open(os.path.join(tmp, "done.json"), "w") as f:
        json.dump({"kind": kind, "splits": splits, "schema_version": SCHEMA_VERSION}, f)
    os.makedirs(root, exist_ok=True)
    try:
        os.replace(tmp, final)  # atomic; fails if another process got there first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(final, "done.json")):
            raise
    return paths


def shrink(c, *, family: str, dataset: str, root: str = "", max_length: int = 64, steps: int = 4) -> None:
    """The `runlocal` variant, in place: a tiny `family` model on the tiny `dataset`, float32, sizes
    that divide 8 devices, eval every few steps with a handful of sampled prompts."""
    data_dir, tok_dir = local_dataset(dataset, root)
    c.model.update(path="", tokenizer=tok_dir, dtype="float32", param_dtype="float32", remat="none")
    c.model.arch.update(family=family, **TINY_ARCH)
    c.reference.path = ""
    c.data.update(source=data_dir, max_length=max_length, max_prompt_length=max_length // 2, min_bucket=max_length,
                  batch_size=8, eval_batch_size=8, num_threads=0)
    c.optim.update(warmup_steps=min(c.optim.warmup_steps, 1), grad_accum=1)
    c.train.update(steps=steps, log_every=1, eval_every=0, checkpoint_every=0, export_final=False, progress=False)
    c.eval.update(num_prompts=4, samples_per_prompt=2, max_new_tokens=8)
    c.mesh.shape.update(data=-1, fsdp=1, tensor=1)
