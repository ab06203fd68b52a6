"""Tulu 3 8B preference tuning: length-normalized DPO (Lambert et al. 2024, "Tulu 3: Pushing Frontiers in
Open Language Model Post-Training"): the DPO stage that turns `allenai/Llama-3.1-Tulu-3-8B-SFT` into
`allenai/Llama-3.1-Tulu-3-8B-DPO` (the DPO hyper-parameter table; the objective ablation that chose
length-normalized DPO over DPO and SimPO). Data `allenai/llama-3.1-tulu-3-8b-preference-mixture`
(one `train` split; `chosen`/`rejected` message lists with the user turn, `prompt` a string).
  L = -log sigmoid(beta (rho_w / |y_w| - rho_l / |y_l|)),  rho = log pi - log pi_ref  (`sigmoid_norm`)
  python -m dpo_jax.main --workdir=/tmp/tulu3 --config=configs/paper/tulu3_dpo.py
Arguments: `beta`, `runlocal` (a tiny Llama on tiny Tulu-style rows), `dir`, `context` (devices that
share each row: context parallelism for the longest pairs, docs/performance.md).

Values (the paper's DPO table and AI2's open-instruct command for the 8B model): loss `dpo_norm`
(= our `sigmoid_norm`), beta 5, lr 5e-7, linear decay after a 10% warmup, AdamW without weight
decay, effective batch 128 pairs, max sequence length 2048, 1 epoch, bfloat16. Assumptions: the
mixture's size (~272.9k rows, hence 272,898 // 128 = 2,132 steps), no separate prompt limit,
1% of the rows held out for evaluation (the recipe evaluates on benchmarks instead), gradient
clipping at 1.0, prompt truncation keeps its end, FSDP over all devices with full remat.
Long-pair settings: rows of up to 2048 tokens run the blockwise attention (memory linear in the row
length; `model.attention='fused'` uses cuDNN / splash on an accelerator instead), and `context=C`
shards every row over C devices of the mesh (the rest stay FSDP).
"""

from configs import base
from configs.common import parse_args
from configs.paper import common

MODEL = "allenai/Llama-3.1-Tulu-3-8B-SFT"
DATASET = "allenai/llama-3.1-tulu-3-8b-preference-mixture"
TRAIN_ROWS = 272_898
ARGS = {"beta": 5.0, "runlocal": False, "dir": "", "context": 1}


def get_config(arg: str = ""):
    a = parse_args(arg, ARGS, "configs/paper/tulu3_dpo.py")
    c = base.get_config()
    c.model.update(path=MODEL, dtype="bfloat16", param_dtype="float32", remat="full", attention="blockwise")
    c.reference.mode = "frozen"
    c.data.update(source=DATASET, format="auto", train_split="train", eval_fraction=0.01, max_length=2048,
                  truncation_mode="keep_end", min_bucket=256, batch_size=128, eval_batch_size=64)
    c.loss.update(name="sigmoid_norm", beta=a["beta"])
    steps = common.epoch_steps(TRAIN_ROWS, 128)
    c.optim.update(name="adamw", lr=5e-7, warmup_steps=common.warmup(steps, 0.1), schedule="linear",
                   end_lr_frac=0.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)
    c.train.update(steps=steps, log_every=10, eval_every=500, checkpoint_every=500)
    c.eval.update(num_prompts=256, samples_per_prompt=1, max_new_tokens=512)
    c.mesh.shape.update(data=1, fsdp=-1, context=a["context"], tensor=1)
    if a["runlocal"]:
        common.shrink(c, family="llama", dataset="tulu3-preference", root=a["dir"])
        c.data.eval_fraction = 0.125
    return c
