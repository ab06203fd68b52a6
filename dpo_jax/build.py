"""From a config to the objects of a run: data files, tokenizer, data configs, models.

Each function is a small translation of one config section; the runner (`runner.py`) and the
training stages (`train/stages.py`) wire them together.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dpo_jax import logprobs, losses, paths, sharding
from dpo_jax.data import pipeline, synthetic, synthetic_exact, synthetic_listwise
from dpo_jax.models import hf, hf_config
from dpo_jax.models.transformer import Decoder, ModelConfig


@dataclasses.dataclass(frozen=True)
class DataFiles:
    """Where a run's rows and tokenizer come from."""

    train: str
    eval: Optional[str]
    sft: Optional[str]
    tokenizer: str
    world_dir: Optional[str] = None  # the synthetic world's directory (world.json)


def world_config(config) -> synthetic_exact.WorldConfig:
    s = config.synthetic
    return synthetic_exact.WorldConfig(vocab_size=s.vocab_size, prompt_len=s.prompt_len,
                                       completion_len=s.completion_len, dirichlet_alpha=s.dirichlet_alpha,
                                       reward_scale=s.reward_scale, seed=s.world_seed)


def synthetic_files(config, data_dir: str, *, shared: bool = True) -> DataFiles:
    """Write (once; deterministic given config.synthetic and config.seed) the world's datasets and tokenizer.

    world.json is written last, so it marks a complete directory; other processes wait for process 0
    (`shared=False`: `data_dir` is this process's own, and it writes it)."""
    s = config.synthetic
    meta = {"world_config": dataclasses.asdict(world_config(config)), "seed": config.seed, "label": s.label,
            "n_sft": s.n_sft, "n_pairs": s.n_pairs, "n_eval": s.n_eval}
    world_file = os.path.join(data_dir, synthetic.WORLD_FILE)
    fresh = True
    if os.path.exists(world_file):
        try:
            with open(world_file) as f:
                old = json.load(f)
            fresh = any(old.get(k) != v for k, v in meta.items())
        except (OSError, ValueError):  # cut short while being written: write everything again
            fresh = True
    if fresh and (jax.process_index() == 0 or not shared):
        if os.path.exists(world_file):
            os.remove(world_file)  # the directory is incomplete until the new world.json is written
        world = synthetic_exact.make_world(world_config(config))
        synthetic.save_tokenizer(world, os.path.join(data_dir, "tokenizer"))
        synthetic.write_dataset(world, data_dir, s.n_sft, s.n_pairs, s.n_eval, seed=config.seed, label=s.label)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dpo_jax.build.synthetic_files")
    train, evaluation = os.path.join(data_dir, "pairs.jsonl"), os.path.join(data_dir, "eval_pairs.jsonl")
    k = list_size(config)
    if k:  # ranked lists of K completions (for a loss of lists), written once per K beside the pairs
        train, evaluation = (os.path.join(data_dir, name) for name in synthetic_listwise.lists_file_names(k))
        if (fresh or not os.path.exists(evaluation)) and (jax.process_index() == 0 or not shared):
            synthetic_listwise.write_lists(synthetic.load_world(data_dir), data_dir, s.n_pairs, s.n_eval, k,
                                           seed=config.seed)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("dpo_jax.build.synthetic_lists")
    return DataFiles(train=train, eval=evaluation, sft=os.path.join(data_dir, "sft.jsonl"),
                     tokenizer=os.path.join(data_dir, "tokenizer"), world_dir=data_dir)


def loss_names(config) -> tuple[str, ...]:
    """The loss names of config.loss.name (several joined by '+'), unchecked."""
    return tuple(n.strip() for n in str(config.loss.name).split("+") if n.strip())


def list_size(config) -> int:
    """K = config.data.list_size when config.loss trains on ranked lists (`losses.LIST_LOSSES`), else 0."""
    return int(config.data.list_size) if any(n in losses.LIST_LOSSES for n in loss_names(config)) else 0


def data_files(config, workdir: str) -> DataFiles:
    if config.data.source == "synthetic":
        if paths.is_local(workdir):
            return synthetic_files(config, os.path.join(workdir, "data"))
        # A bucket workdir: datasets and transformers read local files, so each process writes its own copy.
        return synthetic_files(config, paths.local_dir(workdir, f"data-{jax.process_index()}"), shared=False)
    return DataFiles(train=config.data.source, eval=config.data.eval_source or None, sft=None,
                     tokenizer=config.model.tokenizer or config.model.path)


def tokenizer(path: str):
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

    return AutoTokenizer.from_pretrained(path)


def data_config(config, path: str, *, pairs: int, eval_split: bool = False, lists: bool = False) -> pipeline.DataConfig:
    """The pipeline's DataConfig for this process (`pairs` = global pairs per batch); `lists`: ranked
    lists of up to config.data.list_size responses (`pairs` then counts lists)."""
    d = config.data
    n = jax.process_count()
    if pairs % n:
        raise ValueError(f"config.data batch of {pairs} pairs cannot be split over {n} processes")
    return pipeline.DataConfig(
        path=path, name=d.name, train_split=d.train_split, eval_split=None if eval_split else d.eval_split,
        eval_fraction=0.0 if eval_split else d.eval_fraction, split_seed=config.seed, seed=config.seed,
        shuffle=not eval_split, num_epochs=(d.num_epochs or None) if not eval_split else 1,
        pairs_per_batch=pairs // n, drop_remainder=not eval_split, layout=d.layout, max_length=d.max_length,
        max_prompt_length=d.max_prompt_length, truncation_mode=d.truncation_mode, min_bucket=d.min_bucket,
        pack_length=d.pack_length, prefix_min_saving=d.prefix_min_saving, logit_slots=d.logit_slots,
        num_threads=d.num_threads, list_size=d.list_size if lists else 0)


def model_config(config, vocab_size: int) -> ModelConfig:
    """The random-init architecture of `config.model.arch`, with the fixed traits of its family (what
    its Hugging Face config cannot change, so that the trained model exports as that family)."""
    a = config.model.arch
    kw = dict(family=a.family, vocab_size=vocab_size, hidden_size=a.hidden_size,
              intermediate_size=a.intermediate_size, num_layers=a.num_layers, num_heads=a.num_heads,
              num_kv_heads=a.num_kv_heads, head_dim=a.head_dim or None, tie_embeddings=a.tie_embeddings,
              max_position_embeddings=a.max_position_embeddings, rope_theta=a.rope_theta,
              dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat,
              scan_min_layers=config.model.scan_min_layers, **attention_kw(config))
    kw.update(hf_config.FAMILY_TRAITS.get(a.family, {}))
    if a.family in hf_config.NO_GQA_FAMILIES:
        kw["num_kv_heads"] = a.num_heads
    return ModelConfig(**kw)


def logit_bias(config, vocab_size: int) -> Optional[np.ndarray]:
    """config.synthetic.mask_logits: float32 [V], 0 at the world's content tokens and EOS and
    `logprobs.MASKED_LOGIT` elsewhere (<pad>, <s>, <unk>), added to every model's logits in
    training and evaluation; else None."""
    if not (config.data.source == "synthetic" and config.synthetic.mask_logits):
        return None
    bias_V = np.full((vocab_size,), logprobs.MASKED_LOGIT, np.float32)
    bias_V[synthetic.format_token_ids(config.synthetic.vocab_size)] = 0.0
    return bias_V


def attention_kw(config) -> dict:
    """The model's attention settings: config.model.attention and attention_block, and the rows' layout
    (data.layout), which says where attention='fused' may run an accelerator's kernel (`models/attend.py`)."""
    return dict(attention=config.model.attention, attention_block=config.model.attention_block,
                attention_layout=config.data.layout)


def _load_kw(config, mesh) -> dict:
    """How a Hugging Face checkpoint is loaded: the run's dtypes, and, with a mesh, streamed slice by
    slice straight into the parameters' shardings (`hf.load_model(mesh=...)`)."""
    kw = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype)
    if mesh is not None:
        kw.update(mesh=mesh, rules=sharding.check_rules(config.mesh.rules))
    return kw


def policy(config, tok, path: str = "", mesh=None) -> Decoder:
    """The initial policy: a Hugging Face checkpoint (`path` or config.model.path; with `mesh`, loaded
    into its shardings) or a random init."""
    path = path or config.model.path
    kw = _load_kw(config, mesh)
    if path:
        return hf.load_model(path, remat=config.model.remat, scan_min_layers=config.model.scan_min_layers,
                             **attention_kw(config), **kw)
    vocab = len(tok)
    cfg = model_config(config, vocab)
    cfg = dataclasses.replace(cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    return Decoder(cfg, rngs=nnx.Rngs(config.seed))


def _reference_from_path(config, mesh=None) -> Decoder:
    """config.reference.path with the dtypes and layer stacking of config.model (no remat: no
    gradient flows through a reference)."""
    return hf.load_model(config.reference.path, scan_min_layers=config.model.scan_min_layers,
                         **attention_kw(config), **_load_kw(config, mesh))


def reference(config, initial_policy: Decoder, mesh=None) -> Optional[Decoder]:
    """The reference model (modes frozen, sync, precomputed): config.reference.path or a copy of the
    initial policy."""
    if config.reference.mode not in ("frozen", "sync", "precomputed"):
        return None
    if config.reference.path:
        return _reference_from_path(config, mesh)
    graphdef, state = nnx.split(initial_policy)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, state))


def sft_model_dir(config, workdir: str) -> str:
    """Where the SFT stage exports its model: config.sft.model_dir (a sweep shares one), else
    workdir/sft/model."""
    return config.sft.model_dir or paths.join(workdir, "sft", "model")


def evaluation_reference(config, workdir: str, tok) -> Decoder:
    """The reference the sampled evaluation measures a run against, its initial reference:
    config.reference.path, else the SFT model (config.sft.model_dir or workdir/sft/model), else the
    initial policy (rebuilt: loaded from config.model.path or re-initialized from the seed). For
    reference.mode='sync' this is the reference before any sync; for 'none' / 'base' the policy the
    run started from. Loaded as `reference` and `policy` load them."""
    if config.reference.path:
        return _reference_from_path(config)
    sft = sft_model_dir(config, workdir)
    if config.sft.steps > 0 and paths.exists(paths.join(sft, "config.json")):
        return policy(config, tok, path=paths.local_copy(sft))
    return policy(config, tok)
