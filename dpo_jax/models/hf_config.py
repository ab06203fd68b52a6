"""Hugging Face config.json <-> `ModelConfig`.

Supported `model_type`s: llama, mistral, qwen2, qwen3, gpt2, gpt_neox (their *ForCausalLM /
GPT2LMHeadModel heads). `config_to_hf` converts back with `config_from_hf` and refuses a config
its family cannot express; unsupported architectures, rope types and activations are named.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

from dpo_jax.models.transformer import ModelConfig, RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}
# What a random-init model of each family takes beyond the ModelConfig defaults, so that it exports as
# that family (`config_to_hf`): the traits its Hugging Face config cannot change, and the defaults of
# the ones it reads (gpt2's activation, norm_eps and tied embeddings, gpt_neox's rotary fraction).
_LAYER_NORM = dict(norm="layer", norm_eps=1e-5, gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True)
FAMILY_TRAITS = {
    "gpt2": dict(_LAYER_NORM, activation="gelu_tanh", position="learned", tie_embeddings=True),
    "gpt_neox": dict(_LAYER_NORM, activation="gelu", parallel_residual=True, rotary_fraction=0.25),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
}
NO_GQA_FAMILIES = ("gpt2", "gpt_neox")  # one key/value head per query head (num_kv_heads = num_heads)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh"}
_ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new"}


class UnsupportedArchitectureError(ValueError):
    """config.json names a model_type / architecture this module cannot load."""


def _get(h: Mapping, key: str, default: Any = KeyError):
    if key in h and h[key] is not None:
        return h[key]
    if default is KeyError:
        raise ValueError(f"config.json of model_type {h.get('model_type')!r} lacks the field {key!r}")
    return default


def _rope_from_hf(h: Mapping, default_fraction: float) -> dict:
    params = {**(h.get("rope_scaling") or {}), **(h.get("rope_parameters") or {})}
    theta = params.get("rope_theta", h.get("rope_theta", h.get("rotary_emb_base", 10000.0)))
    fraction = params.get("partial_rotary_factor",
                          h.get("partial_rotary_factor", h.get("rotary_pct", default_fraction)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    out = dict(rope_theta=float(theta), rotary_fraction=float(fraction), rope_scaling=None)
    if rope_type == "default":
        return out
    if rope_type == "linear":
        out["rope_scaling"] = RopeScaling("linear", factor=float(params["factor"]))
    elif rope_type == "llama3":
        out["rope_scaling"] = RopeScaling(
            "llama3", factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings",
                                                            h.get("max_position_embeddings"))))
    else:
        raise ValueError(f"config.json rope_parameters.rope_type {rope_type!r} is not supported; "
                         f"supported: 'default', 'linear', 'llama3'")
    return out


def _activation(h: Mapping, key: str) -> str:
    act = _get(h, key)
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json {key} {act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


def _sliding(h: Mapping, n_layers: int) -> dict:
    """Qwen2/3: `layer_types` (or use_sliding_window + max_window_layers) -> per-layer sliding."""
    window = h.get("sliding_window")
    types = h.get("layer_types")
    if types is None:
        use = bool(h.get("use_sliding_window")) and window is not None
        types = ["sliding_attention" if use and i >= h.get("max_window_layers", 0) else "full_attention"
                 for i in range(n_layers)]
    bad = sorted(set(types) - {"sliding_attention", "full_attention"})
    if bad or len(types) != n_layers:
        raise ValueError(f"config.json layer_types must list {n_layers} of 'full_attention' / "
                         f"'sliding_attention'; got {types}")
    slides = tuple(t == "sliding_attention" for t in types)
    if not any(slides):
        return dict(sliding_window=None, sliding_layers=None)
    return dict(sliding_window=int(window), sliding_layers=slides)


def _common_ids(h: Mapping) -> dict:
    eos = h.get("eos_token_id")
    return dict(bos_token_id=h.get("bos_token_id"), pad_token_id=h.get("pad_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos)


def config_from_hf(h: Mapping, **overrides) -> ModelConfig:
    """A Hugging Face config dict -> ModelConfig; `overrides` (dtype, param_dtype, remat, ...) win."""
    model_type, archs = h.get("model_type"), list(h.get("architectures") or [])
    if model_type not in ARCHITECTURES or any(a != ARCHITECTURES[model_type] for a in archs):
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type={model_type!r}, architectures={archs}; supported: "
            + ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items()))
    L = int(_get(h, "n_layer" if model_type == "gpt2" else "num_hidden_layers"))
    c: dict[str, Any] = dict(family=model_type, num_layers=L, vocab_size=int(_get(h, "vocab_size")), **_common_ids(h))
    if model_type == "gpt2":
        D, H = int(_get(h, "n_embd")), int(_get(h, "n_head"))
        if not h.get("scale_attn_weights", True) or h.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError("config.json: gpt2 with scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true "
                             "is not supported")
        c.update(hidden_size=D, num_heads=H, num_kv_heads=H, head_dim=D // H,
                 intermediate_size=int(h.get("n_inner") or 4 * D), norm="layer",
                 norm_eps=float(_get(h, "layer_norm_epsilon", 1e-5)), activation=_activation(h, "activation_function"),
                 gated_mlp=False, position="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
                 tie_embeddings=bool(h.get("tie_word_embeddings", True)),
                 max_position_embeddings=int(_get(h, "n_positions")))
    elif model_type == "gpt_neox":
        D, H = int(_get(h, "hidden_size")), int(_get(h, "num_attention_heads"))
        bias = bool(h.get("attention_bias", True))
        c.update(hidden_size=D, num_heads=H, num_kv_heads=H, head_dim=D // H,
                 intermediate_size=int(_get(h, "intermediate_size")), norm="layer",
                 norm_eps=float(_get(h, "layer_norm_eps", 1e-5)), activation=_activation(h, "hidden_act"),
                 gated_mlp=False, qkv_bias=bias, o_bias=bias, mlp_bias=True,
                 parallel_residual=bool(h.get("use_parallel_residual", True)),
                 tie_embeddings=bool(h.get("tie_word_embeddings", False)),
                 max_position_embeddings=int(_get(h, "max_position_embeddings")), **_rope_from_hf(h, 0.25))
    else:
        D, H = int(_get(h, "hidden_size")), int(_get(h, "num_attention_heads"))
        c.update(hidden_size=D, num_heads=H, num_kv_heads=int(_get(h, "num_key_value_heads", H)),
                 head_dim=int(_get(h, "head_dim", D // H)), intermediate_size=int(_get(h, "intermediate_size")),
                 norm="rms", norm_eps=float(_get(h, "rms_norm_eps", 1e-6)), activation=_activation(h, "hidden_act"),
                 gated_mlp=True, tie_embeddings=bool(h.get("tie_word_embeddings", False)),
                 max_position_embeddings=int(_get(h, "max_position_embeddings")), **_rope_from_hf(h, 1.0))
        if model_type == "llama":
            c.update(qkv_bias=bool(h.get("attention_bias", False)), o_bias=bool(h.get("attention_bias", False)),
                     mlp_bias=bool(h.get("mlp_bias", False)))
        elif model_type == "mistral":
            c.update(sliding_window=h.get("sliding_window"))
        elif model_type == "qwen2":
            c.update(qkv_bias=True, **_sliding(h, L))
        else:  # qwen3
            bias = bool(h.get("attention_bias", False))
            c.update(qkv_bias=bias, o_bias=bias, qk_norm=True, **_sliding(h, L))
    c.update(overrides)
    return ModelConfig(**c)


def _rope_to_hf(cfg: ModelConfig) -> dict:
    params: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rotary_fraction != 1.0:
        params["partial_rotary_factor"] = cfg.rotary_fraction
    sc = cfg.rope_scaling
    if sc is not None and sc.rope_type != "default":
        params.update(rope_type=sc.rope_type, factor=sc.factor)
        if sc.rope_type == "llama3":
            params.update(low_freq_factor=sc.low_freq_factor, high_freq_factor=sc.high_freq_factor,
                          original_max_position_embeddings=sc.original_max_position_embeddings)
    out = {"rope_parameters": params, "rope_theta": cfg.rope_theta}  # legacy key for transformers 4.x
    if params["rope_type"] != "default":
        out["rope_scaling"] = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return out


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> a Hugging Face config dict of its family. Raises ValueError when the family
    cannot express the config (checked by converting back and comparing)."""
    f, eos = cfg.family, cfg.eos_token_id
    h: dict[str, Any] = {"model_type": f, "architectures": [ARCHITECTURES[f]], "vocab_size": cfg.vocab_size,
                         "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
                         "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
                         "tie_word_embeddings": cfg.tie_embeddings, "dtype": cfg.param_dtype,
                         "initializer_range": cfg.init_std, "use_cache": True}
    if f == "gpt2":
        h.update(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
                 n_positions=cfg.max_position_embeddings, layer_norm_epsilon=cfg.norm_eps,
                 activation_function=_ACT_TO_HF[cfg.activation], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    else:
        h.update(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                 intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                 hidden_act=_ACT_TO_HF[cfg.activation], attention_dropout=0.0, **_rope_to_hf(cfg))
    if f == "gpt_neox":
        h.update(layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.parallel_residual, attention_bias=cfg.qkv_bias,
                 rotary_pct=cfg.rotary_fraction, rotary_emb_base=cfg.rope_theta, hidden_dropout=0.0)
    elif f != "gpt2":
        h.update(num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps)
    if f == "llama":
        h.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif f == "mistral":
        h.update(sliding_window=cfg.sliding_window)
    elif f in ("qwen2", "qwen3"):
        slides = cfg.layer_slides
        h.update(use_sliding_window=any(slides), sliding_window=cfg.sliding_window, max_window_layers=cfg.num_layers,
                 layer_types=["sliding_attention" if s else "full_attention" for s in slides])
        if f == "qwen3":
            h.update(attention_bias=cfg.qkv_bias)
    numerics = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat, scan_layers=cfg.scan_layers,
                    scan_min_layers=cfg.scan_min_layers, attention=cfg.attention, attention_layout=cfg.attention_layout,
                    init_std=cfg.init_std)  # ours only: never written to config.json
    back = config_from_hf(h, **numerics)
    cmp = dataclasses.replace(cfg, sliding_layers=cfg.layer_slides if cfg.sliding_window else None)
    back = dataclasses.replace(back, sliding_layers=back.layer_slides if back.sliding_window else None)
    diff = [k.name for k in dataclasses.fields(cfg) if getattr(cmp, k.name) != getattr(back, k.name)]
    if diff:
        raise ValueError(f"ModelConfig fields {diff} cannot be expressed as a Hugging Face {f!r} config "
                         f"(ours: {[getattr(cfg, k) for k in diff]}, {f}: {[getattr(back, k) for k in diff]})")
    return h


def load_config(model_dir, **overrides) -> ModelConfig:
    """ModelConfig from `model_dir/config.json` (overrides such as dtype / param_dtype / remat win)."""
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    return config_from_hf(json.loads(path.read_text()), **overrides)
