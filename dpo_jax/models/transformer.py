"""A decoder-only transformer in Flax NNX: the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3),
GPT-2 and GPT-NeoX/Pythia, configured by one frozen `ModelConfig`.

Layer parameters are stacked on a leading `layers` axis and the blocks run under `jax.lax.scan`
(or an unrolled loop), each block a pure function of its arrays (`_block`). Attention follows the
rule of docs/design.md (`layers.attention_mask`) for the plain forward and for KV-cached decoding
alike: dense (`layers.masked_attention`, a [T, S] score buffer per layer), tiled
(`attention.tiled_attention`, the tiles up to the diagonal), blockwise
(`attention.blockwise_attention`, memory linear in T), an accelerator's fused kernel, or sharded
over the mesh's `context` axis, as `attend.layer_attention` chooses from `ModelConfig.attention`.
The pure layer math (attention rule, RoPE, norms, attention, projections) is in `layers.py`.

Every parameter carries logical axis names as NNX `out_sharding` metadata, created with
`eager_sharding=False` (this file knows no mesh; `nnx.get_partition_spec(nnx.state(model))` gives
them, sharding.py maps them to mesh axes). Shapes (L layers, V vocab, D width, H / K query / kv
heads, E head dim, F mlp width) and axes:
  embed [V, D] (vocab, embed); pos_embed [P, D] (None, embed); lm_head [D, V] (embed, vocab);
  final_norm(_bias) [D] (embed); layers/wq [L, D, H, E] (layers, embed, heads, kv);
  layers/wk, wv [L, D, K, E] (layers, embed, kv_heads, kv); layers/wo [L, H, E, D] (layers, heads, kv, embed);
  layers/w_gate, w_up [L, D, F] (layers, embed, mlp); layers/w_down [L, F, D] (layers, mlp, embed);
  layers/*norm* [L, D] (layers, embed); layers/q_norm, k_norm [L, E] (layers, kv); biases follow
  the output axes of their kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.models import context_parallel
from dpo_jax.models.attend import backend, layer_attention
from dpo_jax.models.attention import ATTENTIONS
from dpo_jax.models.fused_attention import LAYOUTS as ATTENTION_LAYOUTS
from dpo_jax.models.layers import (activation as _act, apply_rope, dense as _dense_2d, norm as _norm, rope_inv_freq,
                                   rope_sin_cos)

__all__ = ["ModelConfig", "RopeScaling", "Decoder", "init_cache", "num_params", "param_shapes", "layer_param_shapes",
           "FAMILIES", "LOGICAL_AXES", "REMAT_POLICIES", "ROPE_TYPES", "ACTIVATIONS", "DTYPES", "ATTENTIONS"]

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")
LOGICAL_AXES = ("layers", "vocab", "embed", "heads", "kv_heads", "kv", "mlp")
REMAT_POLICIES = ("none", "full", "dots", "dots_all")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF `rope_parameters`). `linear`: inv_freq / factor. `llama3`:
    wavelengths above original_max / low_freq_factor are divided by factor, below
    original_max / high_freq_factor kept, smoothly interpolated in between."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type must be one of {ROPE_TYPES}; got {self.rope_type!r}")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0; got {self.factor}")


def _dtype_name(field: str, value: Any) -> str:
    try:
        name = jnp.dtype(value).name
    except TypeError as e:
        raise ValueError(f"{field} must be one of {DTYPES}; got {value!r}") from e
    if name not in DTYPES:
        raise ValueError(f"{field} must be one of {DTYPES}; got {value!r}")
    return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a `Decoder`. Defaults describe a small Llama."""

    family: str = "llama"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_heads
    norm: str = "rms"  # rms | layer (with bias)
    norm_eps: float = 1e-6
    activation: str = "silu"  # silu | gelu (exact) | gelu_tanh (GPT-2's gelu_new)
    gated_mlp: bool = True  # act(x W_gate) * (x W_up) W_down, else act(x W_up + b) W_down + b
    position: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rotary_fraction: float = 1.0  # share of head_dim rotated (GPT-NeoX rotary_pct)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1 x) + mlp(ln2 x)
    sliding_window: int | None = None  # key j visible iff positions[i] - positions[j] < window
    sliding_layers: tuple[bool, ...] | None = None  # which layers slide; None: all (if window)
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots (save matmuls without batch dims) | dots_all
    scan_layers: bool = True  # lax.scan over the layer stack (when at least scan_min_layers deep)
    scan_min_layers: int = 9  # shallower stacks run unrolled: on CPU the scan's residual stacking costs
    # ~12% of a 4-layer train step (docs/performance.md); deep stacks are scanned for a flat compile time
    attention: str = "auto"  # dense | tiled | blockwise | auto (by row length, attention.resolve) | fused
    attention_layout: str = "standard"  # the rows' data layout: where attention='fused' may use a kernel (attend.py)
    attention_block: int = 0  # query and key block of blockwise attention, query tile of tiled; 0: attention.BLOCK

    @property
    def scanned(self) -> bool:
        """Whether the forward scans the layer stack (else unrolls it); the parameters are stacked
        [L, ...] either way."""
        return self.scan_layers and self.num_layers >= self.scan_min_layers

    def __post_init__(self):
        s = functools.partial(object.__setattr__, self)
        s("dtype", _dtype_name("dtype", self.dtype))
        s("param_dtype", _dtype_name("param_dtype", self.param_dtype))
        if self.head_dim is None:
            s("head_dim", self.hidden_size // max(self.num_heads, 1))
        if isinstance(self.eos_token_id, list):
            s("eos_token_id", tuple(self.eos_token_id))
        if self.sliding_layers is not None:
            s("sliding_layers", tuple(bool(b) for b in self.sliding_layers))
        choices = dict(family=FAMILIES, norm=("rms", "layer"), activation=ACTIVATIONS,
                       position=("rope", "learned"), remat=REMAT_POLICIES, attention=ATTENTIONS,
                       attention_layout=ATTENTION_LAYOUTS)
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"ModelConfig.{field} must be one of {allowed}; got {getattr(self, field)!r}")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"ModelConfig.{field} must be a positive integer; got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.position == "rope" and (self.rotary_dim % 2 or self.rotary_dim == 0):
            raise ValueError(f"ModelConfig.rotary_fraction * head_dim must be a positive even number; "
                             f"got {self.rotary_fraction} * {self.head_dim}")
        if not isinstance(self.attention_block, int) or self.attention_block < 0:
            raise ValueError(f"ModelConfig.attention_block must be an integer >= 0 (0: this platform's "
                             f"attention.BLOCK); got {self.attention_block!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be positive or None; got {self.sliding_window}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"ModelConfig.sliding_layers must have num_layers={self.num_layers} entries; "
                             f"got {len(self.sliding_layers)}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"ModelConfig.rope_scaling must be a RopeScaling or None; got {self.rope_scaling!r}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def layer_slides(self) -> tuple[bool, ...]:
        """Per layer: whether the sliding window applies."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        return self.sliding_layers if self.sliding_layers is not None else (True,) * self.num_layers


def _block(cfg: ModelConfig, x_BxTxD, p: dict, attend, sin, cos, kv_cache=None, cache_index=None):
    """One transformer block on arrays `p` (this layer's slice); `attend(q_BxTxHxE, k_BxSxKxE,
    v_BxSxKxE) -> o_BxTxHxE` is this layer's attention (dense or blockwise, with its mask).
    Returns (x, (k, v) or None)."""
    dt = x_BxTxD.dtype
    w = {k: v.astype(dt) for k, v in p.items()}
    _dense = functools.partial(_dense_2d, float32_product=backend() == "cpu")  # layers.dense
    bias = lambda name: w.get(name)  # noqa: E731
    add = lambda y, b: y if b is None else y + b  # noqa: E731

    def attention(h):
        q = add(_dense(h, w["wq"]), bias("bq"))
        k = add(_dense(h, w["wk"]), bias("bk"))
        v = add(_dense(h, w["wv"]), bias("bv"))
        if cfg.qk_norm:
            q = _norm(q, w["q_norm"], None, "rms", cfg.norm_eps)
            k = _norm(k, w["k_norm"], None, "rms", cfg.norm_eps)
        if sin is not None:
            q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        new_kv = None
        if kv_cache is not None:
            k_all, v_all = kv_cache
            k = jax.lax.dynamic_update_slice_in_dim(k_all, k.astype(k_all.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_all, v.astype(v_all.dtype), cache_index, axis=1)
            new_kv = (k, v)
            k, v = k.astype(dt), v.astype(dt)
        o = attend(q, k, v)
        return add(_dense(o, w["wo"], in_axes=2), bias("bo")), new_kv

    def mlp(h):
        up = add(_dense(h, w["w_up"]), bias("b_up"))
        if cfg.gated_mlp:
            gate = add(_dense(h, w["w_gate"]), bias("b_gate"))
            a = _act(gate, cfg.activation) * up
        else:
            a = _act(up, cfg.activation)
        return add(_dense(a, w["w_down"]), bias("b_down"))

    attn_out, new_kv = attention(_norm(x_BxTxD, w["attn_norm"], bias("attn_norm_bias"), cfg.norm, cfg.norm_eps))
    if cfg.parallel_residual:
        h = _norm(x_BxTxD, w["mlp_norm"], bias("mlp_norm_bias"), cfg.norm, cfg.norm_eps)
        return x_BxTxD + attn_out + mlp(h), new_kv
    x = x_BxTxD + attn_out
    return x + mlp(_norm(x, w["mlp_norm"], bias("mlp_norm_bias"), cfg.norm, cfg.norm_eps)), new_kv


def _remat(fn, policy: str, scanned: bool):
    """One layer `fn(x, xs_l)` under jax.checkpoint with `policy`. In the layer scan, the loop runs
    each layer's recomputation in its turn of the backward. Unrolled, XLA:CPU drops the
    optimization barriers that keep a recomputation apart from the forward, merges the two, and
    keeps every layer's activations: remat='full' held as much memory as 'none'
    (docs/performance.md). So an unrolled layer's backward adds 0 * (one entry of the incoming
    cotangent) to its residuals: exact when that entry is finite (else all of the layer's gradients
    turn non-finite, where some already were), and the recomputation now depends on the cotangent,
    so it can neither merge with the forward nor run before its turn."""
    if policy == "none":
        return fn
    policies = {
        "full": None,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "dots_all": jax.checkpoint_policies.checkpoint_dots,
    }
    checkpointed = jax.checkpoint(fn, policy=policies[policy], prevent_cse=not scanned)
    if scanned:
        return checkpointed

    @jax.custom_vjp
    def layer(x, xs_l):
        return checkpointed(x, xs_l)

    def layer_fwd(x, xs_l):
        return jax.vjp(checkpointed, x, xs_l)  # (outputs, the backward closed over the policy's residuals)

    def layer_bwd(backward, cotangents):
        g = jax.tree.leaves(cotangents)[0]
        zero = jnp.zeros((), jnp.float32) * g.reshape(-1)[0].astype(jnp.float32)  # 0, once the cotangent exists
        tie = lambda r: r + zero.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.floating) else r  # noqa: E731
        return jax.tree.map(tie, backward)(cotangents)

    layer.defvjp(layer_fwd, layer_bwd)
    return layer


# ----------------------------------------------------------------------------- parameters


def layer_param_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """Per-layer parameter name -> (shape without L, logical axes without `layers`)."""
    D, H, K, E, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    s = {
        "attn_norm": ((D,), ("embed",)),
        "wq": ((D, H, E), ("embed", "heads", "kv")),
        "wk": ((D, K, E), ("embed", "kv_heads", "kv")),
        "wv": ((D, K, E), ("embed", "kv_heads", "kv")),
        "wo": ((H, E, D), ("heads", "kv", "embed")),
        "mlp_norm": ((D,), ("embed",)),
        "w_up": ((D, F), ("embed", "mlp")),
        "w_down": ((F, D), ("mlp", "embed")),
    }
    if cfg.norm == "layer":
        s["attn_norm_bias"] = s["mlp_norm_bias"] = ((D,), ("embed",))
    if cfg.qkv_bias:
        s.update(bq=((H, E), ("heads", "kv")), bk=((K, E), ("kv_heads", "kv")), bv=((K, E), ("kv_heads", "kv")))
    if cfg.o_bias:
        s["bo"] = ((D,), ("embed",))
    if cfg.qk_norm:
        s["q_norm"] = s["k_norm"] = ((E,), ("kv",))
    if cfg.gated_mlp:
        s["w_gate"] = ((D, F), ("embed", "mlp"))
    if cfg.mlp_bias:
        s.update(b_up=((F,), ("mlp",)), b_down=((D,), ("embed",)))
        if cfg.gated_mlp:
            s["b_gate"] = ((F,), ("mlp",))
    return s


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """Every parameter: path ("embed", "layers/wq", ...) -> (shape, logical axes)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    out = {"embed": ((V, D), ("vocab", "embed")), "final_norm": ((D,), ("embed",))}
    if cfg.position == "learned":
        out["pos_embed"] = ((cfg.max_position_embeddings, D), (None, "embed"))
    if cfg.norm == "layer":
        out["final_norm_bias"] = ((D,), ("embed",))
    if not cfg.tie_embeddings:
        out["lm_head"] = ((D, V), ("embed", "vocab"))
    for name, (shape, axes) in layer_param_shapes(cfg).items():
        out[f"layers/{name}"] = ((cfg.num_layers, *shape), ("layers", *axes))
    return out


def _init_kind(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    if name.endswith("norm"):
        return "ones"
    return "zeros" if name.startswith("b") or name.endswith("_bias") else "normal"


@functools.partial(jax.jit, static_argnames=("shapes", "dtype"))
def _init_values(key, std, shapes, dtype):
    """Norm scales 1, biases 0, weights N(0, std^2): all weights are slices of ONE normal draw, so
    initialization compiles one RNG kernel instead of one per shape (seconds per model on CPU); the
    transient flat vector costs one extra copy of the weights."""
    normal = [(p, s) for p, s in shapes if _init_kind(p) == "normal"]
    sizes = [math.prod(s) for _, s in normal]
    flat = std * jax.random.normal(key, (sum(sizes),), jnp.float32)
    parts = jnp.split(flat, np.cumsum(sizes)[:-1].tolist()) if normal else []
    out = {p: x.reshape(s).astype(dtype) for (p, s), x in zip(normal, parts)}
    for p, s in shapes:
        if p not in out:
            out[p] = (jnp.ones if _init_kind(p) == "ones" else jnp.zeros)(s, dtype)
    return out


def _param(value, names):
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class LayerStack(nnx.Module):
    """All blocks' parameters, each stacked on a leading `layers` axis of size L (set by Decoder)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """An empty KV cache: keys/values [L, B, S, K, E] plus the positions, segment and branch ids of
    the cached keys [B, S] (segment 0 = empty slot, never attended)."""
    dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
    kv = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    ids = jnp.zeros((batch, max_len), jnp.int32)
    return {"k_LxBxSxKxE": jnp.zeros(kv, dtype), "v_LxBxSxKxE": jnp.zeros(kv, dtype),
            "positions_BxS": ids, "segment_ids_BxS": ids, "branch_ids_BxS": ids}


class Decoder(nnx.Module):
    """Tokens -> final-normed hidden states; `logits` / `unembedding` for the output layer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        specs = param_shapes(cfg)
        values = _init_values(rngs.params(), jnp.float32(cfg.init_std),
                              tuple((p, shape) for p, (shape, _) in specs.items()), cfg.param_dtype)
        self.layers = LayerStack(tuple(sorted(p[len("layers/"):] for p in specs if p.startswith("layers/"))))
        for path, (_, axes) in specs.items():
            owner, name = (self.layers, path[len("layers/"):]) if path.startswith("layers/") else (self, path)
            setattr(owner, name, _param(values[path], axes))

    def unembedding(self):
        """(W_DxV, bias_V or None): the lm_head, or the transposed tied embedding, in the compute dtype
        as every layer's weights are (bfloat16 compute over float32 master weights runs the log-probs'
        matmuls in bfloat16, accumulated in float32; the gradient reaches the weights in their dtype)."""
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return w.astype(self.cfg.dtype), None

    def logits(self, hidden_BxTxD):
        """hidden @ W_DxV in the compute dtype, accumulated and returned in float32."""
        w, b = self.unembedding()
        dt = jnp.dtype(self.cfg.dtype)
        out = jnp.einsum("btd,dv->btv", hidden_BxTxD.astype(dt), w, preferred_element_type=jnp.float32)
        return out if b is None else out + b.astype(jnp.float32)

    def __call__(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None, branch_ids_BxT=None,
                 cache=None, cache_index=None, scan: bool | None = None):
        """hidden_BxTxD (compute dtype). With `cache` (see `init_cache`), the T tokens' keys and values
        are written at slots [cache_index, cache_index + T), queries attend over the whole cache under
        the same rule, and (hidden_BxTxD, new_cache) is returned. Defaults: positions = arange
        (+ cache_index), segment ids 1, branch ids 0. `scan` overrides `cfg.scanned` (the same
        values): a forward that is never differentiated (the reference's) scans at no cost."""
        cfg = self.cfg
        scanned = cfg.scanned if scan is None else bool(scan)
        dt = jnp.dtype(cfg.dtype)
        B, T = tokens_BxT.shape
        if cache is not None and cache_index is None:
            raise ValueError("cache_index is required when cache is given (the first slot to write)")
        if positions_BxT is None:
            start = 0 if cache is None else cache_index
            positions_BxT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones((B, T), jnp.int32)
        if branch_ids_BxT is None:
            branch_ids_BxT = jnp.zeros((B, T), jnp.int32)
        for name, arr in (("positions_BxT", positions_BxT), ("segment_ids_BxT", segment_ids_BxT),
                          ("branch_ids_BxT", branch_ids_BxT)):
            if arr.shape != (B, T):
                raise ValueError(f"{name} must have the shape of tokens_BxT {(B, T)}; got {arr.shape}")

        x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dt)
        if cfg.position == "learned":
            x = x + jnp.take(self.pos_embed[...], positions_BxT, axis=0).astype(dt)
            sin = cos = None
        else:
            sin, cos = rope_sin_cos(positions_BxT, rope_inv_freq(cfg), materialize=backend() == "cpu")

        if cache is None:
            k_seg, k_pos, k_br = segment_ids_BxT, positions_BxT, branch_ids_BxT
        else:
            put = lambda old, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                old, new.astype(old.dtype), cache_index, axis=1)
            k_seg = put(cache["segment_ids_BxS"], segment_ids_BxT)
            k_pos = put(cache["positions_BxS"], positions_BxT)
            k_br = put(cache["branch_ids_BxS"], branch_ids_BxT)
        attend = layer_attention(cfg, T, (segment_ids_BxT, positions_BxT, branch_ids_BxT), (k_seg, k_pos, k_br),
                                  cached=cache is not None)
        if cache is None:
            x = context_parallel.constrain(x)

        params = self.layers.arrays()
        xs = {"p": params, "slides": jnp.asarray(cfg.layer_slides)}
        if cache is not None:
            xs["kv"] = (cache["k_LxBxSxKxE"], cache["v_LxBxSxKxE"])

        def layer(x, xs_l):
            x = x if cache is not None else context_parallel.constrain(x)
            return _block(cfg, x, xs_l["p"], functools.partial(attend, xs_l["slides"]), sin, cos, xs_l.get("kv"),
                          cache_index)

        if cache is None:
            layer = _remat(layer, cfg.remat, scanned)
        if scanned:
            x, new_kv = jax.lax.scan(layer, x, xs)
        else:
            outs = []
            for i in range(cfg.num_layers):
                x, kv_i = layer(x, jax.tree.map(lambda a: a[i], xs))
                outs.append(kv_i)
            new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

        fb = self.final_norm_bias[...] if cfg.norm == "layer" else None
        hidden = _norm(x, self.final_norm[...], fb, cfg.norm, cfg.norm_eps)
        if cache is None:
            return hidden
        new_cache = {"k_LxBxSxKxE": new_kv[0], "v_LxBxSxKxE": new_kv[1], "positions_BxS": k_pos,
                     "segment_ids_BxS": k_seg, "branch_ids_BxS": k_br}
        return hidden, new_cache


def num_params(model: nnx.Module) -> int:
    """Number of scalar parameters (nnx.Param leaves)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
