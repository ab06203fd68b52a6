"""beta-DPO through the trainer: its running statistics live in the train state (checkpointed and
restored exactly), the beta it uses reaches metrics.jsonl, and fused members keep one state each."""

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dpo_jax import runner

TIMING = ("tokens_per_s", "mfu")


def _config(steps=6):
    from tests.test_runner import synthetic_config

    config = synthetic_config(steps=steps, checkpoint_every=2, keep_checkpoints=0, log_every=1, export_final=False)
    config.eval.num_prompts = 0
    config.loss.update(name="beta_dpo", beta=0.5, beta_dpo_alpha=2.0, beta_dpo_rho=0.75)
    return config


def _metrics(workdir):
    rows = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows if "loss" in r}


def _stored_loss_state(step_dir):
    return jax.tree.map(float, ocp.StandardCheckpointer().restore(step_dir / "state")["loss_state"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("beta_dpo_full")
    runner.run(_config(), str(workdir))
    return workdir


def test_beta_reaches_metrics_and_the_state_reaches_checkpoints(uninterrupted):
    rows = _metrics(uninterrupted)
    assert sorted(rows) == list(range(1, 7))
    betas = [rows[s]["beta_dpo/beta"] for s in range(1, 7)]
    assert betas[0] == pytest.approx(0.5, rel=1e-6), "step 1: policy == reference, every margin 0, beta = beta0"
    assert len(set(betas[1:])) > 1 and all(b > 0 for b in betas), betas
    for s in range(1, 7):
        assert rows[s]["beta_dpo/kept_frac"] == pytest.approx(0.75), s  # 12 of 16 pairs
    for s in (2, 4, 6):
        stored = _stored_loss_state(uninterrupted / "checkpoints" / str(s))["beta_dpo"]
        assert stored["initialized"] == 1.0
        assert stored["margin_mean"] == pytest.approx(rows[s]["beta_dpo/running_mean"], rel=1e-6, abs=1e-9), s
        assert stored["margin_std"] == pytest.approx(rows[s]["beta_dpo/running_std"], rel=1e-6, abs=1e-9), s
    assert rows[6]["beta_dpo/running_mean"] != 0.0


def test_resume_continues_with_the_saved_running_statistics(tmp_path, monkeypatch, uninterrupted):
    """Crash during step 5 (checkpoints 2 and 4 on disk), rerun: the resumed run starts from step 4's
    M0 and sigma and writes the uninterrupted run's rows."""
    from tests.train.test_checkpoint_recovery import _Crash, _crash_during_step

    with monkeypatch.context() as patch:
        _crash_during_step(patch, 5)
        with pytest.raises(_Crash):
            runner.run(_config(), str(tmp_path))
    checkpoints = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4]
    runner.run(_config(), str(tmp_path))
    want, got = _metrics(uninterrupted), _metrics(tmp_path)
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s] == want[s], f"step {s} differs after resume"


def test_fused_members_keep_one_state_each(tmp_path):
    """Two members that differ only in alpha: loss_state entries are [2], member k's rows are those
    of the separate run k."""
    configs = [_config(steps=3), _config(steps=3)]
    configs[1].loss.beta_dpo_alpha = 0.0
    dirs = [tmp_path / "a", tmp_path / "b"]
    for c, d in zip(configs, dirs):
        c.train.checkpoint_every = 0
    runner.run_group(configs, [str(d) for d in dirs])
    fused = [_metrics(d) for d in dirs]
    assert fused[1][3]["beta_dpo/beta"] == pytest.approx(0.5, rel=1e-6)  # alpha = 0: beta0
    assert fused[0][3]["beta_dpo/beta"] != pytest.approx(0.5, rel=1e-4)
    state = ocp.StandardCheckpointer().restore(dirs[0] / "checkpoints" / "3" / "state")
    assert np.asarray(state["loss_state"]["beta_dpo"]["margin_mean"]).shape == (2,)
    single = tmp_path / "single"
    runner.run(configs[0], str(single))
    alone = _metrics(single)
    for s in alone:
        for key in ("loss", "beta_dpo/beta", "beta_dpo/running_mean"):
            assert fused[0][s][key] == pytest.approx(alone[s][key], rel=1e-5, abs=1e-7), (s, key)
