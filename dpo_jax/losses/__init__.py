"""Preference losses: the core (`core.py`: PairLogps, implicit rewards, DPO, gradient weights, the
registry, `Objective`), the variants (`variants.py`, one pure function each) and the losses of
ranked lists (`listwise.py`, registered in `LIST_LOSSES`).

Importing the package registers every variant in `LOSSES`, so its users see the core's names here:
  from dpo_jax import losses as L
  L.LOSSES["sigmoid"](L.PairLogps(...), L.params("sigmoid", beta=0.1))
"""

from dpo_jax.losses import variants  # noqa: F401  (registers every variant in core.LOSSES)
from dpo_jax.losses import beta_dpo  # noqa: F401  (registers beta_dpo, a loss with running statistics)
from dpo_jax.losses import listwise  # noqa: F401  (registers the list losses in core.LIST_LOSSES)
from dpo_jax.losses.core import (  # noqa: F401  (the package's API)
    BETA,
    LOSSES,
    SMOOTHING,
    HParam,
    LIST_LOSSES,
    HParams,
    LossSpec,
    Objective,
    PairLogps,
    dpo_loss,
    get,
    grad_weight,
    implicit_reward,
    masked_mean,
    names,
    params,
    register,
    reward_metrics,
)
