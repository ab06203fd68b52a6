r"""Our train step against peer DPO trainers (TRL, Tunix), same model and pairs, in one process.

    python benchmarks/trl_compare.py --repeats 5 [bench flags] [--trl-steps N]
    python benchmarks/trl_compare.py --compare trl,tunix --repeats 5 [bench flags] [--tunix-steps N]
    python benchmarks/trl_compare.py --compare trl,tunix --repeats 5 \
        --shapes '64+64,256+64:prefix,1024+512:steps=2:repeats=3'      # one JSON line per shape

Prints the bench's JSON line (`python -m dpo_jax.bench`) with two more keys per peer of `--compare`
(default `trl`): `trl` (TRL's step time, tokens/s and versions) and `speedup_vs_trl` (our tokens/s
over TRL's); `tunix` and `speedup_vs_tunix` likewise (benchmarks/tunix_compare.py). Each peer's
section also has `mfu`: our model FLOPs per step (the same work) over the peer's step time and the
same matmul peak. Needs the `bench` extra (`pip install -e '.[bench]'`: torch, TRL, google-tunix).
The bench flags (`python -m dpo_jax.bench --help`) choose the model and pairs; the bench's random
model is exported once in Hugging Face format and every peer trains it, from that checkpoint, on
the same pairs, in the same process, float32, with a frozen reference. After every `--trl-steps`
(`--tunix-steps`) timed peer steps (0 = `--steps`) one round of our step runs, so both see the same
machine load; our figures are the median over all those rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

from dpo_jax import host_memory

if __name__ == "__main__":  # before the heavy imports: the process may be re-executed
    host_memory.reexec_with_malloc_tunables(keep_heap=True)

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # noqa: E402

from dpo_jax import bench  # noqa: E402
from dpo_jax.models import hf, transformer  # noqa: E402

PEERS = ("trl", "tunix")


def _sibling(name: str):
    """A module of this folder (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tunix_compare = _sibling("tunix_compare")


def word_tokenizer(vocab_size: int, out_dir: str):
    """Word level: '<pad>' 0, '<s>' 1, '</s>' 2, '<unk>' 3, 'w<i>' = id i ('w5 w9' -> [5, 9]), no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    words.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>")
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def check(cfg: bench.BenchConfig, compare: tuple[str, ...] = ("trl",)) -> None:
    """The peers run here as float32 DPO (the sigmoid loss) with a frozen reference; the benchmark must match."""
    unknown = [p for p in compare if p not in PEERS]
    if unknown or not compare:
        raise ValueError(f"--compare takes a comma-separated list of {PEERS}; got {','.join(compare)!r}")
    if cfg.ref_mode != "frozen" or cfg.dtype != "float32" or cfg.param_dtype != "float32":
        raise ValueError("the peer comparison needs --ref-mode frozen, --dtype float32 and --param-dtype float32")
    if cfg.loss not in ("", "sigmoid"):
        raise ValueError(f"the peers run DPO's sigmoid loss; got --loss {cfg.loss!r}")
    if "tunix" in compare:
        tunix_compare.check(cfg)


def export(cfg: bench.BenchConfig, timer: bench.StepTimer, out_dir: str):
    """(model dir, tokenizer): our policy's initial weights in Hugging Face format, with the word
    tokenizer, under `out_dir`; every peer loads this checkpoint."""
    tok_dir, model_dir = os.path.join(out_dir, "tokenizer"), os.path.join(out_dir, "model")
    tok = word_tokenizer(cfg.vocab_size, tok_dir)
    model = transformer.Decoder(timer.model_cfg, rngs=nnx.Rngs(cfg.seed))  # our policy's initial weights
    hf.export_model(model, model_dir, tokenizer_dir=tok_dir)
    return model_dir, tok


def tokens_per_pair(examples: list[dict]) -> float:
    """Mean input tokens of a pair as TRL counts them: 2n + a + b."""
    total = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    return total / len(examples)


def trl_bench(cfg: bench.BenchConfig, timer: bench.StepTimer, steps_per_round: int, model_dir: str, tok) -> dict:
    """TRL's DPOTrainer (float32 CPU, same batch size, frozen reference, no gradient checkpointing) on
    the same random model exported with `hf.export_model` (`export`), and the same pairs. After every
    `steps_per_round` timed TRL steps a trainer callback runs one round of our step. A TRL step is
    timed from `on_step_begin` to `on_step_end`: forward, backward, gradient clipping and the AdamW
    update (`between_steps_s`: the trainer's work between steps, next batch and logging, reported
    apart, as our side's batch building is left out)."""
    import datasets
    import torch
    import transformers
    import trl

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="dpo_jax_trl_compare_") as tmp:
        load = lambda: transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # noqa: E731
        examples = [e for g in timer.groups for e in g]
        text = lambda ids: " ".join(f"w{int(i)}" for i in ids)  # noqa: E731
        rows = [{"prompt": text(e["prompt_ids"]) + " ", "chosen": text(e["chosen_ids"][:-1]),
                 "rejected": text(e["rejected_ids"][:-1])} for e in examples]  # TRL appends the EOS
        warmup = max(cfg.warmup, 3)
        args = trl.DPOConfig(output_dir=tmp, per_device_train_batch_size=cfg.pairs, beta=0.1,
                             learning_rate=bench.LR, max_steps=warmup + steps_per_round * cfg.repeats,
                             use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, max_length=None,
                             report_to=[], save_strategy="no", logging_steps=10**9, disable_tqdm=True,
                             dataloader_num_workers=0, seed=cfg.seed)
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
    tokens_per_step = tokens_per_pair(examples) * cfg.pairs  # exact for fixed lengths, else the dataset's mean
    between = statistics.median(cb.between[warmup:]) if len(cb.between) > warmup else 0.0
    return {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "step_time_s": step_s,
            "step_time_rounds_s": [round(r, 5) for r in rounds], "between_steps_s": between,
            "tokens_per_s_with_between": tokens_per_step / (step_s + between), "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step / step_s, "pairs_per_s": cfg.pairs / step_s,
            "layout": "standard (TRL pads chosen and rejected rows; padding_free is disabled in TRL 1.16)"}


def run(cfg: bench.BenchConfig, trl_steps: int = 0, compare: tuple[str, ...] = ("trl",), tunix_steps: int = 0) -> dict:
    """Compile and warm up our step, time each peer of `compare` with our rounds in between, report all."""
    check(cfg, compare)
    load = os.getloadavg()[0]
    timer = bench.StepTimer(cfg)
    timer.warmup()
    peers = {}
    with tempfile.TemporaryDirectory(prefix="dpo_jax_peer_compare_") as tmp:
        model_dir, tok = export(cfg, timer, tmp)
        for peer in compare:
            if peer == "trl":
                peers[peer] = trl_bench(cfg, timer, trl_steps or cfg.steps, model_dir, tok)
            else:
                peers[peer] = tunix_compare.tunix_bench(cfg, timer, tunix_steps or cfg.steps, model_dir)
    out = bench.finish(timer, load)
    for peer, result in peers.items():
        result["mfu"] = out["model_flops_per_step"] / result["step_time_s"] / out["peak_flops_per_s"]
        out[peer] = result
        out[f"speedup_vs_{peer}"] = out["tokens_per_s"] / result["tokens_per_s"]
    return out


def parse_shapes(spec: str, cfg: bench.BenchConfig) -> list[tuple[str, bench.BenchConfig]]:
    """`--shapes`: comma-separated 'P+C' (prompt and completion tokens), each optionally followed by
    ':layout' and ':field=value' settings of this shape alone (e.g. '1024+512:steps=2:repeats=3');
    returns (the shape as given, its BenchConfig) in order. An empty spec is the flags' one shape."""
    if not spec.strip():
        return [("", cfg)]
    types = {f.name: f.type for f in dataclasses.fields(bench.BenchConfig)}
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        lengths, *settings = item.split(":")
        try:
            prompt, completion = (int(x) for x in lengths.split("+"))
            kw = {"prompt_len": prompt, "completion_len": completion}
            for setting in settings:
                key, sep, value = setting.partition("=")
                if not sep:  # a bare word is the layout
                    key, value = "layout", setting
                if types.get(key) not in ("int", "str", "float"):
                    raise ValueError(f"{key!r} is not a benchmark setting of one shape")
                kw[key] = {"int": int, "str": str, "float": float}[types[key]](value)
            out.append((item, dataclasses.replace(cfg, **kw)))
        except ValueError as e:
            raise ValueError(f"--shapes item {item!r}: {e} (expected P+C[:layout][:field=value...])") from None
    return out


def main(argv=None) -> int:
    ap = bench.arg_parser("python benchmarks/trl_compare.py", __doc__.splitlines()[0])
    ap.add_argument("--compare", default="trl", help=f"comma-separated peers, of {', '.join(PEERS)} (default trl)")
    ap.add_argument("--trl-steps", type=int, default=0, help="timed TRL steps per round (0 = --steps)")
    ap.add_argument("--tunix-steps", type=int, default=0, help="timed Tunix steps per round (0 = --steps)")
    ap.add_argument("--shapes", default="", help="run several shapes one after another in this process, one "
                    "JSON line each (with 'shape'): comma-separated P+C[:layout][:field=value...], e.g. "
                    "'64+64,256+64:prefix,1024+512:steps=2:repeats=3'")
    args = ap.parse_args(argv)
    cfg = bench.config_from_args(ap, args)
    compare = tuple(p.strip() for p in args.compare.split(",") if p.strip())
    try:
        shapes = parse_shapes(args.shapes, cfg)
        for _, shape_cfg in shapes:
            check(shape_cfg, compare)
    except ValueError as e:
        ap.error(str(e))
    for label, shape_cfg in shapes:
        out = run(shape_cfg, args.trl_steps, compare, args.tunix_steps)
        print(json.dumps({"shape": label, **out} if label else out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
