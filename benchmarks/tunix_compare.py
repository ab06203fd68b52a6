r"""Tunix's DPO trainer on the benchmark's model and pairs: the `tunix` section of

    python benchmarks/trl_compare.py --compare tunix [bench flags] [--tunix-steps N]
    python benchmarks/trl_compare.py --compare trl,tunix --repeats 5 [bench flags]

Needs google-tunix (the `bench` extra). Tunix's `DPOTrainer` (`tunix.sft.dpo.dpo_trainer`) trains
its own Llama model (`tunix.models.llama3`), loaded with `create_model_from_safe_tensors` from the
Hugging Face checkpoint that `hf.export_model` writes of the bench's random policy, with a frozen
reference loaded from the same files, float32, on the same pairs (token ids, prompts left-padded
and completions right-padded as Tunix takes them), with the bench's own optax transformation and
beta. The model is the same function: `model_config` maps every field of the checkpoint's
config.json and refuses one Tunix's Llama cannot express; Tunix 0.1.7's attention leaves
`ModelConfig.rope_theta` unused (it rotates with its `apply_rope` default, base 1e6), so
`rope_theta` passes the checkpoint's base to it for the duration of the comparison (`DIFFERENCES`).

A Tunix step is everything its training loop does for one batch, as `DPOTrainer.train` runs it:
`_prepare_inputs` (the concatenation of chosen and rejected rows, the attention mask and positions,
the reference forward, jitted on its own), the jitted train step (policy forward and backward,
optimizer update) and its metric bookkeeping. Rounds of `steps_per_round` steps are timed from the
loop asking for a round's first batch to the parameters of its last step being ready; after each
round one round of our step runs, so both see the same machine load.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import statistics
import sys
import time

import numpy as np

from dpo_jax import bench

# What differs between Tunix's side and ours, besides the code (reported in the JSON line).
DIFFERENCES = {
    "logits": "Tunix computes float32 logits at every position of the [2B, T] batch and keeps the completion "
              "positions (common.get_per_token_logps); ours: chunked log-probs, by default at the completion "
              "positions only (--no-logit-slots: every position)",
    "reference": "Tunix runs the frozen reference forward in _prepare_inputs, a jitted call of its own before "
                 "the train step; ours runs inside the one jitted step",
    "attention": "Tunix: dense attention with a [2B, T, T] boolean mask; ours: the bench's --attention",
    "layout": "Tunix: the prompt left-padded, chosen and rejected right-padded to the batch's longest, one "
              "[2B, P + C] forward; ours: the bench's --layout",
}


def check(cfg: bench.BenchConfig) -> None:
    """What the Tunix side can run: a Llama model on one device (float32 and a frozen reference are
    checked for every peer)."""
    if cfg.family != "llama":
        raise ValueError(f"the Tunix comparison needs --family llama (tunix.models.llama3); got {cfg.family!r}")
    if cfg.devices != 1 or cfg.context != 1:
        raise ValueError("the Tunix comparison runs on one device: --devices 1 --context 1")


def _hf_rope_theta(h: dict) -> float:
    params = h.get("rope_parameters") or {}
    scaling = h.get("rope_scaling") or {}
    if params.get("rope_type", "default") != "default" or scaling.get("rope_type", "default") != "default":
        raise ValueError(f"Tunix's Llama takes no RoPE scaling; the checkpoint has {params or scaling}")
    return float(params.get("rope_theta", h.get("rope_theta", 10000.0)))


def model_config(hf_dir: str):
    """Tunix's `llama3.ModelConfig` of a Hugging Face Llama checkpoint (its config.json). A field
    Tunix's Llama cannot express (biases, another activation, RoPE scaling) is an error."""
    from tunix.models.llama3 import model as llama  # pylint: disable=g-import-not-at-top

    with open(os.path.join(hf_dir, "config.json")) as f:
        h = json.load(f)
    if h.get("model_type") != "llama":
        raise ValueError(f"Tunix's Llama needs a llama checkpoint; got model_type {h.get('model_type')!r}")
    unsupported = {k: h[k] for k in ("attention_bias", "mlp_bias") if h.get(k)}
    if h.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = h["hidden_act"]
    if unsupported:
        raise ValueError(f"Tunix's Llama cannot express {unsupported}")
    heads = int(h["num_attention_heads"])
    return llama.ModelConfig(num_layers=int(h["num_hidden_layers"]), vocab_size=int(h["vocab_size"]),
                             embed_dim=int(h["hidden_size"]), hidden_dim=int(h["intermediate_size"]),
                             num_heads=heads, head_dim=int(h.get("head_dim") or h["hidden_size"] // heads),
                             num_kv_heads=int(h.get("num_key_value_heads", heads)), rope_theta=_hf_rope_theta(h),
                             norm_eps=float(h["rms_norm_eps"]), weight_tying=bool(h.get("tie_word_embeddings")))


def rope_ignored() -> bool:
    """Whether Tunix's Llama attention leaves `ModelConfig.rope_theta` unused (0.1.7 does)."""
    from tunix.models.llama3 import model as llama  # pylint: disable=g-import-not-at-top

    return "rope_theta" not in inspect.getsource(llama.Attention.block)


def default_rope_theta() -> float:
    from tunix.models.llama3 import model as llama  # pylint: disable=g-import-not-at-top

    return float(inspect.signature(llama.apply_rope).parameters["rope_theta"].default)


@contextlib.contextmanager
def rope_theta(theta: float):
    """Within the context Tunix's Llama rotates with base `theta` (when its attention leaves
    `ModelConfig.rope_theta` unused); the cost of a step is unchanged."""
    from tunix.models.llama3 import model as llama  # pylint: disable=g-import-not-at-top

    if not rope_ignored():
        yield
        return
    original = llama.apply_rope
    llama.apply_rope = functools.partial(original, rope_theta=theta)
    try:
        yield
    finally:
        llama.apply_rope = original


def load_model(hf_dir: str):
    """Tunix's Llama with the checkpoint's weights, float32."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from tunix.models.llama3 import params as llama_params  # pylint: disable=g-import-not-at-top

    return llama_params.create_model_from_safe_tensors(hf_dir, model_config(hf_dir), dtype=jnp.float32)


def training_input(examples: list[dict]) -> dict:
    """Tunix's tokenized DPO input (`dpo_trainer.TrainingInput` fields) of a group of pairs, on the
    device: prompts left-padded to the longest, chosen and rejected right-padded to the longest
    completion of either (Tunix stacks them into one batch), masks 1 at real tokens."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    n = max(len(e["prompt_ids"]) for e in examples)
    c = max(max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)

    def pad(rows, length, left):
        ids = np.full((len(rows), length), bench.PAD, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            sl = slice(length - len(r), length) if left else slice(0, len(r))
            ids[i, sl], mask[i, sl] = r, 1
        return jnp.asarray(ids), jnp.asarray(mask)

    out = {}
    for key, length, left in (("prompt", n, True), ("chosen", c, False), ("rejected", c, False)):
        out[f"{key}_ids"], out[f"{key}_mask"] = pad([e[f"{key}_ids"] for e in examples], length, left)
    return out


def make_trainer(hf_dir: str, tx, beta: float, max_steps: int | None = None, ref_dir: str | None = None):
    """Tunix's `DPOTrainer`: policy loaded from `hf_dir`, frozen reference from `ref_dir` (default: the
    same checkpoint), optimizer `tx`, sigmoid DPO with `beta`, no checkpoints, metrics kept in memory."""
    from tunix.sft.dpo import dpo_trainer  # pylint: disable=g-import-not-at-top

    config = dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10**9, max_steps=max_steps, algorithm="dpo", beta=beta,
                                           label_smoothing=0.0, pbar_description=None)
    return dpo_trainer.DPOTrainer(model=load_model(hf_dir), ref_model=load_model(ref_dir or hf_dir), optimizer=tx,
                                  training_config=config)


def loss_and_metrics(trainer, examples: list[dict], beta: float) -> dict[str, float]:
    """Tunix's DPO loss and its metrics on a group of pairs, no update: its own input preparation
    (reference forward included) and loss function."""
    from tunix.sft.dpo import dpo_trainer  # pylint: disable=g-import-not-at-top

    example = trainer._prepare_inputs(training_input(examples))  # pylint: disable=protected-access
    loss, aux = dpo_trainer.dpo_loss_fn(trainer.model, example, algorithm="dpo", beta=beta, label_smoothing=0.0)
    return {"loss": float(loss), **{k: float(v) for k, v in aux.items()}}


def versions() -> dict[str, str]:
    import importlib.metadata as md  # pylint: disable=g-import-not-at-top

    return {name: md.version(dist) for name, dist in (("tunix", "google-tunix"), ("jax", "jax"), ("flax", "flax"),
                                                        ("optax", "optax"))}


def tunix_bench(cfg: bench.BenchConfig, timer: bench.StepTimer, steps_per_round: int, hf_dir: str) -> dict:
    """Tunix's DPOTrainer on the checkpoint in `hf_dir` (the bench's policy) and the bench's pairs
    (`timer.groups`, cycled as our step cycles its batches), after every `steps_per_round` timed
    steps one round of our step (`timer.round()`)."""
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    check(cfg)
    groups = timer.groups
    inputs = [training_input(g) for g in groups]
    warmup = max(cfg.warmup, 3, len(groups))  # every distinct batch shape compiled before timing
    total = warmup + steps_per_round * cfg.repeats
    beta = float(timer.hp["beta"])
    times: list[float] = []

    with rope_theta(model_config(hf_dir).rope_theta):
        trainer = make_trainer(hf_dir, timer.step_cfg.tx, beta, max_steps=total)

        def ready():
            jax.block_until_ready(nnx.state(trainer.model, nnx.Param))

        def batches():
            """The training loop's data: timing at round boundaries (the loop asks for batch i after
            dispatching step i - 1)."""
            t0 = 0.0
            for i in range(total + 1):
                if i >= warmup and (i - warmup) % steps_per_round == 0:
                    ready()
                    if i > warmup:
                        times.append((time.perf_counter() - t0) / steps_per_round)
                        timer.round()
                    t0 = time.perf_counter()
                if i < total:
                    yield inputs[i % len(inputs)]

        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON line
            trainer.train(batches())
        if trainer.train_steps != total or len(times) != cfg.repeats:
            raise RuntimeError(f"Tunix ran {trainer.train_steps} steps and {len(times)} rounds; expected {total} "
                               f"and {cfg.repeats}")
        loss = float(trainer.metrics_logger.get_metric_history("", "loss", "train")[-1])  # its last logged step
    step_s = statistics.median(times)
    examples = [e for g in groups for e in g]
    pairs = len(examples) / len(groups)
    tokens_per_step = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                          for e in examples) / len(groups)
    padded = statistics.mean(2 * x["prompt_ids"].size + x["chosen_ids"].size + x["rejected_ids"].size for x in inputs)
    tcfg = model_config(hf_dir)
    differs = dict(DIFFERENCES)
    if rope_ignored():
        differs["rope"] = (f"Tunix {versions()['tunix']}'s Llama attention leaves ModelConfig.rope_theta unused and "
                           f"rotates with base {default_rope_theta():g}; the comparison passes the checkpoint's "
                           f"rope_theta ({tcfg.rope_theta:g}) to its apply_rope, so both models compute the same "
                           "function at the same cost")
    return {**versions(), "step_time_s": step_s, "step_time_rounds_s": [round(r, 5) for r in times],
            "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / step_s,
            "padded_tokens_per_step": padded, "pairs_per_s": pairs / step_s, "loss": loss, "beta": beta,
            "steps": total, "warmup_steps": warmup,
            "model": {k: getattr(tcfg, k) for k in ("num_layers", "vocab_size", "embed_dim", "hidden_dim",
                                                     "num_heads", "head_dim", "num_kv_heads", "rope_theta",
                                                     "norm_eps", "weight_tying")},
            "step": "DPOTrainer.train's loop per batch: _prepare_inputs (masks, positions, reference forward) + "
                    "jitted train step (policy forward, backward, optimizer) + metric bookkeeping",
            "differs": differs}
