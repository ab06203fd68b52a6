"""DPO on IMDb controlled sentiment generation with GPT-2 large (Rafailov et al. 2023, "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model", NeurIPS 2023): the reward-KL frontier
of Figure 2 (left). Model `gpt2-large`; data from `stanfordnlp/imdb`; ground-truth reward
`siebert/sentiment-roberta-large-english`.

The paper's preference data is not a hub dataset: prompts are 2-8-token prefixes of IMDb train
reviews, completions are sampled from the SFT model (gpt2-large fine-tuned on the IMDb train
reviews) and each pair is labelled by the sentiment classifier (Appendix C.1). Build that file first
(standard format: `prompt`, `chosen`, `rejected` strings) and pass it as `data=`:
  python -m dpo_jax.main --workdir=/tmp/imdb_dpo \
      --config=configs/paper/dpo_imdb.py:policy=SFT_DIR,data=imdb_pairs.jsonl,beta=0.1
The frontier is a sweep: one run per beta (`beta=`), each point being (KL(pi || pi_ref), mean
sentiment reward) of samples on held-out prompts. Our `eval.reward` takes a one-label reward model
or `module:function`; the two-label sentiment classifier needs a `module:function` wrapper (its
positive-class probability), which is not part of this config.
Arguments: `policy` (default the base model; the paper starts from its SFT), `data` (required for
a real run; default `imdb_preference_pairs.jsonl`), `beta`, `steps`, `runlocal` (a tiny GPT-2 on
tiny IMDb-style pairs, seconds), `dir` (where runlocal writes its data).

Paper values (Appendix B): beta 0.1, batch 64 pairs, RMSprop, lr 1e-6 warmed up linearly over 150
steps, constant after. From the authors' code: gradient clipping at norm 10, RMSprop alpha 0.99.
The frontier's betas (`get_sweep`): 0.05, 0.1, 1 and 5, as we read the paper's IMDb appendix.
Assumptions (not stated for IMDb): max_length 128 with prompts of at most 16 tokens (the prefixes
are 2-8 tokens), 5% of the pairs held out for evaluation, `steps` default 1,000 (the number of
pairs depends on the file you generate).
  python -m launch.sweep --config=configs/paper/dpo_imdb.py:policy=SFT_DIR,data=FILE --root=DIR
"""

from configs import base
from configs.common import parse_args
from configs.paper import common

MODEL = "gpt2-large"
DATASET = "stanfordnlp/imdb"  # the source of the prompts; the pairs are generated (see above)
PAIRS_FILE = "imdb_preference_pairs.jsonl"
ARGS = {"policy": MODEL, "data": PAIRS_FILE, "beta": 0.1, "steps": 1000, "runlocal": False, "dir": ""}
SWEEP_BETAS = (0.05, 0.1, 1.0, 5.0)


def get_config(arg: str = ""):
    a = parse_args(arg, ARGS, "configs/paper/dpo_imdb.py")
    c = base.get_config()
    c.model.update(path=a["policy"], dtype="bfloat16", param_dtype="float32")
    c.reference.mode = "frozen"
    c.data.update(source=a["data"], format="standard", eval_fraction=0.05, max_length=128,
                  max_prompt_length=16, truncation_mode="keep_start", min_bucket=32, batch_size=64,
                  eval_batch_size=64)
    c.loss.update(name="sigmoid", beta=a["beta"])
    c.optim.update(name="rmsprop", lr=1e-6, warmup_steps=150, schedule="constant", b2=0.99, eps=1e-8, momentum=0.0,
                   clip_norm=10.0, weight_decay=0.0)
    c.train.update(steps=a["steps"], log_every=10, eval_every=250, checkpoint_every=250)
    c.eval.update(num_prompts=256, samples_per_prompt=4, max_new_tokens=64)
    if a["runlocal"]:
        common.shrink(c, family="gpt2", dataset="imdb-pairs", root=a["dir"])
    return c


def get_sweep(arg: str = ""):
    """The frontier of Figure 2 (left): one run per beta of SWEEP_BETAS, all from the same policy."""
    from launch import sweep_plan  # pylint: disable=g-import-not-at-top  (training runs never import it)

    get_config(arg)  # the same argument errors as a run
    return sweep_plan.product(("loss.beta", list(SWEEP_BETAS)))
