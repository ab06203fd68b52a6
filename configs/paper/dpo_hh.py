"""DPO on Anthropic HH with Pythia-2.8B (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model", NeurIPS 2023): the single-turn dialogue experiment,
Figure 3 (left: win rate against the preferred completions vs sampling temperature; right: over
training). Model `EleutherAI/pythia-2.8b`; data `Anthropic/hh-rlhf` (implicit-prompt text: each of
`chosen`/`rejected` is the whole "\\n\\nHuman: ... \\n\\nAssistant: ..." dialogue; splits train, test).

Two stages, as in the paper (the reference is the "Preferred-FT" model, i.e. SFT on the chosen
completions):
  python -m dpo_jax.main --workdir=/tmp/hh_sft --config=configs/paper/dpo_hh.py:stage=sft
  python -m dpo_jax.main --workdir=/tmp/hh_dpo --config=configs/paper/dpo_hh.py:policy=/tmp/hh_sft/final
Arguments: `stage` (sft | dpo, default dpo), `policy` (the initial policy and reference; default the
base model), `beta`, `runlocal` (a tiny GPT-NeoX on tiny HH-style data, seconds), `dir` (where
runlocal writes its data).

Paper values (Appendix B): beta 0.1, batch 64 pairs, RMSprop, lr 1e-6 linearly warmed up from 0 over
150 steps and constant after (as the authors' code, eric-mitchell/direct-preference-optimization).
From the authors' code (config/config.yaml; the paper does not state them): max_length 512,
max_prompt_length 256, prompt truncation keeps its END for HH, gradient clipping at norm 10, one
epoch, RMSprop as torch's defaults (alpha 0.99, eps 1e-8, no momentum). Assumptions: the SFT stage
uses the code's default lr 5e-7 (the paper gives none), bfloat16 compute with float32 master
weights, FSDP over all devices; one epoch = 160,800 // 64 = 2,512 steps (hh-rlhf train has
160,800 rows).
"""

from configs import base
from configs.common import parse_args
from configs.paper import common

MODEL = "EleutherAI/pythia-2.8b"
DATASET = "Anthropic/hh-rlhf"
TRAIN_ROWS = 160_800
ARGS = {"stage": "dpo", "policy": MODEL, "beta": 0.1, "runlocal": False, "dir": ""}


def get_config(arg: str = ""):
    a = parse_args(arg, ARGS, "configs/paper/dpo_hh.py")
    stage = a["stage"]
    if stage not in ("sft", "dpo"):
        raise ValueError(f"configs/paper/dpo_hh.py: stage={stage!r}; allowed: sft, dpo")
    c = base.get_config()
    c.model.update(path=a["policy"], dtype="bfloat16", param_dtype="float32", remat="full")
    c.data.update(source=DATASET, format="implicit_prompt", train_split="train", eval_split="test",
                  max_length=512, max_prompt_length=256, truncation_mode="keep_end", min_bucket=64,
                  batch_size=64, eval_batch_size=32, num_epochs=0)
    steps = common.epoch_steps(TRAIN_ROWS, 64)
    if stage == "sft":  # Preferred-FT: NLL of the chosen completions, no reference
        c.loss.update(name="sft", beta=0.1)
        c.reference.mode = "none"
        lr = 5e-7
    else:
        c.loss.update(name="sigmoid", beta=a["beta"])
        c.reference.mode = "frozen"
        lr = 1e-6
    c.optim.update(name="rmsprop", lr=lr, warmup_steps=150, schedule="constant", b2=0.99, eps=1e-8, momentum=0.0,
                   clip_norm=10.0, weight_decay=0.0)
    c.train.update(steps=steps, log_every=10, eval_every=500, checkpoint_every=500)
    c.eval.update(num_prompts=256, samples_per_prompt=1, max_new_tokens=256)
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    if a["runlocal"]:
        common.shrink(c, family="gpt_neox", dataset="hh-rlhf", root=a["dir"])
    return c
