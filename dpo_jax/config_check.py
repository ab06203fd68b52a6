"""Validation of a run's config before anything is built or compiled.

Every error names the config key and what is allowed, e.g.
  ValueError: config.loss.name='sigmod': unknown loss; allowed: alpha_divergence, aot, ...
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from jax.sharding import AbstractMesh

from dpo_jax import build, losses, sharding
from dpo_jax.data import formats, layouts, pipeline, tokenize
from dpo_jax.data.tokenize import TRUNCATION_MODES
from dpo_jax.models import hf_config, transformer
from dpo_jax.models.transformer import FAMILIES, REMAT_POLICIES
from dpo_jax.train import optim
from dpo_jax.train.step import check_ref_mode

FORMATS = ("auto",) + formats.FORMATS  # auto: detected from the columns of the first row
# Training dtypes: what the model computes in, less float16 (no loss scaling here: its gradients underflow).
DTYPES = tuple(d for d in transformer.DTYPES if d != "float16")
NONFINITE = ("stop", "skip")
# The tokenizer's vocabulary size is only known once it is loaded; no architecture rule depends on it.
_PLACEHOLDER_VOCAB = 1


def _choice(key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"config.{key}={value!r}; allowed: {', '.join(map(str, allowed))}")


def _positive(key: str, value, zero_ok: bool = False) -> None:
    if value is None or (value < 0 if zero_ok else value <= 0):
        raise ValueError(f"config.{key}={value!r}; must be {'>= 0' if zero_ok else '> 0'}")


def objective(config) -> losses.Objective:
    """The loss of `config.loss` (validated) as an Objective."""
    names = build.loss_names(config)
    for n in names:
        if n not in losses.names():
            raise ValueError(f"config.loss.name={config.loss.name!r}: unknown loss {n!r}; allowed: "
                             f"{', '.join(losses.names())} (several joined by '+')")
    # `ld_alpha` is the own hyper-parameter of a loss that has one (ld_dpo); otherwise it applies
    # LD-DPO's length weighting to every term (TRL's `ld_alpha`).
    own_ld = any("ld_alpha" in losses.get(n).hparams for n in names)
    try:
        return losses.Objective(names, ld=config.loss.ld_alpha is not None and not own_ld)
    except ValueError as e:
        raise ValueError(f"config.loss.name={config.loss.name!r}: {e}"
                         + (" (unset config.loss.ld_alpha)" if config.loss.ld_alpha is not None else "")) from None


def loss_hparams(config) -> dict:
    """Validated, traced-ready hyper-parameters of `config.loss`; `beta` always present (metrics).

    A hyper-parameter set in `config.loss` that none of the named losses has is an error (it would
    be silently ignored), except `beta`, which the reward metrics use."""
    obj = objective(config)
    known = set().union(*(s.hparams for s in obj.specs))
    all_hparams = set().union(*(s.hparams for s in losses.LOSSES.values()))
    for k in sorted(all_hparams - known - {"beta", "ld_alpha"}):
        if k in config.loss and config.loss[k] is not None:
            having = sorted(n for n, s in losses.LOSSES.items() if k in s.hparams)
            raise ValueError(f"config.loss.{k}={config.loss[k]!r} is not a hyper-parameter of "
                             f"config.loss.name={config.loss.name!r} (its hyper-parameters: "
                             f"{', '.join(sorted(known)) or 'none'}); unset it, or use a loss that has it: "
                             f"{', '.join(having)}")
    given = {k: config.loss[k] for k in known if k in config.loss and config.loss[k] is not None}
    ld = {"ld_alpha": config.loss.ld_alpha} if obj.ld else {}
    own_ld = given.pop("ld_alpha", None)  # ld_dpo's own; Objective.params reads `ld_alpha` as the LD weighting
    try:
        hp = obj.params(weights=config.loss.weights, **ld, **given)
        for spec in obj.specs:
            if own_ld is not None and "ld_alpha" in spec.hparams:
                hp["ld_alpha"] = losses.params(spec.name, ld_alpha=own_ld)["ld_alpha"]
    except ValueError as e:
        raise ValueError(f"config.loss: {e}") from None
    hp.setdefault("beta", np.float32(config.loss.beta))
    return hp


def validate(config) -> None:
    """Raise ValueError naming the first invalid key or combination. Needs no devices: the rules
    that depend on them are `check_devices`."""
    obj = objective(config)
    loss_hparams(config)
    check_ref_mode(config.reference.mode, obj, has_lora=config.model.lora.rank > 0, key="config.",
                   loss_name=config.loss.name)
    if config.model.lora.rank > 0 and config.reference.mode == "sync":
        raise ValueError("config.reference.mode='sync' updates the reference towards the policy; with a LoRA "
                         "policy (config.model.lora.rank > 0) use 'base', 'frozen' or 'precomputed'")
    if config.reference.mode == "sync":
        if not 0.0 < config.reference.sync_alpha <= 1.0:
            raise ValueError(f"config.reference.sync_alpha={config.reference.sync_alpha}; must be in (0, 1]")
        _positive("reference.sync_every", config.reference.sync_every)
    _choice("model.dtype", config.model.dtype, DTYPES)
    _choice("model.param_dtype", config.model.param_dtype, DTYPES)
    _choice("model.remat", config.model.remat, REMAT_POLICIES)
    _choice("model.attention", config.model.attention, transformer.ATTENTIONS)
    _positive("model.scan_min_layers", config.model.scan_min_layers, zero_ok=True)
    _positive("model.attention_block", config.model.attention_block, zero_ok=True)
    _choice("data.layout", config.data.layout, layouts.LAYOUTS)  # before the model, which reads it
    if not config.model.path:
        _choice("model.arch.family", config.model.arch.family, FAMILIES)
        check_arch(config)
    _choice("data.truncation_mode", config.data.truncation_mode, TRUNCATION_MODES)
    _choice("data.format", config.data.format, FORMATS)
    _positive("data.batch_size", config.data.batch_size)
    _positive("data.eval_batch_size", config.data.eval_batch_size)
    _positive("data.max_length", config.data.max_length)
    if not 0.0 <= config.data.prefix_min_saving < 1.0:
        raise ValueError(f"config.data.prefix_min_saving={config.data.prefix_min_saving}; must be in [0, 1)")
    pipeline.check_eval_split(config.data.eval_split, config.data.eval_fraction, config.data.eval_source,
                              key="config.data")
    if not config.data.source:
        raise ValueError("config.data.source is empty: 'synthetic', a local file, a saved dataset or a hub id")
    if config.synthetic.mask_logits and config.data.source != "synthetic":
        raise ValueError(f"config.synthetic.mask_logits=True masks to the synthetic world's tokens; "
                         f"config.data.source={config.data.source!r} is not the synthetic world")
    if config.data.source != "synthetic" and not (config.model.path or config.model.tokenizer):
        raise ValueError("config.model.tokenizer (or config.model.path) is needed to tokenize "
                         f"config.data.source={config.data.source!r}")
    check_lengths(config.data)
    check_format_for_losses(config.data.format, obj)
    if obj.batch_kind == "lists":
        if not isinstance(config.data.list_size, int) or config.data.list_size < 2:
            raise ValueError(f"config.data.list_size={config.data.list_size!r}: the responses per ranked list "
                             "(an int >= 2)")
        if config.online.rounds:
            raise ValueError(f"config.online.rounds={config.online.rounds}: online rounds label pairs; "
                             f"config.loss.name={config.loss.name!r} trains on ranked lists")
    optim.check(config.optim, key="config.optim")
    optim.check_lr(config.sft.lr, key="config.sft.lr")
    _positive("sft.batch_size", config.sft.batch_size)
    _positive("train.steps", config.train.steps, zero_ok=True)
    _positive("train.log_every", config.train.log_every)
    sharding.check_rules(config.mesh.rules)
    _positive("distributed.heartbeat_timeout_s", config.distributed.heartbeat_timeout_s)
    _positive("distributed.initialization_timeout_s", config.distributed.initialization_timeout_s)
    _choice("train.on_nonfinite", config.train.on_nonfinite, NONFINITE)
    _positive("logprobs.chunk_size", config.logprobs.chunk_size)
    _positive("logprobs.vocab_chunk_size", config.logprobs.vocab_chunk_size)
    for key in ("train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "train.max_skipped_steps",
                "sft.steps", "sft.warmup_steps"):
        section, name = key.split(".")
        _positive(key, config[section][name], zero_ok=True)
    if config.train.peak_flops < 0:
        raise ValueError(f"config.train.peak_flops={config.train.peak_flops!r}; must be >= 0")


def check_arch(config) -> None:
    """The random-init architecture `config.model.arch`: the rules of `ModelConfig` (via
    `build.model_config`), head_dim=0 (hidden_size // num_heads) only where that divides, and a
    model its Hugging Face family can express (the SFT model and the final policy are exported)."""
    a = config.model.arch
    try:
        cfg = build.model_config(config, _PLACEHOLDER_VOCAB)
    except ValueError as e:
        raise ValueError(str(e).replace("ModelConfig.", "config.model.arch.")) from None
    if not a.head_dim and a.hidden_size % a.num_heads:
        raise ValueError(f"config.model.arch.hidden_size={a.hidden_size} is not a multiple of "
                         f"config.model.arch.num_heads={a.num_heads} (head_dim=0 means hidden_size // num_heads); "
                         "change one of them or set config.model.arch.head_dim")
    try:
        hf_config.config_to_hf(cfg)
    except ValueError as e:
        raise ValueError(f"config.model.arch (family={a.family!r}): {e}") from None


def check_lengths(data) -> None:
    """`config.data.max_length` and `max_prompt_length`: the tokenizer's bounds (`PairTokenizer`:
    max_length >= 2, one prompt and one completion token; the EOS appended to a completion is cut
    like any completion token when the sequence is full, so it adds nothing), and a prompt limit
    below max_length, which leaves room for a completion (a prompt that fills max_length drops the
    row under keep_start and is cut shorter anyway under keep_end)."""
    try:  # the tokenizer's own argument checks; no tokenizer is needed for them
        tokenize.PairTokenizer(None, max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                               truncation_mode=data.truncation_mode)
    except ValueError as e:
        raise ValueError(f"config.data.{e}") from None
    if data.max_prompt_length is not None and data.max_prompt_length >= data.max_length:
        raise ValueError(f"config.data.max_prompt_length={data.max_prompt_length} leaves no room for a completion "
                         f"in config.data.max_length={data.max_length}; must be < max_length")


def check_format_for_losses(format_name: str, objective: losses.Objective, where: str = "config.data.format") -> None:
    """Unpaired rows (format 'unpaired': prompt, completion, label) train only losses of one completion
    (`LossSpec.needs_pairs` False); a loss that compares a pair's two completions is an error. Listwise
    rows (format 'listwise') train exactly the losses of ranked lists (`losses.LIST_LOSSES`), and those
    losses train on nothing else. `where` names the format's origin in the message: the config key, or
    the data source whose format 'auto' detected."""
    name = "+".join(objective.names)
    list_losses = ", ".join(sorted(losses.LIST_LOSSES))
    if format_name == "listwise" and objective.batch_kind != "lists":
        raise ValueError(f"{where}={format_name!r}: ranked lists train the losses of lists ({list_losses}), "
                         f"not config.loss.name={name!r}")
    if objective.batch_kind == "lists" and format_name not in ("listwise", "auto"):
        raise ValueError(f"{where}={format_name!r}: config.loss.name={name!r} trains on ranked lists (K scored "
                         "responses per prompt: format 'listwise', see dpo_jax/data/listwise.py)")
    if format_name != "unpaired":
        return
    paired = objective.paired_names
    if paired:
        raise ValueError(f"{where}={format_name!r}: rows of one completion cannot train "
                         f"config.loss.name={name!r} ({', '.join(paired)} compares chosen and "
                         f"rejected completions); losses for unpaired rows: "
                         f"{', '.join(sorted({s.name for s in losses.LOSSES.values() if not s.needs_pairs}))}")


def check_devices(config, num_devices: int, num_processes: int = 1) -> None:
    """The rules that depend on the machine: `config.mesh.shape` fits `num_devices` (resolved as
    `sharding.make_mesh` does), and every batch splits evenly over the mesh axes that shard it
    (`sharding.BATCH_AXES`) and over the processes. `grad_accum` does not split a batch (each
    micro-step takes a whole `data.batch_size` batch). Asking JAX for the devices starts its backend,
    so call it in the process that trains, after `jax.distributed` starts:
      check_devices(config, jax.device_count(), jax.process_count())"""
    try:
        sizes = sharding.mesh_shape(config.mesh.shape, num_devices)
    except ValueError as e:
        raise ValueError(f"config.{e}") from None
    mesh = AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
    batches = {"data.batch_size": config.data.batch_size, "data.eval_batch_size": config.data.eval_batch_size}
    if config.sft.steps > 0:
        batches["sft.batch_size"] = config.sft.batch_size
    for key, n in batches.items():
        sharding.check_batch_divisible(n, mesh, key=f"config.{key}={n}")
        if n % num_processes:
            raise ValueError(f"config.{key}={n} cannot be split over {num_processes} processes; "
                             f"choose a multiple of {num_processes}")
    check_context_lengths(config.data, sizes[sharding.CONTEXT_AXIS])


def check_context_lengths(data, shards: int) -> None:
    """With `shards` context devices every row length must split evenly over them: data.max_length,
    data.min_bucket (the power-of-two buckets double it), data.buckets and data.pack_length."""
    if shards == 1:
        return
    lengths = {"data.max_length": data.max_length, "data.min_bucket": data.min_bucket}
    lengths.update({f"data.buckets[{i}]": b for i, b in enumerate(data.get("buckets", ()) or ())})
    if data.get("pack_length"):
        lengths["data.pack_length"] = data.pack_length
    for key, n in lengths.items():
        if n % shards:
            raise ValueError(f"config.{key}={n} cannot be split over config.mesh.shape.context={shards} devices; "
                             f"choose a multiple of {shards}")
