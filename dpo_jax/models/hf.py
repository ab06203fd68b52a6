"""Hugging Face checkpoints <-> `Decoder`: config.json <-> `ModelConfig`, safetensors import/export.

Supported `model_type`s: llama, mistral, qwen2, qwen3, gpt2, gpt_neox (their *ForCausalLM /
GPT2LMHeadModel heads). The config half lives in `hf_config.py`. Each family is a list of rules
`HF tensor <-> our parameter(s)`; the loader checks the checkpoint against the rules (missing,
unexpected and mis-shaped tensors are named) before reading any data.
`load_model(..., mesh=mesh)` creates every parameter already sharded on the mesh, each process
reading only its devices' slices of the files (`hf_stream`); `export_model` writes one tensor at a
time, into shards with an index above `max_shard_bytes`.
CLI: `python -m dpo_jax.models.hf --check DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import pathlib
import re
import shutil
import sys
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from dpo_jax import multihost, sharding
from dpo_jax.models import hf_stream
from dpo_jax.models.hf_config import ARCHITECTURES, config_to_hf, load_config
from dpo_jax.models.hf_stream import Entry, TensorFile, View
from dpo_jax.models.transformer import Decoder, ModelConfig, num_params

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json", "generation_config.json")
# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq|\.attn\.(masked_)?bias|\.attention\.(masked_)?bias)$")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match what its config.json implies."""


# ----------------------------------------------------------------------------- tensor rules


class Rule(NamedTuple):
    """HF tensor <-> our parameter(s). The HF tensor is viewed with each axis split into `factors`;
    our parameter takes the view axes in the order `perm`. Several `ours` are the parts of a fused
    tensor along view axis `part_axis` (part k at index k)."""

    hf: str  # HF tensor name; "{i}" marks a per-layer tensor
    ours: tuple[str, ...]  # our parameter paths ("layers/wq" is the layer-i slice of a stacked param)
    factors: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]
    part_axis: Optional[int] = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The HF tensor's shape."""
        return tuple(math.prod(f) for f in self.factors)

    def views(self) -> tuple[View, ...]:
        """One `View` per parameter of `ours`."""
        if self.part_axis is None:
            return (View(self.factors, self.perm),)
        return tuple(View(self.factors, self.perm, ((self.part_axis, k),)) for k in range(len(self.ours)))

    def to_ours(self, w: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(v.to_ours(w) for v in self.views())

    def to_hf(self, *arrays: np.ndarray) -> np.ndarray:
        out = np.empty(self.shape, np.result_type(*arrays))
        for view, a in zip(self.views(), arrays):
            view.place(out, a)
        return out


def _r(hf, ours, factors, perm=None, part_axis=None) -> Rule:
    """A rule; `factors` lists each HF axis as its size or as a tuple of factors; `perm` defaults
    to the view axes in order."""
    factors = tuple(tuple(f) if isinstance(f, tuple) else (f,) for f in factors)
    perm = tuple(range(sum(map(len, factors)))) if perm is None else tuple(perm)
    return Rule(hf, (ours,) if isinstance(ours, str) else tuple(ours), factors, perm, part_axis)


def _linear_in(name, ours, n_in, heads, e):
    """nn.Linear weight [heads*e, n_in] <-> ours [n_in, heads, e] (or [n_in, heads*e] if heads is None)."""
    if heads is None:
        return _r(name, ours, (e, n_in), (1, 0))
    return _r(name, ours, ((heads, e), n_in), (2, 0, 1))


def _head_bias(name, ours, heads, e):
    return _r(name, ours, ((heads, e),))


def rules(cfg: ModelConfig) -> list[Rule]:
    """The tensor rules of cfg's family (prefixes as written by transformers' *ForCausalLM)."""
    V, D, H, K, E, F, P = (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.max_position_embeddings)
    o_in = lambda name: _r(name, "layers/wo", (D, (H, E)), (1, 2, 0))  # noqa: E731  [D, H*E] <-> [H, E, D]
    if cfg.family == "gpt2":
        t, p = "transformer.", "transformer.h.{i}."
        rs = [_r(t + "wte.weight", "embed", (V, D)), _r(t + "wpe.weight", "pos_embed", (P, D)),
              _r(t + "ln_f.weight", "final_norm", (D,)), _r(t + "ln_f.bias", "final_norm_bias", (D,)),
              _r(p + "ln_1.weight", "layers/attn_norm", (D,)), _r(p + "ln_1.bias", "layers/attn_norm_bias", (D,)),
              _r(p + "ln_2.weight", "layers/mlp_norm", (D,)), _r(p + "ln_2.bias", "layers/mlp_norm_bias", (D,)),
              # Conv1D [D, 3*D] = [q | k | v] columns
              _r(p + "attn.c_attn.weight", ("layers/wq", "layers/wk", "layers/wv"), (D, (3, H, E)), (0, 2, 3), 1),
              _r(p + "attn.c_attn.bias", ("layers/bq", "layers/bk", "layers/bv"), ((3, H, E),), (1, 2), 0),
              _r(p + "attn.c_proj.weight", "layers/wo", ((H, E), D)),
              _r(p + "attn.c_proj.bias", "layers/bo", (D,)),
              _r(p + "mlp.c_fc.weight", "layers/w_up", (D, F)), _r(p + "mlp.c_fc.bias", "layers/b_up", (F,)),
              _r(p + "mlp.c_proj.weight", "layers/w_down", (F, D)), _r(p + "mlp.c_proj.bias", "layers/b_down", (D,))]
        return rs if cfg.tie_embeddings else rs + [_linear_in("lm_head.weight", "lm_head", D, None, V)]
    if cfg.family == "gpt_neox":
        t, p = "gpt_neox.", "gpt_neox.layers.{i}."
        qkv = ("layers/wq", "layers/wk", "layers/wv")  # rows per head [q | k | v]
        rs = [_r(t + "embed_in.weight", "embed", (V, D)),
              _r(t + "final_layer_norm.weight", "final_norm", (D,)),
              _r(t + "final_layer_norm.bias", "final_norm_bias", (D,)),
              _r(p + "input_layernorm.weight", "layers/attn_norm", (D,)),
              _r(p + "input_layernorm.bias", "layers/attn_norm_bias", (D,)),
              _r(p + "post_attention_layernorm.weight", "layers/mlp_norm", (D,)),
              _r(p + "post_attention_layernorm.bias", "layers/mlp_norm_bias", (D,)),
              _r(p + "attention.query_key_value.weight", qkv, ((H, 3, E), D), (3, 0, 2), 1),
              o_in(p + "attention.dense.weight"),
              _linear_in(p + "mlp.dense_h_to_4h.weight", "layers/w_up", D, None, F),
              _r(p + "mlp.dense_h_to_4h.bias", "layers/b_up", (F,)),
              _linear_in(p + "mlp.dense_4h_to_h.weight", "layers/w_down", F, None, D),
              _r(p + "mlp.dense_4h_to_h.bias", "layers/b_down", (D,))]
        if cfg.qkv_bias:
            rs += [_r(p + "attention.query_key_value.bias", ("layers/bq", "layers/bk", "layers/bv"), ((H, 3, E),),
                      (0, 2), 1),
                   _r(p + "attention.dense.bias", "layers/bo", (D,))]
        return rs if cfg.tie_embeddings else rs + [_linear_in("embed_out.weight", "lm_head", D, None, V)]
    p = "model.layers.{i}."
    rs = [_r("model.embed_tokens.weight", "embed", (V, D)), _r("model.norm.weight", "final_norm", (D,)),
          _r(p + "input_layernorm.weight", "layers/attn_norm", (D,)),
          _r(p + "post_attention_layernorm.weight", "layers/mlp_norm", (D,)),
          _linear_in(p + "self_attn.q_proj.weight", "layers/wq", D, H, E),
          _linear_in(p + "self_attn.k_proj.weight", "layers/wk", D, K, E),
          _linear_in(p + "self_attn.v_proj.weight", "layers/wv", D, K, E),
          o_in(p + "self_attn.o_proj.weight"),
          _linear_in(p + "mlp.gate_proj.weight", "layers/w_gate", D, None, F),
          _linear_in(p + "mlp.up_proj.weight", "layers/w_up", D, None, F),
          _linear_in(p + "mlp.down_proj.weight", "layers/w_down", F, None, D)]
    if cfg.qkv_bias:
        rs += [_head_bias(p + f"self_attn.{n}_proj.bias", f"layers/b{n}", h, E)
               for n, h in (("q", H), ("k", K), ("v", K))]
    if cfg.o_bias:
        rs.append(_r(p + "self_attn.o_proj.bias", "layers/bo", (D,)))
    if cfg.qk_norm:
        rs += [_r(p + "self_attn.q_norm.weight", "layers/q_norm", (E,)),
               _r(p + "self_attn.k_norm.weight", "layers/k_norm", (E,))]
    if cfg.mlp_bias:
        rs += [_r(p + "mlp.gate_proj.bias", "layers/b_gate", (F,)), _r(p + "mlp.up_proj.bias", "layers/b_up", (F,)),
               _r(p + "mlp.down_proj.bias", "layers/b_down", (D,))]
    return rs if cfg.tie_embeddings else rs + [_linear_in("lm_head.weight", "lm_head", D, None, V)]


def _expand(rule: Rule, n_layers: int) -> list[tuple[int | None, str]]:
    return [(i, rule.hf.format(i=i)) for i in range(n_layers)] if "{i}" in rule.hf else [(None, rule.hf)]


# ----------------------------------------------------------------------------- safetensors I/O


def _tensor_files(model_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """HF tensor name -> the safetensors file holding it (single file or index.json shards)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"{index} names shard {f.name}, which does not exist")
        return files
    singles = sorted(model_dir.glob("*.safetensors"))
    if len(singles) != 1:
        raise FileNotFoundError(f"{model_dir} must hold model.safetensors.index.json or exactly one *.safetensors "
                                f"file (found {[f.name for f in singles]}); PyTorch .bin checkpoints are not supported")
    with safe_open(singles[0], framework="np") as f:
        return {name: singles[0] for name in f.keys()}


def _normalize_prefix(names: list[str], cfg: ModelConfig) -> dict[str, str]:
    """Checkpoint name -> canonical name; base-model checkpoints (e.g. the hub's `gpt2`) lack the prefix."""
    prefix = {"gpt2": "transformer.", "gpt_neox": "gpt_neox."}.get(cfg.family, "model.")
    heads = ("lm_head.weight", "embed_out.weight")
    if any(n.startswith(prefix) for n in names):
        return {n: n for n in names}
    return {n: n if n in heads else prefix + n for n in names}


def _limit(names) -> str:
    return ", ".join(names[:12]) + (f" (+{len(names) - 12} more)" if len(names) > 12 else "")


def locate_tensors(model_dir, cfg: ModelConfig) -> dict[str, TensorFile]:
    """Canonical HF tensor name -> (file, name in the file) of every tensor cfg's rules read, after
    checking the checkpoint against the rules from the file headers alone (missing, unexpected and
    mis-shaped tensors are named)."""
    model_dir = pathlib.Path(model_dir)
    files = _tensor_files(model_dir)
    canon = _normalize_prefix(list(files), cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                if name in canon:
                    shapes[canon[name]] = tuple(f.get_slice(name).get_shape())
    absent = [n for n, c in canon.items() if c not in shapes]
    if absent:
        raise CheckpointMismatchError(f"{model_dir}: index names tensors absent from their shard: {_limit(absent)}")
    expected = {name: r.shape for r in rules(cfg) for _, name in _expand(r, cfg.num_layers)}
    ignorable = {n for n in shapes if _IGNORED.search(n) or (cfg.tie_embeddings and n in ("lm_head.weight",))}
    problems = {
        "missing tensors": sorted(set(expected) - set(shapes)),
        "unexpected tensors": sorted(set(shapes) - set(expected) - ignorable),
        "mis-shaped tensors": [f"{n} (expected {expected[n]}, got {shapes[n]})" for n in sorted(expected)
                               if n in shapes and shapes[n] != expected[n]]}
    if any(problems.values()):
        raise CheckpointMismatchError(f"checkpoint {model_dir} does not match its config.json ({cfg.family}, "
                                      f"{cfg.num_layers} layers): " + "; ".join(
                                          f"{k}: {_limit(v)}" for k, v in problems.items() if v))
    return {canon[n]: TensorFile(files[n], n) for n in files if canon[n] in expected}


def read_params(model_dir, cfg: ModelConfig) -> dict:
    """Read and convert the checkpoint into our nested parameter dict (numpy, checkpoint dtype)."""
    tensors = locate_tensors(model_dir, cfg)
    flat: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        handles: dict[pathlib.Path, Any] = {}

        def get(name):
            src = tensors[name]
            if src.path not in handles:
                handles[src.path] = stack.enter_context(safe_open(src.path, framework="np"))
            return handles[src.path].get_tensor(src.name)

        for r in rules(cfg):
            parts = [r.to_ours(get(name)) for _, name in _expand(r, cfg.num_layers)]
            for k, ours in enumerate(r.ours):
                arrays = [np.asarray(p[k]) for p in parts]
                flat[ours] = np.stack(arrays) if "{i}" in r.hf else arrays[0]
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        head, _, leaf = path.rpartition("/")
        (nested.setdefault(head, {}) if head else nested)[leaf] = value
    return nested


def _abstract_model(cfg: ModelConfig):
    """(graphdef, state) of a Decoder of cfg, shapes only (no weights initialized)."""
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))


def _path_key(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def model_from_params(cfg: ModelConfig, params: Mapping) -> Decoder:
    """A Decoder holding `params` (nested dict as `nnx.to_pure_dict` gives), cast to cfg.param_dtype,
    built without initializing random weights."""
    graphdef, state = _abstract_model(cfg)
    have = dict(jax.tree_util.tree_flatten_with_path(params)[0])

    def take(path, spec):
        key, value = jax.tree_util.keystr(path), have.get(path)
        if value is None or tuple(value.shape) != tuple(spec.shape):
            raise CheckpointMismatchError(f"parameter {key}: expected shape {spec.shape}, got "
                                          f"{'nothing' if value is None else tuple(value.shape)}")
        return jnp.asarray(value, dtype=cfg.param_dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(take, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _param_sources(cfg: ModelConfig, tensors: Mapping[str, TensorFile]) -> dict[str, tuple[Any, View]]:
    """Our parameter path -> (its HF tensor, or one per layer for a stacked parameter; its View)."""
    out = {}
    for r in rules(cfg):
        names = [name for _, name in _expand(r, cfg.num_layers)]
        src = [tensors[n] for n in names] if "{i}" in r.hf else tensors[names[0]]
        out.update({path: (src, view) for path, view in zip(r.ours, r.views())})
    return out


def sharded_model(model_dir, cfg: ModelConfig, mesh: Mesh, axis_rules=sharding.DEFAULT_RULES) -> Decoder:
    """A Decoder whose parameters are created in their shardings on `mesh` (from their logical axes
    and `axis_rules`), each device shard read from the checkpoint on its own (`hf_stream`)."""
    tensors = locate_tensors(model_dir, cfg)
    graphdef, state = _abstract_model(cfg)
    abstract = nnx.to_pure_dict(state)
    shardings = sharding.param_shardings(abstract, graphdef, mesh, axis_rules)
    sources = _param_sources(cfg, tensors)

    def fill(path, spec, target):
        key = _path_key(path)
        if key not in sources:
            raise CheckpointMismatchError(f"parameter {key}: no checkpoint tensor maps to it")
        src, view = sources[key]
        per_layer = tuple(spec.shape[1:] if isinstance(src, list) else spec.shape)
        if per_layer != view.shape:
            raise CheckpointMismatchError(f"parameter {key}: expected shape {per_layer}, the checkpoint gives "
                                          f"{view.shape}")
        read = functools.partial(hf_stream.read_block, src, view, shape=spec.shape, dtype=spec.dtype)
        return hf_stream.sharded_param(spec.shape, target, read)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, abstract, shardings))
    return nnx.merge(graphdef, state)


def _resolve(model_dir_or_hub_id) -> pathlib.Path:
    if os.path.isdir(model_dir_or_hub_id):
        return pathlib.Path(model_dir_or_hub_id)
    name = str(model_dir_or_hub_id)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name} is not a model directory (and not a hub id of the form org/name)")
    from huggingface_hub import snapshot_download

    return pathlib.Path(snapshot_download(repo_id=str(model_dir_or_hub_id),
                                          allow_patterns=["*.json", "*.safetensors", *_TOKENIZER_FILES]))


def load_model(model_dir_or_hub_id, *, dtype="float32", param_dtype="float32", mesh: Optional[Mesh] = None,
               rules=sharding.DEFAULT_RULES, **overrides) -> Decoder:
    """Decoder from a local HF directory (or a hub id, downloaded with snapshot_download).
    Without `mesh` the parameters are read whole into host arrays; with a mesh each is created in
    its sharding on the mesh (logical axes mapped by `rules`, as `sharding.param_shardings`), every
    process reading only the slices of its own devices' shards."""
    model_dir = _resolve(model_dir_or_hub_id)
    cfg = load_config(model_dir, dtype=dtype, param_dtype=param_dtype, **overrides)
    if mesh is not None:
        return sharded_model(model_dir, cfg, mesh, rules)
    return model_from_params(cfg, read_params(model_dir, cfg))


# ----------------------------------------------------------------------------- export


@jax.jit
def _take_layer(x, i):
    return x[i]


def _host_value(value, layer: Optional[int]) -> np.ndarray:
    """A parameter (or one layer of a stacked one) on the host, gathered from every process when
    it is sharded over several (then every process must be exporting)."""
    if layer is not None:
        value = _take_layer(value, layer) if isinstance(value, jax.Array) else np.asarray(value)[layer]
    return np.asarray(multihost.fetch_to_host(value))


def _export_entries(model: Decoder) -> list[Entry]:
    """Every HF tensor of the model, in rule order, each gathered and converted when written."""
    cfg = model.cfg
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def leaf(path):
        value = params
        for k in path.split("/"):
            value = value[k]
        return value

    def make(rule, leaves, layer):
        return rule.to_hf(*[_host_value(x, layer) for x in leaves])

    out = []
    for r in rules(cfg):
        leaves = [leaf(p) for p in r.ours]
        dtype = np.result_type(*[np.dtype(x.dtype) for x in leaves])
        out += [Entry(name, r.shape, dtype, functools.partial(make, r, leaves, i))
                for i, name in _expand(r, cfg.num_layers)]
    return out


def group_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Consecutive entries grouped into files of at most max_shard_bytes (a bigger tensor alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def export_model(model: Decoder, out_dir, *, tokenizer_dir=None, max_shard_bytes: int = 2 * 2**30) -> pathlib.Path:
    """Write config.json + safetensors loadable by `transformers.AutoModelForCausalLM.from_pretrained`
    (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` above max_shard_bytes, else
    `model.safetensors`); copy tokenizer / generation_config files. Tensors are gathered and written
    one at a time, so the host holds one tensor, never the whole model. The main process writes;
    when the parameters are sharded over several processes every process must call this (each
    tensor is gathered by all)."""
    cfg = model.cfg
    out = pathlib.Path(out_dir)
    write = multihost.is_main_process()
    shards = group_shards(_export_entries(model), max_shard_bytes)
    fnames = (["model.safetensors"] if len(shards) == 1 else
              [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    if write:
        out.mkdir(parents=True, exist_ok=True)
        for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            stale.unlink()
    for fname, shard in zip(fnames, shards):
        hf_stream.write_safetensors(out / fname if write else None, shard, metadata={"format": "pt"})
    if not write:
        return out
    if len(shards) > 1:
        weight_map = {e.name: fname for fname, shard in zip(fnames, shards) for e in shard}
        index = {"metadata": {"total_size": int(sum(e.nbytes for s in shards for e in s))}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2, sort_keys=True))
    if tokenizer_dir is not None:
        for fname in _TOKENIZER_FILES:
            src = pathlib.Path(tokenizer_dir) / fname
            if src.is_file():
                shutil.copyfile(src, out / fname)
    return out


# ----------------------------------------------------------------------------- CLI


def check(model_dir, *, dtype="float32", num_tokens=8) -> bool:
    """Load `model_dir`, print its architecture and parameter count, run a forward pass."""
    model = load_model(model_dir, dtype=dtype, param_dtype=dtype)
    cfg = model.cfg
    print(f"architecture: {cfg.family} ({ARCHITECTURES[cfg.family]}): {cfg.num_layers} layers, hidden "
          f"{cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads} x {cfg.head_dim}, mlp "
          f"{cfg.intermediate_size}, vocab {cfg.vocab_size}, tied {cfg.tie_embeddings}")
    print(f"parameters: {num_params(model):,}")
    tokens = (jnp.arange(num_tokens, dtype=jnp.int32)[None] * 7919 + 1) % cfg.vocab_size
    logits = nnx.jit(lambda m, t: m.logits(m(t)))(model, tokens)
    finite = bool(jnp.all(jnp.isfinite(logits)))
    print(f"logits: shape {tuple(logits.shape)} dtype {logits.dtype}, finite: {finite}")
    return finite


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpo_jax.models.hf", description=__doc__.splitlines()[0])
    ap.add_argument("--check", metavar="DIR", required=True, help="a Hugging Face model directory (or hub id)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=8, help="length of the test forward pass")
    args = ap.parse_args(argv)
    try:
        ok = check(args.check, dtype=args.dtype, num_tokens=args.tokens)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not ok:
        print("error: non-finite logits", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
