"""The benchmark's smoke test (one JSON line on a toy shape); its model and batch layout are those
of the equivalent training config; and step-level equalities it relies on: the loss of the real
train step is the same in every batch layout, and with naive logits."""

import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from dpo_jax import bench, build, losses, sharding
from dpo_jax.train import loop, metrics, step
from dpo_jax.train import state as train_state
from dpo_jax.data import layouts
from dpo_jax.models.transformer import Decoder, ModelConfig

TOY = ["--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "1", "--num-heads", "2",
       "--num-kv-heads", "1", "--vocab-size", "64", "--prompt-len", "6", "--completion-len", "5", "--pairs", "2",
       "--steps", "2", "--repeats", "1", "--warmup", "1", "--batches", "2"]


def test_bench_prints_one_json_line_with_the_documented_keys(capsys):
    assert bench.main(TOY) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    out = json.loads(lines[0])
    missing = [k for k in bench.KEYS if k not in out]
    assert not missing, f"missing keys {missing}"
    # 2 pairs of prompt 6 + completions 5 + 5, the prompt counted twice: 2 * (12 + 10) tokens per step.
    assert out["tokens_per_step"] == 44.0 and out["real_tokens_per_step"] == 44.0
    assert out["batch_shape"] == [4, 16]  # 2P rows, padded to data.max_length = 11 rounded up to 16
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
    cfg = bench.BenchConfig(lengths="uniform:16:64", vocab_size=64)
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
    examples = bench.synthetic_examples(bench.BenchConfig(vocab_size=CFG.vocab_size, lengths="uniform:5:14"), PAIRS,
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


def test_bench_trains_the_loss_it_is_given(capsys):
    """--loss ipo: at the start the policy is the reference, so every margin is 0 and IPO's loss is
    (0 - 1 / (2 beta))^2 = 25 at beta 0.1 (sigmoid's would be log 2); the trainer's key maps to the flag."""
    assert bench.main(TOY + ["--config.loss.name=ipo"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["loss"] == "ipo"
    np.testing.assert_allclose(out["loss"], 25.0, rtol=1e-3)


def test_bench_keeps_the_running_statistics_of_a_loss_that_has_them():
    cfg, _ = bench.parse_args(TOY + ["--loss", "beta_dpo"])
    timer = bench.StepTimer(cfg)
    before = jax.tree.map(np.asarray, timer.state.loss_state)
    timer.run_steps(2)
    after = jax.tree.map(np.asarray, timer.state.loss_state)
    assert jax.tree.structure(after) == jax.tree.structure(before) and jax.tree.leaves(after)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after))
    assert int(timer.state.step) == 2 and float(timer.metrics["nonfinite"]) == 0.0


@pytest.mark.parametrize("loss, ref_mode, message", [
    ("plackett_luce", "frozen", "loss of ranked lists; the benchmark builds pairs"),
    ("sigmoid+lipo_lambda", "frozen", "'lipo_lambda' is a loss of ranked lists"),
    ("dpo_typo", "frozen", "unknown loss 'dpo_typo'"),
    ("ipo", "none", "reference.mode='none' is only for reference-free losses"),
])
def test_bench_rejects_a_loss_it_cannot_train(loss, ref_mode, message):
    with pytest.raises(ValueError, match=message):
        bench.BenchConfig(loss=loss, ref_mode=ref_mode)


def test_bench_config_fields_are_cli_flags():
    cfg, _ = bench.parse_args(["--layout", "packed", "--scan-min-layers", "0", "--no-logit-slots",
                               "--vocab-size", "128"])
    assert cfg == dataclasses.replace(bench.BenchConfig(), layout="packed", scan_min_layers=0, logit_slots=False,
                                      vocab_size=128)


# ---------------------------------------------------------------------------------------------
# The bench's model and batches are the training config's.

def test_bench_fields_are_training_config_keys():
    config = base.get_config()
    for field, key in bench.TRAINING_KEYS.items():
        section, _, name = key.rpartition(".")
        assert name == field or field in ("pairs", "ref_mode", "loss"), (field, key)
        assert name in (config[section] if section else config), f"{key} is not a key of configs/base.py"
        assert hasattr(bench.BenchConfig(), field)


def training_config(cfg: bench.BenchConfig, max_length: int):
    """The training config of `cfg`, written out key by key."""
    config = base.get_config()
    config.model.arch.update(family=cfg.family, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                             intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                             num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                             tie_embeddings=cfg.tie_embeddings)
    config.model.update(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat,
                        scan_min_layers=cfg.scan_min_layers)
    config.data.update(layout=cfg.layout, logit_slots=cfg.logit_slots, min_bucket=cfg.min_bucket,
                       pack_length=cfg.pack_length, prefix_min_saving=cfg.prefix_min_saving, max_length=max_length,
                       batch_size=cfg.pairs)
    return config


@pytest.mark.parametrize("flags, max_length, shape", [
    ([], 128, dict(buckets=(16, 32, 64, 128))),
    (["--layout", "packed", "--lengths", "uniform:16:250", "--pairs", "4"], 256, dict(num_rows=4, row_length=256)),
    (["--layout", "prefix", "--prompt-len", "9", "--completion-len", "4", "--family", "qwen3", "--tie-embeddings",
      "--scan-min-layers", "0", "--dtype", "bfloat16", "--no-logit-slots"], 16, dict(buckets=(16, 32))),
])
def test_bench_model_and_layout_are_the_training_configs(flags, max_length, shape):
    cfg, _ = bench.parse_args(flags)
    expected = training_config(cfg, max_length)
    model = dataclasses.replace(build.model_config(expected, cfg.vocab_size), bos_token_id=bench.BOS,
                                eos_token_id=bench.EOS, pad_token_id=bench.PAD)
    assert bench.model_config(cfg.training_config()) == model
    spec = bench.layout_spec(cfg.training_config())
    assert spec == build.data_config(expected, path="", pairs=cfg.pairs).layout_spec()
    assert spec.num_pairs == cfg.pairs and spec.layout == cfg.layout and spec.logit_slots == cfg.logit_slots
    for key, value in shape.items():
        assert getattr(spec, key) == value, (key, getattr(spec, key))
    if cfg.family == "qwen3":  # the family's traits and the flags reach the model
        assert model.qk_norm and model.tie_embeddings and model.scanned and model.dtype == "bfloat16"


def _benchmark_script(name: str):
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matmul_shapes_are_the_model_flops_of_projections_and_unembedding(family, capsys):
    """The products' FLOPs per step are metrics.step_flops' (6 N per policy token + 2 N per
    reference token, the unembedding at the logit slots) without the attention pairs."""
    matmul_shapes = _benchmark_script("matmul_shapes")
    cfg = bench.BenchConfig(family=family, prompt_len=24, completion_len=8, pairs=3, hidden_size=32,
                            intermediate_size=48, num_heads=4, num_kv_heads=2, vocab_size=40, num_layers=2)
    model = build.model_config(cfg.training_config(), cfg.vocab_size)
    n, unembed = metrics.matmul_params(model), model.hidden_size * model.vocab_size
    tokens, logit_positions = 6 * 32, 6 * 8
    expected = 8 * ((n - unembed) * tokens + unembed * logit_positions)
    assert sum(2 * m * k * n_ * calls for _, m, k, n_, calls in matmul_shapes.products(cfg)) == expected
    matmul_shapes.main(["--repeats", "1", "--family", family, "--hidden-size", "32", "--intermediate-size", "48",
                        "--vocab-size", "40", "--prompt-len", "24", "--completion-len", "8", "--pairs", "3"])
    line = json.loads(capsys.readouterr().out)
    assert len(line["products"]) == len(matmul_shapes.products(cfg)) and line["matmul_bound_mfu"] > 0
    assert len(line["attention_products"]) == 3 and line["bound_mfu"] > 0  # T = 32: dense, one tile


def test_matmul_shapes_lists_each_attention_tile_and_counts_the_causal_pairs():
    """Tiles of 8 rows over T = 32 keys: tile i multiplies 8 query rows by the 8 (i + 1) keys up to
    it, 4 products of 4 L H E FLOPs per (query, key) in the forward (policy and reference) and 8 in
    the backward; the model FLOPs count the T (T + 1) / 2 causal pairs per row (metrics' rule)."""
    matmul_shapes = _benchmark_script("matmul_shapes")
    cfg = bench.BenchConfig(prompt_len=24, completion_len=8, pairs=3, hidden_size=32, intermediate_size=48,
                            num_heads=4, num_kv_heads=2, vocab_size=40, num_layers=2, attention="tiled",
                            attention_block=8)
    listed, model_flops = matmul_shapes.attention_products(cfg)
    assert [name for name, *_ in listed[:3]] == ["scores:8x8", "values:8x8", "kv_grad:8x8"] and len(listed) == 12
    L, H, E, rows, T = 2, 4, 8, 6, 32
    tile_pairs = 8 * (8 + 16 + 24 + 32)
    assert sum(2 * b * m * k * n * calls for _, b, m, k, n, calls in listed) == 16 * L * H * E * rows * tile_pairs
    ids = (np.ones((rows, T)), np.broadcast_to(np.arange(T), (rows, T)), np.zeros((rows, T)))
    assert model_flops == 16 * L * H * E * metrics.attention_pairs(*ids)


def test_trl_compare_takes_the_bench_flags(capsys):
    trl_compare = _benchmark_script("trl_compare")
    with pytest.raises(SystemExit) as e:
        trl_compare.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f in out for f in ("--trl-steps", "--hidden-size", "--vocab-size")), out
    with pytest.raises(SystemExit) as e:  # TRL runs float32 with a frozen reference
        trl_compare.main(["--ref-mode", "none"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # and DPO's sigmoid loss
        trl_compare.main(["--loss", "ipo"])
    assert e.value.code == 2
    assert "the peers run DPO's sigmoid loss; got --loss 'ipo'" in capsys.readouterr().err


def test_step_variants_ratio_is_per_round_mfu_over_the_first_variants():
    """A round in which both variants slowed alike gives the same ratio as the others."""
    step_variants = _benchmark_script("step_variants")
    ratios = step_variants.round_ratios([0.2, 0.4, 0.2], 50.0, [0.5, 1.0, 0.4], 100.0)
    assert ratios == pytest.approx([0.8, 0.8, 1.0])
