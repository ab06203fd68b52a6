"""Speedup of fused sweep members: K policies in one vmapped step vs K separate steps.

  python benchmarks/fused_speedup.py --members 4 --steps 20

Both sides run the real jitted train step (`train_state.init_state` + `loop.compiled_steps`) on the
same batches (the synthetic default's model: 2-layer Llama, hidden 64; 64 pairs of 4 + 9 + 9
tokens; frozen reference), after a warm-up; the fused side computes the reference log-probs once
for all members. Prints one JSON line: seconds per step of all K members, each way, and the ratio.
"""

import argparse
import dataclasses
import json
import time

import jax
import numpy as np
import optax
from flax import nnx

from dpo_jax import losses, sharding
from dpo_jax.train import loop, members, step
from dpo_jax.train import state as train_state
from dpo_jax.data import layouts
from dpo_jax.models.transformer import Decoder, ModelConfig


def batches(n, pairs, seed=0):
    rng = np.random.default_rng(seed)
    spec = layouts.LayoutSpec(num_pairs=pairs, buckets=(16,))
    ids = lambda k: rng.integers(4, 12, k).astype(np.int32)  # noqa: E731
    return [spec([{"prompt_ids": ids(4), "chosen_ids": np.append(ids(8), 2).astype(np.int32),
                    "rejected_ids": np.append(ids(8), 2).astype(np.int32)} for _ in range(pairs)]) for _ in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=64)
    a = ap.parse_args()
    cfg = ModelConfig(vocab_size=12, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    obj = losses.Objective(("sigmoid",))
    tx = optax.adamw(1e-3)
    data = [sharding.global_batch(b, mesh) for b in batches(a.steps + 2, a.pairs)]
    betas = [0.25 * 2**k for k in range(a.members)]

    def setup(members):
        state, sh, graphdef = train_state.init_state(Decoder(cfg, rngs=nnx.Rngs(0)), Decoder(cfg, rngs=nnx.Rngs(0)), tx, mesh, 0)
        scfg = step.StepConfig(graphdef=graphdef, objective=obj, tx=tx, lr=lambda s: 1e-3)
        if members:
            state, sh = members.stack_state(state, sh, members)
            scfg = dataclasses.replace(scfg, members=members)
        return state, loop.compiled_steps(scfg, sh, mesh, layouts.BATCH_KEYS)[0]

    def timed(fn):
        fn(data[:2])  # warm-up (compile)
        t = time.perf_counter()
        fn(data[2:])
        return (time.perf_counter() - t) / a.steps

    sep = [setup(0) for _ in betas]

    def separate(bs):
        for i, (st, f) in enumerate(sep):
            hp = obj.params(beta=betas[i])
            for b in bs:
                st, m = f(st, b, hp)
            sep[i] = (st, f)
        jax.block_until_ready(m)

    fst, ffn = setup(a.members)
    hp_k = members.stack_hparams([obj.params(beta=b) for b in betas])
    box = [fst]

    def fused_run(bs):
        st = box[0]
        for b in bs:
            st, m = ffn(st, b, hp_k)
        box[0] = st
        jax.block_until_ready(m)

    t_sep, t_fused = timed(separate), timed(fused_run)
    print(json.dumps({"members": a.members, "pairs": a.pairs, "separate_s_per_step": round(t_sep, 5),
                      "fused_s_per_step": round(t_fused, 5), "speedup": round(t_sep / t_fused, 3),
                      "device": jax.devices()[0].device_kind}))


if __name__ == "__main__":
    main()
