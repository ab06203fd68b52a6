"""End-to-end tests of the trainer: TRL parity through configs/hf.py, exact resume after SIGKILL,
SIGTERM, non-finite losses, and the exported model."""

import collections
import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from dpo_jax import multihost, runner
from dpo_jax.data import pipeline
from dpo_jax.train import checkpoint, loop

REPO = pathlib.Path(__file__).resolve().parents[1]
REGEN = ("goldens: tests/fixtures/trl_parity/trl_reference.json (TRL 1.16 DPOTrainer.compute_loss, one batch of "
         "all 16 pairs, float32 CPU, beta 0.1); regenerate with tests/fixtures/trl_parity/make_reference.py")


def hf_config(fixture, **loss):
    from configs import hf as hf_config_file

    pairs = str(fixture / "pairs.jsonl")
    c = hf_config_file.get_config(f"policy={fixture / 'policy'},reference={fixture / 'reference'},data={pairs},"
                                  f"eval={pairs},batch=16")
    c.train.update(steps=0, progress=False, export_final=False)
    c.data.update(eval_batch_size=16)
    c.loss.update(loss)
    return c


def test_evaluate_only_scores_every_row_without_an_eval_file(trl_fixture_dir, tmp_path):
    """train.steps=0 and no eval= argument: configs/hf.py would hold out 5% for a training run; an
    evaluation scores all 16 pairs and reproduces TRL's loss on all of them."""
    from configs import hf as hf_config_file

    ref = json.loads((REPO / "tests/fixtures/trl_parity/trl_reference.json").read_text())
    sigmoid = next(c for c in ref["cases"] if c["case"] == {"loss_type": ["sigmoid"]})
    c = hf_config_file.get_config(f"policy={trl_fixture_dir / 'policy'},reference={trl_fixture_dir / 'reference'},"
                                  f"data={trl_fixture_dir / 'pairs.jsonl'},batch=16,steps=0")
    assert c.data.eval_fraction == 0.05 and not c.data.eval_source
    c.train.update(progress=False, export_final=False)
    c.data.update(eval_batch_size=16)
    report = runner.run(c, str(tmp_path))
    assert report["eval/pairs"] == 16.0
    np.testing.assert_allclose(report["eval/loss"], sigmoid["loss"], rtol=1e-5, err_msg=REGEN)


def trl_case_overrides(case):
    """TRL DPOConfig loss setting -> config.loss overrides."""
    names = list(case["loss_type"])
    out = {"name": "+".join(names), "beta": 0.1}
    if case.get("f_divergence_type", "reverse_kl") != "reverse_kl":
        out["name"] = case["f_divergence_type"]
    for ours, theirs in (("label_smoothing", "label_smoothing"), ("alpha", "f_alpha_divergence_coef"),
                         ("ld_alpha", "ld_alpha")):
        if theirs in case:
            out[ours] = case[theirs]
    if "loss_weights" in case:
        out["weights"] = tuple(case["loss_weights"])
    return out


def _cases():
    ref = json.loads((REPO / "tests/fixtures/trl_parity/trl_reference.json").read_text())
    return [pytest.param(c, id="+".join(c["case"]["loss_type"]) + "-" + "-".join(
        f"{k}={v}" for k, v in c["case"].items() if k != "loss_type")) for c in ref["cases"]]


@pytest.mark.parametrize("case", _cases())
def test_trl_parity_end_to_end(case, trl_fixture_dir, tmp_path):
    """configs/hf.py on the fixture (policy, reference, pairs, beta 0.1, one eval batch of all 16 pairs)
    reproduces TRL's loss and metrics: checkpoint loading, tokenization, layout, log-probs, loss."""
    config = hf_config(trl_fixture_dir, **trl_case_overrides(case["case"]))
    report = runner.run(config, str(tmp_path))
    assert report["eval/pairs"] == 16.0
    f_div = case["case"].get("f_divergence_type", "reverse_kl") != "reverse_kl"
    np.testing.assert_allclose(report["eval/loss"], case["loss"], rtol=1e-4 if f_div else 1e-5,
                               err_msg=f"{case['case']}: loss; {REGEN}")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        np.testing.assert_allclose(report[f"eval/{key}"], case["metrics"][key], rtol=1e-5, atol=2e-6,
                                   err_msg=f"{case['case']}: {key}; {REGEN}")
    assert (tmp_path / "report.json").exists() and (tmp_path / "config.json").exists()


def synthetic_config(**train_overrides):
    from configs import synthetic

    c = synthetic.get_config("runlocal=1")
    c.sft.steps = 0
    c.train.update(progress=False, **train_overrides)
    return c


def test_masked_logits_never_sample_special_tokens(tmp_path):
    """synthetic.mask_logits: trained and evaluated over content tokens and EOS only."""
    from configs import synthetic

    c = synthetic.get_config("runlocal=1,mask=1")
    c.train.update(progress=False, export_final=False)
    report = runner.run(c, str(tmp_path))
    assert report["sample/malformed/special_token"] == 0.0
    assert np.isfinite(report["eval/loss"]) and np.isfinite(report["sample/kl"])


def test_evaluate_only_at_step_zero_gives_closed_form(tmp_path):
    """train.steps=0 with policy == reference: loss ln 2, all rewards 0, gradient weight 1/2."""
    report = runner.run(synthetic_config(steps=0), str(tmp_path))
    assert math.isclose(report["eval/loss"], math.log(2.0), rel_tol=1e-6)
    for key in ("eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins"):
        assert report[key] == 0.0, key
    assert report["eval/grad_weight/mean"] == 0.5


def test_export_loads_in_transformers_with_same_logits(tmp_path):
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from dpo_jax.models import hf

    c = synthetic_config(steps=4, checkpoint_every=0)
    c.sft.steps = 2
    runner.run(c, str(tmp_path))
    trained = hf.load_model(str(tmp_path / "final"))
    sft = hf.load_model(str(tmp_path / "sft" / "model"))
    tokens = np.array([[5, 9, 4, 7, 6, 11, 2]], np.int32)
    ours = np.asarray(trained.logits(trained(tokens)))
    assert not np.allclose(ours, np.asarray(sft.logits(sft(tokens))))  # DPO moved the policy
    torch_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"), dtype=torch.float32)
    with torch.no_grad():
        theirs = torch_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    del nnx


def _nan_at(batch_index, real):
    """`make_train_iterator` whose batch number `batch_index` (1-based; a container: each of those) has
    out-of-vocabulary targets, so a NaN loss."""
    bad = set(batch_index) if isinstance(batch_index, (set, range, list, tuple)) else {batch_index}

    def make(rows, tokenize_fn, config, **kw):
        it = real(rows, tokenize_fn, config, **kw)

        class Corrupting:
            def __init__(self):
                self.n = 0

            def __next__(self):
                batch = dict(next(it))
                self.n += 1
                if self.n in bad:  # an out-of-vocabulary target gives a NaN log-prob
                    batch["targets_BxT"] = np.where(batch["loss_mask_BxT"] > 0, 10_000,
                                                    batch["targets_BxT"]).astype(np.int32)
                return batch

            def get_state(self):
                return it.get_state()

            def set_state(self, s):
                it.set_state(s)

        return Corrupting()
    return make


def test_nonfinite_loss_stops_and_leaves_last_checkpoint_loadable(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "make_train_iterator", _nan_at(4, pipeline.make_train_iterator))
    monkeypatch.setattr(checkpoint.Checkpointer, "save", _plain_save(checkpoint.Checkpointer.save))
    with pytest.raises(loop.NonFiniteError, match=r"train: step 4: non-finite loss") as err:
        runner.run(synthetic_config(steps=8, checkpoint_every=2), str(tmp_path))
    assert "the newest checkpoint, step 2 in" in str(err.value), str(err.value)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2], steps
    import jax
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "2" / "state")
    assert int(restored["step"]) == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored["params"]))


def test_nonfinite_first_step_says_there_is_no_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "make_train_iterator", _nan_at(1, pipeline.make_train_iterator))
    monkeypatch.setattr(checkpoint.Checkpointer, "save", _plain_save(checkpoint.Checkpointer.save))
    with pytest.raises(loop.NonFiniteError, match=r"train: step 1: non-finite loss.*has no checkpoint yet"):
        runner.run(synthetic_config(steps=4, checkpoint_every=2), str(tmp_path))
    assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


def test_skip_mode_stops_after_max_skipped_steps_in_a_row(tmp_path, monkeypatch):
    """Steps 2 and 4 skipped (counted, reported); from step 6 on every step is non-finite: the run stops
    when the 3rd in a row exceeds train.max_skipped_steps=2, and no non-finite state reaches a checkpoint."""
    monkeypatch.setattr(pipeline, "make_train_iterator", _nan_at({2, 4, *range(6, 20)}, pipeline.make_train_iterator))
    monkeypatch.setattr(checkpoint.Checkpointer, "save", _plain_save(checkpoint.Checkpointer.save))
    config = synthetic_config(steps=12, checkpoint_every=1, on_nonfinite="skip", max_skipped_steps=2, log_every=1,
                              keep_checkpoints=0)
    with pytest.raises(loop.NonFiniteError, match=r"train: step 8: non-finite loss.*3 non-finite steps in a row, "
                                                  r"more than train.max_skipped_steps=2"):
        runner.run(config, str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0.0) for r in rows if "loss" in r] == [0, 1, 1, 2, 2, 3, 4]  # steps 1..7
    import orbax.checkpoint as ocp

    import jax
    for path in (tmp_path / "checkpoints").iterdir():
        if path.name.isdigit():
            params = ocp.StandardCheckpointer().restore(path / "state")["params"]
            assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params)), path.name


def test_finished_run_rerun_writes_nothing(tmp_path, capsys):
    config = synthetic_config(steps=2, checkpoint_every=0)
    config.eval.num_prompts = 0
    first = runner.run(config, str(tmp_path))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    again = runner.run(config, str(tmp_path))
    assert again == json.loads(json.dumps(first))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written, nothing new
    changed = synthetic_config(steps=3, checkpoint_every=0)  # another config resumes and trains on
    changed.eval.num_prompts = 0
    assert runner.run(changed, str(tmp_path))["steps"] == 3


def _plain_save(save):  # the data iterator of the corrupting wrapper is not a grain iterator
    def wrapped(self, step, state, data_iterator=None, extra=None, *, force=False):
        return save(self, step, state, None, extra, force=force)
    return wrapped


def test_nonfinite_loss_skipped_when_configured(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "make_train_iterator", _nan_at(3, pipeline.make_train_iterator))
    monkeypatch.setattr(checkpoint.Checkpointer, "save", _plain_save(checkpoint.Checkpointer.save))
    report = runner.run(synthetic_config(steps=6, checkpoint_every=0, on_nonfinite="skip", log_every=1), str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    flagged = [r["step"] for r in rows if r.get("nonfinite") == 1.0]
    assert flagged == [3]
    assert np.isfinite(report["eval/loss"])


# ------------------------------------------------------------------------------------------------
# Exact resume after SIGKILL, and SIGTERM, with the real entrypoint in a subprocess.

SFT_STEPS = 4  # an SFT stage first: a kill in preference training must keep every row of the finished SFT stage
ARGS = ["--config=configs/synthetic.py:runlocal=1", f"--config.sft.steps={SFT_STEPS}", "--config.sft.batch_size=8",
        "--config.train.steps=12",
        "--config.train.checkpoint_every=3", "--config.train.log_every=1", "--config.train.progress=False",
        "--config.train.export_final=False", "--config.train.keep_checkpoints=20", "--config.eval.num_prompts=0"]
# keep_checkpoints=20: every checkpoint stays for the assertions below.


# The real entrypoint in a subprocess, with `metrics.step_flops` (called once per training step, before the
# step runs) wrapped to send the process a real signal during a chosen step: deterministic, however fast
# the machine is (a signal sent from outside when a checkpoint appears can arrive after the last step).
SIGNAL_AT_STEP = """
import os, runpy, signal, sys
from dpo_jax.train import metrics
signum, at_call = int(os.environ["TEST_SIGNAL"]), int(os.environ["TEST_SIGNAL_AT_CALL"])
calls, step_flops = [0], metrics.step_flops
def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at_call:
        os.kill(os.getpid(), signum)
    return step_flops(*args, **kwargs)
metrics.step_flops = wrapped
sys.argv = ["dpo_jax.main", *sys.argv[1:]]
runpy.run_module("dpo_jax.main", run_name="__main__", alter_sys=True)
"""


def _launch(workdir, signum=None, at_call=0):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
    if signum is None:
        cmd = [sys.executable, "-m", "dpo_jax.main"]
    else:
        cmd = [sys.executable, "-c", SIGNAL_AT_STEP]
        env.update(TEST_SIGNAL=str(int(signum)), TEST_SIGNAL_AT_CALL=str(at_call))
    return subprocess.Popen([*cmd, f"--workdir={workdir}", *ARGS], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


TIMING = ("tokens_per_s", "mfu", "sft/tokens_per_s", "sft/mfu")


def _rows(workdir):
    """Every row of metrics.jsonl, timing figures left out, as a multiset."""
    rows = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return collections.Counter(json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True)
                               for r in rows)


def _metrics(workdir):
    rows = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows if "loss" in r}


def test_sigkill_then_resume_is_bitwise_identical_and_sigterm_exits_preempted(tmp_path):
    full, killed, termed = tmp_path / "full", tmp_path / "killed", tmp_path / "termed"
    # SIGKILL during step 8 (checkpoint 6 may still be in flight); SIGTERM during step 5 (after the SFT steps).
    procs = [_launch(full), _launch(killed, signal.SIGKILL, SFT_STEPS + 8),
             _launch(termed, signal.SIGTERM, SFT_STEPS + 5)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert procs[0].returncode == 0, outs[0][-3000:]
    assert procs[1].returncode == -signal.SIGKILL, outs[1][-3000:]
    assert procs[2].returncode == multihost.PREEMPTED_EXIT, outs[2][-3000:]  # "resume me", not "finished"
    assert "train: preempted at step 5: checkpoint saved" in outs[2], outs[2][-3000:]
    for workdir in (killed, termed):
        assert not (workdir / "report.json").exists()
    assert (termed / "checkpoints" / "5").is_dir()  # saved on SIGTERM, off the every-3-steps schedule
    for workdir in (killed, termed):
        resumed = _launch(workdir)
        out = resumed.communicate(timeout=300)[0]
        assert resumed.returncode == 0, out[-3000:]
        assert "stage 'train': resumed from step" in out, out[-3000:]  # at WARNING: the entrypoint shows it
    want = _metrics(full)
    assert sorted(want) == list(range(1, 13))
    for workdir in (killed, termed):
        got = _metrics(workdir)
        assert sorted(got) == sorted(want), f"{workdir.name}: steps {sorted(got)}"
        for s in want:
            assert got[s] == want[s], f"{workdir.name}: step {s} differs after resume"
        rows, want_rows = _rows(workdir), _rows(full)
        assert rows == want_rows, (f"{workdir.name}: rows only after resume {list((rows - want_rows).elements())}; "
                                   f"rows lost {list((want_rows - rows).elements())}")
    assert any(json.loads(r).get("sft/loss") is not None for r in _rows(full))
    assert json.loads((killed / "report.json").read_text()) == json.loads((full / "report.json").read_text())


def test_dataset_with_every_row_dropped_is_an_error_not_a_hang(tmp_path, trl_fixture_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"prompt": "w1 ", "chosen": "w2", "rejected": "w2"}) for _ in range(5)))
    config = hf_config(trl_fixture_dir)
    config.data.source = str(bad)
    config.data.eval_source = str(bad)
    with pytest.raises(ValueError, match=r"bad.jsonl: dropped all 5 rows: chosen_equals_rejected 5 \(rows 0, 1, 2, 3, 4\)"):
        runner.run(config, str(tmp_path / "run"))
