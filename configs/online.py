"""Online (iterative) DPO on the synthetic world of configs/synthetic.py (dpo_jax/online.py).

The SFT reference pi_0 as in configs/synthetic.py, then `rounds` rounds: `pairs` prompts of the
world's train file, two samples each from the current policy, labelled by the true reward through
Bradley-Terry, and `steps` sigmoid DPO steps on those pairs (a fresh optimizer per round):
  python -m dpo_jax.main --config=configs/online.py --workdir=/tmp/dpo_online
The default spends the labelled pairs and steps of the offline default (20k pairs, 600 steps of
64 pairs): 4 rounds of 5,000 pairs and 150 steps. Arguments (`configs/online.py:key=value,...`):
`beta` (1.0), `rounds` (4), `pairs` (pairs per round, 5000), `steps` (preference steps per round,
150), `samples` (K completions per prompt, 2), `reference` ('fixed' | 'last_round'), `runlocal`
(`runlocal=1`: 2 rounds of 64 pairs, a smoke run well under a minute).
"""

from configs import synthetic
from configs.common import parse_args

CONFIG = "configs/online.py"
ARGS = {"beta": 1.0, "rounds": 4, "pairs": 5000, "steps": 150, "samples": 2, "reference": "fixed",
        "runlocal": False}


def get_config(arg: str = ""):
    a = parse_args(arg, ARGS, CONFIG)
    c = synthetic.get_config(f"beta={a['beta']},runlocal={int(a['runlocal'])}")
    rounds, pairs, steps = a["rounds"], a["pairs"], a["steps"]
    if a["runlocal"]:
        given = parse_args(arg, {k: type(v) for k, v in ARGS.items()}, CONFIG)
        rounds, pairs, steps = given.get("rounds", 2), given.get("pairs", 64), given.get("steps", 4)
        c.train.update(log_every=2, checkpoint_every=0)
    c.synthetic.n_pairs = rounds * pairs  # the prompts of every round: the same rows an offline run pairs
    c.train.steps = steps                 # per round
    c.online.update(rounds=rounds, prompts_per_round=pairs, samples_per_prompt=a["samples"],
                    reference=a["reference"])
    return c
