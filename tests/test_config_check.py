"""Tests of config validation: each error names the key and what is allowed; the shipped configs pass."""

import re

import jax
import numpy as np
import pytest

from configs import base, hf, synthetic
from dpo_jax import config_check, losses, runner
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
    ("train", "keep_checkpoints", -1, ">= 0"), ("train", "max_skipped_steps", -1, ">= 0"), ("sft", "steps", -1, ">= 0"), ("sft", "warmup_steps", -1, ">= 0"),
    ("sft", "batch_size", 0, "> 0"), ("train", "peak_flops", -1.0, ">= 0"), ("model", "attention_block", -1, ">= 0"),
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


# Every rule of `validate`, through `runner.run`: the error comes before anything is compiled or written.
REJECTED = {
    "lr_nan": (dict(optim=dict(lr=float("nan"))), ("config.optim.lr=nan", "finite and > 0")),
    "lr_inf": (dict(optim=dict(lr=float("inf"))), ("config.optim.lr=inf",)),
    "lr_zero": (dict(optim=dict(lr=0.0)), ("config.optim.lr=0.0",)),
    "lr_negative": (dict(optim=dict(lr=-1e-3)), ("config.optim.lr=-0.001",)),
    "sft_lr_nan": (dict(sft=dict(lr=float("nan"))), ("config.sft.lr=nan", "finite and > 0")),
    "keep_checkpoints": (dict(train=dict(keep_checkpoints=-1)), ("config.train.keep_checkpoints=-1", ">= 0")),
    "log_every": (dict(train=dict(log_every=0)), ("config.train.log_every=0", "> 0")),
    "heads_do_not_divide_hidden": (dict(model=dict(arch=dict(hidden_size=66))),
                                   ("config.model.arch.hidden_size=66", "config.model.arch.num_heads=4")),
    "kv_heads_do_not_divide_heads": (dict(model=dict(arch=dict(num_kv_heads=3))),
                                     ("config.model.arch.num_heads (4)", "num_kv_heads (3)")),
    "not_exportable": (dict(model=dict(arch=dict(family="gpt2", head_dim=8))),
                       ("config.model.arch (family='gpt2')", "head_dim")),
    "max_length": (dict(data=dict(max_length=1)), ("config.data.max_length=1", ">= 2")),
    "max_prompt_length": (dict(data=dict(max_prompt_length=16)),
                          ("config.data.max_prompt_length=16", "config.data.max_length=16")),
    "mask_logits_outside_synthetic": (dict(synthetic=dict(mask_logits=True),
                                           data=dict(source="pairs.jsonl"), model=dict(tokenizer="tok")),
                                      ("config.synthetic.mask_logits=True", "config.data.source='pairs.jsonl'")),
    "unpaired_with_paired_loss": (dict(data=dict(format="unpaired")),
                                  ("config.data.format='unpaired'", "config.loss.name='sigmoid'", "sft")),
}


@pytest.fixture
def compiles():
    """The XLA compilations while the test runs (jax.monitoring's backend-compile event)."""
    seen = []

    def listen(event, duration_secs, **kwargs):
        del duration_secs, kwargs
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listen)


def test_compile_counter_sees_a_compile(compiles):
    jax.jit(lambda x: x * 3 + 1)(np.float32(2.0))
    assert compiles


@pytest.mark.parametrize("updates,fragments", REJECTED.values(), ids=REJECTED.keys())
def test_rejected_before_anything_compiles(updates, fragments, tmp_path, compiles):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        runner.run(config(**updates), str(workdir))
    msg = str(e.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} missing from: {msg}"
    assert "\n" not in msg
    assert compiles == [] and not workdir.exists()


def test_the_rejected_configs_pass_once_fixed():
    config_check.validate(config(model=dict(arch=dict(hidden_size=66, head_dim=16))))
    config_check.validate(config(model=dict(arch=dict(family="gpt2", num_kv_heads=3))))  # gpt2: kv heads = heads
    config_check.validate(config(model=dict(path="/some/hf/dir", arch=dict(num_kv_heads=3))))  # its config.json rules
    config_check.validate(config(data=dict(max_length=2, max_prompt_length=1)))


def test_format_for_losses():
    sft, mixed = losses.Objective(("sft",)), losses.Objective(("sigmoid", "sft"))
    config_check.check_format_for_losses("unpaired", sft)
    for fmt in ("auto", "standard", "conversational"):
        config_check.check_format_for_losses(fmt, mixed)
    with pytest.raises(ValueError, match=r"^config\.data\.source='x\.jsonl'='unpaired': .*'sigmoid\+sft' \(sigmoid "):
        config_check.check_format_for_losses("unpaired", mixed, where="config.data.source='x.jsonl'")


# The rules that depend on the devices: 8 devices (tests/conftest.py), mesh (data=-1, fsdp=1, tensor=1).
DEVICE_REJECTED = {
    "batch_size": (dict(data=dict(batch_size=12)), 8, 1, ("config.data.batch_size=12", "multiple of 8")),
    "eval_batch_size": (dict(data=dict(eval_batch_size=20)), 8, 1, ("config.data.eval_batch_size=20", "8 devices")),
    "sft_batch_size": (dict(sft=dict(batch_size=36)), 8, 1, ("config.sft.batch_size=36", "multiple of 8")),
    "fsdp_shards_the_batch": (dict(data=dict(batch_size=12), mesh=dict(shape=dict(data=1, fsdp=-1))), 8, 1,
                              ("config.data.batch_size=12", "('data', 'fsdp')")),
    "tensor_does_not": (dict(data=dict(batch_size=6), mesh=dict(shape=dict(tensor=2))), 8, 1,
                        ("config.data.batch_size=6", "multiple of 4")),
    "processes": (dict(data=dict(batch_size=7), mesh=dict(shape=dict(data=1, tensor=-1))), 2, 2,
                  ("config.data.batch_size=7", "2 processes")),
    "mesh_shape": (dict(mesh=dict(shape=dict(data=3))), 8, 1, ("config.mesh.shape=", "needs 3 devices")),
}


@pytest.mark.parametrize("updates,devices,processes,fragments", DEVICE_REJECTED.values(), ids=DEVICE_REJECTED.keys())
def test_device_rules(updates, devices, processes, fragments):
    c = config(**updates)
    config_check.validate(c)  # no devices needed
    with pytest.raises(ValueError) as e:
        config_check.check_devices(c, devices, processes)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} missing from: {e.value}"


def test_device_rules_pass_for_the_shipped_configs():
    for c in (synthetic.get_config(), synthetic.get_config("runlocal=1"), base.get_config()):
        config_check.check_devices(c, jax.device_count(), jax.process_count())
        config_check.check_devices(c, 1)
    config_check.check_devices(config(data=dict(batch_size=6), mesh=dict(shape=dict(tensor=4))), 8)
    config_check.check_devices(config(sft=dict(steps=0, batch_size=36)), 8)  # no SFT stage: its batch is unused


def test_losses_of_ranked_lists_and_their_data():
    config_check.validate(config(loss=dict(name="plackett_luce"), data=dict(layout="prefix")))
    config_check.validate(config(loss=dict(name="lipo_lambda"), data=dict(format="listwise", list_size=3)))
    msg = raises(config(loss=dict(name="sigmod")), "unknown loss")
    assert "plackett_luce" in msg and "lipo_lambda" in msg  # the registry of lists is listed too
    raises(config(loss=dict(name="plackett_luce"), data=dict(format="standard")),
           "config.data.format='standard'", "plackett_luce", "ranked lists")
    raises(config(loss=dict(name="sigmoid"), data=dict(format="listwise")),
           "config.data.format='listwise'", "lipo_lambda, plackett_luce", "not config.loss.name='sigmoid'")
    raises(config(loss=dict(name="sigmoid+plackett_luce")), "config.loss.name='sigmoid+plackett_luce'",
           "mixes losses of ranked lists")
    raises(config(loss=dict(name="plackett_luce", ld_alpha=0.5)), "LD-DPO", "unset config.loss.ld_alpha")
    raises(config(loss=dict(name="plackett_luce"), reference=dict(mode="precomputed")),
           "config.reference.mode='precomputed'", "'frozen'")
    raises(config(loss=dict(name="plackett_luce"), data=dict(list_size=1)), "config.data.list_size=1")
    raises(config(loss=dict(name="plackett_luce"), online=dict(rounds=2)), "config.online.rounds=2",
           "ranked lists")
