"""models/attend.py: the Decoder with attention='fused' runs the accelerator's kernel where the
rows' layout allows it (splash in Pallas interpret mode and the cuDNN arguments through XLA stand in
for the devices here) and equals the dense Decoder in values and gradients; everywhere else
(prefix rows, mixed windows, context shards, KV caches, CPU) it runs as 'auto'."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import sharding
from dpo_jax.models import attend, fused_attention
from dpo_jax.models.transformer import ModelConfig

from tests.models.test_attention import LAYOUTS, _rows
from tests.models.test_context_parallel import decoder_value_and_grad

CFG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  attention="fused")


def _run(cfg, layout, mesh_shape=None):
    return decoder_value_and_grad(cfg, _rows(*LAYOUTS[layout]), mesh_shape)


def _assert_equal_to_dense(cfg, layout, mesh_shape=None):
    value, grads, jaxpr = _run(cfg, layout, mesh_shape)
    ref_value, ref_grads, _ = _run(dataclasses.replace(cfg, attention="dense"), layout)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))
    return jaxpr


@pytest.fixture
def on(monkeypatch):
    """on('tpu') / on('gpu'): the model is compiled as for that backend (the kernels then run in
    interpret mode / with XLA's implementation of the same call, so they run on CPU)."""
    def backend(name):
        monkeypatch.setattr(attend, "backend", lambda: name)
        if name == "gpu":  # cuDNN takes bf16 / fp16 only; the same arguments through XLA take float32
            monkeypatch.setattr(fused_attention, "CUDNN_DTYPES", fused_attention.CUDNN_DTYPES | {"float32"})
            xla = functools.partial(fused_attention.cudnn_attention, implementation="xla")

            def recorded(*args, **kwargs):
                calls.append(kwargs)
                return xla(*args, **kwargs)

            monkeypatch.setattr(fused_attention, "cudnn_attention", recorded)
        return calls

    calls = []
    return backend


@pytest.mark.parametrize("layout,mesh_shape", [("standard", None), ("packed", None), ("packed", {"data": 2, "fsdp": 4})])
def test_splash_on_tpu_equals_dense(on, layout, mesh_shape):
    on("tpu")
    cfg = dataclasses.replace(CFG, attention_layout=layout)
    assert attend.fused_kernel(cfg, cached=False) == "splash"
    jaxpr = _assert_equal_to_dense(cfg, layout, mesh_shape)
    assert "pallas_call" in jaxpr
    assert ("shard_map" in jaxpr) == (mesh_shape is not None)  # under a mesh: each device's rows


def test_cudnn_arguments_on_gpu_equal_dense(on):
    calls = on("gpu")
    cfg = dataclasses.replace(CFG, attention_layout="standard", sliding_window=5)
    assert attend.fused_kernel(cfg, cached=False) == "cudnn"
    _assert_equal_to_dense(cfg, "standard")
    assert calls and all(kw["sliding_window"] == 5 for kw in calls)  # every layer went through the cuDNN call


@pytest.mark.parametrize("case", ["cpu", "prefix", "mixed windows", "packed on gpu", "kv cache", "context shards"])
def test_fused_falls_back_where_no_kernel_applies(on, case):
    """No kernel: the choice is None, and the Decoder still equals the dense one."""
    cfg, layout, mesh_shape = dataclasses.replace(CFG, attention_layout="standard"), "standard", None
    if case != "cpu":
        on("gpu" if case == "packed on gpu" else "tpu")
    if case == "prefix":
        cfg, layout = dataclasses.replace(cfg, attention_layout="prefix"), "prefix"
    elif case == "mixed windows":
        cfg = dataclasses.replace(cfg, sliding_window=4, sliding_layers=(True, False))
    elif case == "packed on gpu":
        cfg, layout = dataclasses.replace(cfg, attention_layout="packed"), "packed"
    elif case == "context shards":
        mesh_shape = {"data": 2, "context": 4}
        rows = LAYOUTS["standard"]
        LAYOUTS_16 = [r + [(0, 0, 0)] * (16 - len(r)) for r in rows] + [[(0, 0, 0)] * 16]  # 4 rows of 16 tokens
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(LAYOUTS, "standard", LAYOUTS_16)
            with jax.sharding.use_abstract_mesh(sharding.make_mesh(mesh_shape).abstract_mesh):
                assert attend.fused_kernel(cfg, cached=False) is None
            jaxpr = _assert_equal_to_dense(cfg, layout, mesh_shape)
        assert "pallas_call" not in jaxpr and "shard_map" in jaxpr
        return
    assert attend.fused_kernel(cfg, cached=case == "kv cache") is None
    if case != "kv cache":
        assert "pallas_call" not in _assert_equal_to_dense(cfg, layout)


def test_the_run_config_passes_the_data_layout_and_the_block():
    from dpo_jax import build
    from configs import base

    config = base.get_config()
    config.model.attention, config.model.attention_block, config.data.layout = "fused", 32, "packed"
    assert build.attention_kw(config) == dict(attention="fused", attention_block=32, attention_layout="packed")
