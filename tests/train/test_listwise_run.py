"""Ranked lists through the trainer on the synthetic world: lists of K completions drawn from pi_ref
and ranked by the Plackett-Luce model of the true reward are written beside the pairs, a loss of
lists trains on them in every layout (and as fused members), logs the list metrics, and resumes."""

import json
import pathlib

import numpy as np
import pytest

from dpo_jax import runner
from dpo_jax.data import synthetic_listwise

TIMING = ("tokens_per_s", "mfu")


def _config(loss="plackett_luce", layout="prefix", steps=4, **train):
    from tests.test_runner import synthetic_config

    config = synthetic_config(steps=steps, log_every=1, export_final=False, **train)
    config.eval.num_prompts = 8
    config.loss.update(name=loss, beta=0.5)
    config.data.update(layout=layout, list_size=3, batch_size=8, eval_batch_size=8)
    return config


def _rows(workdir):
    rows = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows if "loss" in r}


def test_plackett_luce_trains_on_synthetic_lists_and_resumes(tmp_path, monkeypatch):
    full = tmp_path / "full"
    report = runner.run(_config(checkpoint_every=2), str(full))
    lists = [json.loads(x) for x in (full / "data" / synthetic_listwise.lists_file_names(3)[0]).read_text().splitlines()]
    assert len(lists) == 512 and all(len(r["responses"]) == 3 and sorted(r["scores"]) == [0, 1, 2] for r in lists)
    rows = _rows(full)
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[1]["loss"] == pytest.approx(np.log(6.0), rel=1e-5)  # pi = pi_ref: -log (1/3!) per list
    assert rows[1]["pairs"] == 8.0 and {"rewards/best", "rewards/worst", "rewards/accuracies"} <= set(rows[4])
    assert rows[4]["loss"] != rows[1]["loss"]
    assert np.isfinite(report["eval/loss"]) and "sample/kl" in report and "frontier/regret" in report
    # a crash during step 3 (checkpoint 2 on disk): the rerun resumes there and writes the same rows
    from tests.train.test_checkpoint_recovery import _Crash, _crash_during_step

    part = tmp_path / "part"
    with monkeypatch.context() as patch:
        _crash_during_step(patch, 3)
        with pytest.raises(_Crash):
            runner.run(_config(checkpoint_every=2), str(part))
    runner.run(_config(checkpoint_every=2), str(part))
    assert _rows(part) == rows


def test_fused_members_equal_separate_runs(tmp_path):
    configs = [_config(steps=3, checkpoint_every=0), _config(steps=3, checkpoint_every=0)]
    configs[1].loss.beta = 0.1
    dirs = [tmp_path / "a", tmp_path / "b"]
    runner.run_group(configs, [str(d) for d in dirs])
    single = tmp_path / "single"
    runner.run(configs[1], str(single))
    fused, alone = _rows(dirs[1]), _rows(single)
    for step in (1, 2):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert fused[step][key] == pytest.approx(alone[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert _rows(dirs[0])[3]["loss"] != fused[3]["loss"]  # beta differs: the comparison can fail


@pytest.mark.parametrize("loss,layout", [("lipo_lambda", "packed"), ("plackett_luce", "standard")])
def test_other_losses_and_layouts_train(tmp_path, loss, layout):
    report = runner.run(_config(loss=loss, layout=layout, steps=2), str(tmp_path))
    rows = _rows(tmp_path)
    assert sorted(rows) == [1, 2] and all(np.isfinite(r["loss"]) for r in rows.values())
    assert np.isfinite(report["eval/loss"])


def test_ultrafeedback_rows_from_a_local_file_train(tmp_path):
    """UltraFeedback's schema (instruction, completions with overall_score; one row of 3 and one
    row of 4 completions, so lists are padded) from a JSON Lines file, the world's tokenizer."""
    from dpo_jax.data import synthetic, synthetic_exact

    world = synthetic_exact.make_world(synthetic_exact.WorldConfig(vocab_size=8, prompt_len=4, completion_len=8))
    synthetic.save_tokenizer(world, str(tmp_path / "tokenizer"))
    rows = []
    for i, row in enumerate(synthetic_listwise.list_rows(synthetic_listwise.sample_lists(
            world, 64, 4, np.random.default_rng(0)))):
        k = 3 if i % 2 else 4
        rows.append({"instruction": row["prompt"], "completions": [
            {"response": r, "overall_score": 2.0 * s, "fine-grained_score": 1.0}
            for r, s in zip(row["responses"][:k], row["scores"][:k])]})
    (tmp_path / "uf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(steps=2, checkpoint_every=0)
    config.data.update(source=str(tmp_path / "uf.jsonl"), list_size=4, eval_fraction=0.25)
    config.model.tokenizer = str(tmp_path / "tokenizer")
    config.eval.num_prompts = 0
    config.synthetic.mask_logits = False
    report = runner.run(config, str(tmp_path / "run"))
    rows_logged = _rows(tmp_path / "run")
    assert sorted(rows_logged) == [1, 2] and rows_logged[1]["pairs"] == 8.0
    assert np.isfinite(report["eval/loss"]) and report["eval/rewards/accuracies"] >= 0.0
