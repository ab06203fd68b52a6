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

The attention's products are timed the same way (`attention_products`, dense or tiled attention as
`model.attention` resolves at T on this platform): per query tile of Q rows over its S keys, batched
over the rows' key/value heads with the G query heads of each in the rows, the scores q k^T
([G Q, E] x [E, S]) and the value product p v ([G Q, S] x [S, E]) run in the policy's and the
reference's forward and once more each in the backward (dp = do v^T, dq = ds k), and dv = p^T do,
dk = ds^T q ([S, G Q] x [G Q, E], the left operand transposed) once each. `bound_mfu` adds them
and the causal pairs' model FLOPs (`metrics.step_flops`: 16 L H E per pair, the tiles' masked
products are work the model FLOPs do not count): the MFU of a step that ran all its matmuls at
their isolated speed and nothing else.
"""

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from dpo_jax import bench, build
from dpo_jax.models import attention
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


def attention_products(cfg: bench.BenchConfig) -> tuple[list[tuple[str, int, int, int, int, int]], float]:
    """(name, batch, M, K, N, calls per step) of every batched product x[batch, M, K] @ w[batch, K, N]
    of one step's attention (dense or tiled, as `model.attention` resolves at the row length T on
    this platform), and the model FLOPs of its causal pairs (`metrics.step_flops`' share)."""
    model = build.model_config(cfg.training_config(), cfg.vocab_size)
    T, E, L = cfg.prompt_len + cfg.completion_len, model.head_dim, model.num_layers
    G, batch = model.num_heads // model.num_kv_heads, 2 * cfg.pairs * model.num_kv_heads
    kind = attention.resolve(model.attention, T)
    if kind not in ("dense", "tiled"):
        raise ValueError(f"attention {kind!r} at T = {T}: only dense and tiled attention are listed")
    tile = min(model.attention_block or attention.for_platform(attention.BLOCK), T) if kind == "tiled" else T
    out = []
    for lo in range(0, T, tile):
        Q, S = min(tile, T - lo), min(lo + tile, T)
        out.append((f"scores:{Q}x{S}", batch, G * Q, E, S, 3 * L))  # q k^T twice forward, do v^T backward
        out.append((f"values:{Q}x{S}", batch, G * Q, S, E, 3 * L))  # p v twice forward, ds k backward
        out.append((f"kv_grad:{Q}x{S}", batch, S, G * Q, E, 2 * L))  # p^T do and ds^T q
    pairs = 2 * cfg.pairs * T * (T + 1) // 2
    return out, 16.0 * L * model.num_heads * E * pairs


def time_product(m: int, k: int, n: int, transposed_lhs: bool, repeats: int, batch: int = 0) -> float:
    """Best wall time of x @ w (x given [k, m] and transposed in the product when transposed_lhs),
    batched over a leading axis of `batch` when it is > 0."""
    lead = (batch,) if batch else ()
    a = jnp.ones(lead + ((k, m) if transposed_lhs else (m, k)), jnp.float32)
    b = jnp.ones(lead + (k, n), jnp.float32)
    f = jax.jit((lambda x, w: jnp.swapaxes(x, -1, -2) @ w) if transposed_lhs else (lambda x, w: x @ w))
    return metrics.best_time(f, a, b, repeats=repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args, rest = ap.parse_known_args(argv)
    cfg, _ = bench.parse_args(rest)
    peak = metrics.measured_matmul_flops(repeats=args.repeats)

    def timed(name, calls, m, k, n, transposed_lhs, batch=0):
        """(JSON row, seconds per step) of one product, timed alone."""
        t = time_product(m, k, n, transposed_lhs, args.repeats, batch=batch)
        rate = 2.0 * max(batch, 1) * m * k * n / t
        shape = {"batch_mkn": [batch, m, k, n]} if batch else {"mkn": [m, k, n]}
        return {"product": name, **shape, "calls": calls, "gflops": round(rate / 1e9, 1),
                "of_peak": round(rate / peak, 3)}, t * calls

    listed = products(cfg)
    rows, times = zip(*(timed(name, calls, m, k, n, name.endswith(":dw")) for name, m, k, n, calls in listed))
    flops, seconds = sum(2.0 * m * k * n * calls for _, m, k, n, calls in listed), sum(times)
    listed, attention_flops = attention_products(cfg)
    attention_rows, times = zip(*(timed(name, calls, m, k, n, name.startswith("kv_grad"), batch=b)
                                  for name, b, m, k, n, calls in listed))
    attention_s = sum(times)
    print(json.dumps({"peak_gflops": round(peak / 1e9, 1), "step_matmul_s": round(seconds, 4),
                      "matmul_bound_mfu": round(flops / seconds / peak, 3),
                      "attention_matmul_s": round(attention_s, 4),
                      "bound_mfu": round((flops + attention_flops) / (seconds + attention_s) / peak, 3),
                      "products": list(rows), "attention_products": list(attention_rows)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
