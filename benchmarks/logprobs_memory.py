r"""Compile-time memory of value-and-grad of sum(token_logps): naive vs chunked.

    python benchmarks/logprobs_memory.py --vocab 131072 --tokens 8192 --dim 2048 --chunk 1024 \
        --vocab-chunk 8192 --dtype bfloat16

Nothing is executed: the inputs are `jax.ShapeDtypeStruct`s and each path is only compiled
(`jax.jit(f).lower(...).compile().memory_analysis()`) for the default backend (add
`JAX_PLATFORMS=cpu` to force the CPU compiler). f(hidden_NxD, unembed_DxV, targets_N) returns
(sum_n logp_n, d/dhidden, d/dunembed). One JSON line per path, then one with the ratio.
"peak" = temp + argument + output - alias bytes, as XLA's memory analysis reports them (the
buffers live at once under XLA's static buffer assignment; aliased outputs counted once).
The bar: chunked peak <= 1/4 of naive peak at V = 128k, N = B*T = 8k, D = 2048.
On CPU, XLA upcasts bfloat16 dot operands to float32 (whole-array converts hoisted out of the
loops), which adds about two float32 copies of the bf16 inputs to the chunked temp figure; GPU and
TPU compilers keep bfloat16 matmuls native.
"""

import argparse
import json

import jax
import jax.numpy as jnp

from dpo_jax.logprobs import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_VOCAB_CHUNK_SIZE,
    naive_token_logps,
    token_logps,
)

GIB = 1024.0**3


def analyse(fn, args):
    """Compile value-and-grad of sum(fn(...)) for abstract args; return the memory figures."""

    def loss_and_grads(hidden_NxD, unembed_DxV, targets_N):
        return jax.value_and_grad(lambda h, w: jnp.sum(fn(h, w, targets_N)), argnums=(0, 1))(
            hidden_NxD, unembed_DxV
        )

    mem = jax.jit(loss_and_grads).lower(*args).compile().memory_analysis()
    temp, arg = mem.temp_size_in_bytes, mem.argument_size_in_bytes
    out, alias = mem.output_size_in_bytes, mem.alias_size_in_bytes
    return {
        "temp_bytes": temp,
        "argument_bytes": arg,
        "output_bytes": out,
        "alias_bytes": alias,
        "peak_bytes": temp + arg + out - alias,
        "peak_gib": round((temp + arg + out - alias) / GIB, 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=131072, help="V")
    parser.add_argument("--tokens", type=int, default=8192, help="N = B*T positions")
    parser.add_argument("--dim", type=int, default=2048, help="D")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_SIZE, help="positions per chunk")
    parser.add_argument(
        "--vocab-chunk",
        type=int,
        default=DEFAULT_VOCAB_CHUNK_SIZE,
        help="vocabulary columns per chunk",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = parser.parse_args()

    dtype = jnp.dtype(a.dtype)
    args = (
        jax.ShapeDtypeStruct((a.tokens, a.dim), dtype),
        jax.ShapeDtypeStruct((a.dim, a.vocab), dtype),
        jax.ShapeDtypeStruct((a.tokens,), jnp.int32),
    )
    common = {
        "vocab": a.vocab,
        "tokens": a.tokens,
        "dim": a.dim,
        "dtype": a.dtype,
        "backend": jax.default_backend(),
    }
    naive = analyse(naive_token_logps, args)
    print(json.dumps({"path": "naive", **common, **naive}), flush=True)
    chunks = {"chunk": a.chunk, "vocab_chunk": a.vocab_chunk}
    chunked = analyse(
        lambda h, w, t: token_logps(h, w, t, chunk_size=a.chunk, vocab_chunk_size=a.vocab_chunk),
        args,
    )
    print(json.dumps({"path": "chunked", **chunks, **common, **chunked}), flush=True)
    ratio = chunked["peak_bytes"] / naive["peak_bytes"]
    print(
        json.dumps(
            {
                "path": "ratio",
                **chunks,
                **common,
                "chunked_over_naive_peak": round(ratio, 4),
                "meets_quarter_bar": ratio <= 0.25,
            }
        )
    )


if __name__ == "__main__":
    main()
