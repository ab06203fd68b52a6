"""Optimizers and learning-rate schedules from config (optax).

lr(t) = peak * t / warmup for t < warmup, then constant, linear decay to `end_lr_frac * peak`, or
cosine decay to `end_lr_frac * peak` over the remaining steps. Gradient clipping by global norm,
then AdamW / RMSprop (as in the DPO paper) / SGD; gradient accumulation over k micro-batches with
`optax.MultiSteps` (the schedule counts optimizer updates).
"""

from __future__ import annotations

import math

import optax

OPTIMIZERS = ("adamw", "rmsprop", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}; allowed: {', '.join(allowed)}")


def _positive(key: str, value, zero_ok: bool = False) -> None:
    if value is None or (value < 0 if zero_ok else value <= 0):
        raise ValueError(f"{key}={value!r}; must be {'>= 0' if zero_ok else '> 0'}")


def check(cfg, key: str = "optim") -> None:
    """The rules of an `optim` config (name, schedule, lr, grad_accum, warmup_steps); messages name
    the field as `key.field` (`config_check` passes 'config.optim')."""
    _choice(f"{key}.name", cfg.name, OPTIMIZERS)
    _choice(f"{key}.schedule", cfg.schedule, SCHEDULES)
    check_lr(cfg.lr, key=f"{key}.lr")
    _positive(f"{key}.grad_accum", cfg.grad_accum)
    _positive(f"{key}.warmup_steps", cfg.warmup_steps, zero_ok=True)


def check_lr(lr, key: str = "optim.lr") -> None:
    """A peak learning rate: finite and > 0 (a nan or inf one makes every update non-finite); the
    message names `key` (`config_check` passes 'config.optim.lr' and 'config.sft.lr')."""
    if lr is None or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{key}={lr!r}; must be finite and > 0")


def schedule(peak_lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "constant",
             end_lr_frac: float = 0.0) -> optax.Schedule:
    _choice("optim.schedule", kind, SCHEDULES)
    _positive("optim.warmup_steps", warmup_steps, zero_ok=True)
    _positive("train.steps", total_steps, zero_ok=True)
    decay_steps = max(total_steps - warmup_steps, 1)
    end = peak_lr * end_lr_frac
    after = {"constant": optax.constant_schedule(peak_lr),
             "linear": optax.linear_schedule(peak_lr, end, decay_steps),
             "cosine": optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=end_lr_frac)}[kind]
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup_steps), after], [warmup_steps])


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, lr_schedule) from an `optim` config (name, lr, warmup_steps, schedule, end_lr_frac,
    weight_decay, b1, b2, eps, momentum, clip_norm, grad_accum)."""
    check(cfg)
    lr = schedule(cfg.lr, total_steps, cfg.warmup_steps, cfg.schedule, cfg.end_lr_frac)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "rmsprop":
        opt = optax.rmsprop(lr, decay=cfg.b2, eps=cfg.eps, momentum=cfg.momentum or None)
    else:
        opt = optax.sgd(lr, momentum=cfg.momentum or None)
    parts = ([optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm and cfg.clip_norm > 0 else []) + [opt]
    tx = optax.chain(*parts)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx, lr
