"""Tests of config -> run objects: model configs per family, synthetic files written once, data
configs per process, policy and reference models."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from dpo_jax import build
from dpo_jax.models import hf, hf_config
from dpo_jax.models.transformer import Decoder


def small_config(**synth):
    c = synthetic.get_config("runlocal=1")
    c.synthetic.update({"n_sft": 32, "n_pairs": 24, "n_eval": 8, **synth})
    return c


def test_model_config_llama():
    c = synthetic.get_config()
    c.model.update(dtype="bfloat16", remat="dots")
    cfg = build.model_config(c, vocab_size=12)
    a = c.model.arch
    assert (cfg.family, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == ("llama", 12, 64, 192)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)  # head_dim 0 -> D / H
    assert (cfg.norm, cfg.position, cfg.gated_mlp, cfg.tie_embeddings) == ("rms", "rope", True, False)
    assert (cfg.dtype, cfg.param_dtype, cfg.remat) == ("bfloat16", "float32", "dots")
    assert cfg.max_position_embeddings == a.max_position_embeddings and cfg.rope_theta == a.rope_theta
    c.model.arch.head_dim = 8
    assert build.model_config(c, 12).head_dim == 8


def test_model_config_gpt2():
    c = synthetic.get_config()
    c.model.arch.family = "gpt2"
    cfg = build.model_config(c, vocab_size=12)
    assert cfg.family == "gpt2" and cfg.norm == "layer" and cfg.norm_eps == 1e-5
    assert (cfg.activation, cfg.position, cfg.gated_mlp, cfg.tie_embeddings) == ("gelu_tanh", "learned", False, True)
    assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias
    assert cfg.num_kv_heads == cfg.num_heads == 4  # GPT-2 has no grouped-query attention
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    assert model.pos_embed[...].shape == (c.model.arch.max_position_embeddings, 64)


@pytest.mark.parametrize("family", sorted(hf_config.ARCHITECTURES))
def test_random_init_of_every_family_exports_as_that_family(family):
    """config_to_hf converts back and compares: the random-init architecture is expressible."""
    c = synthetic.get_config()
    c.model.arch.family = family
    h = hf_config.config_to_hf(build.model_config(c, vocab_size=12))
    assert h["model_type"] == family


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("synthetic") / "data")
    return build.synthetic_files(small_config(), data_dir), data_dir


def _age(paths, seconds=1000):
    """Set mtimes into the past, so that a rewrite is visible whatever the file system's resolution."""
    stamps = {}
    for p in paths:
        t = os.stat(p).st_mtime - seconds
        os.utime(p, (t, t))
        stamps[p] = os.stat(p).st_mtime_ns
    return stamps


def _files(files):
    tok = [os.path.join(files.tokenizer, f) for f in sorted(os.listdir(files.tokenizer))]
    return [files.train, files.eval, files.sft, os.path.join(files.world_dir, "world.json"), *tok]


def test_synthetic_files_written_once(written):
    files, data_dir = written
    assert files.world_dir == data_dir and files.tokenizer == os.path.join(data_dir, "tokenizer")
    with open(files.train) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 24 and {"prompt", "chosen", "rejected"} <= set(rows[0])
    meta = json.load(open(os.path.join(data_dir, "world.json")))
    assert meta["n_pairs"] == 24 and meta["seed"] == 0
    stamps = _age(_files(files))
    again = build.synthetic_files(small_config(), data_dir)
    assert again == files
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps, "same config: nothing is rewritten"


def test_synthetic_files_rewritten_when_the_config_changes(tmp_path):
    data_dir = str(tmp_path / "data")
    files = build.synthetic_files(small_config(), data_dir)
    first = open(files.train).read()
    stamps = _age(_files(files))
    build.synthetic_files(small_config(n_pairs=40), data_dir)
    assert os.stat(files.train).st_mtime_ns != stamps[files.train]
    with open(files.train) as f:
        assert sum(1 for _ in f) == 40
    assert json.load(open(os.path.join(data_dir, "world.json")))["n_pairs"] == 40
    # back to the first config: the same rows again (deterministic in config.synthetic and config.seed)
    build.synthetic_files(small_config(), data_dir)
    assert open(files.train).read() == first


def test_synthetic_files_rewritten_after_an_interrupted_write(tmp_path):
    data_dir = str(tmp_path / "data")
    files = build.synthetic_files(small_config(), data_dir)
    world = os.path.join(data_dir, "world.json")
    for broken in ('{"world_config": {"vocab', None):  # cut short, or never written
        if broken is None:
            os.remove(world)
        else:
            open(world, "w").write(broken)
        stamps = _age([files.train])
        build.synthetic_files(small_config(), data_dir)
        assert os.stat(files.train).st_mtime_ns != stamps[files.train]
        assert json.load(open(world))["n_pairs"] == 24


def test_data_files_for_a_file_source(tmp_path):
    c = synthetic.get_config()
    c.data.update(source="/d/pairs.jsonl", eval_source="/d/eval.jsonl")
    c.model.update(path="/models/p", tokenizer="")
    files = build.data_files(c, str(tmp_path))
    assert files == build.DataFiles(train="/d/pairs.jsonl", eval="/d/eval.jsonl", sft=None, tokenizer="/models/p")
    c.model.tokenizer = "/tok"
    c.data.eval_source = ""
    files = build.data_files(c, str(tmp_path))
    assert files.tokenizer == "/tok" and files.eval is None
    assert os.listdir(tmp_path) == []


def test_data_config_train_and_eval():
    c = synthetic.get_config()
    c.data.update(layout="prefix", max_length=32, max_prompt_length=8, truncation_mode="keep_end", num_epochs=2,
                  eval_fraction=0.1)
    c.seed = 7
    d = build.data_config(c, "/d/pairs.jsonl", pairs=16)
    assert (d.path, d.pairs_per_batch, d.layout, d.max_length, d.max_prompt_length) == ("/d/pairs.jsonl", 16,
                                                                                        "prefix", 32, 8)
    assert (d.truncation_mode, d.seed, d.split_seed, d.eval_fraction, d.num_epochs) == ("keep_end", 7, 7, 0.1, 2)
    assert d.shuffle and d.drop_remainder
    e = build.data_config(c, "/d/pairs.jsonl", pairs=32, eval_split=True)
    assert (e.pairs_per_batch, e.shuffle, e.drop_remainder, e.num_epochs) == (32, False, False, 1)
    assert e.eval_fraction == 0.0 and e.eval_split is None
    c.data.num_epochs = 0
    assert build.data_config(c, "x", pairs=16).num_epochs is None  # 0 = repeat forever


def test_data_config_splits_the_batch_over_processes(monkeypatch):
    c = synthetic.get_config()
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    assert build.data_config(c, "x", pairs=16).pairs_per_batch == 4
    with pytest.raises(ValueError, match=r"config\.data batch of 18 pairs .* 4 processes"):
        build.data_config(c, "x", pairs=18)


@pytest.fixture(scope="module")
def tiny_policy():
    c = synthetic.get_config()
    c.model.arch.update(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    return c, Decoder(build.model_config(c, vocab_size=12), rngs=nnx.Rngs(0))


def test_reference_is_a_copy_of_the_policy(tiny_policy):
    c, pol = tiny_policy
    for mode in ("frozen", "sync", "precomputed"):
        c.reference.mode = mode
        ref = build.reference(c, pol)
        assert isinstance(ref, Decoder) and ref is not pol and ref.cfg == pol.cfg
        pairs = zip(jax.tree.leaves(nnx.state(pol, nnx.Param)), jax.tree.leaves(nnx.state(ref, nnx.Param)))
        for a, b in pairs:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert a is not b
        before = np.asarray(ref.embed[...]).copy()
        pol.embed[...] = pol.embed[...] + 1.0  # updating the policy leaves the copy alone
        np.testing.assert_array_equal(np.asarray(ref.embed[...]), before)
        pol.embed[...] = pol.embed[...] - 1.0


@pytest.mark.parametrize("mode", ["none", "base"])
def test_reference_none_for_modes_without_a_model(tiny_policy, mode):
    c, pol = tiny_policy
    c.reference.mode = mode
    assert build.reference(c, pol) is None


def test_reference_and_policy_from_checkpoints(trl_fixture_dir):
    c = synthetic.get_config()
    c.model.path = str(trl_fixture_dir / "policy")
    c.reference.update(mode="frozen", path=str(trl_fixture_dir / "reference"))
    pol = build.policy(c, tok=None)
    ref = build.reference(c, pol)
    assert pol.cfg.vocab_size == ref.cfg.vocab_size == 512
    assert not np.array_equal(np.asarray(pol.embed[...]), np.asarray(ref.embed[...]))


def test_policy_random_init_from_the_tokenizer(written):
    files, _ = written
    tok = build.tokenizer(files.tokenizer)
    c = small_config()
    model = build.policy(c, tok)
    assert model.cfg.vocab_size == len(tok) == 12
    assert (model.cfg.bos_token_id, model.cfg.eos_token_id, model.cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    same = build.policy(c, tok)  # seeded by config.seed
    np.testing.assert_array_equal(np.asarray(model.embed[...]), np.asarray(same.embed[...]))


def test_evaluation_reference_is_the_sft_export_when_the_run_trained_one(tmp_path, written):
    c = synthetic.get_config("runlocal=1")
    tok = build.tokenizer(written[0].tokenizer)
    initial = build.evaluation_reference(c, str(tmp_path), tok)  # no SFT export yet: the seeded initial policy
    assert initial.cfg.vocab_size == len(tok)
    sft = Decoder(initial.cfg, rngs=nnx.Rngs(123))
    hf.export_model(sft, str(tmp_path / "sft" / "model"))
    loaded = build.evaluation_reference(c, str(tmp_path), tok)
    tokens = np.array([[5, 6, 7, 8]], np.int32)
    np.testing.assert_allclose(loaded.logits(loaded(tokens)), sft.logits(sft(tokens)), atol=1e-6)
    again = build.evaluation_reference(c, str(tmp_path / "other"), tok)
    np.testing.assert_array_equal(again.logits(again(tokens)), initial.logits(initial(tokens)))


def test_evaluation_reference_from_a_path_is_loaded_as_the_training_reference(tmp_path, trl_fixture_dir):
    c = synthetic.get_config()
    c.model.update(scan_min_layers=1, remat="full")
    c.reference.update(mode="frozen", path=str(trl_fixture_dir / "reference"))
    ref = build.reference(c, initial_policy=None)
    evaluated = build.evaluation_reference(c, str(tmp_path), tok=None)
    assert evaluated.cfg == ref.cfg and evaluated.cfg.scan_min_layers == 1
    for a, b in zip(jax.tree.leaves(nnx.state(ref, nnx.Param)), jax.tree.leaves(nnx.state(evaluated, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
