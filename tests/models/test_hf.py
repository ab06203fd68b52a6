"""Hugging Face checkpoint I/O: tensor errors that name the culprit, shards, bfloat16, CLI."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from dpo_jax import sharding
from dpo_jax.models import hf
from dpo_jax.models.hf_config import FAMILY_TRAITS
from dpo_jax.models.transformer import Decoder, ModelConfig

TINY = ModelConfig(family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                   num_kv_heads=1, init_std=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama checkpoint written by export_model (single model.safetensors)."""
    return hf.export_model(Decoder(TINY, rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("tiny") / "ckpt")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(directory, fn):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _hidden(model, n=5):
    return np.asarray(model(jnp.arange(n, dtype=jnp.int32)[None] % model.cfg.vocab_size))


def _same_params(a, b):
    la, lb = jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


# ----------------------------------------------------------------------------- tensors


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf.CheckpointMismatchError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.load_model(d)


def test_misshaped_tensor_is_named_with_both_shapes(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _edit_tensors(d, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", np.zeros((16, 16), np.float32)))
    with pytest.raises(hf.CheckpointMismatchError) as e:
        hf.load_model(d)
    assert "model.layers.0.self_attn.k_proj.weight (expected (8, 16), got (16, 16))" in str(e.value)


def test_unexpected_tensor_is_named_and_known_buffers_are_ignored(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    assert _same_params(hf.load_model(d), hf.load_model(tiny_dir))
    _edit_tensors(d, lambda t: t.update({"model.layers.0.adapter.weight": np.ones(4, np.float32)}))
    with pytest.raises(hf.CheckpointMismatchError, match=r"unexpected tensors: model\.layers\.0\.adapter\.weight"):
        hf.load_model(d)


def test_no_weights_and_missing_shard_are_reported(tiny_dir, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_model(d)
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        hf.load_model(d)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        hf.load_model(tmp_path / "no_such_dir")  # a path, never sent to the hub


def test_base_model_checkpoint_without_prefix_loads(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")

    def strip(t):
        for k in list(t):
            if k.startswith("model."):
                t[k[len("model."):]] = t.pop(k)

    _edit_tensors(d, strip)
    assert _same_params(hf.load_model(d), hf.load_model(tiny_dir))


def test_sharded_checkpoints_with_index_load(tiny_dir, tmp_path):
    ours = hf.load_model(tiny_dir)
    out = hf.export_model(ours, tmp_path / "sharded", max_shard_bytes=3_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3 and not (out / "model.safetensors").exists()
    assert _same_params(hf.load_model(out), ours)

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pt = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    pt.save_pretrained(tmp_path / "hf_sharded", max_shard_size="8KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf_sharded").glob("*.safetensors"))) >= 2
    assert _same_params(hf.load_model(tmp_path / "hf_sharded"), ours)
    del torch


def test_bfloat16_export_and_load(tiny_dir, tmp_path, trl_fixture_dir):
    model = hf.load_model(tiny_dir, dtype="bfloat16", param_dtype="bfloat16", remat="full")
    assert model.cfg.remat == "full" and model.cfg.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("bfloat16")}
    out = hf.export_model(model, tmp_path / "bf16", tokenizer_dir=trl_fixture_dir / "policy")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].dtype.name == "bfloat16"
    assert _same_params(hf.load_model(out, dtype="bfloat16", param_dtype="bfloat16"), model)


# ----------------------------------------------------------------------------- streamed (sharded) loading


FAMILY_CFGS = {
    "llama": TINY,
    "qwen2_bias": ModelConfig(family="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                              num_heads=4, num_kv_heads=2, init_std=0.3, tie_embeddings=True, **FAMILY_TRAITS["qwen2"]),
    "gpt2": ModelConfig(family="gpt2", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=4, max_position_embeddings=32, init_std=0.3, **FAMILY_TRAITS["gpt2"]),
    "gpt_neox": ModelConfig(family="gpt_neox", vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=2,
                            num_heads=4, num_kv_heads=4, init_std=0.3, **FAMILY_TRAITS["gpt_neox"]),
}
MESHES = {"fsdp8": {"data": 1, "fsdp": 8, "tensor": 1}, "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2},
          "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}


def _random_slice(rng, n):
    start = int(rng.integers(0, n))
    return slice(start, int(rng.integers(start + 1, n + 1)))


class _Recorder:
    """A tensor that records the elements read through `[index]`."""

    def __init__(self, array, log):
        self.array, self.log = array, log

    def __getitem__(self, index):
        block = self.array[index]
        self.log.append(block.size)
        return block


@pytest.mark.parametrize("family", sorted(FAMILY_CFGS))
def test_views_read_exactly_the_block_of_every_parameter(family):
    """Each rule's view of a random HF tensor: to_ours / to_hf invert each other, and the block at
    any index is read from the HF tensor without reading one element more than the block."""
    rng = np.random.default_rng(0)
    for rule in hf.rules(FAMILY_CFGS[family]):
        w = rng.standard_normal(rule.shape).astype(np.float32)
        ours = rule.to_ours(w)
        np.testing.assert_array_equal(rule.to_hf(*ours), w, err_msg=rule.hf)
        for view, whole in zip(rule.views(), ours):
            assert whole.shape == view.shape
            for _ in range(6):
                index = tuple(_random_slice(rng, n) for n in view.shape)
                log = []
                block = view.read(_Recorder(w, log), index)
                np.testing.assert_array_equal(block, whole[index], err_msg=f"{rule.hf} {index}")
                assert sum(log) == block.size, (rule.hf, index, log)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("family,mesh_name", [(f, "fsdp4_tensor2") for f in sorted(FAMILY_CFGS)]
                         + [("llama", "fsdp8"), ("gpt_neox", "data2_fsdp2_tensor2")])
def test_streamed_load_is_sharded_and_equals_the_host_loader(family, mesh_name, tmp_path):
    out = hf.export_model(Decoder(FAMILY_CFGS[family], rngs=nnx.Rngs(1)), tmp_path / "ckpt", max_shard_bytes=4_000)
    mesh = sharding.make_mesh(MESHES[mesh_name])
    host = hf.load_model(out)
    streamed = hf.load_model(out, mesh=mesh)
    assert streamed.cfg == host.cfg
    graphdef, state = nnx.split(host)
    want_sh = sharding.param_shardings(nnx.to_pure_dict(state), graphdef, mesh)
    got, want = _params(streamed), _params(host)
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    assert [p for p, _ in flat_got] == [p for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]]
    for (path, a), b, sh in zip(flat_got, jax.tree.leaves(want), jax.tree.leaves(want_sh)):
        key = jax.tree_util.keystr(path)
        assert isinstance(a, jax.Array) and a.sharding == sh, (key, a.sharding, sh)
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), key
    sharded = [a for a in jax.tree.leaves(got) if not a.sharding.is_fully_replicated]
    assert len(sharded) >= 5


def test_streamed_load_of_bfloat16_checkpoint_into_float32_and_bfloat16(tiny_dir, tmp_path):
    bf16 = hf.export_model(hf.load_model(tiny_dir, param_dtype="bfloat16"), tmp_path / "bf16")
    mesh = sharding.make_mesh(MESHES["fsdp4_tensor2"])
    for param_dtype in ("float32", "bfloat16"):
        host = hf.load_model(bf16, param_dtype=param_dtype)
        streamed = hf.load_model(bf16, param_dtype=param_dtype, mesh=mesh)
        for a, b in zip(jax.tree.leaves(_params(streamed)), jax.tree.leaves(_params(host))):
            assert a.dtype == b.dtype == jnp.dtype(param_dtype)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_export_loads_in_transformers_and_in_both_loaders(tiny_dir, tmp_path):
    model = hf.load_model(tiny_dir, mesh=sharding.make_mesh(MESHES["fsdp4_tensor2"]))
    out = hf.export_model(model, tmp_path / "sharded", max_shard_bytes=2_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(files) >= 4 and sorted(set(index["weight_map"].values())) == [f.name for f in files]
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.nbytes for f in files for t in load_file(f).values())
    for f in files:
        tensors = load_file(f)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 2_000
    host = hf.load_model(tiny_dir)
    assert _same_params(hf.load_model(out), host)
    assert _same_params(hf.load_model(out, mesh=sharding.make_mesh(MESHES["fsdp8"])), host)

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pt = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.arange(5)[None] % TINY.vocab_size
    with torch.no_grad():
        ref = pt(torch.tensor(tokens), output_hidden_states=True).hidden_states[-1].numpy()
    np.testing.assert_allclose(_hidden(host), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "dpo_jax.models.hf", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_check_cli(tiny_dir, tmp_path):
    r = _cli("--check", tiny_dir)
    assert r.returncode == 0, r.stderr
    assert "architecture: llama (LlamaForCausalLM)" in r.stdout
    assert f"parameters: {sum(x.size for x in load_file(tiny_dir / 'model.safetensors').values()):,}" in r.stdout
    assert "logits: shape (1, 8, 64)" in r.stdout and "finite: True" in r.stdout

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    r = _cli("--check", tmp_path)
    assert r.returncode != 0 and "unsupported architecture" in r.stderr and "bert" in r.stderr
