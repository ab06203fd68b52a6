"""launch.sweep_plan: declaring a sweep (product, zip), expanding it into named runs, validating every
member before anything runs, and the groups that share an SFT model."""

import os
import sys

import pytest

from launch import sweep_plan
from tests.launch.test_sweep import REPO, SYNTHETIC, write_config


def test_product_and_zip():
    assert sweep_plan.product(("a.x", [1, 2]), ("b.y", ["p", "q"])) == [
        {"a.x": 1, "b.y": "p"}, {"a.x": 1, "b.y": "q"}, {"a.x": 2, "b.y": "p"}, {"a.x": 2, "b.y": "q"}]
    assert sweep_plan.zip(("a.x", [1, 2]), ("b.y", [3, 4])) == [{"a.x": 1, "b.y": 3}, {"a.x": 2, "b.y": 4}]
    nested = sweep_plan.product(("loss.name", ["simpo"]),
                                sweep_plan.zip(("loss.beta", [1.0, 2.0]), ("loss.gamma", [0.5, 1.0])))
    assert nested == [{"loss.name": "simpo", "loss.beta": 1.0, "loss.gamma": 0.5},
                      {"loss.name": "simpo", "loss.beta": 2.0, "loss.gamma": 1.0}]
    with pytest.raises(ValueError, match=r"different lengths \[2, 3\]"):
        sweep_plan.zip(("a", [1, 2]), ("b", [1, 2, 3]))
    with pytest.raises(ValueError, match="'a' is set twice"):
        sweep_plan.product(("a", [1]), ("a", [2]))
    with pytest.raises(ValueError, match="not a dotted config key"):
        sweep_plan.product(("loss beta", [1]))
    with pytest.raises(ValueError, match="no values for 'a'"):
        sweep_plan.product(("a", []))


def test_default_synthetic_sweep_expands_to_12_named_runs(tmp_path):
    runs = sweep_plan.expand(SYNTHETIC, str(tmp_path))
    names = [r.name for r in runs]
    assert len(runs) == 12 and len(set(names)) == 12
    assert names[0] == "loss.name=sigmoid,loss.beta=0.25"
    assert "loss.name=ipo,loss.beta=0.5" in names
    assert "loss.name=simpo,loss.beta=8.0,reference.mode=none" in names
    by_loss = {}
    for r in runs:
        by_loss.setdefault(r.overrides["loss.name"], []).append(r.overrides["loss.beta"])
        assert r.overrides["train.steps"] == 300
        assert r.overrides.get("reference.mode") == ("none" if r.overrides["loss.name"] == "simpo" else None)
        assert r.workdir == os.path.join(str(tmp_path), r.name)
        assert r.sft_model_dir == os.path.join(str(tmp_path), "sft_model")  # one SFT model for all 12
        assert r.command[:3] == [sys.executable, "-m", "dpo_jax.main"]
        assert r.command[3:5] == [f"--config={SYNTHETIC}", f"--workdir={r.workdir}"]
        assert f"--config.loss.beta={r.overrides['loss.beta']!r}" in r.command
        assert r.command[-1] == f"--config.sft.model_dir={tmp_path}/sft_model"
        assert r.env["JAX_COMPILATION_CACHE_DIR"] == f"{tmp_path}/jax_cache"  # compiled once, shared
    assert {k: len(v) for k, v in by_loss.items()} == {"sigmoid": 4, "ipo": 4, "simpo": 4}
    # runlocal keeps the config's own (tiny) step count
    assert all("train.steps" not in r.overrides for r in sweep_plan.expand(SYNTHETIC + ":runlocal=1", str(tmp_path)))


def test_hf_sweep_over_beta(tmp_path):
    fixture = REPO / "tests" / "fixtures" / "trl_parity"
    spec = f"{REPO}/configs/hf.py:policy={fixture}/policy,data={fixture}/pairs.jsonl,loss=ipo"
    runs = sweep_plan.expand(spec, str(tmp_path))
    assert [r.name for r in runs] == ["loss.beta=0.01", "loss.beta=0.05", "loss.beta=0.1", "loss.beta=0.5"]
    assert all(r.sft_model_dir is None and r.args[0] == f"--config={spec}" for r in runs)  # no SFT stage
    with pytest.raises(ValueError, match="policy=DIR,data=FILE"):
        sweep_plan.expand(f"{REPO}/configs/hf.py", str(tmp_path))


def test_bad_members_fail_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"sweep member 'loss.betta=0.5': config key 'loss.betta' does not exist"):
        sweep_plan.expand(write_config(tmp_path, 'sweep_plan.product(("loss.betta", [0.5, 1.0]))'), str(tmp_path))
    with pytest.raises(ValueError, match=r"sweep member 'loss.name=ipo'.*reference.mode='none'"):
        sweep_plan.expand(write_config(tmp_path, 'sweep_plan.product(("reference.mode", ["none"]), '
                                                 '("loss.name", ["simpo", "ipo"]))'), str(tmp_path))
    with pytest.raises(ValueError, match="identical members"):
        sweep_plan.expand(write_config(tmp_path, '[{"loss.beta": 1.0}, {"loss.beta": 1.0}]'), str(tmp_path))
    with pytest.raises(ValueError, match="declares no sweep"):
        sweep_plan.expand(str(REPO / "configs" / "base.py"), str(tmp_path))


def test_sft_groups_follow_the_keys_that_change_sft(tmp_path):
    cfg = write_config(tmp_path, 'sweep_plan.product(("sft.lr", [0.001, 0.003]), ("loss.beta", [0.5, 1.0]))')
    runs = sweep_plan.expand(cfg, str(tmp_path))
    dirs = {r.name: r.sft_model_dir for r in runs}
    assert dirs["sft.lr=0.001,loss.beta=0.5"] == dirs["sft.lr=0.001,loss.beta=1.0"]
    assert dirs["sft.lr=0.001,loss.beta=0.5"] == f"{tmp_path}/sft_model.sft.lr=0.001"
    assert dirs["sft.lr=0.003,loss.beta=0.5"] == f"{tmp_path}/sft_model.sft.lr=0.003"
    no_sft = sweep_plan.expand(cfg, str(tmp_path), extra={"sft.steps": 0})
    assert all(r.sft_model_dir is None and not any("sft.model_dir" in a for a in r.args) for r in no_sft)


def test_seeds_repeat_every_member_each_with_its_own_sft_model(tmp_path):
    cfg = write_config(tmp_path, 'sweep_plan.product(("loss.name", ["sigmoid", "ipo"]), ("loss.beta", [0.5, 1.0]))')
    one = sweep_plan.expand(cfg, str(tmp_path))
    runs = sweep_plan.expand(cfg, str(tmp_path), seeds=2)
    assert len(runs) == 2 * len(one) == 8
    assert [r.name for r in runs] == [f"{r.name},seed={s}" for r in one for s in (0, 1)]
    assert [r.overrides["seed"] for r in runs] == [0, 1] * 4
    for r in runs:
        s = r.overrides["seed"]
        assert f"--config.seed={s}" in r.command and r.workdir == os.path.join(str(tmp_path), r.name)
        assert r.sft_model_dir == f"{tmp_path}/sft_model.seed={s}"  # seed changes the SFT stage
    assert all("seed" not in r.overrides for r in sweep_plan.expand(cfg, str(tmp_path), seeds=1))
    based = sweep_plan.expand(cfg, str(tmp_path), seeds=2, extra={"seed": 5})  # base seed + i
    assert [r.overrides["seed"] for r in based] == [5, 6] * 4 and based[1].name.endswith(",seed=6")
    with pytest.raises(ValueError, match="--seeds=0"):
        sweep_plan.expand(cfg, str(tmp_path), seeds=0)


def test_fused_groups_keep_seeds_apart(tmp_path):
    from launch import fused_sweep  # pylint: disable=g-import-not-at-top

    cfg = write_config(tmp_path, 'sweep_plan.product(("loss.beta", [0.5, 1.0, 2.0]))')
    runs = sweep_plan.expand(cfg, str(tmp_path), seeds=2)
    groups = [[runs[i].overrides["seed"] for i in g] for g in fused_sweep.plan(cfg, runs)]
    assert groups == [[0, 0, 0], [1, 1, 1]]


def test_config_args_are_the_trainers_override_syntax():
    overrides, rest = sweep_plan.parse_config_args(
        ["--config=configs/x.py:runlocal=1", "--config.train.steps=7", "--root", "R", "--config.loss.name", "ipo",
         "--config.mesh.shape={'data': -1}", "--config.model.lora.targets=('mlp',)", "--dry_run"])
    assert overrides == {"train.steps": 7, "loss.name": "ipo", "mesh.shape": {"data": -1},
                         "model.lora.targets": ("mlp",)}
    assert rest == ["--config=configs/x.py:runlocal=1", "--root", "R", "--dry_run"]
    assert sweep_plan.override_args({"train.steps": 7, "loss.beta": 0.5, "model.lora.targets": ("mlp",)}) == [
        "--config.train.steps=7", "--config.loss.beta=0.5", "--config.model.lora.targets=('mlp',)"]
    with pytest.raises(ValueError, match="no value"):
        sweep_plan.parse_config_args(["--config.train.steps"])
    with pytest.raises(ValueError, match="not a dotted config key"):
        sweep_plan.parse_config_args(["--config.train..steps=3"])
