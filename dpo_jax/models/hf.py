"""Hugging Face checkpoints <-> `Decoder`: config.json <-> `ModelConfig`, safetensors import/export.

Supported `model_type`s: llama, mistral, qwen2, qwen3, gpt2, gpt_neox (their *ForCausalLM /
GPT2LMHeadModel heads). The config half lives in `hf_config.py`. Each family is a list of rules
`HF tensor <-> our parameter(s)`; the loader checks the checkpoint against the rules (missing,
unexpected and mis-shaped tensors are named) before reading any data.
CLI: `python -m dpo_jax.models.hf --check DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import shutil
import sys
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from dpo_jax.models.hf_config import ARCHITECTURES, config_to_hf, load_config
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
    hf: str  # HF tensor name; "{i}" marks a per-layer tensor
    ours: tuple[str, ...]  # our parameter paths ("layers/wq" is the layer-i slice of a stacked param)
    shape: tuple[int, ...]  # the HF tensor's shape
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _r(hf, ours, shape, to_ours=lambda w: (w,), to_hf=lambda a: a):
    return Rule(hf, (ours,) if isinstance(ours, str) else tuple(ours), tuple(shape), to_ours, to_hf)


def _linear_in(name, ours, n_in, heads, e):
    """nn.Linear weight [heads*e, n_in] <-> ours [n_in, heads, e] (or [n_in, heads*e] if heads is None)."""
    if heads is None:
        return _r(name, ours, (e, n_in), lambda w: (w.T,), lambda a: a.T)
    return _r(name, ours, (heads * e, n_in), lambda w: (w.T.reshape(n_in, heads, e),),
              lambda a: a.reshape(n_in, heads * e).T)


def _head_bias(name, ours, heads, e):
    return _r(name, ours, (heads * e,), lambda b: (b.reshape(heads, e),), lambda a: a.reshape(-1))


def rules(cfg: ModelConfig) -> list[Rule]:
    """The tensor rules of cfg's family (prefixes as written by transformers' *ForCausalLM)."""
    V, D, H, K, E, F, P = (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.max_position_embeddings)
    o_in = _r("", "", (D, H * E), lambda w: (w.T.reshape(H, E, D),), lambda a: a.reshape(H * E, D).T)
    if cfg.family == "gpt2":
        t, p = "transformer.", "transformer.h.{i}."
        split3 = lambda w: tuple(x.reshape(D, H, E) for x in np.split(w, 3, axis=1))  # noqa: E731
        rs = [_r(t + "wte.weight", "embed", (V, D)), _r(t + "wpe.weight", "pos_embed", (P, D)),
              _r(t + "ln_f.weight", "final_norm", (D,)), _r(t + "ln_f.bias", "final_norm_bias", (D,)),
              _r(p + "ln_1.weight", "layers/attn_norm", (D,)), _r(p + "ln_1.bias", "layers/attn_norm_bias", (D,)),
              _r(p + "ln_2.weight", "layers/mlp_norm", (D,)), _r(p + "ln_2.bias", "layers/mlp_norm_bias", (D,)),
              _r(p + "attn.c_attn.weight", ("layers/wq", "layers/wk", "layers/wv"), (D, 3 * D), split3,
                 lambda *a: np.concatenate([x.reshape(D, D) for x in a], axis=1)),
              _r(p + "attn.c_attn.bias", ("layers/bq", "layers/bk", "layers/bv"), (3 * D,),
                 lambda b: tuple(x.reshape(H, E) for x in np.split(b, 3)),
                 lambda *a: np.concatenate([x.reshape(-1) for x in a])),
              _r(p + "attn.c_proj.weight", "layers/wo", (D, D), lambda w: (w.reshape(H, E, D),),
                 lambda a: a.reshape(D, D)),
              _r(p + "attn.c_proj.bias", "layers/bo", (D,)),
              _r(p + "mlp.c_fc.weight", "layers/w_up", (D, F)), _r(p + "mlp.c_fc.bias", "layers/b_up", (F,)),
              _r(p + "mlp.c_proj.weight", "layers/w_down", (F, D)), _r(p + "mlp.c_proj.bias", "layers/b_down", (D,))]
        return rs if cfg.tie_embeddings else rs + [_linear_in("lm_head.weight", "lm_head", D, None, V)]
    if cfg.family == "gpt_neox":
        t, p = "gpt_neox.", "gpt_neox.layers.{i}."

        def qkv_in(w):  # [3*H*E, D] -> per head [q | k | v]
            x = w.T.reshape(D, H, 3, E)
            return x[:, :, 0], x[:, :, 1], x[:, :, 2]

        rs = [_r(t + "embed_in.weight", "embed", (V, D)),
              _r(t + "final_layer_norm.weight", "final_norm", (D,)),
              _r(t + "final_layer_norm.bias", "final_norm_bias", (D,)),
              _r(p + "input_layernorm.weight", "layers/attn_norm", (D,)),
              _r(p + "input_layernorm.bias", "layers/attn_norm_bias", (D,)),
              _r(p + "post_attention_layernorm.weight", "layers/mlp_norm", (D,)),
              _r(p + "post_attention_layernorm.bias", "layers/mlp_norm_bias", (D,)),
              _r(p + "attention.query_key_value.weight", ("layers/wq", "layers/wk", "layers/wv"), (3 * H * E, D),
                 qkv_in, lambda *a: np.stack(a, axis=2).reshape(D, 3 * H * E).T),
              o_in._replace(hf=p + "attention.dense.weight", ours=("layers/wo",)),
              _linear_in(p + "mlp.dense_h_to_4h.weight", "layers/w_up", D, None, F),
              _r(p + "mlp.dense_h_to_4h.bias", "layers/b_up", (F,)),
              _linear_in(p + "mlp.dense_4h_to_h.weight", "layers/w_down", F, None, D),
              _r(p + "mlp.dense_4h_to_h.bias", "layers/b_down", (D,))]
        if cfg.qkv_bias:
            rs += [_r(p + "attention.query_key_value.bias", ("layers/bq", "layers/bk", "layers/bv"), (3 * H * E,),
                      lambda b: tuple(np.moveaxis(b.reshape(H, 3, E), 1, 0)), lambda *a: np.stack(a, 1).reshape(-1)),
                   _r(p + "attention.dense.bias", "layers/bo", (D,))]
        return rs if cfg.tie_embeddings else rs + [_linear_in("embed_out.weight", "lm_head", D, None, V)]
    p = "model.layers.{i}."
    rs = [_r("model.embed_tokens.weight", "embed", (V, D)), _r("model.norm.weight", "final_norm", (D,)),
          _r(p + "input_layernorm.weight", "layers/attn_norm", (D,)),
          _r(p + "post_attention_layernorm.weight", "layers/mlp_norm", (D,)),
          _linear_in(p + "self_attn.q_proj.weight", "layers/wq", D, H, E),
          _linear_in(p + "self_attn.k_proj.weight", "layers/wk", D, K, E),
          _linear_in(p + "self_attn.v_proj.weight", "layers/wv", D, K, E),
          o_in._replace(hf=p + "self_attn.o_proj.weight", ours=("layers/wo",)),
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


def read_params(model_dir, cfg: ModelConfig) -> dict:
    """Read and convert the checkpoint into our nested parameter dict (numpy, checkpoint dtype)."""
    model_dir = pathlib.Path(model_dir)
    files = _tensor_files(model_dir)
    canon = _normalize_prefix(list(files), cfg)
    by_canon = {c: n for n, c in canon.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                if name in canon:
                    shapes[canon[name]] = tuple(f.get_slice(name).get_shape())
    absent = [n for n, c in canon.items() if c not in shapes]
    if absent:
        raise CheckpointMismatchError(f"{model_dir}: index names tensors absent from their shard: {_limit(absent)}")
    rs = rules(cfg)
    expected = {name: r.shape for r in rs for _, name in _expand(r, cfg.num_layers)}
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
    flat: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(path, framework="np")) for path in set(files.values())}
        get = lambda name: handles[files[by_canon[name]]].get_tensor(by_canon[name])  # noqa: E731
        for r in rs:
            parts = [r.to_ours(get(name)) for _, name in _expand(r, cfg.num_layers)]
            for k, ours in enumerate(r.ours):
                arrays = [np.asarray(p[k]) for p in parts]
                flat[ours] = np.stack(arrays) if "{i}" in r.hf else arrays[0]
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        head, _, leaf = path.rpartition("/")
        (nested.setdefault(head, {}) if head else nested)[leaf] = value
    return nested


def model_from_params(cfg: ModelConfig, params: Mapping) -> Decoder:
    """A Decoder holding `params` (nested dict as `nnx.to_pure_dict` gives), cast to cfg.param_dtype,
    built without initializing random weights."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    have = dict(jax.tree_util.tree_flatten_with_path(params)[0])

    def take(path, spec):
        key, value = jax.tree_util.keystr(path), have.get(path)
        if value is None or tuple(value.shape) != tuple(spec.shape):
            raise CheckpointMismatchError(f"parameter {key}: expected shape {spec.shape}, got "
                                          f"{'nothing' if value is None else tuple(value.shape)}")
        return jnp.asarray(value, dtype=cfg.param_dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(take, nnx.to_pure_dict(state)))
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


def load_model(model_dir_or_hub_id, *, dtype="float32", param_dtype="float32", **overrides) -> Decoder:
    """Decoder from a local HF directory (or a hub id, downloaded with snapshot_download)."""
    model_dir = _resolve(model_dir_or_hub_id)
    cfg = load_config(model_dir, dtype=dtype, param_dtype=param_dtype, **overrides)
    return model_from_params(cfg, read_params(model_dir, cfg))


def export_model(model: Decoder, out_dir, *, tokenizer_dir=None, max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
    """Write config.json + safetensors (sharded with an index above max_shard_bytes) loadable by
    `transformers.AutoModelForCausalLM.from_pretrained`; copy tokenizer / generation_config files."""
    cfg = model.cfg
    hf_cfg = config_to_hf(cfg)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    def ours(path, i):
        value = params
        for k in path.split("/"):
            value = value[k]
        return value if i is None else value[i]

    tensors: dict[str, np.ndarray] = {}
    for r in rules(cfg):
        for i, name in _expand(r, cfg.num_layers):
            tensors[name] = np.ascontiguousarray(r.to_hf(*[ours(p, i) for p in r.ours]))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
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
