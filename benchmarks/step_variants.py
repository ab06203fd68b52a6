r"""Time variants of the train step, and pieces of it, interleaved in one process.

    python benchmarks/step_variants.py --variants base capacity=-1 scan_layers=0 --pieces

Each variant is `name=value` overrides of the benchmark's config (`dpo_jax.bench.BenchConfig`,
e.g. `capacity=-1 vocab_chunk_size=4096 scan_layers=0 remat=dots`); `base` is the config as given
by the flags (the CPU shape of docs/performance.md by default). `--pieces` adds jitted pieces of the
base step: the decoder forward only, the reference's log-probs (forward + log-probs), and the
policy's value-and-grad without the optimizer. Rounds visit every variant in turn, so a machine
whose load changes during the run slows all of them alike; each gets the median of its rounds,
next to the same round's dense float32 matmul rate, and the median process CPU time per step
(user + system, all threads: on a loaded machine a steadier measure of the work than wall time)
with `cpu_mfu`, the model FLOPs per CPU second over the matmul's FLOPs per CPU second.
One JSON line per variant or piece.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax import bench, metrics, sharding, step


def _override(cfg: bench.BenchConfig, text: str) -> bench.BenchConfig:
    if text == "base":
        return cfg
    kw = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        field = {f.name: f for f in dataclasses.fields(cfg)}.get(key)
        if field is None:
            raise ValueError(f"variant {text!r}: BenchConfig has no field {key!r}")
        kw[key] = value if field.type == "str" else (value not in ("0", "false", "False")) \
            if field.type == "bool" else int(value)
    return dataclasses.replace(cfg, **kw)


def _pieces(cfg: bench.BenchConfig, mesh):
    """Jitted pieces of the base step: name -> (fn, args)."""
    host, _ = bench.make_batches(cfg)
    state, train_fn, model_cfg, capacity = bench.build_step(cfg, host, mesh)
    batch = sharding.global_batch(host[0], mesh)
    graphdef = nnx.graphdef(bench.transformer.Decoder(model_cfg, rngs=nnx.Rngs(0)))
    scfg = step.StepConfig(graphdef=graphdef, objective=cfg.objective(), tx=None, lr=None,
                           ref_mode=cfg.ref_mode, capacity=capacity, chunk_size=cfg.chunk_size,
                           vocab_chunk_size=cfg.vocab_chunk_size)
    hp = {k: jnp.asarray(v) for k, v in cfg.objective().params(beta=0.1).items()}

    def forward(state, b, params=None):
        params = state.params if params is None else params
        model = nnx.merge(graphdef, params)
        return model(b["tokens_BxT"], positions_BxT=b["positions_BxT"], segment_ids_BxT=b["segment_ids_BxT"],
                     branch_ids_BxT=b["branch_ids_BxT"])

    def ref_logps(state, b):
        return step.reference_logps(scfg, state, b)

    def value_and_grad(state, b):
        ref = step.reference_logps(scfg, state, b)
        return jax.value_and_grad(step._loss, has_aux=True)(state.params, scfg, ref, b, hp)  # pylint: disable=protected-access

    def forward_and_grad(state, b):
        return jax.grad(lambda p: jnp.sum(forward(state, b, p)))(state.params)

    return {name: (jax.jit(fn), (state, batch))
            for name, fn in (("piece:decoder_forward", forward), ("piece:decoder_forward_backward", forward_and_grad),
                             ("piece:reference_logps", ref_logps), ("piece:policy_value_and_grad", value_and_grad))}


def _matmul_flops_per_cpu_s(n: int = 2048, repeats: int = 3) -> float:
    """FLOPs of a float32 n x n matmul per second of process CPU time (all threads), best of `repeats`."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        c = time.process_time()
        f(a).block_until_ready()
        best = min(best, time.process_time() - c)
    return 2.0 * n**3 / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="*", default=["base"])
    ap.add_argument("--pieces", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-steps", type=int, default=3)
    args, rest = ap.parse_known_args(argv)
    base, _ = bench.parse_args(rest)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    runners = {}
    for text in args.variants:
        cfg = _override(base, text)
        host, groups = bench.make_batches(cfg)
        state, train_fn, model_cfg, capacity = bench.build_step(cfg, host, mesh)
        batches = [sharding.global_batch(b, mesh) for b in host]
        counts = [bench.batch_counts(b, g, model_cfg, cfg.ref_mode == "frozen") for b, g in zip(host, groups)]
        hp = cfg.objective().params(beta=0.1)
        holder = {"state": state}

        def run_step(i, holder=holder, train_fn=train_fn, batches=batches, hp=hp):
            holder["state"], m = train_fn(holder["state"], batches[i % len(batches)], hp)
            return m

        runners[text] = (run_step, bench._mean_counts(counts, args.round_steps), capacity)  # pylint: disable=protected-access
    if args.pieces:
        for name, (fn, fargs) in _pieces(base, mesh).items():
            runners[name] = ((lambda i, fn=fn, fargs=fargs: fn(*fargs)), None, None)
    for run_step, _, _ in runners.values():  # compile and warm up
        jax.block_until_ready(run_step(0))
        jax.block_until_ready(run_step(1))
    times = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    peaks, cpu_peaks = [], []
    names = list(runners)
    for r in range(args.rounds):
        peaks.append(metrics.measured_matmul_flops(repeats=3))
        cpu_peaks.append(_matmul_flops_per_cpu_s())
        for name in names[r % len(names):] + names[:r % len(names)]:  # a different order each round
            run_step = runners[name][0]
            t, c = time.perf_counter(), time.process_time()
            for i in range(args.round_steps):
                out = run_step(i)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t) / args.round_steps)
            cpu[name].append((time.process_time() - c) / args.round_steps)
    peak, cpu_peak = statistics.median(peaks), statistics.median(cpu_peaks)
    for name, (_, counts, capacity) in runners.items():
        s = statistics.median(times[name])
        row = {"variant": name, "step_time_s": s, "cpu_time_s": statistics.median(cpu[name]),
               "rounds_s": [round(t, 4) for t in times[name]],
               "matmul_flops_per_s": peak}
        if counts is not None:
            c = statistics.median(cpu[name])
            row.update(tokens_per_s=counts["tokens"] / s, model_flops_per_s=counts["flops"] / s,
                       mfu=counts["flops"] / s / peak, capacity=capacity,
                       cpu_mfu=counts["flops"] / c / cpu_peak)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
