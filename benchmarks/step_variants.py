r"""Time variants of the train step, and pieces of it, interleaved in one process.

    python benchmarks/step_variants.py --variants base logit_slots=0 scan_min_layers=0 --pieces [bench flags]

Each variant is `name=value[,name=value]` overrides of the benchmark's config
(`dpo_jax.bench.BenchConfig`, e.g. `logit_slots=0`, `vocab_chunk_size=4096`, `scan_min_layers=0`,
`remat=dots`); `base` is the config the bench flags give (the CPU shape of docs/performance.md by
default). `--pieces` adds jitted pieces of the base step: the decoder forward, the decoder forward
and backward (of the sum of the hidden states), the reference's log-probs, and the policy's
value-and-grad without the optimizer. Rounds visit every variant in turn, in a rotating order, so
a machine whose load changes slows all of them alike. Per variant: the median over rounds of the
wall time per step, of the process CPU time per step (user + system, all threads: on a loaded
machine a steadier measure of the work), and of the minor page faults per step (fresh memory
touched); `mfu` against the median of the rounds' dense float32 matmul rate, and `cpu_mfu`, model
FLOPs per CPU second over the matmul's FLOPs per CPU second. For each variant after the first,
`mfu_over_first`: the median over rounds of its MFU over the first variant's in the same round
(`round_ratios`; the rounds' values in `mfu_over_first_rounds`), a ratio that a slow drift of the
machine's speed moves less than the ratio of the two medians. One JSON line per variant or piece.
"""

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time

from dpo_jax import host_memory

if __name__ == "__main__":  # before the heavy imports: the process may be re-executed
    host_memory.reexec_with_malloc_tunables(keep_heap=True)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from dpo_jax import bench  # noqa: E402
from dpo_jax.train import metrics, step  # noqa: E402


def override(cfg: bench.BenchConfig, text: str) -> bench.BenchConfig:
    """'base' or 'field=value,field=value' -> a BenchConfig."""
    if text == "base":
        return cfg
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    kw = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in fields:
            raise ValueError(f"variant {text!r}: BenchConfig has no field {key!r}")
        kind = fields[key].type
        kw[key] = (value if kind == "str" else value not in ("0", "false", "False") if kind == "bool"
                   else float(value) if kind == "float" else int(value))
    return dataclasses.replace(cfg, **kw)


def round_ratios(first_s: list[float], first_flops: float, this_s: list[float], this_flops: float) -> list[float]:
    """Per round, this variant's model FLOPs per second over the first variant's in the same round."""
    return [(this_flops / t) / (first_flops / t0) for t0, t in zip(first_s, this_s)]


def pieces(timer: bench.StepTimer) -> dict:
    """Jitted pieces of the timer's step: name -> zero-argument callable."""
    scfg, graphdef = timer.step_cfg, timer.step_cfg.graphdef
    hp = {k: jnp.asarray(v) for k, v in timer.hp.items()}

    def forward(state, b, params=None):
        model = nnx.merge(graphdef, state.params if params is None else params)
        return model(b["tokens_BxT"], positions_BxT=b["positions_BxT"], segment_ids_BxT=b["segment_ids_BxT"],
                     branch_ids_BxT=b["branch_ids_BxT"])

    def forward_backward(state, b):
        return jax.grad(lambda p: jnp.sum(forward(state, b, p)))(state.params)

    def reference_logps(state, b):
        return step.reference_logps(scfg, state, b)

    def value_and_grad(state, b):
        ref = step.reference_logps(scfg, state, b)
        loss = step._loss  # pylint: disable=protected-access
        return jax.value_and_grad(loss, has_aux=True)(state.params, scfg, ref, b, hp)

    fns = {"decoder_forward": forward, "decoder_forward_backward": forward_backward,
           "reference_logps": reference_logps, "policy_value_and_grad": value_and_grad}
    return {f"piece:{k}": (lambda f=jax.jit(f): f(timer.state, timer.batches[0])) for k, f in fns.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="*", default=["base"])
    ap.add_argument("--pieces", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-steps", type=int, default=3)
    args, rest = ap.parse_known_args(argv)
    base, _ = bench.parse_args(rest)
    runners, flops = {}, {}
    for text in args.variants:
        timer = bench.StepTimer(override(base, text))
        timer.warmup()
        runners[text] = lambda timer=timer: timer.run_steps(args.round_steps)
        flops[text] = (timer.per_step["flops"], timer.per_step["tokens"], timer.per_step["real_tokens"])
        if args.pieces and text == args.variants[0]:
            for name, fn in pieces(timer).items():
                jax.block_until_ready(fn())
                runners[name] = lambda fn=fn: jax.block_until_ready([fn() for _ in range(args.round_steps)])
    names = list(runners)
    wall, cpu, faults = ({k: [] for k in names} for _ in range(3))
    peaks, cpu_peaks = [], []
    for r in range(args.rounds):
        peaks.append(bench.matmul_rate())
        cpu_peaks.append(metrics.measured_matmul_flops(repeats=3, clock=time.process_time))
        for name in names[r % len(names):] + names[:r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            runners[name]()
            wall[name].append((time.perf_counter() - t) / args.round_steps)
            cpu[name].append((time.process_time() - c) / args.round_steps)
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f) / args.round_steps)
    peak, cpu_peak = statistics.median(peaks), statistics.median(cpu_peaks)
    for name in names:
        s, c = statistics.median(wall[name]), statistics.median(cpu[name])
        row = {"variant": name, "step_time_s": s, "cpu_time_s": c, "page_faults": statistics.median(faults[name]),
               "rounds_s": [round(t, 4) for t in wall[name]], "matmul_flops_per_s": peak}
        if name in flops:
            fl, tokens, real = flops[name]
            row.update(tokens_per_s=tokens / s, real_tokens_per_s=real / s, model_flops_per_s=fl / s,
                       mfu=fl / s / peak, cpu_mfu=fl / c / cpu_peak)
            first = names[0]
            if name != first and first in flops:
                ratios = round_ratios(wall[first], flops[first][0], wall[name], fl)
                row.update(mfu_over_first=statistics.median(ratios),
                           mfu_over_first_rounds=[round(x, 4) for x in ratios])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
