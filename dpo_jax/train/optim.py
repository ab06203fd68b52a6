"""Optimizers and learning-rate schedules from config (optax).

lr(t) = peak * t / warmup for t < warmup, then constant, linear decay to `end_lr_frac * peak`, or
cosine decay to `end_lr_frac * peak` over the remaining steps. Gradient clipping by global norm,
then AdamW / RMSprop (as in the DPO paper) / SGD; gradient accumulation over k micro-batches with
`optax.MultiSteps` (the schedule counts optimizer updates).
"""

from __future__ import annotations

import optax

OPTIMIZERS = ("adamw", "rmsprop", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


def schedule(peak_lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "constant",
             end_lr_frac: float = 0.0) -> optax.Schedule:
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule={kind!r}; allowed: {list(SCHEDULES)}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError("optim.warmup_steps and train.steps must be >= 0")
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
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.name!r}; allowed: {list(OPTIMIZERS)}")
    if cfg.lr <= 0:
        raise ValueError(f"optim.lr={cfg.lr} must be > 0")
    if cfg.grad_accum < 1:
        raise ValueError(f"optim.grad_accum={cfg.grad_accum} must be >= 1")
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
