"""The benchmark's smoke test (one JSON line on a toy shape), and step-level equalities it relies on:
the loss of the real train step is the same in every batch layout, and with naive logits."""

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dpo_jax import bench, losses, sharding
from dpo_jax.train import loop, step
from dpo_jax.train import state as train_state
from dpo_jax.data import layouts
from dpo_jax.models.transformer import Decoder, ModelConfig

TOY = ["--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--vocab", "64",
       "--prompt-len", "6", "--completion-len", "5", "--pairs", "2", "--steps", "2", "--repeats", "1",
       "--warmup", "1", "--batches", "2"]


def test_bench_prints_one_json_line_with_the_documented_keys(capsys):
    assert bench.main(TOY) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    out = json.loads(lines[0])
    missing = [k for k in bench.KEYS if k not in out]
    assert not missing, f"missing keys {missing}"
    # 2 pairs of prompt 6 + completions 5 + 5, the prompt counted twice: 2 * (12 + 10) tokens per step.
    assert out["tokens_per_step"] == 44.0 and out["real_tokens_per_step"] == 44.0
    assert out["batch_shape"] == [4, 16]  # 2P rows, padded to a multiple of 16
    for key in ("step_time_s", "tokens_per_s", "model_flops_per_s", "peak_flops_per_s", "mfu", "peak_memory_bytes"):
        assert np.isfinite(out[key]) and out[key] > 0, (key, out[key])
    np.testing.assert_allclose(out["tokens_per_s"], 44.0 / out["step_time_s"], rtol=1e-9)
    np.testing.assert_allclose(out["mfu"] * out["peak_flops_per_s"], out["model_flops_per_s"], rtol=0.5)


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--layout", "ragged"])
    with pytest.raises(ValueError, match="uniform:LO:HI"):
        bench.parse_lengths("normal:3:9")


def test_synthetic_lengths_are_uniform_per_sequence():
    cfg = bench.BenchConfig(lengths="uniform:16:64", vocab=64)
    ex = bench.synthetic_examples(cfg, 400, np.random.default_rng(0))
    seq = np.array([len(e["prompt_ids"]) + len(e[k]) for e in ex for k in ("chosen_ids", "rejected_ids")])
    assert seq.min() >= 16 and seq.max() <= 64 and abs(seq.mean() - 40) < 2
    assert all(e["chosen_ids"][-1] == bench.EOS and e["rejected_ids"][-1] == bench.EOS for e in ex)


# ---------------------------------------------------------------------------------------------
# Step-level equalities.

CFG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
PAIRS = 4
HP = losses.Objective(("sigmoid",)).params(beta=0.5)


@pytest.fixture(scope="module")
def setup():
    """One policy/reference pair (different weights) and the pairs every layout lays out."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    tx = optax.adamw(1e-2)
    state, state_sh, graphdef = train_state.init_state(Decoder(CFG, rngs=nnx.Rngs(0)), Decoder(CFG, rngs=nnx.Rngs(1)), tx,
                                                 mesh, seed=0)
    examples = bench.synthetic_examples(bench.BenchConfig(vocab=CFG.vocab_size, lengths="uniform:5:14"), PAIRS,
                                        np.random.default_rng(3))

    steps = {}  # one jitted step per setting: a batch shape compiles once

    def run(spec, naive_logits=False):
        batch = spec(examples)
        key = (naive_logits, tuple(sorted(batch)))
        if key not in steps:
            cfg = step.StepConfig(graphdef=graphdef, objective=losses.Objective(("sigmoid",)), tx=tx,
                                  lr=lambda s: 1e-2, chunk_size=16, vocab_chunk_size=16, naive_logits=naive_logits)
            steps[key] = loop.compiled_steps(cfg, state_sh, mesh, key[1])[0]
        train_fn = steps[key]
        fresh = jax.tree.map(lambda x: x.copy(), state)  # the step donates its state
        _, m = train_fn(fresh, sharding.global_batch(batch, mesh), HP)
        return {k: float(v) for k, v in m.items()}

    return run


STANDARD = layouts.LayoutSpec(layout="standard", num_pairs=PAIRS, buckets=(32,))  # [8, 32]


def test_train_step_loss_is_the_same_in_every_layout(setup):
    specs = {  # the packed batches take the standard batch's shape: one compile for three layouts
        "prefix": layouts.LayoutSpec(layout="prefix", num_pairs=PAIRS, buckets=(32,)),
        "packed": layouts.LayoutSpec(layout="packed", num_pairs=PAIRS, num_rows=8, row_length=32),
        "packed+prefix": layouts.LayoutSpec(layout="packed", num_pairs=PAIRS, num_rows=8, row_length=32,
                                            share_prefix=True),
        "standard+slots": dataclasses.replace(STANDARD, logit_slots=True),
        "prefix+slots": layouts.LayoutSpec(layout="prefix", num_pairs=PAIRS, buckets=(32,), logit_slots=True),
        "packed+slots": layouts.LayoutSpec(layout="packed", num_pairs=PAIRS, num_rows=8, row_length=32,
                                           logit_slots=True),
    }
    ref = setup(STANDARD)
    assert abs(ref["loss"] - np.log(2.0)) > 1e-3, "policy and reference differ: the loss is not ln 2"
    for name, spec in specs.items():
        m = setup(spec)
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"):
            np.testing.assert_allclose(m[key], ref[key], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{key}: {name} layout vs standard")


def test_naive_logits_step_equals_the_chunked_step(setup):
    chunked, naive = setup(STANDARD), setup(STANDARD, naive_logits=True)
    for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        np.testing.assert_allclose(naive[key], chunked[key], rtol=1e-5, err_msg=key)


def test_bench_config_fields_are_cli_flags():
    cfg, _ = bench.parse_args(["--layout", "packed", "--no-scan-layers", "--capacity", "-1"])
    assert cfg == dataclasses.replace(bench.BenchConfig(), layout="packed", scan_layers=False, capacity=-1)

