"""Zephyr-7B-beta: distilled DPO of Mistral-7B on UltraFeedback (Tunstall et al. 2023, "Zephyr: Direct
Distillation of LM Alignment"): the dDPO model of Table 1 (MT-Bench, AlpacaEval) and the released
`HuggingFaceH4/zephyr-7b-beta`. Policy and reference `HuggingFaceH4/mistral-7b-sft-beta` (the dSFT
model); data `HuggingFaceH4/ultrafeedback_binarized` (splits train_prefs / test_prefs; `prompt` a
string, `chosen`/`rejected` message lists that repeat the user turn).
  python -m dpo_jax.main --workdir=/tmp/zephyr --config=configs/paper/zephyr_dpo.py
Arguments: `beta`, `epochs`, `runlocal` (a tiny Mistral on tiny UltraFeedback-style rows), `dir`.

Paper and model card values: beta 0.1, lr 5e-7, AdamW without weight decay, global batch 32
(16 devices x 2), linear decay after a 10% linear warmup, 3 epochs (61,135 train_prefs rows ->
3 x 1,910 = 5,730 steps), bfloat16. From the alignment-handbook recipe (assumed to match):
max_length 1024, max_prompt_length 512. The handbook later found 1 epoch with beta 0.01 as good
(`epochs=1,beta=0.01`). Assumptions: gradient clipping at norm 1.0 (the HF Trainer default),
FSDP over all devices with full rematerialization.
"""

from configs import base
from configs.common import parse_args
from configs.paper import common

MODEL = "HuggingFaceH4/mistral-7b-sft-beta"
DATASET = "HuggingFaceH4/ultrafeedback_binarized"
TRAIN_ROWS = 61_135
ARGS = {"beta": 0.1, "epochs": 3, "runlocal": False, "dir": ""}


def get_config(arg: str = ""):
    a = parse_args(arg, ARGS, "configs/paper/zephyr_dpo.py")
    c = base.get_config()
    c.model.update(path=MODEL, dtype="bfloat16", param_dtype="float32", remat="full")
    c.reference.mode = "frozen"
    c.data.update(source=DATASET, format="auto", train_split="train_prefs", eval_split="test_prefs",
                  max_length=1024, max_prompt_length=512, truncation_mode="keep_end", min_bucket=128,
                  batch_size=32, eval_batch_size=32)
    c.loss.update(name="sigmoid", beta=a["beta"])
    steps = common.epoch_steps(TRAIN_ROWS, 32, a["epochs"])
    c.optim.update(name="adamw", lr=5e-7, warmup_steps=common.warmup(steps, 0.1), schedule="linear",
                   end_lr_frac=0.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)
    c.train.update(steps=steps, log_every=10, eval_every=500, checkpoint_every=500)
    c.eval.update(num_prompts=256, samples_per_prompt=1, max_new_tokens=512)
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    if a["runlocal"]:
        common.shrink(c, family="mistral", dataset="ultrafeedback-binarized", root=a["dir"])
    return c
