"""KTO on UltraFeedback from Zephyr-beta's SFT model (Ethayarajh et al. 2024, "KTO: Model Alignment as
Prospect Theoretic Optimization", ICML 2024): the experiment aligning `HuggingFaceH4/mistral-7b-sft-beta`
on `HuggingFaceH4/ultrafeedback_binarized` with KTO vs DPO (train_prefs / test_prefs), where each
pair gives one desirable (chosen) and one undesirable (rejected) example.
  L = lambda_D (1 - sigmoid(beta (rho_w - z0))) / 2 + lambda_U (1 - sigmoid(beta (z0 - rho_l))) / 2
  python -m dpo_jax.main --workdir=/tmp/kto --config=configs/paper/kto_zephyr.py
Arguments: `beta`, `runlocal` (a tiny Mistral on tiny UltraFeedback-style rows), `dir`.

Values from the paper and the authors' code at the time (ContextualAI/HALOs, config/config.yaml,
config/loss/kto.yaml, config/model/base_model.yaml): beta 0.1, lambda_D = lambda_U = 1, lr 5e-7,
RMSprop, 150 linear warmup steps then constant, batch 32, 1 epoch (61,135 // 32 = 1,910 steps),
max_length 1024, max_prompt_length 512. Differences: our `kto` is the paired form (both
completions of a pair in the same batch); its reference point z0 = max(0, mean log-ratio of the
batch's own completions), detached, where the paper estimates the KL with mismatched completions.
Assumptions: gradient clipping at 10 (the HALOs default of the time), prompt truncation keeps its
end, bfloat16 with float32 master weights, FSDP over all devices with full remat.
"""

from configs import base
from configs.common import parse_args
from configs.paper import common

MODEL = "HuggingFaceH4/mistral-7b-sft-beta"
DATASET = "HuggingFaceH4/ultrafeedback_binarized"
TRAIN_ROWS = 61_135
ARGS = {"beta": 0.1, "runlocal": False, "dir": ""}


def get_config(arg: str = ""):
    a = parse_args(arg, ARGS, "configs/paper/kto_zephyr.py")
    c = base.get_config()
    c.model.update(path=MODEL, dtype="bfloat16", param_dtype="float32", remat="full")
    c.reference.mode = "frozen"
    c.data.update(source=DATASET, format="auto", train_split="train_prefs", eval_split="test_prefs",
                  max_length=1024, max_prompt_length=512, truncation_mode="keep_end", min_bucket=128,
                  batch_size=32, eval_batch_size=32)
    c.loss.update(name="kto", beta=a["beta"], desirable_weight=1.0, undesirable_weight=1.0)
    c.optim.update(name="rmsprop", lr=5e-7, warmup_steps=150, schedule="constant", b2=0.99, eps=1e-8, momentum=0.0,
                   clip_norm=10.0, weight_decay=0.0)
    c.train.update(steps=common.epoch_steps(TRAIN_ROWS, 32), log_every=10, eval_every=500, checkpoint_every=500)
    c.eval.update(num_prompts=256, samples_per_prompt=1, max_new_tokens=512)
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    if a["runlocal"]:
        common.shrink(c, family="mistral", dataset="ultrafeedback-binarized", root=a["dir"])
    return c
