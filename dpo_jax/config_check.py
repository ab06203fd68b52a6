"""Validation of a run's config before anything is built or compiled.

Every error names the config key and what is allowed, e.g.
  ValueError: config.loss.name='sigmod': unknown loss; allowed: alpha_divergence, aot, ...
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from dpo_jax import losses, sharding
from dpo_jax.data import formats, layouts, pipeline
from dpo_jax.data.tokenize import TRUNCATION_MODES
from dpo_jax.models import transformer
from dpo_jax.models.transformer import FAMILIES, REMAT_POLICIES
from dpo_jax.train import optim
from dpo_jax.train.step import check_ref_mode

FORMATS = ("auto",) + formats.FORMATS  # auto: detected from the columns of the first row
# Training dtypes: what the model computes in, less float16 (no loss scaling here: its gradients underflow).
DTYPES = tuple(d for d in transformer.DTYPES if d != "float16")
NONFINITE = ("stop", "skip")


def _choice(key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"config.{key}={value!r}; allowed: {', '.join(map(str, allowed))}")


def _positive(key: str, value, zero_ok: bool = False) -> None:
    if value is None or (value < 0 if zero_ok else value <= 0):
        raise ValueError(f"config.{key}={value!r}; must be {'>= 0' if zero_ok else '> 0'}")


def objective(config) -> losses.Objective:
    """The loss of `config.loss` (validated) as an Objective."""
    names = tuple(n.strip() for n in str(config.loss.name).split("+") if n.strip())
    for n in names:
        if n not in losses.LOSSES:
            raise ValueError(f"config.loss.name={config.loss.name!r}: unknown loss {n!r}; allowed: "
                             f"{', '.join(sorted(losses.LOSSES))} (several joined by '+')")
    # `ld_alpha` is the own hyper-parameter of a loss that has one (ld_dpo); otherwise it applies
    # LD-DPO's length weighting to every term (TRL's `ld_alpha`).
    own_ld = any("ld_alpha" in losses.get(n).hparams for n in names)
    return losses.Objective(names, ld=config.loss.ld_alpha is not None and not own_ld)


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
    """Raise ValueError naming the first invalid key or combination."""
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
    _positive("model.scan_min_layers", config.model.scan_min_layers, zero_ok=True)
    if not config.model.path:
        _choice("model.arch.family", config.model.arch.family, FAMILIES)
    _choice("data.layout", config.data.layout, layouts.LAYOUTS)
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
    if config.data.source != "synthetic" and not (config.model.path or config.model.tokenizer):
        raise ValueError("config.model.tokenizer (or config.model.path) is needed to tokenize "
                         f"config.data.source={config.data.source!r}")
    optim.check(config.optim, key="config.optim")
    _positive("train.steps", config.train.steps, zero_ok=True)
    _positive("train.log_every", config.train.log_every)
    sharding.check_rules(config.mesh.rules)
    _positive("distributed.heartbeat_timeout_s", config.distributed.heartbeat_timeout_s)
    _positive("distributed.initialization_timeout_s", config.distributed.initialization_timeout_s)
    _choice("train.on_nonfinite", config.train.on_nonfinite, NONFINITE)
    _positive("logprobs.chunk_size", config.logprobs.chunk_size)
    _positive("logprobs.vocab_chunk_size", config.logprobs.vocab_chunk_size)
    if config.logprobs.capacity > 0 and config.data.logit_slots:
        raise ValueError(f"config.logprobs.capacity={config.logprobs.capacity} and config.data.logit_slots=True "
                         "both choose where logits are computed; set one (logprobs.capacity=0 or "
                         "data.logit_slots=False)")
    for key in ("eval_every", "checkpoint_every", "logprobs.capacity", "sft.steps"):
        section, _, name = key.rpartition(".")
        value = config[section or "train"][name]
        _positive(f"{section or 'train'}.{name}", value, zero_ok=True)
    if config.train.peak_flops < 0:
        raise ValueError("config.train.peak_flops must be >= 0")
