r"""Benchmark of the real jitted train step: one JSON line of throughput, FLOP/s, MFU and memory.

    python -m dpo_jax.bench                       # the CPU shape of docs/performance.md
    python -m dpo_jax.bench --layout prefix --prompt-len 256
    python -m dpo_jax.bench --layout packed --lengths uniform:16:256
    python benchmarks/trl_compare.py              # + TRL's DPOTrainer on the same model and data

A benchmark (`BenchConfig`) is a training config (`BenchConfig.training_config`: configs/base.py
with the model, data, log-prob, reference and seed keys its fields name) plus synthetic data and
timing. From that config, as a training run builds them: the random decoder
(`build.model_config`), the batch layout (`build.data_config(...).layout_spec()`, with
`data.max_length` = the longest sequence rounded up to a multiple of `--min-bucket`), the optimizer
(`optim.make_optimizer(config.optim)`, AdamW at lr 1e-6), the loss (`--loss`: any loss of pairs in the
registry, or several joined by '+'; by default sigmoid, or simpo with `--ref-mode none`), its running
statistics if it has some (beta_dpo), and the step (`train_state.init_state` +
`loop.compiled_steps`). The pairs are random tokens (`synthetic_examples`). After `--warmup` steps
(every distinct batch shape compiled), `--repeats` rounds of `--steps` steps are timed (dispatched
back to back, blocked at the end of each round); the median round is reported.

Tokens, per step: `tokens` = input tokens as TRL counts them, sum over pairs of 2n + a + b (prompt
n counted twice, completions a and b), in every layout, so the layouts compare on the same work;
`real_tokens` = non-padding positions of the batch (segment id > 0; the prompt once per pair in
the prefix layout); `padded_tokens` = B * T. FLOP model (`metrics.step_flops`): 6 N per trained
token + 2 N per reference token (frozen reference) + attention pairs, N = matmul parameters
including the unembedding, over the real tokens; with logit slots (the default, as in training;
`--no-logit-slots`: logits at every position, as TRL computes them) the unembedding counts only at
the slots, where it runs. MFU = model FLOP/s over the peak: on CPU a dense float32 2048 x 2048
matmul measured in the same process, on GPU/TPU the chip's bf16 dense peak. Peak memory = temp +
argument + output - alias bytes of the compiled step's memory analysis (`metrics.memory_figures`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time

from dpo_jax import host_memory

if __name__ == "__main__":  # before the heavy imports: the process may be re-executed
    host_memory.reexec_with_malloc_tunables(keep_heap=True)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_dict  # noqa: E402

from configs import base, common  # noqa: E402
from dpo_jax import build, config_check, losses, sharding  # noqa: E402
from dpo_jax.train import loop, metrics, optim, step  # noqa: E402
from dpo_jax.train import state as train_state  # noqa: E402
from dpo_jax.data import layouts  # noqa: E402
from dpo_jax.models import attention, transformer  # noqa: E402

PAD, BOS, EOS, UNK = 0, 1, 2, 3  # special ids of the synthetic tokens (and of the TRL comparison's tokenizer)
LR = 1e-6  # AdamW's constant learning rate
# Keys of the JSON line of a timed run (docs/performance.md describes each).
KEYS = ("step_time_s", "pairs_per_s", "tokens_per_s", "real_tokens_per_s", "padded_tokens_per_s",
        "model_flops_per_step", "model_flops_per_s", "flop_model", "peak_flops_per_s", "peak_source", "mfu",
        "peak_memory_bytes", "memory_bytes", "batch_shape", "attention", "config", "env")
_BASE = base.get_config()
_ARCH = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
         "tie_embeddings")
# BenchConfig field -> the training config key it sets.
TRAINING_KEYS = {**{f: f"model.arch.{f}" for f in _ARCH},
                 **{f: f"model.{f}" for f in ("dtype", "param_dtype", "remat", "scan_min_layers", "attention",
                                               "attention_block")},
                 **{f: f"data.{f}" for f in ("layout", "logit_slots", "min_bucket", "pack_length",
                                              "prefix_min_saving")},
                 **{f: f"logprobs.{f}" for f in ("chunk_size", "vocab_chunk_size")},
                 "pairs": "data.batch_size", "ref_mode": "reference.mode", "loss": "loss.name", "seed": "seed",
                 "context": "mesh.shape.context"}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark. Model, data and log-prob fields are named as the training config keys they set
    (`TRAINING_KEYS`); the others shape the synthetic pairs and the timing."""

    # model.arch: the CPU shape of docs/performance.md
    family: str = "llama"
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    tie_embeddings: bool = False
    # model, data, logprobs: the trainer's defaults (float32)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = _BASE.model.remat
    scan_min_layers: int = _BASE.model.scan_min_layers  # stacks this deep are scanned (0: all), others unrolled
    attention: str = _BASE.model.attention  # dense | blockwise | auto | fused (model.attention)
    attention_block: int = _BASE.model.attention_block  # 0: the platform's attention.BLOCK
    layout: str = _BASE.data.layout  # standard | prefix | packed
    logit_slots: bool = _BASE.data.logit_slots  # logits only at completion positions (--no-logit-slots: all)
    min_bucket: int = _BASE.data.min_bucket  # rows padded to powers of two from here up to data.max_length
    pack_length: int = _BASE.data.pack_length  # packed: row length (0 = the longest row)
    prefix_min_saving: float = _BASE.data.prefix_min_saving  # prefix: batches saving less are laid out standard
    chunk_size: int = _BASE.logprobs.chunk_size
    vocab_chunk_size: int = _BASE.logprobs.vocab_chunk_size
    # synthetic pairs, step and timing
    prompt_len: int = 64
    completion_len: int = 64  # tokens of each completion, EOS included
    lengths: str = ""  # "uniform:LO:HI": each sequence (prompt + completion) length ~ U{LO..HI}
    pairs: int = 8  # pairs per batch (data.batch_size)
    ref_mode: str = "frozen"  # frozen | precomputed | none (reference.mode)
    loss: str = ""  # loss.name, a loss of pairs ('+' joins several); '': sigmoid, or simpo with ref_mode none
    naive_logits: bool = False
    steps: int = 10
    repeats: int = 3
    warmup: int = 2
    batches: int = 4  # distinct batches, cycled
    devices: int = 1
    context: int = 1  # of the devices, how many shard each row's positions (mesh.shape.context)
    seed: int = 0

    def __post_init__(self):
        choices = {"layout": layouts.LAYOUTS, "ref_mode": ("frozen", "precomputed", "none"),
                   "family": transformer.FAMILIES, "dtype": config_check.DTYPES, "param_dtype": config_check.DTYPES,
                   "remat": transformer.REMAT_POLICIES, "attention": transformer.ATTENTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{_flag(name)} must be one of {tuple(allowed)}; got {getattr(self, name)!r}")
        for name in ("prompt_len", "completion_len", "pairs", "min_bucket", "steps", "repeats", "batches", "devices",
                     "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1; got {getattr(self, name)}")
        if self.lengths:
            parse_lengths(self.lengths)
        if self.loss:
            check_loss(self.loss, self.ref_mode)

    def longest_sequence(self) -> int:
        return parse_lengths(self.lengths)[1] if self.lengths else self.prompt_len + self.completion_len

    def max_length(self) -> int:
        """data.max_length: the longest sequence, rounded up to a multiple of `min_bucket`."""
        return self.min_bucket * math.ceil(self.longest_sequence() / self.min_bucket)

    def training_config(self) -> config_dict.ConfigDict:
        """configs/base.py with the keys of `TRAINING_KEYS`, data.max_length, the loss (sigmoid, or
        simpo without a reference) and the learning rate set from this benchmark."""
        config = base.get_config()
        config.update_from_flattened_dict({key: getattr(self, f) for f, key in TRAINING_KEYS.items()})
        config.data.max_length = self.max_length()
        arch = config.model.arch
        arch.max_position_embeddings = max(arch.max_position_embeddings, config.data.max_length)
        config.loss.name = self.loss or ("simpo" if self.ref_mode == "none" else "sigmoid")
        config.optim.lr = LR
        return config


def check_loss(name: str, ref_mode: str) -> None:
    """`--loss`: registered losses of pairs ('+' joins several) that `--ref-mode` can train."""
    pair_losses = ", ".join(sorted(losses.LOSSES))
    parts = tuple(name.split("+"))
    for part in parts:
        if part in losses.LIST_LOSSES:
            raise ValueError(f"--loss {name!r}: {part!r} is a loss of ranked lists; the benchmark builds pairs "
                             f"(losses of pairs: {pair_losses})")
        if part not in losses.LOSSES:
            raise ValueError(f"--loss {name!r}: unknown loss {part!r}; losses of pairs: {pair_losses}")
    step.check_ref_mode(ref_mode, losses.Objective(parts), has_lora=False, loss_name=name)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def parse_lengths(text: str) -> tuple[int, int]:
    """'uniform:LO:HI' -> (LO, HI)."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != "uniform" or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"--lengths must be 'uniform:LO:HI'; got {text!r}")
    lo, hi = int(parts[1]), int(parts[2])
    if not 4 <= lo <= hi:
        raise ValueError(f"--lengths needs 4 <= LO <= HI; got {text!r}")
    return lo, hi


def model_config(config) -> transformer.ModelConfig:
    """The random-init policy of a training config (`build.model_config`), with the special ids."""
    cfg = build.model_config(config, config.model.arch.vocab_size)
    return dataclasses.replace(cfg, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def layout_spec(config) -> layouts.LayoutSpec:
    """The batch shapes of a training config: the pipeline's `DataConfig.layout_spec()`."""
    return build.data_config(config, path="", pairs=config.data.batch_size).layout_spec()


def synthetic_examples(cfg: BenchConfig, n: int, rng: np.random.Generator) -> list[dict]:
    """n random pairs. Fixed: prompt n, completions a = b = completion_len. `lengths`: the chosen and
    rejected sequence lengths s_c, s_r ~ U{LO..HI}, prompt = min(s_c, s_r) // 2. Completions end
    with EOS; other tokens are uniform over the non-special ids."""
    def ids(k):
        return rng.integers(4, cfg.vocab_size, k).astype(np.int32)

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


def make_batches(cfg: BenchConfig, config) -> tuple[list[dict], list[list[dict]]]:
    """`cfg.batches` host batches laid out as `config` lays them out, and the examples of each
    (packed: as many pairs as fit)."""
    rng = np.random.default_rng(cfg.seed)
    spec = layout_spec(config)
    if cfg.layout == "packed":
        stream = iter(synthetic_examples(cfg, 64 * cfg.batches * spec.num_pairs, rng))
        groups = list(layouts.pack_groups(stream, spec))[:cfg.batches]
    else:
        groups = [synthetic_examples(cfg, cfg.pairs, rng) for _ in range(cfg.batches)]
    batches = [spec(g) for g in groups]
    if cfg.ref_mode == "precomputed":  # reference log-probs carried in the batch
        for b in batches:
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


def build_step(cfg: BenchConfig, config, batch_keys: tuple[str, ...], mesh):
    """(state, train_fn, step_cfg, model_cfg): policy, reference, optimizer, state and jitted step
    built from the training config as a training run builds them."""
    model_cfg = model_config(config)
    policy = transformer.Decoder(model_cfg, rngs=nnx.Rngs(config.seed))
    reference = build.reference(config, policy) if config.reference.mode == "frozen" else None
    tx, lr = optim.make_optimizer(config.optim, config.train.steps)
    objective = config_check.objective(config)
    state, state_sh, graphdef = train_state.init_state(policy, reference, tx, mesh, config.seed,
                                                       rules=sharding.check_rules(config.mesh.rules),
                                                       loss_state=objective.init_state())
    step_cfg = step.StepConfig(graphdef=graphdef, objective=objective, tx=tx, lr=lr,
                               ref_mode=config.reference.mode, grad_accum=config.optim.grad_accum,
                               chunk_size=config.logprobs.chunk_size,
                               vocab_chunk_size=config.logprobs.vocab_chunk_size, naive_logits=cfg.naive_logits)
    train_fn, _ = loop.compiled_steps(step_cfg, state_sh, mesh, batch_keys)
    return state, train_fn, step_cfg, model_cfg


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
    """The benchmark's step, compiled; `warmup()` runs every batch shape once, `round()` times
    `cfg.steps` steps, `result()` reports. `config` is the training config it was built from,
    `groups` the examples of each batch."""

    def __init__(self, cfg: BenchConfig):
        self.cfg, self.config = cfg, cfg.training_config()
        mesh = sharding.make_mesh(dict(self.config.mesh.shape), devices=jax.devices()[:cfg.devices])
        host, self.groups = make_batches(cfg, self.config)
        self.state, self.train_fn, self.step_cfg, self.model_cfg = build_step(cfg, self.config,
                                                                              tuple(sorted(host[0])), mesh)
        self.hp = config_check.loss_hparams(self.config)
        counts = [batch_counts(b, g, self.model_cfg, cfg.ref_mode == "frozen") for b, g in zip(host, self.groups)]
        self.per_step = {k: sum(counts[i % len(counts)][k] for i in range(cfg.steps)) / cfg.steps for k in counts[0]}
        self.batches = [sharding.global_batch(b, mesh) for b in host]
        t = time.perf_counter()
        self.memory = metrics.memory_figures(self.train_fn.lower(self.state, self.batches[0], self.hp).compile())
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
               "max_length": self.config.data.max_length, "batch_shape": self.shape, "pairs_per_step": c["pairs"],
               "params": sum(math.prod(s) for s, _ in transformer.param_shapes(self.model_cfg).values()),
               "matmul_params": metrics.matmul_params(self.model_cfg),
               "attention": attention.resolve(self.model_cfg.attention, self.shape[1]),
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


def finish(timer: StepTimer, load_start: float) -> dict:
    """The rounds left of `cfg.repeats`, then the result with the environment (`load_start`: the
    1-minute load average when the benchmark began)."""
    while len(timer.rounds) < timer.cfg.repeats:
        timer.round()
    out = timer.result()
    out["env"] = {"loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                  "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""), "cpu_count": os.cpu_count(),
                  "jax": jax.__version__}
    return out


def run(cfg: BenchConfig, *, compile_only: bool = False) -> dict:
    """Compile, warm up, time `cfg.repeats` rounds, report."""
    load = os.getloadavg()[0]
    timer = StepTimer(cfg)
    if compile_only:
        return timer.result()
    timer.warmup()
    return finish(timer, load)


def arg_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per BenchConfig field: `--hidden-size 256`, `--logit-slots` / `--no-logit-slots`, ..."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(BenchConfig):
        if f.type == "bool":
            ap.add_argument("--" + _flag(f.name), action=argparse.BooleanOptionalAction, default=f.default)
        else:
            ap.add_argument("--" + _flag(f.name), type={"int": int, "str": str, "float": float}[f.type],
                            default=f.default)
    return ap


def config_from_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig of parsed flags; an invalid one exits through `ap.error`."""
    try:
        return BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
    except ValueError as e:
        ap.error(str(e))


def config_flags(ap: argparse.ArgumentParser, argv) -> list[str]:
    """The trainer's override syntax, `--config.KEY=VALUE` (or `--config.KEY VALUE`), rewritten to the
    flag of the BenchConfig field that sets KEY (`TRAINING_KEYS`): `--config.data.layout=prefix` ->
    `--layout=prefix`, `--config.data.logit_slots=False` -> `--no-logit-slots`. Other keys are an
    error naming the keys a benchmark takes."""
    fields = {key: f for f, key in TRAINING_KEYS.items()}
    types = {f.name: f.type for f in dataclasses.fields(BenchConfig)}
    try:
        split, rest = common.split_overrides(list(argv))
    except ValueError as e:
        ap.error(str(e))
    out, done = [], 0
    for key, value, _, before in split:  # each flag where its override stood (a later flag wins)
        out, done = out + rest[done:before], before
        if key not in fields:
            ap.error(f"--config.{key}: the benchmark takes only these training config keys: {', '.join(fields)}")
        field = fields[key]
        if types[field] == "bool":
            if value.lower() not in ("true", "false", "1", "0"):
                ap.error(f"--config.{key}={value}: expected True or False")
            out.append(f"--{'' if value.lower() in ('true', '1') else 'no-'}{_flag(field)}")
        else:
            out.append(f"--{_flag(field)}={value}")
    out += rest[done:]
    return out


def parse_args(argv=None) -> tuple[BenchConfig, argparse.Namespace]:
    """The BenchConfig of a command line: its own flags (`arg_parser`) and `--config.KEY=VALUE` for the
    training config keys its fields set (`config_flags`)."""
    import sys  # pylint: disable=g-import-not-at-top

    ap = arg_parser("python -m dpo_jax.bench", __doc__.splitlines()[0])
    ap.add_argument("--compile-only", action="store_true", help="compile only: memory figures, no timing")
    ap.epilog = ("--config.KEY=VALUE: the trainer's syntax for the training config keys the flags set: "
                 + ", ".join(TRAINING_KEYS.values()))
    args = ap.parse_args(config_flags(ap, sys.argv[1:] if argv is None else argv))
    return config_from_args(ap, args), args


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    print(json.dumps(run(cfg, compile_only=args.compile_only)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
