"""Tests of config validation: each error names the key and what is allowed; the shipped configs pass."""

import re

import numpy as np
import pytest

from configs import base, hf, synthetic
from dpo_jax import config_check, losses
from dpo_jax.train import optim
from dpo_jax.data import layouts, tokenize
from dpo_jax.train.step import REF_MODES


def config(**sections):
    """configs/synthetic.py with `section={key: value}` updates."""
    c = synthetic.get_config()
    for section, values in sections.items():
        c[section].update(values)
    return c


def raises(c, *fragments):
    with pytest.raises(ValueError) as e:
        config_check.validate(c)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} missing from: {e.value}"
    return str(e.value)


@pytest.mark.parametrize("arg", ["", "runlocal=1", "loss=ipo,beta=0.5,steps=3"])
def test_synthetic_configs_validate(arg):
    c = synthetic.get_config(arg)
    config_check.validate(c)
    assert set(config_check.loss_hparams(c)) >= {"beta", "loss_weights"}


def test_hf_and_base_configs_validate():
    config_check.validate(hf.get_config("policy=X,data=Y"))
    config_check.validate(hf.get_config("policy=X,data=Y,eval=Z,loss=robust,beta=0.2,steps=5,batch=4"))
    config_check.validate(base.get_config())
    with pytest.raises(ValueError, match="policy=DIR,data=FILE"):
        hf.get_config("policy=X")


def test_unknown_loss_lists_the_registry():
    msg = raises(config(loss=dict(name="sigmod")), "config.loss.name='sigmod'", "unknown loss 'sigmod'")
    allowed = msg.split("allowed: ")[1]
    for name in losses.LOSSES:
        assert re.search(rf"\b{name}\b", allowed), name
    raises(config(loss=dict(name="sigmoid+nope")), "unknown loss 'nope'")


def test_combined_loss_with_weights():
    c = config(loss=dict(name="sigmoid+sft", weights=(1.0, 0.25)))
    config_check.validate(c)
    hp = config_check.loss_hparams(c)
    np.testing.assert_array_equal(hp["loss_weights"], np.float32([1.0, 0.25]))
    assert config_check.objective(c).names == ("sigmoid", "sft")
    raises(config(loss=dict(name="sigmoid+sft", weights=(1.0,))), "config.loss", "loss.weights", "2 losses")


def test_reference_modes():
    msg = raises(config(reference=dict(mode="frozzen")), "config.reference.mode='frozzen'")
    for mode in REF_MODES:
        assert mode in msg
    raises(config(reference=dict(mode="none")), "config.reference.mode='none'", "sigmoid", "simpo")
    config_check.validate(config(reference=dict(mode="none"), loss=dict(name="simpo")))
    config_check.validate(config(reference=dict(mode="none"), loss=dict(name="orpo")))
    raises(config(reference=dict(mode="base")), "config.reference.mode='base'", "config.model.lora.rank")
    config_check.validate(config(reference=dict(mode="base"), model=dict(lora=dict(rank=4))))
    raises(config(reference=dict(mode="sync"), model=dict(lora=dict(rank=4))), "config.reference.mode='sync'",
           "config.model.lora.rank")
    raises(config(reference=dict(mode="sync", sync_alpha=1.5)), "config.reference.sync_alpha=1.5", "(0, 1]")
    raises(config(reference=dict(mode="sync", sync_every=0)), "config.reference.sync_every=0", "> 0")
    config_check.validate(config(reference=dict(mode="precomputed")))


@pytest.mark.parametrize("section,key,bad,allowed", [
    ("data", "layout", "paked", layouts.LAYOUTS),
    ("data", "truncation_mode", "keep_middle", tokenize.TRUNCATION_MODES),
    ("data", "format", "implicit", config_check.FORMATS),
    ("model", "dtype", "float16", config_check.DTYPES),
    ("model", "param_dtype", "fp32", config_check.DTYPES),
    ("model", "remat", "some", ("none", "full", "dots", "dots_all")),
    ("optim", "name", "adam", optim.OPTIMIZERS),
    ("optim", "schedule", "cosin", optim.SCHEDULES),
    ("train", "on_nonfinite", "ignore", config_check.NONFINITE),
])
def test_choices_name_key_and_allowed_values(section, key, bad, allowed):
    msg = raises(config(**{section: {key: bad}}), f"config.{section}.{key}={bad!r}", "allowed: ")
    for a in allowed:
        assert a in msg.split("allowed: ")[1], a


def test_family_checked_only_for_random_init():
    c = config(model=dict(arch=dict(family="bert")))
    raises(c, "config.model.arch.family='bert'", "llama", "gpt2")
    c.model.update(path="/some/hf/dir")
    config_check.validate(c)  # the checkpoint's config.json decides the family


@pytest.mark.parametrize("section,key,bad,bound", [
    ("data", "batch_size", 0, "> 0"), ("data", "eval_batch_size", -1, "> 0"), ("data", "max_length", 0, "> 0"),
    ("optim", "lr", 0.0, "> 0"), ("optim", "grad_accum", 0, "> 0"), ("optim", "warmup_steps", -1, ">= 0"),
    ("train", "steps", -1, ">= 0"), ("train", "log_every", 0, "> 0"), ("train", "eval_every", -5, ">= 0"),
    ("logprobs", "capacity", -1, ">= 0"), ("sft", "steps", -1, ">= 0"),
])
def test_numbers_out_of_range(section, key, bad, bound):
    raises(config(**{section: {key: bad}}), f"config.{section}.{key}={bad!r}", bound)


def test_eval_sources_are_exclusive():
    raises(config(data=dict(eval_split="test", eval_fraction=0.1)), "eval_split", "eval_fraction")
    raises(config(data=dict(eval_source="x.jsonl", eval_fraction=0.1)), "eval_source", "eval_fraction")
    raises(config(data=dict(eval_fraction=1.0)), "config.data.eval_fraction=1.0", "[0, 1)")
    raises(config(data=dict(prefix_min_saving=1.0)), "config.data.prefix_min_saving=1.0", "[0, 1)")
    config_check.validate(config(data=dict(eval_split="test")))
    config_check.validate(config(data=dict(eval_fraction=0.1)))


def test_data_source_and_tokenizer():
    raises(config(data=dict(source="")), "config.data.source")
    raises(config(data=dict(source="pairs.jsonl")), "config.model.tokenizer", "'pairs.jsonl'")
    config_check.validate(config(data=dict(source="pairs.jsonl"), model=dict(tokenizer="tok/")))


def test_loss_hyperparameter_out_of_range_is_named():
    raises(config(loss=dict(name="robust", label_smoothing=0.7)), "config.loss", "'robust'", "label_smoothing=0.7",
           "[0.0, 0.5)")
    raises(config(loss=dict(beta=0.0)), "config.loss", "beta=0.0", "(0.0, inf]")
    raises(config(loss=dict(name="simpo", gamma=-1.0)), "gamma=-1.0")
    hp = config_check.loss_hparams(config(loss=dict(name="robust", label_smoothing=0.2, beta=0.3)))
    assert hp["label_smoothing"] == np.float32(0.2) and hp["beta"] == np.float32(0.3)
    hp = config_check.loss_hparams(config(loss=dict(name="robust")))
    assert hp["label_smoothing"] == np.float32(losses.LOSSES["robust"].hparams["label_smoothing"].default)


def test_hyperparameter_the_loss_does_not_have_is_an_error():
    """TRL's sigmoid takes label_smoothing; ours is 'conservative' - never ignore it silently."""
    msg = raises(config(loss=dict(name="sigmoid", label_smoothing=0.1)), "config.loss.label_smoothing=0.1",
                 "config.loss.name='sigmoid'", "conservative", "robust")
    assert "its hyper-parameters: beta" in msg
    raises(config(loss=dict(name="ipo", gamma=1.0)), "config.loss.gamma=1.0", "simpo")


def test_loss_hparams_always_has_beta():
    for name in ("sigmoid", "sft", "simpo", "orpo", "kto", "sigmoid+sft"):
        c = config(loss=dict(name=name, beta=0.37))
        if "+" in name:
            c.loss.weights = (1.0, 1.0)
        hp = config_check.loss_hparams(c)
        assert hp["beta"] == np.float32(0.37), name
        assert all(isinstance(v, (np.ndarray, np.floating)) for v in hp.values()), hp


def test_ld_alpha_length_weighting_and_ld_dpo():
    c = config(loss=dict(name="sigmoid", ld_alpha=0.5))
    assert config_check.objective(c).ld
    assert config_check.loss_hparams(c)["ld_alpha"] == np.float32(0.5)
    assert not config_check.objective(config()).ld
    raises(config(loss=dict(name="sigmoid", ld_alpha=1.5)), "ld_alpha=1.5")
    # ld_dpo has its own ld_alpha: the config's value is that hyper-parameter, applied once.
    c = config(loss=dict(name="ld_dpo", ld_alpha=0.3))
    config_check.validate(c)
    assert not config_check.objective(c).ld
    assert config_check.loss_hparams(c)["ld_alpha"] == np.float32(0.3)
    raises(config(loss=dict(name="ld_dpo", ld_alpha=1.5)), "config.loss", "'ld_dpo'", "ld_alpha=1.5")
    assert config_check.loss_hparams(config(loss=dict(name="ld_dpo")))["ld_alpha"] == np.float32(0.5)


def test_rules_owned_by_lower_modules_name_the_config_key():
    """optim, eval-split and reference-mode rules live with their modules; config_check names the key."""
    from dpo_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    from dpo_jax.train import step  # pylint: disable=g-import-not-at-top

    c = config(optim=dict(name="adam"))
    with pytest.raises(ValueError, match=r"^optim\.name='adam'; allowed: adamw"):
        optim.check(c.optim)
    raises(c, "config.optim.name='adam'; allowed: adamw")
    with pytest.raises(ValueError, match=r"^DataConfig: set at most one of eval_split, eval_fraction$"):
        pipeline.DataConfig(eval_split="test", eval_fraction=0.1).validate()
    raises(config(data=dict(eval_split="test", eval_source="x.jsonl")),
           "config.data: set at most one of eval_split, eval_fraction, eval_source")
    obj = config_check.objective(config())
    with pytest.raises(ValueError, match=r"^reference\.mode='base' needs a LoRA policy: set model\.lora\.rank > 0"):
        step.check_ref_mode("base", obj, has_lora=False)
    step.check_ref_mode("base", obj, has_lora=True)
    raises(config(reference=dict(mode="none")), "config.loss.name='sigmoid' uses a reference")


def test_mesh_rules_are_checked_before_anything_is_built():
    c = base.get_config()
    c.mesh.rules = (("embd", "fsdp"),)
    with pytest.raises(ValueError, match=r"config\.mesh\.rules\[0\]: unknown logical axis 'embd'"):
        config_check.validate(c)


def test_logit_slots_and_capacity_are_not_both_chosen():
    raises(config(logprobs=dict(capacity=64)), "config.logprobs.capacity=64", "config.data.logit_slots=True")
    config_check.validate(config(logprobs=dict(capacity=64), data=dict(logit_slots=False)))
