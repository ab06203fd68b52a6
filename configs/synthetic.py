"""The built-in default: the synthetic Markov preference world and a tiny Llama.

A run trains the SFT reference on samples of pi_ref, then sigmoid DPO on Bradley-Terry pairs,
then writes report.json with the distance to the exact optimum. Sized to finish on a 2-core CPU
in a few minutes:
  python -m dpo_jax.main --config=configs/synthetic.py --workdir=/tmp/dpo_synthetic
Arguments (`configs/synthetic.py:key=value,...`): `beta`, `loss`, `steps`, `runlocal` (a
seconds-long smoke run).
"""

from configs import base


def _args(arg: str) -> dict:
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def get_config(arg: str = ""):
    a = _args(arg)
    c = base.get_config()
    c.synthetic.update(vocab_size=8, prompt_len=4, completion_len=8, n_sft=20000, n_pairs=20000, n_eval=512)
    # content tokens + <pad> <s> </s> <unk>: vocab 12; a 4-token prompt + 8 + EOS fits max_length 16
    c.model.arch.update(family="llama", hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64)
    c.data.update(source="synthetic", max_length=16, min_bucket=16, batch_size=64, eval_batch_size=256)
    c.sft.update(steps=600, lr=3e-3, batch_size=64)
    c.loss.update(name=a.get("loss", "sigmoid"), beta=float(a.get("beta", 1.0)))
    c.optim.update(name="adamw", lr=1e-3, warmup_steps=20, schedule="constant", clip_norm=1.0)
    c.train.update(steps=int(a.get("steps", 600)), log_every=50, eval_every=200, checkpoint_every=200)
    c.eval.update(num_prompts=256, samples_per_prompt=4)
    if a.get("runlocal"):
        c.synthetic.update(n_sft=512, n_pairs=512, n_eval=64)
        c.sft.update(steps=10)
        c.train.update(steps=10, log_every=5, eval_every=0, checkpoint_every=5)
        c.data.update(batch_size=16, eval_batch_size=32)
        c.eval.update(num_prompts=16, samples_per_prompt=2)
    return c
