"""The synthetic Markov preference world: sampling, text datasets and a tokenizer.

The world and its exact math (pi_ref, the reward, pi*_beta, exact E[r] and KL, the reward-KL
frontier) live in `synthetic_exact.py`. This module samples from it with a numpy Generator and
writes text datasets so synthetic runs take the same path as real data (datasets -> tokenizer ->
grain):

- content token i is the word "t{i}"; prompts are rendered "t3 t7 t1 t0 " (ending with a space,
  like the standard-format fixture), completions "t2 t5 ..." (exactly T words, no EOS);
- `save_tokenizer` writes a word-level tokenizer with `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3,
  then t0..t{V-1}; it adds no BOS. So the model sees token id = content token + TOKEN_OFFSET, and
  the tokenization pipeline appends EOS (id 2) after every completion: a policy trained on these
  files spends T + 1 predictions per completion, the last one (EOS) being the same for pi_ref,
  pi*_beta and every sensible policy, so it adds ~0 to log-ratios and KL estimates.

Default world (`WorldConfig()`): V = 8, k = 4, T = 8, alpha = 1, reward scale 1.
Measured facts: with V = 16 and T = 12 a time-dependent tabular policy (T V (V - 1) = 2,880 free
parameters) needs ~200k Bradley-Terry pairs for sigmoid DPO to land within 1-2% of the frontier;
on 20k pairs it overshoots the KL of pi*_beta several-fold (measured again here, seed 0, beta 1:
KL 15.9 vs 4.4 on 20k pairs, 4.67 vs 4.41 on 200k). The default halves V and shortens T
(448 parameters, sequences of 4 + 8 + 1 tokens) so a CPU demo (SFT + DPO + eval in a few minutes
on 2 cores) can afford data in the regime where DPO approaches pi*_beta. Tabular sigmoid DPO on
the default world (seed 0; full-batch Adam 0.05, 1,500 steps; pi_ref's E[r] = 0.80):
    beta 1: pi* has KL 3.18, E[r] 7.21;  5k pairs -> KL 4.61 (+45%),  20k -> 3.44,  50k -> 3.27;
    beta 0.5: pi* KL 8.33;               5k pairs -> KL 11.1 (+34%),  20k -> 8.76,  50k -> 8.47;
with 20k+ pairs the learned policy is within ~1% of the frontier's reward gain at its own KL, with
5k it overshoots the KL and loses 4-10%. So ~20k pairs show DPO reaching pi*_beta and ~5k show
finite-data over-optimization. The trade-off: a smaller world is easier to fit but has a shorter
frontier (less KL to spend) and fewer distinct prompts (V^k = 4,096); raise V and T (and the data
with them) for a harder one. A transformer fitted by SGD is not the tabular family: treat these
sizes as a lower bound on what it needs.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from dpo_jax.data.synthetic_exact import (TabularPolicy, World, WorldConfig, make_world, reference_policy,
                                          sequence_reward)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
TOKEN_OFFSET = len(SPECIAL_TOKENS)  # model token id = content token + TOKEN_OFFSET
LABEL_CHOICES = ("bradley_terry", "argmax")
WORLD_FILE = "world.json"


def format_token_ids(world_vocab_size: int) -> np.ndarray:
    """The model ids a well-formed completion uses: the world's content tokens and EOS."""
    return np.append(np.arange(world_vocab_size) + TOKEN_OFFSET, EOS_ID).astype(np.int32)


def _categorical(cdf_NxV: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Inverse-CDF draws, one per row; zero-probability entries are never drawn."""
    u_N = rng.random(cdf_NxV.shape[0]) * cdf_NxV[:, -1]
    return np.minimum((cdf_NxV <= u_N[:, None]).sum(axis=1), cdf_NxV.shape[1] - 1)


def sample_prompts(world: World, n: int, rng: np.random.Generator) -> np.ndarray:
    """n prompts of k tokens from pi_ref's chain: x_1 ~ mu, x_{i+1} ~ P[x_i]. int64 [n, k]."""
    n = _count("n", n)
    cdf_VxV = np.cumsum(world.ref_probs_VxV, axis=1)
    prompts = np.empty((n, world.prompt_len), dtype=np.int64)
    prompts[:, 0] = _categorical(np.broadcast_to(np.cumsum(world.init_probs_V), (n, world.vocab_size)), rng)
    for i in range(1, world.prompt_len):
        prompts[:, i] = _categorical(cdf_VxV[prompts[:, i - 1]], rng)
    return prompts


def sample_completions(world: World, policy: TabularPolicy, last_tokens_N, rng: np.random.Generator) -> np.ndarray:
    """y_t ~ pi_t(. | y_{t-1}), y_0 = the last prompt token: int64 [N, T]."""
    last = np.asarray(last_tokens_N, dtype=np.int64)
    if last.ndim != 1:
        raise ValueError(f"last_tokens_N must be 1-D, got shape {last.shape}")
    if policy.probs_TxVxV.shape != (world.completion_len, world.vocab_size, world.vocab_size):
        raise ValueError(f"policy.probs_TxVxV has shape {policy.probs_TxVxV.shape}, the world needs [T, V, V]")
    cdf_TxVxV = np.cumsum(policy.probs_TxVxV, axis=-1)
    out = np.empty((last.size, world.completion_len), dtype=np.int64)
    prev = last
    for t in range(world.completion_len):
        prev = out[:, t] = _categorical(cdf_TxVxV[t, prev], rng)
    return out


def sample_sft(world: World, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prompts [n, k], completions [n, T]): prompt and completion both from pi_ref."""
    prompts = sample_prompts(world, n, rng)
    return prompts, sample_completions(world, reference_policy(world), prompts[:, -1], rng)


@dataclasses.dataclass(frozen=True, eq=False)
class PreferencePairs:
    """P pairs: the prompt, the preferred and the other completion, and their true rewards."""

    prompts_PxK: np.ndarray
    chosen_PxT: np.ndarray
    rejected_PxT: np.ndarray
    reward_chosen_P: np.ndarray
    reward_rejected_P: np.ndarray


def sample_pairs(
    world: World,
    n: int,
    rng: np.random.Generator,
    label: str = "bradley_terry",
    policy: TabularPolicy | None = None,
) -> PreferencePairs:
    """Two completions y1, y2 ~ pi (default pi_ref) for one prompt; y1 is chosen with probability
    sigmoid(r(x, y1) - r(x, y2)) ("bradley_terry") or iff r(x, y1) >= r(x, y2) ("argmax").

    Draw order: prompts, y1, y2, then the n label uniforms (bradley_terry only).
    """
    if label not in LABEL_CHOICES:
        raise ValueError(f"label must be one of {LABEL_CHOICES}, got {label!r}")
    policy = reference_policy(world) if policy is None else policy
    prompts = sample_prompts(world, n, rng)
    y1 = sample_completions(world, policy, prompts[:, -1], rng)
    y2 = sample_completions(world, policy, prompts[:, -1], rng)
    r1, r2 = sequence_reward(world, prompts[:, -1], y1), sequence_reward(world, prompts[:, -1], y2)
    if label == "argmax":
        first = r1 >= r2
    else:
        p_first = 0.5 * (1.0 + np.tanh(0.5 * (r1 - r2)))  # sigmoid(r1 - r2), overflow-free
        first = rng.random(prompts.shape[0]) < p_first
    return PreferencePairs(
        prompts_PxK=prompts,
        chosen_PxT=np.where(first[:, None], y1, y2),
        rejected_PxT=np.where(first[:, None], y2, y1),
        reward_chosen_P=np.where(first, r1, r2),
        reward_rejected_P=np.where(first, r2, r1),
    )


def _count(name: str, n) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    return int(n)


# ----------------------------------------------------------------------------------------- text


def tokens_to_text(tokens) -> str:
    """Content tokens -> words: [3, 7] -> "t3 t7" (no trailing space)."""
    return " ".join(f"t{int(t)}" for t in np.asarray(tokens).reshape(-1))


def prompt_to_text(tokens) -> str:
    """A prompt as text, ending with a space like the standard-format fixture: "t3 t7 "."""
    return tokens_to_text(tokens) + " "


def text_to_tokens(text: str) -> np.ndarray:
    """Words -> content tokens: "t3 t7 " -> [3, 7]; a word that is not t<int> is an error."""
    out = []
    for word in text.split():
        if len(word) < 2 or word[0] != "t" or not word[1:].isdigit():
            raise ValueError(f"text_to_tokens: {word!r} in {text!r} is not a content word t<int>")
        out.append(int(word[1:]))
    return np.asarray(out, dtype=np.int64)


def _write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _pair_rows(pairs: PreferencePairs):
    for x, c, r, rc, rr in zip(
        pairs.prompts_PxK, pairs.chosen_PxT, pairs.rejected_PxT, pairs.reward_chosen_P, pairs.reward_rejected_P
    ):
        yield {
            "prompt": prompt_to_text(x),
            "chosen": tokens_to_text(c),
            "rejected": tokens_to_text(r),
            "reward_chosen": float(rc),
            "reward_rejected": float(rr),
        }


def write_dataset(
    world: World,
    out_dir: str,
    n_sft: int,
    n_pairs: int,
    n_eval: int,
    seed: int,
    label: str = "bradley_terry",
) -> dict[str, str]:
    """Writes sft.jsonl {"prompt", "completion"}, pairs.jsonl and eval_pairs.jsonl {"prompt",
    "chosen", "rejected", "reward_chosen", "reward_rejected"} and world.json (the WorldConfig).

    The three files draw from independent streams (SeedSequence(seed).spawn(3)), so changing one
    size leaves the other files unchanged. Returns {"sft", "pairs", "eval_pairs", "world"} -> path.
    """
    n_sft, n_pairs, n_eval = _count("n_sft", n_sft), _count("n_pairs", n_pairs), _count("n_eval", n_eval)
    if label not in LABEL_CHOICES:
        raise ValueError(f"label must be one of {LABEL_CHOICES}, got {label!r}")
    os.makedirs(out_dir, exist_ok=True)
    rng_sft, rng_pairs, rng_eval = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("sft", "pairs", "eval_pairs")}
    prompts, completions = sample_sft(world, n_sft, rng_sft)
    _write_jsonl(
        paths["sft"],
        ({"prompt": prompt_to_text(x), "completion": tokens_to_text(y)} for x, y in zip(prompts, completions)),
    )
    _write_jsonl(paths["pairs"], _pair_rows(sample_pairs(world, n_pairs, rng_pairs, label)))
    _write_jsonl(paths["eval_pairs"], _pair_rows(sample_pairs(world, n_eval, rng_eval, label)))
    paths["world"] = os.path.join(out_dir, WORLD_FILE)
    meta = {"world_config": dataclasses.asdict(world.config), "token_offset": TOKEN_OFFSET, "seed": seed,
            "label": label, "n_sft": n_sft, "n_pairs": n_pairs, "n_eval": n_eval}
    with open(paths["world"], "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return paths


def load_world(data_dir: str) -> World:
    """Rebuilds the world of a directory written by `write_dataset` (from its world.json)."""
    path = os.path.join(data_dir, WORLD_FILE)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if "world_config" not in meta:
        raise ValueError(f"{path} has no 'world_config' key")
    return make_world(WorldConfig(**meta["world_config"]))


def save_tokenizer(world: World, out_dir: str) -> str:
    """Saves (save_pretrained) a word-level PreTrainedTokenizerFast: <pad> <s> </s> <unk> t0..t{V-1}.

    Splits on whitespace, adds no BOS/EOS itself; "t3 t0" encodes to [7, 4]. Returns out_dir.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers  # imported here: only writing needs them
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i + TOKEN_OFFSET for i in range(world.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return out_dir
