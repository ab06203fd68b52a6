r"""The train step's matmuls, each timed alone: what the step would take if it were only its matmuls.

    python benchmarks/matmul_shapes.py [bench flags, e.g. --prompt-len 256]

For the benchmark's model and batch (`dpo_jax.bench.BenchConfig`, standard layout: 2 P rows of
T = prompt + completion tokens, logits at the 2 P C completion positions), every projection of
every layer, y[M, O] = x[M, I] W[I, O] with M = 2 P T, runs three times in a step (forward,
dx = dy W^T, dW = x^T dy) for the policy and once more for the frozen reference's forward; the
unembedding the same at the M = 2 P C logit positions. Each distinct product is jitted and timed
alone (best of `--repeats`), in float32, beside the dense 2048 x 2048 float32 matmul that MFU is
measured against (`metrics.measured_matmul_flops`). One JSON line: per product its GFLOP/s and
rate over the 2048^2 rate; and `matmul_bound_mfu`, the model FLOPs of these products over the sum
of their times, over the 2048^2 rate: the MFU of a step that did nothing but run its projection
and unembedding matmuls at their isolated speed (attention, whose pairs the model FLOPs also
count, is left out).
"""

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from dpo_jax import bench, build
from dpo_jax.train import metrics


def products(cfg: bench.BenchConfig) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, calls per step) of every matmul x[M, K] @ w[K, N] of one step."""
    model = build.model_config(cfg.training_config(), cfg.vocab_size)
    D, F, V, E = model.hidden_size, model.intermediate_size, model.vocab_size, model.head_dim
    rows = 2 * cfg.pairs
    M, M_logits = rows * (cfg.prompt_len + cfg.completion_len), rows * cfg.completion_len
    L = model.num_layers
    projections = {"q": (D, model.num_heads * E), "k": (D, model.num_kv_heads * E),
                   "v": (D, model.num_kv_heads * E), "o": (model.num_heads * E, D), "up": (D, F), "down": (F, D)}
    if model.gated_mlp:
        projections["gate"] = (D, F)
    out = []
    for name, (i, o), m, n in [(k, v, M, L) for k, v in projections.items()] + [("unembed", (D, V), M_logits, 1)]:
        out.append((f"{name}:fwd", m, i, o, 2 * n))  # the policy's forward and the reference's
        out.append((f"{name}:dx", m, o, i, n))
        out.append((f"{name}:dw", i, m, o, n))  # x^T dy: contracted over the M rows
    return out


def time_product(m: int, k: int, n: int, transposed_lhs: bool, repeats: int) -> float:
    """Best wall time of x @ w (x given [k, m] and transposed in the product when transposed_lhs)."""
    a = jnp.ones((k, m) if transposed_lhs else (m, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    f = jax.jit((lambda x, w: x.T @ w) if transposed_lhs else (lambda x, w: x @ w))
    return metrics.best_time(f, a, b, repeats=repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args, rest = ap.parse_known_args(argv)
    cfg, _ = bench.parse_args(rest)
    peak = metrics.measured_matmul_flops(repeats=args.repeats)
    rows, flops, seconds = [], 0.0, 0.0
    for name, m, k, n, calls in products(cfg):
        t = time_product(m, k, n, name.endswith(":dw"), args.repeats)
        rate = 2.0 * m * k * n / t
        rows.append({"product": name, "mkn": [m, k, n], "calls": calls, "gflops": round(rate / 1e9, 1),
                     "of_peak": round(rate / peak, 3)})
        flops += 2.0 * m * k * n * calls
        seconds += t * calls
    print(json.dumps({"peak_gflops": round(peak / 1e9, 1), "step_matmul_s": round(seconds, 4),
                      "matmul_bound_mfu": round(flops / seconds / peak, 3), "products": rows}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
