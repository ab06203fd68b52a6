"""Mistral-ORPO-beta (Hong, Lee and Thorne 2024, "ORPO: Monolithic Preference Optimization without
Reference Model", EMNLP 2024): the Mistral-ORPO-beta model of the AlpacaEval 2.0 and MT-Bench
results (released as `kaist-ai/mistral-orpo-beta`). Trained from the base model
`mistralai/Mistral-7B-v0.1` with no SFT stage and no reference, on
`argilla/ultrafeedback-binarized-preferences-cleaned` (one `train` split; `prompt` a string,
`chosen`/`rejected` message lists with the user turn).
  L = NLL(y_w) - lambda log sigmoid(log odds(y_w) - log odds(y_l)),  odds = p / (1 - p) of the
  mean token probability p  (`orpo`; lambda is `loss.beta`, as in TRL)
  python -m dpo_jax.main --workdir=/tmp/orpo --config=configs/paper/orpo_mistral.py
Arguments: `beta` (lambda), `runlocal` (a tiny Mistral on tiny rows of that schema), `dir`.

Values from the authors' script (xfactlab/orpo, scripts/run_mistral_orpo_beta.sh): lambda 0.1,
lr 5e-6, 200 warmup steps, 5 epochs, batch 32 (4 devices x 8), prompts up to 1792 tokens and
sequences up to 2048. Approximation: their inverse-square-root decay (lr ~ sqrt(200 / t) after
warmup) is not one of our schedules; a linear decay to 15% of the peak ends at the same lr after
the 9,515 steps of 5 epochs (60,917 rows // 32 = 1,903 per epoch; the row count is the dataset
card's). Assumptions: AdamW without weight decay, gradient clipping at 1.0 (HF Trainer defaults),
1% of the rows held out for evaluation, bfloat16, FSDP over all devices with full remat.
"""

from configs import base
from configs.common import parse_args
from configs.paper import common

MODEL = "mistralai/Mistral-7B-v0.1"
DATASET = "argilla/ultrafeedback-binarized-preferences-cleaned"
TRAIN_ROWS = 60_917
ARGS = {"beta": 0.1, "runlocal": False, "dir": ""}


def get_config(arg: str = ""):
    a = parse_args(arg, ARGS, "configs/paper/orpo_mistral.py")
    c = base.get_config()
    c.model.update(path=MODEL, dtype="bfloat16", param_dtype="float32", remat="full")
    c.reference.mode = "none"
    c.data.update(source=DATASET, format="auto", train_split="train", eval_fraction=0.01, max_length=2048,
                  max_prompt_length=1792, truncation_mode="keep_end", min_bucket=256, batch_size=32,
                  eval_batch_size=32)
    c.loss.update(name="orpo", beta=a["beta"])
    steps = common.epoch_steps(TRAIN_ROWS, 32, 5)
    c.optim.update(name="adamw", lr=5e-6, warmup_steps=200, schedule="linear", end_lr_frac=0.15,
                   weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)
    c.train.update(steps=steps, log_every=10, eval_every=1000, checkpoint_every=1000)
    c.eval.update(num_prompts=256, samples_per_prompt=1, max_new_tokens=512)
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    if a["runlocal"]:
        common.shrink(c, family="mistral", dataset="ultrafeedback-cleaned", root=a["dir"])
        c.data.eval_fraction = 0.125
    return c
