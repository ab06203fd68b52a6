"""The peer comparison (benchmarks/trl_compare.py --compare ...): its flags, the Tunix section on a toy
shape, and that Tunix's DPO loss on the benchmark's model and pairs is ours (like for like). The
Tunix tests need google-tunix (the `bench` extra) and are skipped without it."""

import contextlib
import importlib.util
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from dpo_jax import bench
from dpo_jax.models import hf, transformer

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
TOY = ["--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2", "--num-heads", "2",
       "--num-kv-heads", "1", "--vocab-size", "64", "--pairs", "3", "--steps", "2", "--repeats", "2",
       "--warmup", "1", "--batches", "2"]
NO_TUNIX = "google-tunix is not installed (pip install -e '.[bench]')"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peer_compare():
    return _load("trl_compare")


def _cfg(*flags):
    return bench.parse_args([*TOY, *flags])[0]


@pytest.mark.parametrize("flags, message", [
    (["--compare", "trl,foo"], "--compare takes"),
    (["--compare", ","], "--compare takes"),
    (["--compare", "tunix", "--family", "qwen3"], "--family llama"),
    (["--compare", "tunix", "--devices", "2"], "--devices 1"),
    (["--compare", "trl,tunix", "--dtype", "bfloat16"], "float32"),
])
def test_compare_rejects_what_a_peer_cannot_run(peer_compare, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        peer_compare.main([*TOY, *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_compare_flags_in_help(peer_compare, capsys):
    with pytest.raises(SystemExit):
        peer_compare.main(["--help"])
    out = capsys.readouterr().out
    assert all(f in out for f in ("--compare", "--trl-steps", "--tunix-steps")), out


def test_tunix_section_on_a_toy_shape(peer_compare):
    pytest.importorskip("tunix", reason=NO_TUNIX)
    cfg = _cfg("--prompt-len", "6", "--completion-len", "5")
    out = peer_compare.run(cfg, compare=("tunix",))
    tunix = out["tunix"]
    assert "trl" not in out and "speedup_vs_trl" not in out
    assert tunix["tunix"] and tunix["jax"] == jax.__version__
    assert len(tunix["step_time_rounds_s"]) == cfg.repeats and tunix["step_time_s"] > 0
    assert tunix["steps"] == tunix["warmup_steps"] + cfg.steps * cfg.repeats
    assert tunix["tokens_per_step"] == cfg.pairs * (2 * 6 + 5 + 5) == out["tokens_per_step"]
    assert tunix["tokens_per_s"] > 0 and 0 < tunix["mfu"] < 1
    assert out["speedup_vs_tunix"] == pytest.approx(out["tokens_per_s"] / tunix["tokens_per_s"])
    assert np.isfinite(tunix["loss"]) and abs(tunix["loss"] - np.log(2)) < 1e-2  # lr 1e-6: near ln 2
    assert tunix["model"]["embed_dim"] == 32 and tunix["model"]["num_layers"] == 2
    assert tunix["model"]["rope_theta"] == pytest.approx(10000.0)
    assert {"logits", "reference", "attention", "layout"} <= set(tunix["differs"])
    assert len(out["step_time_rounds_s"]) == cfg.repeats  # our rounds ran between Tunix's


def test_trl_and_tunix_in_one_run(peer_compare):
    """Both peers train the one exported checkpoint; our rounds alternate with each peer's."""
    pytest.importorskip("tunix", reason=NO_TUNIX)
    pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[bench]')")
    cfg = _cfg("--prompt-len", "6", "--completion-len", "5", "--repeats", "1")
    out = peer_compare.run(cfg, compare=("trl", "tunix"))
    for peer in ("trl", "tunix"):
        assert out[peer]["tokens_per_step"] == out["tokens_per_step"] and out[peer]["tokens_per_s"] > 0
        assert out[f"speedup_vs_{peer}"] == pytest.approx(out["tokens_per_s"] / out[peer]["tokens_per_s"])
    assert len(out["step_time_rounds_s"]) == 2 * cfg.repeats


def _sharpened(model_cfg, seed, factor=15.0):
    """A random decoder with its weight matrices scaled up from the init's std 0.02 to 0.3: attention
    and logits far from uniform, so RoPE and every weight show in the log-probs."""
    model = transformer.Decoder(model_cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a * factor if float(np.std(a)) > 0 else a, state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def first_batch(tmp_path_factory):
    """Ours and Tunix's DPO metrics on the first batch of a toy benchmark with pairs of varied lengths:
    policy and frozen reference = the bench's architecture from two seeds, sharpened (so the loss is
    not ln 2 and attention matters), in our train step and exported to Hugging Face checkpoints for
    Tunix."""
    pytest.importorskip("tunix", reason=NO_TUNIX)
    tunix_compare = _load("tunix_compare")
    cfg = _cfg("--lengths", "uniform:6:14", "--pairs", "4")
    timer = bench.StepTimer(cfg)
    tmp = tmp_path_factory.mktemp("tunix_first_batch")
    policy, reference = (_sharpened(timer.model_cfg, cfg.seed + i) for i in (0, 1))
    hf.export_model(policy, tmp / "policy")
    hf.export_model(reference, tmp / "reference")

    def params(model, like):
        return jax.device_put(nnx.to_pure_dict(nnx.split(model)[1]), jax.tree.map(lambda a: a.sharding, like))

    state = timer.state.replace(params=params(policy, timer.state.params),
                                ref_params=params(reference, timer.state.ref_params))
    _, ours = timer.train_fn(state, timer.batches[0], timer.hp)
    ours = {k: float(v) for k, v in ours.items()}
    beta = float(timer.hp["beta"])

    def tunix(matched_rope=True):
        jax.clear_caches()  # RoPE's base is read when a function is traced: no trace of the other base is reused
        model_cfg = tunix_compare.model_config(str(tmp / "policy"))
        with tunix_compare.rope_theta(model_cfg.rope_theta) if matched_rope else contextlib.nullcontext():
            trainer = tunix_compare.make_trainer(str(tmp / "policy"), timer.step_cfg.tx, beta,
                                                 ref_dir=str(tmp / "reference"))
            return tunix_compare.loss_and_metrics(trainer, timer.groups[0], beta)

    return tunix_compare, ours, tunix


def test_tunix_loss_on_the_first_batch_is_ours(first_batch):
    _, ours, tunix = first_batch
    theirs = tunix()
    assert abs(ours["rewards/chosen"]) > 1e-2 and abs(ours["loss"] - np.log(2)) > 1e-2, (
        "the reference must differ from the policy for the loss to say anything", ours)
    pairs = [("loss", "loss"), ("logps/chosen", "log_probs/chosen"), ("logps/rejected", "log_probs/rejected"),
             ("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
             ("rewards/margins", "rewards/margin"), ("rewards/accuracies", "rewards/accuracy")]
    for mine, peer in pairs:
        assert theirs[peer] == pytest.approx(ours[mine], rel=1e-5, abs=1e-4), (mine, ours[mine], theirs[peer])


def test_tunix_rope_as_shipped_is_another_model(first_batch):
    """Tunix 0.1.7's Llama rotates with base 1e6 whatever its config says; the comparison passes the
    checkpoint's base through (`tunix_compare.rope_theta`). Without it the log-probs differ."""
    tunix_compare, ours, tunix = first_batch
    if not tunix_compare.rope_ignored():
        pytest.skip("this Tunix passes ModelConfig.rope_theta to its RoPE itself")
    theirs = tunix(matched_rope=False)
    assert abs(theirs["log_probs/chosen"] - ours["logps/chosen"]) > 1e-2, (theirs, ours)


def test_shapes_parse_into_one_config_each(peer_compare):
    base = _cfg()
    shapes = peer_compare.parse_shapes("64+64, 256+64:prefix,1024+512:steps=2:repeats=3", base)
    assert [label for label, _ in shapes] == ["64+64", "256+64:prefix", "1024+512:steps=2:repeats=3"]
    got = [(c.prompt_len, c.completion_len, c.layout, c.steps, c.repeats) for _, c in shapes]
    assert got == [(64, 64, base.layout, 2, 2), (256, 64, "prefix", 2, 2), (1024, 512, base.layout, 2, 3)]
    assert peer_compare.parse_shapes("", base) == [("", base)]
    for bad, message in (("64", "P+C"), ("64+x", "P+C"), ("64+64:nope=1", "'nope' is not a benchmark setting"),
                         ("64+64:steps=two", "steps=two")):
        with pytest.raises(ValueError, match=re.escape(message)):
            peer_compare.parse_shapes(bad, base)


def test_shapes_print_one_json_line_each(peer_compare, capsys, monkeypatch):
    import json

    seen = []
    monkeypatch.setattr(peer_compare, "check", lambda cfg, compare: None)
    monkeypatch.setattr(peer_compare, "run", lambda cfg, *a: seen.append(cfg) or {"tokens_per_s": float(cfg.prompt_len)})
    assert peer_compare.main([*TOY, "--shapes", "16+8,32+8:prefix"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines == [{"shape": "16+8", "tokens_per_s": 16.0}, {"shape": "32+8:prefix", "tokens_per_s": 32.0}]
    assert [c.layout for c in seen] == [_cfg().layout, "prefix"]
    with pytest.raises(SystemExit) as e:
        peer_compare.main([*TOY, "--shapes", "16"])
    assert e.value.code == 2 and "--shapes item '16'" in capsys.readouterr().err
