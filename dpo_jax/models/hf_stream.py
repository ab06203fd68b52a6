"""Safetensors read and written a slice at a time: the index maps between a Hugging Face tensor and
our parameters, sharded parameters filled device by device, and a streaming safetensors writer.

A `View` describes one of our parameters as a reshape + transpose (+ one fixed index, for a part of
a fused tensor such as GPT-2's `c_attn`) of a Hugging Face tensor. It converts whole tensors both
ways (`to_ours`, `place`) and reads the block of our parameter at a device's index straight from a
safetensors slice (`read`), reading only the rows and columns that block needs.

`sharded_param` builds a `jax.Array` in its target sharding one device shard at a time: each
distinct shard is read (for a stacked per-layer parameter, layer by layer), placed on its devices
and dropped before the next is read, and every read opens the file only for that read (safetensors
memory-maps it; the mapped pages leave the process when it closes). So a process holds its own
shards plus one tensor's pages, and in a multi-process run reads only its addressable devices'
shards.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import struct
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

import jax
import numpy as np
from safetensors import safe_open

Index = tuple[slice, ...]
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int32": "I32",
              "int64": "I64", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


# ----------------------------------------------------------------------------- views


class View(NamedTuple):
    """One parameter as a view of a Hugging Face tensor: every HF axis split into `factors` (the
    view axes, numbered left to right over all HF axes), the view axes in `select` fixed at an index
    (a part of a fused tensor), and the remaining view axes put in the order `perm` (our axes)."""

    factors: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]
    select: tuple[tuple[int, int], ...] = ()

    @property
    def view_shape(self) -> tuple[int, ...]:
        return tuple(f for fs in self.factors for f in fs)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(fs) for fs in self.factors)

    @property
    def shape(self) -> tuple[int, ...]:
        """Our parameter's shape (of one layer, for a per-layer tensor)."""
        return tuple(self.view_shape[a] for a in self.perm)

    def _fixed(self, at_zero: bool = False) -> tuple:
        sel = dict(self.select)
        return tuple((0 if at_zero else sel[a]) if a in sel else slice(None) for a in range(len(self.view_shape)))

    def _to_perm(self, arr: np.ndarray) -> np.ndarray:
        """The kept view axes (in view order) of `arr` put in our order."""
        kept = sorted(self.perm)
        return arr.transpose([kept.index(a) for a in self.perm])

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        """Our parameter from the whole HF tensor `w`."""
        return self._to_perm(np.asarray(w).reshape(self.view_shape)[self._fixed()])

    def place(self, hf: np.ndarray, ours: np.ndarray) -> None:
        """Write our parameter `ours` into its part of the (C-contiguous) HF tensor `hf`."""
        kept = sorted(self.perm)
        hf.reshape(self.view_shape)[self._fixed()] = np.asarray(ours).transpose([self.perm.index(a) for a in kept])

    def read(self, tensor, index: Index) -> np.ndarray:
        """Our parameter's block at `index` (slices of our axes, step 1), read from `tensor` (a
        safetensors slice: `tensor[tuple of slices]` reads only that block) without reading more
        than the block's rows and columns (whole inner factors of a split axis at most)."""
        want = [slice(0, n) for n in self.view_shape]
        for axis, s in zip(self.perm, index):
            want[axis] = s
        for axis, k in self.select:
            want[axis] = slice(k, k + 1)
        out = None
        first = 0
        plans = []
        for fs in self.factors:
            plans.append(_axis_reads(fs, want[first:first + len(fs)]))
            first += len(fs)
        for combo in itertools.product(*plans):
            block = tensor[tuple(c[0] for c in combo)]
            if out is None:
                out = np.empty([s.stop - s.start for s in want], block.dtype)
            out[tuple(i for c in combo for i in c[1])] = block.reshape([n for c in combo for n in c[2]])
        return self._to_perm(out[self._fixed(at_zero=True)])


def _axis_reads(factors: Sequence[int], want: Sequence[slice]) -> list[tuple[slice, tuple, tuple]]:
    """How to read the wanted block of one HF axis split into `factors`: a list of (contiguous range
    of the HF axis, where it goes in the block (an int per outer factor, then slices), its shape
    there). Factors after the last one not wanted whole are read whole; the factors before it are
    read one index at a time."""
    partial = [i for i, (f, s) in enumerate(zip(factors, want)) if (s.start, s.stop) != (0, f)]
    m = partial[-1] if partial else 0
    strides = [math.prod(factors[i + 1:]) for i in range(len(factors))]
    inner = tuple(factors[m + 1:])
    reads = []
    for outer in itertools.product(*(range(s.start, s.stop) for s in want[:m])):
        base = sum(c * st for c, st in zip(outer, strides))
        start, stop = base + want[m].start * strides[m], base + want[m].stop * strides[m]
        where = tuple(c - s.start for c, s in zip(outer, want)) + (slice(None),) * (len(factors) - m)
        reads.append((slice(start, stop), where, (want[m].stop - want[m].start, *inner)))
    return reads


# ----------------------------------------------------------------------------- sharded reading


class TensorFile(NamedTuple):
    path: pathlib.Path
    name: str  # the tensor's name in that file


def read_slice(source: TensorFile, view: View, index: Index) -> np.ndarray:
    """`view.read` of one tensor, with its file open (memory-mapped) only for this read."""
    with safe_open(source.path, framework="numpy") as f:
        return view.read(f.get_slice(source.name), index)


def _normalize(index: Index, shape: Sequence[int]) -> Index:
    out = []
    for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided index {s} is not supported")
        out.append(slice(start, stop))
    return tuple(out)


def read_block(sources: Union[TensorFile, Sequence[TensorFile]], view: View, index: Index, shape: Sequence[int],
               dtype) -> np.ndarray:
    """The block at `index` of our parameter of `shape`, in `dtype`: from one tensor, or, for a
    stacked parameter (`sources` one tensor per layer, the leading axis), layer by layer."""
    index = _normalize(index, shape)
    if isinstance(sources, TensorFile):
        return np.ascontiguousarray(read_slice(sources, view, index), dtype=dtype)
    layers = range(index[0].start, index[0].stop)
    out = np.empty([s.stop - s.start for s in index], dtype)
    for k, layer in enumerate(layers):
        out[k] = read_slice(sources[layer], view, index[1:])
    return out


def _index_key(index: Index, shape: Sequence[int]) -> tuple:
    return tuple((s.start, s.stop) for s in _normalize(index, shape))


def sharded_param(shape: Sequence[int], sharding: jax.sharding.Sharding, read: Callable[[Index], np.ndarray]):
    """A jax.Array of `shape` in `sharding`, filled by `read(index)` (a numpy block) one distinct
    shard at a time: each block is read once, put on every addressable device that holds it, and
    dropped before the next is read (`jax.make_array_from_callback` reads every shard of the
    process before placing any, holding a whole tensor in between)."""
    shape = tuple(shape)
    device_index = sharding.addressable_devices_indices_map(shape)
    groups: dict[tuple, tuple[Index, list]] = {}
    for device, index in device_index.items():
        groups.setdefault(_index_key(index, shape), (index, []))[1].append(device)
    placed = {}
    for index, devices in groups.values():
        block = read(index)
        for device in devices:
            placed[device] = jax.device_put(block, device)
        del block
    return jax.make_array_from_single_device_arrays(shape, sharding, [placed[d] for d in device_index])


# ----------------------------------------------------------------------------- streaming writer


class Entry(NamedTuple):
    """A tensor to write: its name, shape and dtype up front, its values from `make()` when written."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def safetensors_header(entries: Iterable[Entry], metadata: Optional[dict] = None) -> bytes:
    """The 8-byte length and JSON header (padded with spaces to 8 bytes) of a safetensors file
    holding `entries` in order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for e in entries:
        dtype = np.dtype(e.dtype).name
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {e.name}: dtype {dtype} cannot be written to safetensors")
        header[e.name] = {"dtype": _ST_DTYPES[dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Optional[pathlib.Path], entries: Sequence[Entry], metadata: Optional[dict] = None) -> None:
    """Write `entries` to the safetensors file `path`, making and writing one tensor at a time.
    With `path` None every tensor is still made (e.g. gathered across processes) but nothing is
    written."""
    if path is None:
        for e in entries:
            e.make()
        return
    with open(path, "wb") as f:
        f.write(safetensors_header(entries, metadata))
        for e in entries:
            value = np.ascontiguousarray(e.make(), dtype=e.dtype)
            if value.shape != tuple(e.shape):
                raise ValueError(f"tensor {e.name}: made shape {value.shape}, announced {tuple(e.shape)}")
            f.write(value.reshape(-1).view(np.uint8))
