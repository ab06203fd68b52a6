"""dpo_jax/models/hf_stream.py: the streamed loader reads only each device's slices, and the
streaming safetensors writer writes what safetensors reads. The loaders' equality with the host
loader is in tests/models/test_hf.py."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

from dpo_jax import sharding
from dpo_jax.models import hf, hf_stream
from dpo_jax.models.transformer import Decoder
from tests.models.test_hf import MESHES, TINY, _same_params


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama checkpoint written by export_model (single model.safetensors)."""
    return hf.export_model(Decoder(TINY, rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("tiny") / "ckpt")


class _RecordingSafeOpen:
    """safe_open that records the index of every slice read and refuses whole-tensor reads."""

    def __init__(self, reads):
        self.reads = reads

    def __call__(self, path, framework):
        real = safe_open(path, framework=framework)
        reads = self.reads

        class Handle:
            def __enter__(self):
                self.f = real.__enter__()
                return self

            def __exit__(self, *exc):
                return real.__exit__(*exc)

            def get_slice(self, name):
                sl = self.f.get_slice(name)

                class Slice:
                    def __getitem__(self, index):
                        block = sl[index]
                        reads.append((name, index, tuple(sl.get_shape()), block.size))
                        return block

                return Slice()

            def get_tensor(self, name):
                raise AssertionError(f"whole tensor {name} read")

        return Handle()


def test_streamed_loader_reads_each_devices_slice_only(tiny_dir, monkeypatch):
    """fsdp=8: every parameter of the tiny Llama has an `embed` axis of 16, split in 8, so each
    device's request is 1/8 of its HF tensor, the 8 requests of a tensor are disjoint, and no
    whole tensor is read."""
    reads = []
    monkeypatch.setattr(hf_stream, "safe_open", _RecordingSafeOpen(reads))
    model = hf.load_model(tiny_dir, mesh=sharding.make_mesh(MESHES["fsdp8"]))
    monkeypatch.undo()
    by_tensor = {}
    for name, index, shape, size in reads:
        assert size * 8 == int(np.prod(shape)), (name, index, shape)
        by_tensor.setdefault(name, []).append(tuple((s.start, s.stop) for s in index))
    expected = {n for r in hf.rules(TINY) for _, n in hf._expand(r, TINY.num_layers)}
    assert set(by_tensor) == expected
    assert all(len(set(v)) == len(v) == 8 for v in by_tensor.values())
    assert _same_params(model, hf.load_model(tiny_dir))


def test_safetensors_header_is_what_safetensors_writes(tmp_path):
    """The streaming writer's files read back with safetensors, bfloat16 included."""
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
               "b.weight": rng.standard_normal((7,)).astype(jnp.bfloat16), "c": np.arange(4, dtype=np.int64)}
    entries = [hf_stream.Entry(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()]
    hf_stream.write_safetensors(tmp_path / "x.safetensors", entries, metadata={"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
