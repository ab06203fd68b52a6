"""Tests of the FLOP model (hand counts, brute-force attention pairs), Mean and the metric writers."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from dpo_jax.train import metrics
from dpo_jax.data import layouts
from dpo_jax.models.layers import make_attention_mask
from dpo_jax.models.transformer import Decoder, ModelConfig

LLAMA = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=6)
GPT2 = ModelConfig(family="gpt2", vocab_size=40, hidden_size=16, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=4, norm="layer", activation="gelu_tanh", gated_mlp=False, position="learned",
                   qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True, max_position_embeddings=32)
QWEN3 = ModelConfig(family="qwen3", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                    num_kv_heads=1, qk_norm=True, qkv_bias=True)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2, QWEN3], ids=["llama", "gpt2", "qwen3"])
def test_matmul_params_is_a_hand_count_of_the_decoder(cfg):
    """All parameters minus embedding lookups, norms and biases, plus the (possibly tied) unembedding."""
    params = nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    flat = {"/".join(map(str, k)): np.shape(v) for k, v in _flatten(params)}
    total = sum(int(np.prod(s)) for s in flat.values())
    lookups = [k for k in flat if k in ("embed", "pos_embed")]
    small = [k for k in flat if k.rsplit("/", 1)[-1].startswith("b") or "norm" in k]
    assert set(lookups).isdisjoint(small)
    n = total - sum(int(np.prod(flat[k])) for k in lookups + small)
    n += cfg.hidden_size * cfg.vocab_size if cfg.tie_embeddings else 0  # lm_head (counted above when untied)
    assert metrics.matmul_params(cfg) == n
    # and by name: the weight matrices, stacked over layers
    weights = ("wq", "wk", "wv", "wo", "w_up", "w_down") + (("w_gate",) if cfg.gated_mlp else ())
    by_name = sum(int(np.prod(flat[f"layers/{w}"])) for w in weights) + cfg.hidden_size * cfg.vocab_size
    assert metrics.matmul_params(cfg) == by_name


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _examples(rng, n, vocab=50):
    ids = lambda lo, hi: rng.integers(4, vocab, rng.integers(lo, hi)).astype(np.int32)  # noqa: E731
    return [{"prompt_ids": ids(1, 8), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7)} for _ in range(n)]


SPECS = {
    "standard": layouts.LayoutSpec(layout="standard", num_pairs=6, buckets=(16, 32)),
    "prefix": layouts.LayoutSpec(layout="prefix", num_pairs=6, buckets=(32,)),
    "packed": layouts.LayoutSpec(layout="packed", num_pairs=6, num_rows=4, row_length=32),
    "packed_prefix": layouts.LayoutSpec(layout="packed", num_pairs=6, num_rows=3, row_length=48, share_prefix=True),
}


@pytest.mark.parametrize("layout", sorted(SPECS))
@pytest.mark.parametrize("seed", [0, 1])
def test_attention_pairs_matches_the_model_mask(layout, seed):
    batch = SPECS[layout](_examples(np.random.default_rng(seed), 5 if layout.startswith("packed") else 6))
    seg, pos, br = batch["segment_ids_BxT"], batch["positions_BxT"], batch["branch_ids_BxT"]
    brute = int(np.asarray(make_attention_mask(seg, pos, br)).sum())
    assert metrics.attention_pairs(seg, pos, br) == brute
    if "prefix" in layout:  # chosen and rejected branches hide each other
        assert brute < int(np.asarray(make_attention_mask(seg, pos)).sum())


def test_attention_pairs_by_hand():
    # one row: a causal sequence of 3, then padding -> 1 + 2 + 3 pairs
    seg, pos, br = np.array([[1, 1, 1, 0]]), np.array([[0, 1, 2, 0]]), np.zeros((1, 4), int)
    assert metrics.attention_pairs(seg, pos, br) == 6
    # prompt of 2 shared by two 1-token branches: 1 + 2 + 3 + 3
    seg, pos, br = np.array([[1, 1, 1, 1]]), np.array([[0, 1, 2, 2]]), np.array([[0, 0, 1, 2]])
    assert metrics.attention_pairs(seg, pos, br) == 9


def test_step_flops_is_6n_trained_and_2n_reference():
    cfg = LLAMA
    batch = SPECS["standard"](_examples(np.random.default_rng(3), 6))
    tokens = int((batch["segment_ids_BxT"] > 0).sum())
    pairs = metrics.attention_pairs(batch["segment_ids_BxT"], batch["positions_BxT"], batch["branch_ids_BxT"])
    n, lhe = metrics.matmul_params(cfg), cfg.num_layers * cfg.num_heads * cfg.head_dim
    train = metrics.step_flops(cfg, batch, reference_forward=False)
    both = metrics.step_flops(cfg, batch, reference_forward=True)
    assert train == pytest.approx(6 * n * tokens + 12 * lhe * pairs, rel=1e-12)
    assert both - train == pytest.approx(2 * n * tokens + 4 * lhe * pairs, rel=1e-12)
    assert both == pytest.approx(train * 4 / 3, rel=1e-12)
    # padding adds nothing: the same pairs in a longer bucket
    longer = layouts.LayoutSpec(layout="standard", num_pairs=6, buckets=(64,))(
        _examples(np.random.default_rng(3), 6))
    assert metrics.step_flops(cfg, longer, reference_forward=True) == both


def test_step_flops_count_the_unembedding_only_at_filled_logit_slots():
    cfg = LLAMA
    batch = SPECS["standard"](_examples(np.random.default_rng(3), 6))
    slotted = {**batch, layouts.SLOTS_KEY: layouts.logit_slots(batch["loss_mask_BxT"])}
    tokens = int((batch["segment_ids_BxT"] > 0).sum())
    completions = int((batch["loss_mask_BxT"] > 0).sum())
    assert 0 < completions < tokens
    unembed = cfg.hidden_size * cfg.vocab_size
    for ref, per_token in ((False, 6), (True, 8)):
        saved = metrics.step_flops(cfg, batch, reference_forward=ref) - metrics.step_flops(
            cfg, slotted, reference_forward=ref)
        assert saved == pytest.approx(per_token * unembed * (tokens - completions), rel=1e-12)


def test_mean_is_weighted():
    m = metrics.Mean()
    assert m.result() == {}
    m.add({"loss": 1.0, "acc": np.float32(0.0)}, weight=1.0)
    m.add({"loss": 4.0, "acc": np.float32(1.0)}, weight=3.0)
    out = m.result()
    assert out["loss"] == pytest.approx((1.0 + 12.0) / 4) and out["acc"] == pytest.approx(0.75)
    assert m.weight == 4.0


def test_writer_jsonl_truncate_and_tensorboard(tmp_path):
    w = metrics.Writer(str(tmp_path))
    for s in (1, 2, 3):
        w.write(s, {"loss": np.float32(0.5 * s), "count": np.int32(s), "name": "x", "ok": np.bool_(True)})
    w.write(3, {"loss": 0.1}, prefix="eval/")
    rows = metrics.read_jsonl(w.path)
    assert [r["step"] for r in rows] == [1, 2, 3, 3]
    assert rows[0] == {"step": 1, "loss": 0.5, "count": 1, "name": "x", "ok": 1}
    assert isinstance(rows[1]["loss"], float) and isinstance(rows[1]["count"], int)
    assert rows[3] == {"step": 3, "eval/loss": pytest.approx(0.1)}
    w.truncate_after(2)
    assert [r["step"] for r in metrics.read_jsonl(w.path)] == [1, 2]
    w.write(3, {"loss": 9.0})  # a resumed run appends after the kept rows
    assert [r["step"] for r in metrics.read_jsonl(w.path)] == [1, 2, 3]
    w.close()
    events = [f for f in os.listdir(tmp_path / "tensorboard") if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0


def test_truncate_after_drops_a_row_cut_short(tmp_path):
    """A process killed mid-write leaves a partial last line; resuming must not fail on it."""
    w = metrics.Writer(str(tmp_path), tensorboard=False)
    w.write(1, {"loss": 1.0})
    w.write(2, {"loss": 2.0})
    with open(w.path, "a") as f:
        f.write('\n{"step": 3, "lo')
    w.truncate_after(5)
    w.write(3, {"loss": 3.0})
    assert [r["step"] for r in metrics.read_jsonl(w.path)] == [1, 2, 3]
    with open(w.path) as f:
        assert all(json.loads(line) for line in f)


def test_disabled_writer_writes_nothing(tmp_path):
    w = metrics.Writer(str(tmp_path), enabled=False)
    w.write(1, {"loss": 1.0})
    w.truncate_after(0)
    w.close()
    assert os.listdir(tmp_path) == []


def test_summary_line_and_fetch():
    line = metrics.summary_line({"loss": 0.693147, "rewards/accuracies": 0.5, "other": 1.0})
    assert line == "loss=0.6931  rewards/accuracies=0.5"
    assert metrics.fetch(None) is None
    assert metrics.fetch({"a": np.float32(2.0)}) == {"a": 2.0}


def test_measured_matmul_flops_positive():
    flops = metrics.measured_matmul_flops(n=128, repeats=2)
    assert np.isfinite(flops) and flops > 1e6
    assert metrics.device_peak_flops(measure_cpu=False) == 0.0  # CPU: no known peak
