r"""Benchmark of the real jitted train step: one JSON line of throughput, FLOP/s, MFU and memory.

    python -m dpo_jax.bench                       # the CPU shape of docs/performance.md
    python -m dpo_jax.bench --layout prefix --prompt-len 256
    python -m dpo_jax.bench --layout packed --lengths uniform:16:256
    python -m dpo_jax.bench --compare trl         # + TRL's DPOTrainer on the same model and data

A random decoder (`ModelConfig`) and synthetic random-token pairs (`synthetic_examples`) are laid
out with `layouts.LayoutSpec`; `train_state.init_state` + `loop.compiled_steps` give the step. After
`--warmup` steps (every distinct batch shape compiled), `--repeats` rounds of `--steps` steps are
timed (dispatched back to back, blocked at the end of each round); the median round is reported.

Tokens, per step: `tokens` = input tokens as TRL counts them, sum over pairs of 2n + a + b (prompt
n counted twice, completions a and b), in every layout, so the layouts compare on the same work;
`real_tokens` = non-padding positions of the batch (segment id > 0; the prompt once per pair in
the prefix layout); `padded_tokens` = B * T. FLOP model (`metrics.step_flops`): 6 N per trained
token + 2 N per reference token (frozen reference) + attention pairs, N = matmul parameters
including the unembedding, over the real tokens; with logit slots (the default, as in training;
`--no-logit-slots`: logits at every position, as TRL computes them) the unembedding counts only at
the slots, where it runs. MFU = model FLOP/s over the peak: on CPU a dense
float32 2048 x 2048 matmul measured in the same process, on GPU/TPU the chip's bf16 dense peak.
Peak memory = temp + argument + output - alias bytes of the compiled step's memory analysis.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

from dpo_jax import host_memory

if __name__ == "__main__":  # before the heavy imports: the process may be re-executed
    host_memory.reexec_with_hugepages()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dpo_jax import logprobs, losses, sharding  # noqa: E402
from dpo_jax.train import loop, metrics, optim, step  # noqa: E402
from dpo_jax.train import state as train_state  # noqa: E402
from dpo_jax.data import layouts  # noqa: E402
from dpo_jax.models import transformer  # noqa: E402

PAD, BOS, EOS, UNK = 0, 1, 2, 3  # special ids of the word-level tokenizer of the TRL comparison
# Keys of the JSON line of a timed run (docs/performance.md describes each).
KEYS = ("step_time_s", "pairs_per_s", "tokens_per_s", "real_tokens_per_s", "padded_tokens_per_s",
        "model_flops_per_step", "model_flops_per_s", "flop_model", "peak_flops_per_s", "peak_source", "mfu",
        "peak_memory_bytes", "memory_bytes", "batch_shape", "config", "env")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark: model, data shape, step settings and timing."""

    hidden: int = 256
    intermediate: int = 704
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 4096
    tie: bool = False
    dtype: str = "float32"  # compute and parameter dtype
    remat: str = "none"
    scan_layers: bool = True
    scan_min_layers: int = transformer.ModelConfig.scan_min_layers  # shallower stacks run unrolled
    prompt_len: int = 64
    completion_len: int = 64  # tokens of each completion, EOS included
    lengths: str = ""  # "uniform:LO:HI": each sequence (prompt + completion) length ~ U{LO..HI}
    pairs: int = 8
    layout: str = "standard"  # standard | prefix | packed
    prefix_min_saving: float = 0.1  # prefix: batches saving less of the padded tokens are laid out standard
    logit_slots: bool = True  # logits only at completion positions (data.logit_slots; --no-logit-slots: all)
    bucket: int = 16  # standard / prefix rows padded to a multiple of this
    pack_rows: int = 0  # packed: rows per batch (0 = 2 * pairs)
    pack_length: int = 0  # packed: row length (0 = the longest sequence)
    pack_pairs: int = 0  # packed: pair capacity of a batch (0 = 4 * pairs)
    ref_mode: str = "frozen"  # frozen | precomputed | none
    capacity: int = 0  # logits at this many completion positions (0 = all positions, -1 = exact)
    chunk_size: int = logprobs.DEFAULT_CHUNK_SIZE
    vocab_chunk_size: int = logprobs.DEFAULT_VOCAB_CHUNK_SIZE
    naive_logits: bool = False
    steps: int = 10
    repeats: int = 3
    warmup: int = 2
    batches: int = 4  # distinct batches, cycled
    devices: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.layout not in layouts.LAYOUTS:
            raise ValueError(f"--layout must be one of {layouts.LAYOUTS}; got {self.layout!r}")
        if self.ref_mode not in ("frozen", "precomputed", "none"):
            raise ValueError(f"--ref-mode must be frozen, precomputed or none; got {self.ref_mode!r}")
        for name in ("prompt_len", "completion_len", "pairs", "bucket", "steps", "repeats", "batches", "devices"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.lengths:
            parse_lengths(self.lengths)

    def model_config(self) -> transformer.ModelConfig:
        return transformer.ModelConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads, tie_embeddings=self.tie,
            dtype=self.dtype, param_dtype=self.dtype, remat=self.remat, scan_layers=self.scan_layers,
            scan_min_layers=self.scan_min_layers,
            max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)

    def objective(self) -> losses.Objective:
        return losses.Objective(("simpo",) if self.ref_mode == "none" else ("sigmoid",))

    def longest_sequence(self) -> int:
        return parse_lengths(self.lengths)[1] if self.lengths else self.prompt_len + self.completion_len


def parse_lengths(text: str) -> tuple[int, int]:
    """'uniform:LO:HI' -> (LO, HI)."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != "uniform" or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"--lengths must be 'uniform:LO:HI'; got {text!r}")
    lo, hi = int(parts[1]), int(parts[2])
    if not 4 <= lo <= hi:
        raise ValueError(f"--lengths needs 4 <= LO <= HI; got {text!r}")
    return lo, hi


def synthetic_examples(cfg: BenchConfig, n: int, rng: np.random.Generator) -> list[dict]:
    """n random pairs. Fixed: prompt n, completions a = b = completion_len. `lengths`: the chosen and
    rejected sequence lengths s_c, s_r ~ U{LO..HI}, prompt = min(s_c, s_r) // 2. Completions end
    with EOS; other tokens are uniform over the non-special ids."""
    def ids(k):
        return rng.integers(4, cfg.vocab, k).astype(np.int32)

    out = []
    for _ in range(n):
        if cfg.lengths:
            lo, hi = parse_lengths(cfg.lengths)
            s_c, s_r = (int(x) for x in rng.integers(lo, hi + 1, 2))
            p = min(s_c, s_r) // 2
            a, b = s_c - p, s_r - p
        else:
            p, a, b = cfg.prompt_len, cfg.completion_len, cfg.completion_len
        out.append({"prompt_ids": ids(p), "chosen_ids": np.append(ids(a - 1), EOS).astype(np.int32),
                    "rejected_ids": np.append(ids(b - 1), EOS).astype(np.int32)})
    return out


def layout_spec(cfg: BenchConfig) -> layouts.LayoutSpec:
    """Row lengths padded to a multiple of `cfg.bucket` (the same rule for every layout)."""
    longest = cfg.longest_sequence()
    if cfg.layout == "packed":
        return layouts.LayoutSpec(layout="packed", num_pairs=cfg.pack_pairs or 4 * cfg.pairs,
                                  num_rows=cfg.pack_rows or 2 * cfg.pairs, row_length=cfg.pack_length or longest,
                                  logit_slots=cfg.logit_slots)
    row = 2 * longest if cfg.layout == "prefix" else longest  # prefix rows: n + a + b + 1 <= 2 * longest
    return layouts.LayoutSpec(layout=cfg.layout, num_pairs=cfg.pairs, prefix_min_saving=cfg.prefix_min_saving,
                              buckets=tuple(range(cfg.bucket, row + cfg.bucket, cfg.bucket)),
                              logit_slots=cfg.logit_slots)


def make_batches(cfg: BenchConfig) -> tuple[list[dict], list[list[dict]]]:
    """`cfg.batches` host batches and the examples of each (packed: as many pairs as fit)."""
    rng = np.random.default_rng(cfg.seed)
    spec = layout_spec(cfg)
    if cfg.layout == "packed":
        groups = list(layouts.pack_groups(iter(synthetic_examples(cfg, 64 * cfg.batches * spec.num_pairs, rng)),
                                          spec))[:cfg.batches]
    else:
        groups = [synthetic_examples(cfg, cfg.pairs, rng) for _ in range(cfg.batches)]
    batches = [spec(g) for g in groups]
    if cfg.ref_mode == "precomputed":  # reference log-probs carried in the batch
        for b, g in zip(batches, groups):
            vals = rng.normal(-300.0, 10.0, (4, spec.num_pairs)).astype(np.float32)
            for key, v in zip(step.PRECOMPUTED_KEYS, vals):
                b[key] = v * b["pair_mask_P"]
    return batches, groups


def batch_counts(batch: dict, examples: list[dict], model_cfg, ref_forward: bool) -> dict[str, float]:
    """Per-step counts; `flops_completion_logits` leaves out the unembedding at positions that are not
    loss-masked (a DPO step needs the logits of completion tokens only)."""
    trl = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    flops = metrics.step_flops(model_cfg, batch, reference_forward=ref_forward)  # with logit slots: where they run
    all_logits = {k: v for k, v in batch.items() if k != layouts.SLOTS_KEY}
    flops_all_logits = metrics.step_flops(model_cfg, all_logits, reference_forward=ref_forward)
    elsewhere = float(np.sum(batch["segment_ids_BxT"] > 0) - np.sum(batch["loss_mask_BxT"] > 0))
    unembed_elsewhere = (8.0 if ref_forward else 6.0) * model_cfg.hidden_size * model_cfg.vocab_size * elsewhere
    return {"pairs": float(len(examples)), "tokens": float(trl),
            "real_tokens": float(np.sum(batch["segment_ids_BxT"] > 0)),
            "padded_tokens": float(batch["tokens_BxT"].size),
            "completion_tokens": float(np.sum(batch["loss_mask_BxT"])),
            "flops": flops, "flops_completion_logits": flops_all_logits - unembed_elsewhere}


def memory_figures(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {"temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "alias": m.alias_size_in_bytes}
    out["peak"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


def build_step(cfg: BenchConfig, batches: list[dict], mesh):
    """(state, train_fn, model_cfg, capacity): the state and step exactly as `loop.fit` builds them."""
    model_cfg = cfg.model_config()
    policy = transformer.Decoder(model_cfg, rngs=nnx.Rngs(cfg.seed))
    reference = None
    if cfg.ref_mode == "frozen":
        graphdef, state = nnx.split(policy)
        reference = nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))
    optim_cfg = argparse.Namespace(name="adamw", lr=1e-6, warmup_steps=0, schedule="constant", end_lr_frac=0.0,
                                   weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, momentum=0.0, clip_norm=1.0,
                                   grad_accum=1)
    tx, lr = optim.make_optimizer(optim_cfg, 1000)
    state, state_sh, graphdef = train_state.init_state(policy, reference, tx, mesh, cfg.seed)
    capacity = None
    if cfg.capacity == -1:  # exactly the largest completion count, rounded up to a multiple of 8
        capacity = int(8 * math.ceil(max(np.sum(b["loss_mask_BxT"] > 0) for b in batches) / 8))
    elif cfg.capacity > 0:
        capacity = cfg.capacity
    step_cfg = step.StepConfig(graphdef=graphdef, objective=cfg.objective(), tx=tx, lr=lr, ref_mode=cfg.ref_mode,
                               capacity=capacity, chunk_size=cfg.chunk_size, vocab_chunk_size=cfg.vocab_chunk_size,
                               naive_logits=cfg.naive_logits)
    train_fn, _ = loop.compiled_steps(step_cfg, state_sh, mesh, tuple(sorted(batches[0])))
    return state, train_fn, model_cfg, capacity


def matmul_rate(n: int = 2048, repeats: int = 3) -> float:
    """The peak for MFU: on CPU a float32 n x n matmul measured now, else the chip's bf16 dense peak."""
    if jax.devices()[0].platform == "cpu":
        return metrics.measured_matmul_flops(n, repeats)
    return metrics.device_peak_flops(measure_cpu=False) / jax.device_count()


def peak_source() -> str:
    dev = jax.devices()[0]
    return "measured float32 2048x2048 matmul, same process, best of 3 before each round" \
        if dev.platform == "cpu" else f"bf16 dense peak of {dev.device_kind}"


class StepTimer:
    """The benchmark's step, compiled and warmed up; `round()` times `cfg.steps` steps."""

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:cfg.devices])
        host, self.groups = make_batches(cfg)
        self.state, self.train_fn, self.model_cfg, self.capacity = build_step(cfg, host, mesh)
        self.hp = cfg.objective().params(beta=0.1)
        counts = [batch_counts(b, g, self.model_cfg, cfg.ref_mode == "frozen") for b, g in zip(host, self.groups)]
        self.per_step = {k: sum(counts[i % len(counts)][k] for i in range(cfg.steps)) / cfg.steps for k in counts[0]}
        self.batches = [sharding.global_batch(b, mesh) for b in host]
        t = time.perf_counter()
        self.memory = memory_figures(self.train_fn.lower(self.state, self.batches[0], self.hp).compile())
        self.compile_s = time.perf_counter() - t
        self.shape = list(host[0]["tokens_BxT"].shape)
        self.rounds: list[float] = []
        self.peaks: list[float] = []
        self.metrics = None

    def warmup(self) -> None:
        self.run_steps(max(self.cfg.warmup, len(self.batches)))  # compiles every distinct batch shape

    def run_steps(self, n: int) -> None:
        """n steps dispatched back to back, cycling the batches; returns when the last is done."""
        for i in range(n):
            self.state, self.metrics = self.train_fn(self.state, self.batches[i % len(self.batches)], self.hp)
        jax.block_until_ready((self.state, self.metrics))

    def round(self) -> float:
        """Mean step time of `cfg.steps` steps (after this round's matmul peak)."""
        self.peaks.append(matmul_rate())
        t = time.perf_counter()
        self.run_steps(self.cfg.steps)
        self.rounds.append((time.perf_counter() - t) / self.cfg.steps)
        return self.rounds[-1]

    def result(self) -> dict:
        cfg, c = self.cfg, self.per_step
        out = {"bench": "dpo_jax.train_step", "backend": jax.default_backend(),
               "device": jax.devices()[0].device_kind, "devices": cfg.devices, "config": dataclasses.asdict(cfg),
               "capacity_used": self.capacity, "batch_shape": self.shape, "pairs_per_step": c["pairs"],
               "params": sum(math.prod(s) for s, _ in transformer.param_shapes(self.model_cfg).values()),
               "matmul_params": metrics.matmul_params(self.model_cfg),
               "peak_memory_bytes": self.memory["peak"], "memory_bytes": self.memory,
               "compile_s": round(self.compile_s, 3)}
        if not self.rounds:
            return out
        step_s = statistics.median(self.rounds)
        per_round = lambda flops: [flops / r / p for r, p in zip(self.rounds, self.peaks)]  # noqa: E731
        out.update({
            "step_time_s": step_s, "step_time_rounds_s": [round(r, 5) for r in self.rounds],
            "loss": float(self.metrics["loss"]), "pairs_per_s": c["pairs"] / step_s,
            "tokens_per_s": c["tokens"] / step_s,
            "tokens_counted": "input tokens with the prompt counted twice per pair (2n + a + b), as TRL counts",
            "real_tokens_per_s": c["real_tokens"] / step_s, "padded_tokens_per_s": c["padded_tokens"] / step_s,
            "tokens_per_step": c["tokens"], "real_tokens_per_step": c["real_tokens"],
            "padded_tokens_per_step": c["padded_tokens"], "completion_tokens_per_step": c["completion_tokens"],
            "model_flops_per_step": c["flops"], "model_flops_per_s": c["flops"] / step_s,
            "flop_model": "6N per trained token + 2N per reference token + attention pairs (metrics.step_flops), "
                          "N = matmul parameters incl. the unembedding, over the real tokens (the unembedding "
                          "only at the filled logit slots when the batch has them)",
            "peak_flops_per_s": statistics.median(self.peaks), "peak_source": peak_source(),
            "mfu": statistics.median(per_round(c["flops"])),
            "mfu_rounds": [round(m, 4) for m in per_round(c["flops"])],
            "mfu_completion_logits": statistics.median(per_round(c["flops_completion_logits"])),
        })
        return out


def run(cfg: BenchConfig, *, compile_only: bool = False, compare: Optional[str] = None, trl_steps: int = 0) -> dict:
    """Compile, warm up, time `cfg.repeats` rounds (between TRL's steps when comparing), report."""
    load = os.getloadavg()[0]
    timer = StepTimer(cfg)
    if compile_only:
        return timer.result()
    timer.warmup()
    trl_out = trl_bench(cfg, timer, trl_steps or cfg.steps) if compare == "trl" else None
    while len(timer.rounds) < cfg.repeats:
        timer.round()
    out = timer.result()
    out["env"] = {"loadavg_1m_start_end": [round(load, 2), round(os.getloadavg()[0], 2)],
                  "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""), "cpu_count": os.cpu_count(),
                  "jax": jax.__version__}
    if trl_out is not None:
        out["trl"] = trl_out
        out["speedup_vs_trl"] = out["tokens_per_s"] / trl_out["tokens_per_s"]
    return out


# ----------------------------------------------------------------------------------------------
# TRL's DPOTrainer on the same model and pairs (optional: pip install 'dpo_jax[bench]').

def _word_tokenizer(vocab: int, out_dir: str):
    """Word level: '<pad>' 0, '<s>' 1, '</s>' 2, '<unk>' 3, 'w<i>' = id i ('w5 w9' -> [5, 9]), no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
    from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

    words = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    words.update({f"w{i}": i for i in range(4, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>")
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def trl_bench(cfg: BenchConfig, timer: StepTimer, steps_per_round: int) -> dict:
    """TRL's DPOTrainer (float32 CPU, same batch size, frozen reference, no gradient checkpointing) on
    the same random Llama exported with `hf.export_model`, and the same pairs. After every
    `steps_per_round` timed TRL steps a trainer callback runs one round of the JAX step, so both
    see the same machine load. A TRL step is timed from `on_step_begin` to `on_step_end`: forward,
    backward, gradient clipping and the AdamW update (`between_steps_s`: the trainer's work between
    steps, next batch and logging, reported apart, as the JAX side's batch building is left out)."""
    if cfg.ref_mode != "frozen" or cfg.dtype != "float32":
        raise ValueError("--compare trl needs --ref-mode frozen and --dtype float32")
    import datasets  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    import trl  # pylint: disable=g-import-not-at-top

    from dpo_jax.models import hf  # pylint: disable=g-import-not-at-top

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="dpo_jax_bench_trl_") as tmp:
        tok = _word_tokenizer(cfg.vocab, os.path.join(tmp, "tokenizer"))
        model = transformer.Decoder(timer.model_cfg, rngs=nnx.Rngs(cfg.seed))  # the JAX policy's initial weights
        hf.export_model(model, os.path.join(tmp, "model"), tokenizer_dir=os.path.join(tmp, "tokenizer"))
        load = lambda: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
            os.path.join(tmp, "model"), dtype=torch.float32)
        examples = [e for g in timer.groups for e in g]
        text = lambda ids: " ".join(f"w{int(i)}" for i in ids)  # noqa: E731
        rows = [{"prompt": text(e["prompt_ids"]) + " ", "chosen": text(e["chosen_ids"][:-1]),
                 "rejected": text(e["rejected_ids"][:-1])} for e in examples]  # TRL appends the EOS
        warmup = max(cfg.warmup, 3)
        args = trl.DPOConfig(output_dir=tmp, per_device_train_batch_size=cfg.pairs, beta=0.1, learning_rate=1e-6,
                             max_steps=warmup + steps_per_round * cfg.repeats, use_cpu=True, bf16=False,
                             fp16=False, gradient_checkpointing=False, max_length=None, report_to=[],
                             save_strategy="no", logging_steps=10**9, disable_tqdm=True, dataloader_num_workers=0,
                             seed=cfg.seed)
        trainer = trl.DPOTrainer(model=load(), ref_model=load(), args=args, processing_class=tok,
                                 train_dataset=datasets.Dataset.from_list(rows))
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if list(trainer.train_dataset[0][key]) != [int(i) for i in examples[0][key]]:
                raise ValueError(f"TRL tokenized {key} of pair 0 differently from the benchmark")

        class Interleave(transformers.TrainerCallback):
            def __init__(self):
                self.t0, self.end, self.times, self.between = 0.0, None, [], []

            def on_step_begin(self, *_, **__):
                self.t0 = time.perf_counter()
                if self.end is not None:  # the trainer's own work between steps: next batch, logging
                    self.between.append(self.t0 - self.end)

            def on_step_end(self, *_, **__):
                self.times.append(time.perf_counter() - self.t0)
                timed = len(self.times) - warmup
                if timed > 0 and timed % steps_per_round == 0:
                    timer.round()
                self.end = time.perf_counter()

        cb = Interleave()
        trainer.add_callback(cb)
        with contextlib.redirect_stdout(sys.stderr):  # the trainer prints a summary; stdout is the JSON line
            trainer.train()
    timed = cb.times[warmup:]
    rounds = [statistics.mean(timed[i:i + steps_per_round]) for i in range(0, len(timed), steps_per_round)]
    step_s = statistics.median(rounds)
    tokens = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    tokens_per_step = tokens / len(examples) * cfg.pairs  # exact for fixed lengths, else the dataset's mean
    between = statistics.median(cb.between[warmup:]) if len(cb.between) > warmup else 0.0
    return {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "step_time_s": step_s,
            "step_time_rounds_s": [round(r, 5) for r in rounds], "between_steps_s": between,
            "tokens_per_s_with_between": tokens_per_step / (step_s + between), "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step / step_s, "pairs_per_s": cfg.pairs / step_s,
            "layout": "standard (TRL pads chosen and rejected rows; padding_free is disabled in TRL 1.16)"}


def parse_args(argv=None) -> tuple[BenchConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python -m dpo_jax.bench", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            ap.add_argument(flag, type={"int": int, "str": str, "float": float}[f.type], default=f.default)
    ap.add_argument("--compile-only", action="store_true", help="compile only: memory figures, no timing")
    ap.add_argument("--compare", choices=["trl"], help="also time TRL's DPOTrainer on the same model and pairs")
    ap.add_argument("--trl-steps", type=int, default=0, help="timed TRL steps per round (0 = --steps)")
    args = ap.parse_args(argv)
    try:
        cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
    except ValueError as e:
        ap.error(str(e))
    return cfg, args


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    print(json.dumps(run(cfg, compile_only=args.compile_only, compare=args.compare, trl_steps=args.trl_steps)),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
