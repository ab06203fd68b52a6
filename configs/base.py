"""Every configuration key of a dpo_jax run, with its default and meaning.

`get_config()` (it takes no arguments) returns the full ConfigDict; other configs start from it
and change what they need. Override any key on the command line, e.g.
  python -m dpo_jax.main --config=configs/synthetic.py --workdir=/tmp/run \
      --config.loss.name=ipo --config.loss.beta=0.05
Durations are in optimizer steps. `None` means "not set" (placeholders keep their type so that
command-line overrides parse). Invalid values fail before anything is compiled
(`dpo_jax.config_check.validate`).
"""

from ml_collections import config_dict

from configs.common import parse_args
from dpo_jax import sharding
from dpo_jax.losses import LOSSES

placeholder = config_dict.placeholder


def get_config(arg: str = "") -> config_dict.ConfigDict:
    parse_args(arg, {}, "configs/base.py")  # any argument is an error
    c = config_dict.ConfigDict()
    c.seed = 0  # seeds model init, data order and sampling

    # --- model: the policy. `path` = a Hugging Face directory or hub id; empty = random init from `arch`.
    c.model = dict(
        path="",
        arch=dict(family="llama", vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=0,  # 0 = hidden_size // num_heads
                  tie_embeddings=False, max_position_embeddings=2048, rope_theta=10000.0),
        dtype="float32",        # compute dtype: float32 | bfloat16 (log-probs and losses are float32 always)
        param_dtype="float32",  # master weights
        remat="none",           # none | full | dots | dots_all
        scan_min_layers=9,      # scan the layer stack from this depth (shallower: unrolled, faster; 0 = always)
        attention="auto",       # dense | tiled (query tiles over the keys up to them) | blockwise (memory
                                # linear in the row length) | auto: by row length, models/attention.py
                                # AUTO_MIN_LENGTH and TILED_MAX_LENGTH (docs/performance.md) |
                                # fused: cuDNN (GPU) / Pallas splash (TPU) where data.layout allows, else auto
        attention_block=0,      # query/key block of blockwise, query tile of tiled; 0 = models/attention.py
                                # BLOCK of the platform (64 on CPU, 256 elsewhere)
        tokenizer="",           # tokenizer dir; empty = model.path, or the synthetic world's tokenizer
        lora=dict(rank=0, alpha=16.0, targets=("attention", "mlp")),  # rank 0 = full fine-tuning
    )

    # --- reference: frozen | precomputed | none | base | sync
    c.reference = dict(
        mode="frozen",     # frozen: a copy of the initial policy (or `path`), never updated
        path="",           # HF directory of the reference; empty = the initial policy
        sync_alpha=0.6,    # sync (TR-DPO): pi_ref <- a pi + (1 - a) pi_ref ...
        sync_every=512,    # ... every this many steps
        cache_dir="",      # precomputed: where reference log-probs are cached (empty = workdir/ref_cache)
    )

    # --- loss: `name` is one registered loss or several joined by '+' (e.g. 'sigmoid+sft').
    c.loss = dict(name="sigmoid", weights=placeholder(tuple), beta=0.1, ld_alpha=placeholder(float))
    for spec in LOSSES.values():  # every variant hyper-parameter, unset unless given
        for key in spec.hparams:
            if key not in c.loss:
                c.loss[key] = placeholder(float)

    # --- data
    c.data = dict(
        source="synthetic",  # 'synthetic' (the built-in Markov world) or a local file / saved dataset / hub id
        name=placeholder(str),  # hub subset
        format="auto",       # auto | standard | implicit_prompt | conversational | unpaired | listwise
        list_size=4,         # losses of ranked lists (plackett_luce, lipo_lambda): K responses per list at most
        train_split="train",
        eval_split=placeholder(str),
        eval_fraction=0.0,   # or hold out this fraction of train (seeded)
        eval_source="",      # or a separate file / dataset for evaluation
        max_length=512,      # prompt + completion tokens per sequence
        max_prompt_length=placeholder(int),
        truncation_mode="keep_start",  # keep_start | keep_end (which part of the prompt survives)
        layout="standard",   # standard | prefix (prompt encoded once per pair) | packed
        prefix_min_saving=0.1,  # prefix: batches whose prefix rows save less padding are laid out standard
        logit_slots=True,    # logits only at completion positions (per-row slots, a few C per T); False: all
        batch_size=8,        # pairs (or ranked lists) per optimizer micro-step (all processes together)
        eval_batch_size=16,  # pairs per eval batch
        min_bucket=16,       # padding buckets: powers of two from here up to the longest row
        pack_length=0,       # packed: row length (0 = longest possible row)
        num_threads=0,       # tokenize in this many threads
        strict=False,        # bad rows raise instead of being dropped and counted
        num_epochs=0,        # 0 = repeat forever
    )

    # --- optimizer (optax)
    c.optim = dict(name="adamw", lr=1e-4, warmup_steps=0, schedule="constant", end_lr_frac=0.0,
                   weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, momentum=0.0, clip_norm=1.0, grad_accum=1)

    # --- training loop
    c.train = dict(
        steps=100,
        log_every=10,
        eval_every=0,          # 0 = only at the end
        checkpoint_every=100,  # 0 = only at the end (and on SIGTERM)
        keep_checkpoints=2,
        on_nonfinite="stop",   # stop | skip (the update of a non-finite step is never applied)
        max_skipped_steps=10,  # skip: stop after this many non-finite steps in a row
        export_final=True,     # write workdir/final/ in Hugging Face format
        progress=True,         # tqdm progress bar
        peak_flops=0.0,        # for mfu; 0 = the device's known peak, or a measured matmul on CPU
    )

    # --- log-probs (dpo_jax/logprobs.py): tiles of positions x vocabulary, never [B, T, V] float32 logits
    c.logprobs = dict(
        chunk_size=1024,        # positions per tile of vocab_chunk_size columns (a narrower vocabulary:
                                # proportionally more, logprobs.positions_per_tile)
        vocab_chunk_size=8192,  # vocabulary entries per tile
    )

    # --- SFT stage before preference training (the synthetic world trains its reference this way)
    # model_dir: where the SFT model is written, and read back if it already exists (empty =
    # workdir/sft/model); a sweep points every member at one directory to train the reference once.
    c.sft = dict(steps=0, lr=1e-3, batch_size=32, warmup_steps=0, model_dir="")

    # --- the synthetic Markov preference world (data.source = 'synthetic')
    c.synthetic = dict(vocab_size=8, prompt_len=4, completion_len=8, dirichlet_alpha=1.0, reward_scale=1.0,
                       world_seed=0, n_sft=20000, n_pairs=20000, n_eval=512, label="bradley_terry",
                       mask_logits=False)  # True: every model's softmax over the world's content tokens and EOS

    # --- evaluation (end of training and every train.eval_every steps)
    c.eval = dict(
        num_prompts=128,       # sampled evaluation: prompts from the eval split ...
        samples_per_prompt=4,  # ... and completions per prompt (temperature 1: unbiased KL)
        max_new_tokens=0,      # 0 = the synthetic completion length + 1, or 128
        temperature=1.0,
        reward="",             # '' (synthetic: the true reward) | 'module:function' | a reward-model dir
    )

    # --- online (iterative) DPO (dpo_jax/online.py): rounds > 0 runs `rounds` rounds of: K samples per
    # prompt from the current policy, one labelled pair per prompt, train.steps preference steps on them
    c.online = dict(
        rounds=0,              # 0 = an ordinary (offline) run
        prompts_per_round=0,   # prompts (= labelled pairs) per round; 0 = the train rows / rounds
        samples_per_prompt=2,  # K completions per prompt; the pair is two distinct ones, uniform
        temperature=1.0,       # sampling temperature of the round's completions
        reward="",             # the labeller's reward: '' = eval.reward (synthetic: the true reward) |
                               # 'module:function' | a reward-model dir
        label="bradley_terry", # bradley_terry: y_a preferred w.p. sigmoid(r_a - r_b) | argmax: iff r_a >= r_b
        reference="fixed",     # fixed: pi_ref = the initial (SFT) policy | last_round: the previous round's policy
    )

    # --- several processes (launch/local.py, launch/slurm.sbatch, launch/tpu_pod.sh; docs/launch.md)
    c.distributed = dict(
        heartbeat_timeout_s=100,       # a process silent this long is lost: the others exit (status 70)
        initialization_timeout_s=300,  # how long the processes wait for each other at start-up
    )

    # --- experiment tracking, besides workdir/metrics.jsonl and TensorBoard (dpo_jax/train/trackers.py)
    # wandb: Weights & Biases (pip install 'dpo_jax[tracking]'); one W&B run per workdir, named after
    # it, with this config; its id is kept in workdir/wandb_run_id so a resumed run continues it.
    # mode: online | offline (written under workdir/wandb/, `wandb sync` later) | disabled.
    # tags: a tuple of strings, e.g. --config.logging.wandb.tags="('sweep1',)"; entity '' = the default.
    c.logging = dict(wandb=dict(enabled=False, project="dpo_jax", entity="", mode="online",
                                tags=placeholder(tuple)))

    # --- device mesh and partitioning rules (logical axis -> mesh axes)
    # rules: logical axis -> mesh axes (a name, a tuple of names, or None: replicated), e.g.
    # --config.mesh.rules="(('embed', 'fsdp'), ('mlp', 'tensor'), ...)"; a dimension is sharded only if
    # its size divides by the axes' devices (dpo_jax/sharding.py). shape.context > 1 shards every row's
    # positions over that many devices (context parallelism for long pairs: dpo_jax/models/context_parallel.py).
    c.mesh = dict(shape=dict(data=-1, fsdp=1, context=1, tensor=1), rules=sharding.DEFAULT_RULES)
    return c
