"""Hugging Face checkpoints and datasets.

  python -m dpo_jax.main --workdir=/tmp/run \
    --config=configs/hf.py:policy=PATH_OR_HUB_ID,reference=PATH_OR_HUB_ID,data=FILE_OR_HUB_ID
Arguments: `policy` (required), `reference` (default: a frozen copy of the initial policy),
`data` (required: a local json/jsonl/parquet/csv/arrow file, a `save_to_disk` directory or a hub
id), `eval` (a separate eval file; default: 5% of `data`), `tokenizer` (default: the policy's),
`loss` (sigmoid), `beta` (0.1), `steps` (1000), `batch` (8); see `configs/common.py`.
"""

from configs import base
from configs.common import parse_args

CONFIG = "configs/hf.py"
ARGS = {"policy": str, "data": str, "reference": "", "eval": "", "tokenizer": "", "loss": "sigmoid", "beta": 0.1,
        "steps": 1000, "batch": 8}


def get_config(arg: str = ""):
    a = parse_args(arg, ARGS, CONFIG)
    if "policy" not in a or "data" not in a:
        raise ValueError("configs/hf.py needs at least 'policy=DIR,data=FILE' (and optionally reference=DIR, "
                         f"eval=FILE, tokenizer=DIR, loss=NAME, beta=FLOAT, steps=INT, batch=INT); got {arg!r}")
    c = base.get_config()
    c.model.update(path=a["policy"], tokenizer=a["tokenizer"])
    c.reference.update(mode="frozen", path=a["reference"])
    c.data.update(source=a["data"], eval_source=a["eval"], eval_fraction=0.0 if a["eval"] else 0.05,
                  batch_size=a["batch"])
    c.loss.update(name=a["loss"], beta=a["beta"])
    c.optim.update(name="adamw", lr=5e-7, warmup_steps=10, schedule="linear")
    c.train.update(steps=a["steps"], log_every=10, eval_every=200, checkpoint_every=500)
    return c


SWEEP_BETAS = (0.01, 0.05, 0.1, 0.5)  # the usual range for sigmoid DPO on pretrained LMs (TRL's default 0.1)


def get_sweep(arg: str = ""):
    """`python -m launch.sweep --config=configs/hf.py:policy=...,data=... --root=DIR`: the loss of
    `arg` (default sigmoid) at the betas of SWEEP_BETAS; every member starts from the same policy."""
    from launch import sweep_plan  # pylint: disable=g-import-not-at-top  (training runs never import it)

    get_config(arg)  # the same argument errors as a run
    return sweep_plan.product(("loss.beta", list(SWEEP_BETAS)))
