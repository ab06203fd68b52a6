"""SimPO on the Mistral-7B Base setting (Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization
with a Reference-Free Reward", NeurIPS 2024): the Mistral-Base SimPO row of the main results table
(AlpacaEval 2, Arena-Hard, MT-Bench). Policy `alignment-handbook/zephyr-7b-sft-full` (Mistral-7B-v0.1 after SFT on
UltraChat-200k); data `HuggingFaceH4/ultrafeedback_binarized` (train_prefs / test_prefs). No
reference model: L = -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma).
  python -m dpo_jax.main --workdir=/tmp/simpo --config=configs/paper/simpo_mistral.py
Arguments: `beta`, `gamma`, `runlocal` (a tiny Mistral on tiny UltraFeedback-style rows), `dir`.

Values from the authors' training config (princeton-nlp/SimPO, training_configs/
mistral-7b-base-simpo.yaml; the paper reports the same batch and lr): beta 2.0, gamma 1.6
(gamma/beta 0.8), lr 3e-7, global batch 128 (8 devices x 2 x 8 accumulation), AdamW, cosine decay
after a 10% warmup, 1 epoch (61,135 // 128 = 477 steps), max_length 1024, max_prompt_length 512,
bfloat16. Assumptions: no weight decay and gradient clipping at 1.0 (HF Trainer defaults), prompt
truncation keeps its end (TRL's default then), FSDP over all devices with full rematerialization.
"""

from configs import base
from configs.common import parse_args
from configs.paper import common

MODEL = "alignment-handbook/zephyr-7b-sft-full"
DATASET = "HuggingFaceH4/ultrafeedback_binarized"
TRAIN_ROWS = 61_135
ARGS = {"beta": 2.0, "gamma": 1.6, "runlocal": False, "dir": ""}


def get_config(arg: str = ""):
    a = parse_args(arg, ARGS, "configs/paper/simpo_mistral.py")
    c = base.get_config()
    c.model.update(path=MODEL, dtype="bfloat16", param_dtype="float32", remat="full")
    c.reference.mode = "none"
    c.data.update(source=DATASET, format="auto", train_split="train_prefs", eval_split="test_prefs",
                  max_length=1024, max_prompt_length=512, truncation_mode="keep_end", min_bucket=128,
                  batch_size=128, eval_batch_size=64)
    c.loss.update(name="simpo", beta=a["beta"], gamma=a["gamma"])
    steps = common.epoch_steps(TRAIN_ROWS, 128)
    c.optim.update(name="adamw", lr=3e-7, warmup_steps=common.warmup(steps, 0.1), schedule="cosine",
                   end_lr_frac=0.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)
    c.train.update(steps=steps, log_every=5, eval_every=100, checkpoint_every=100)
    c.eval.update(num_prompts=256, samples_per_prompt=1, max_new_tokens=512)
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    if a["runlocal"]:
        common.shrink(c, family="mistral", dataset="ultrafeedback-binarized", root=a["dir"])
    return c
