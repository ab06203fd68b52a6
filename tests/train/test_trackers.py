"""W&B tracking of metrics.Writer (offline, no network)."""

import glob
import json
import os
import sys

import pytest

from dpo_jax.train import metrics, trackers


def _wandb_cfg(**kw):
    return {"enabled": True, "project": "dpo_jax_test", "entity": "", "mode": "offline", "tags": ("test",), **kw}


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'dpo_jax[tracking]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    os.makedirs(tmp_path / "wandb_dir", exist_ok=True)
    return tmp_path


def _offline_runs(workdir):
    return sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))


def test_writer_logs_to_an_offline_run_and_resumes_it(offline_env):
    workdir = str(offline_env / "run_a")
    w = metrics.Writer(workdir, tensorboard=False, wandb=_wandb_cfg(), run_config={"seed": 3, "loss": {"beta": 0.1}})
    assert len(w.trackers) == 1
    w.write(1, {"loss": 0.5, "rewards/accuracies": 0.25})
    w.write(2, {"loss": 0.4, "rewards/accuracies": 0.5})
    w.write(2, {"kl": 0.1, "name": "not a number"}, prefix="eval/")
    w.close()
    assert [r["step"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [1, 2, 2]
    with open(os.path.join(workdir, trackers.RUN_ID_FILE)) as f:
        rid = f.read().strip()
    runs = _offline_runs(workdir)
    assert len(runs) == 1 and runs[0].endswith(rid), runs

    # A second writer on the same workdir (a resumed run) continues the same W&B run.
    w2 = metrics.Writer(workdir, tensorboard=False, wandb=_wandb_cfg(), run_config={"seed": 3})
    assert w2.trackers[0].run_id == rid
    w2.write(3, {"loss": 0.3})
    w2.close()
    runs = _offline_runs(workdir)
    assert len(runs) == 2 and all(f"-{rid}" in os.path.basename(r) for r in runs), runs


def test_run_id_is_created_once(tmp_path):
    rid = trackers.run_id(str(tmp_path / "w"))
    assert rid and trackers.run_id(str(tmp_path / "w")) == rid
    assert json.dumps(rid)  # a plain string


def test_only_an_enabled_writer_tracks(offline_env):
    w = metrics.Writer(str(offline_env / "run_b"), tensorboard=False, enabled=False, wandb=_wandb_cfg())
    assert w.trackers == []
    w.write(1, {"loss": 1.0})
    w.close()
    assert not os.path.exists(offline_env / "run_b" / trackers.RUN_ID_FILE)


def test_disabled_tracking_needs_no_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    w = metrics.Writer(str(tmp_path), tensorboard=False, wandb=_wandb_cfg(enabled=False))
    w.write(1, {"loss": 1.0})
    w.close()
    assert metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) == [{"step": 1, "loss": 1.0}]
    with pytest.raises(ImportError, match=r"config\.logging\.wandb\.enabled.*dpo_jax\[tracking\]"):
        metrics.Writer(str(tmp_path / "on"), tensorboard=False, wandb=_wandb_cfg())


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        trackers.WandbTracker(str(tmp_path), _wandb_cfg(mode="sometimes"))


def test_base_config_section(tmp_path):
    from configs import base  # pylint: disable=g-import-not-at-top

    cfg = base.get_config()
    assert cfg.logging.wandb.enabled is False and cfg.logging.wandb.mode in trackers.MODES
    assert trackers.make_trackers(str(tmp_path), cfg.logging) == []
