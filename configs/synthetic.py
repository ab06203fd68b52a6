"""The built-in default: the synthetic Markov preference world and a tiny Llama.

A run trains the SFT reference on samples of pi_ref, then sigmoid DPO on Bradley-Terry pairs,
then writes report.json with the distance to the exact optimum. Sized to finish on a 2-core CPU
in a few minutes:
  python -m dpo_jax.main --config=configs/synthetic.py --workdir=/tmp/dpo_synthetic
Arguments (`configs/synthetic.py:key=value,...`, see `configs/common.py`): `beta` (1.0), `loss`
(sigmoid), `steps` (600), `mask` (`mask=1`: every model's softmax restricted to the world's content
tokens and EOS, `synthetic.mask_logits`), `runlocal` (`runlocal=1`: a seconds-long smoke run).
"""

from configs import base
from configs.common import parse_args

CONFIG = "configs/synthetic.py"
ARGS = {"beta": 1.0, "loss": "sigmoid", "steps": 600, "mask": False, "runlocal": False}


def get_config(arg: str = ""):
    a = parse_args(arg, ARGS, CONFIG)
    c = base.get_config()
    c.synthetic.update(vocab_size=8, prompt_len=4, completion_len=8, n_sft=20000, n_pairs=20000, n_eval=512,
                       mask_logits=a["mask"])
    # content tokens + <pad> <s> </s> <unk>: vocab 12; a 4-token prompt + 8 + EOS fits max_length 16
    c.model.arch.update(family="llama", hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64)
    c.data.update(source="synthetic", max_length=16, min_bucket=16, batch_size=64, eval_batch_size=256)
    c.sft.update(steps=600, lr=3e-3, batch_size=64)
    c.loss.update(name=a["loss"], beta=a["beta"])
    c.optim.update(name="adamw", lr=1e-3, warmup_steps=20, schedule="constant", clip_norm=1.0)
    c.train.update(steps=a["steps"], log_every=50, eval_every=200, checkpoint_every=200)
    c.eval.update(num_prompts=256, samples_per_prompt=4)
    if a["runlocal"]:
        c.synthetic.update(n_sft=512, n_pairs=512, n_eval=64)
        c.sft.update(steps=10)
        c.train.update(steps=10, log_every=5, eval_every=0, checkpoint_every=5)
        c.data.update(batch_size=16, eval_batch_size=32)
        c.eval.update(num_prompts=16, samples_per_prompt=2)
    return c


# The default sweep: three losses at four betas each, on one shared SFT reference.
# - sigmoid (DPO): beta 0.25-2 spans the exact frontier from high KL (0.25) to near pi_ref (2).
# - ipo: its log-ratios are averaged per token (as TRL), so it regresses the per-token margin onto
#   1/(2 beta); over the 9 completion tokens beta 0.5-4 asks for sequence margins of 9-1.1 nats,
#   the range sigmoid DPO reaches at beta 0.25-2.
# - simpo: reference-free (reference.mode='none': no reference forward at all) on length-normalized
#   policy log-probs, -log s(beta (avg logp_w - avg logp_l) - gamma) with gamma = 1 (the registry
#   default); its reward scale differs, so beta 1-8 around the paper's 2-2.5 sets the per-token
#   margin gamma/beta it stops pushing at to 1-0.125 nats: larger beta, smaller moves away from pi_ref.
SWEEP_BETAS = {"sigmoid": (0.25, 0.5, 1.0, 2.0), "ipo": (0.5, 1.0, 2.0, 4.0), "simpo": (1.0, 2.0, 4.0, 8.0)}
# Preference steps per member (~1 epoch of the 20k pairs at batch 64). The 12 runs take ~500 CPU-s
# with the launcher's shared compilation cache: 9-11 min on a busy 2-core CPU two at a time (the default).
SWEEP_STEPS = 300


def get_sweep(arg: str = ""):
    """Members of `python -m launch.sweep --config=configs/synthetic.py[:arg] --root=DIR`.

    12 runs: sigmoid, ipo and simpo at the betas of SWEEP_BETAS, each SWEEP_STEPS preference steps
    after the shared SFT reference (600 steps, trained once by the launcher). `runlocal=1` or
    `steps` in `arg` keep the step count of get_config(arg). Takes the arguments of get_config."""
    from launch import sweep_plan  # pylint: disable=g-import-not-at-top  (training runs never import it)

    given = parse_args(arg, {k: type(v) for k, v in ARGS.items()}, CONFIG)  # the keys of `arg` only
    short = [] if (given.get("runlocal") or "steps" in given) else [("train.steps", [SWEEP_STEPS])]
    members = []
    for loss, betas in SWEEP_BETAS.items():
        ref = [("reference.mode", ["none"])] if loss == "simpo" else []
        members += sweep_plan.product(("loss.name", [loss]), *ref, ("loss.beta", list(betas)), *short)
    return members
