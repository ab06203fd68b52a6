"""The fused attention kernel of this machine's backend against the dense path.

  python benchmarks/fused_attention_check.py [--batch 4 --length 1024 --heads 16 --kv-heads 4
                                              --head-dim 128 --window 0 --steps 10]

For each layout (standard, packed) and dtype (float32, bfloat16) that `fused_attention.select`
sends to a fused kernel (cuDNN on GPU, splash on TPU), runs o = attention(q, k, v) and the
gradients of sum(sin(o)) through the fused kernel and through `layers.masked_attention` under
`layers.attention_mask`, both on the same inputs in that dtype, and measures each error against
the dense path in float32 (matmuls at 'highest' precision) as max|x - ref| / max|ref|; the dense
path's own error in that dtype is printed beside it. A case is ok when the fused error is within
TOLERANCE or at most twice the dense path's own error (TPU matmuls may run float32 at reduced
precision by default). Prints one JSON line: per case the errors, ok, and the seconds per
forward + backward step of each path.
Exits 1 when a case is out of tolerance; on a backend with no fused kernel (CPU) it says so and
exits 0. `--emulate gpu|tpu` checks this script anywhere, slowly: it dispatches as that backend and
runs the kernel in a mode that needs no device (cuDNN's arguments under the XLA implementation,
splash in Pallas interpret mode), e.g. `--emulate tpu --batch 2 --length 256 --heads 2 --kv-heads 1
--head-dim 32 --steps 1`.
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models import fused_attention as fa
from dpo_jax.models import layers

TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}  # relative to the float32 dense path's max |value|


def layout_ids(layout, B, T, rng):
    """(segment_ids, positions, branch_ids) [B, T]: standard = one sequence per row then right
    padding; packed = sequences of random lengths one after another, positions restarting."""
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b in range(B):
        s, n = 0, 0
        while s < T - 8 and (n == 0 or layout == "packed"):
            length = int(rng.integers(T // 8, T // 2)) if layout == "packed" else int(rng.integers(T // 2, T))
            length = min(length, T - s - int(rng.integers(0, 8)))
            n += 1
            seg[b, s:s + length], pos[b, s:s + length] = n, np.arange(length)
            s += length
    return tuple(jnp.asarray(x) for x in (seg, pos, np.zeros_like(seg)))


def loss_and_grads(attend):
    f = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v).astype(jnp.float32)))  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


def outputs(attend, q, k, v):
    return (jax.jit(attend)(q, k, v), *loss_and_grads(attend)(q, k, v)[1])


def seconds_per_step(attend, q, k, v, steps):
    fn = loss_and_grads(attend)
    jax.block_until_ready(fn(q, k, v))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(q, k, v))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def rel_err(xs, refs):
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - r)) / (float(jnp.max(jnp.abs(r))) + 1e-30))
               for x, r in zip(xs, refs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=0, help="sliding window; 0 = none")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--emulate", choices=("gpu", "tpu"), default=None)
    a = ap.parse_args()
    backend, window = a.emulate or jax.default_backend(), (a.window or None)
    emulation = {None: {}, "gpu": {"implementation": "xla"}, "tpu": {"interpret": True}}[a.emulate]
    out = {"backend": backend, "device": str(jax.devices()[0].device_kind), "shape": vars(a), "cases": []}
    ok = True
    rng = np.random.default_rng(0)
    B, T, H, K, E = a.batch, a.length, a.heads, a.kv_heads, a.head_dim
    scale = E ** -0.5
    r = np.random.default_rng(1)
    q32, k32, v32 = (jnp.asarray(r.normal(size=(B, T, n, E)), jnp.float32) for n in (H, K, K))
    for layout in ("standard", "packed"):
        kernels = {dt: fa.select(backend, layout=layout, sliding_window=window, decoding=False, dtype=dt,
                                 head_dim=E) for dt in TOLERANCE}
        out["cases"] += [{"layout": layout, "dtype": dt, "kernel": None} for dt in TOLERANCE if not kernels[dt]]
        if not any(kernels.values()):
            continue
        ids = layout_ids(layout, B, T, rng)
        mask = layers.attention_mask(*ids, *ids, sliding_window=window)
        dense = lambda q, k, v: layers.masked_attention(q, k, v, mask, scale)  # noqa: E731
        with jax.default_matmul_precision("highest"):
            refs = outputs(dense, q32, k32, v32)
        for dtype, kernel in kernels.items():
            if kernel is None:
                continue
            case = {"layout": layout, "dtype": dtype, "kernel": kernel}
            out["cases"].append(case)
            fused = lambda q, k, v: fa.fused_attention(kernel, q, k, v, ids, ids, scale,  # noqa: E731
                                                       sliding_window=window, **emulation)
            q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
            case["fused_err"] = rel_err(outputs(fused, q, k, v), refs)
            case["dense_err"] = rel_err(outputs(dense, q, k, v), refs)
            case["ok"] = case["fused_err"] <= max(TOLERANCE[dtype], 2 * case["dense_err"])
            case["fused_s"] = seconds_per_step(fused, q, k, v, a.steps)
            case["dense_s"] = seconds_per_step(dense, q, k, v, a.steps)
            ok &= case["ok"]
    if not any(c["kernel"] for c in out["cases"]):
        out["note"] = f"no fused kernel applies on backend {backend!r}"
    print(json.dumps(out))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
