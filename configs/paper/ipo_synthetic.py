"""IPO vs DPO under deterministic preferences (Azar et al. 2023, "A General Theoretical Paradigm to
Understand Learning from Human Preferences", AISTATS 2024), in the synthetic Markov world.

The paper has no language-model experiment: its argument (Section 4.2) is that with deterministic or
near-deterministic preferences the Bradley-Terry reward gap is unbounded, so DPO drives
pi(y_l) -> 0 and ignores the KL regularization whatever beta, while IPO's squared loss regresses
the log-ratio margin to the finite target 1/(2 tau) and keeps pi close to pi_ref; its illustrative
examples (Section 5) show this on small bandits with deterministic preference datasets. Here
the same comparison runs in the built-in synthetic world (no model or dataset on the hub: a tiny
Llama trained from scratch, SFT on pi_ref's samples as the reference), with deterministic labels
(`synthetic.label='argmax'`: the higher-reward completion always wins), where KL(pi || pi_ref) and
the exact frontier are known:
  python -m dpo_jax.main --workdir=/tmp/ipo --config=configs/paper/ipo_synthetic.py:loss=ipo,beta=1
  python -m dpo_jax.main --workdir=/tmp/dpo --config=configs/paper/ipo_synthetic.py:loss=sigmoid,beta=1
Expected: as steps grow, the sigmoid run's sampled KL keeps growing past KL(pi*_beta), the IPO run's
settles. Arguments: `loss` (ipo | sigmoid | any registered loss), `beta` (tau for IPO), `steps`,
`runlocal` (seconds). Our `ipo` averages log-ratios per token as TRL does, so its target margin
1/(2 tau) is per token (T + 1 = 9 tokens here). Assumptions: the synthetic world and optimizer of
`configs/synthetic.py`; tau = beta = 1 and 2,000 steps (past convergence of the default run) are
our choices, not the paper's. The sweep (`get_sweep`) runs both losses over betas of matching
sequence margins (IPO's per-token target over 9 tokens: beta 0.5-4 ~ sigmoid beta 0.25-2), on one
shared SFT reference:
  python -m launch.sweep --config=configs/paper/ipo_synthetic.py --root=DIR
"""

from configs import synthetic
from configs.common import format_args, parse_args

ARGS = {"loss": "ipo", "beta": 1.0, "steps": 2000, "runlocal": False}  # those of configs/synthetic.py
SWEEP_BETAS = {"ipo": (0.5, 1.0, 2.0, 4.0), "sigmoid": (0.25, 0.5, 1.0, 2.0)}


def get_config(arg: str = ""):
    a = parse_args(arg, ARGS, "configs/paper/ipo_synthetic.py")
    c = synthetic.get_config(format_args(a))
    c.synthetic.label = "argmax"
    return c


def get_sweep(arg: str = ""):
    """IPO and sigmoid DPO on deterministic labels, each at the betas of SWEEP_BETAS."""
    from launch import sweep_plan  # pylint: disable=g-import-not-at-top  (training runs never import it)

    get_config(arg)  # the same argument errors as a run
    members = []
    for loss, betas in SWEEP_BETAS.items():
        members += sweep_plan.product(("loss.name", [loss]), ("loss.beta", list(betas)))
    return members
