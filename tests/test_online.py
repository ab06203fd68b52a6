"""Online DPO (dpo_jax/online.py): the Bradley-Terry labeller, a 2-round run of configs/online.py,
resume after a round, the two reference rules, and notebooks/online_vs_offline.ipynb on its runs."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from dpo_jax import online, runner
from dpo_jax.data import synthetic, synthetic_exact
from dpo_jax.evaluation import sampled
from tests.test_notebooks import execute, images, kernel_env  # noqa: F401  (kernel_env: a fixture)


def _table_reward(prompt_ids, completion_ids):
    """r = the first completion id (a reward source: (rewards, malformed))."""
    return np.asarray([float(c[0]) for c in completion_ids]), np.zeros(len(completion_ids), bool)


def test_bradley_terry_probability_closed_form():
    r_a, r_b = np.array([0.0, 2.0, -3.0, 800.0]), np.array([0.0, 0.0, 1.0, -800.0])
    np.testing.assert_allclose(online.bradley_terry_probability(r_a, r_b), 1 / (1 + np.exp(-(r_a - r_b))))


@pytest.mark.parametrize("diff", [0.0, 0.7, 2.0, -1.5])
def test_labeller_prefers_with_the_bradley_terry_probability(diff):
    """K = 2 completions with rewards (diff, 0): y_0 must be chosen with frequency sigmoid(diff)
    over 40,000 prompts (seeded), within 4 standard errors (about 0.01)."""
    n = 40_000
    comps = [[np.array([diff]), np.array([0.0])]] * n
    labels = online.BradleyTerryLabeller(_table_reward)([np.array([5])] * n, comps, np.random.default_rng(0))
    first = labels.reward_chosen_B == diff if diff != 0 else labels.chosen_B == 0
    p = 1 / (1 + math.exp(-diff))
    assert abs(first.mean() - p) < 4 * math.sqrt(p * (1 - p) / n), (first.mean(), p)
    np.testing.assert_array_equal(labels.chosen_B != labels.rejected_B, True)


def test_labeller_pairs_are_distinct_and_uniform_and_argmax_is_deterministic():
    n, k = 30_000, 3
    comps = [[np.array([0.0]), np.array([1.0]), np.array([2.0])]] * n
    labels = online.BradleyTerryLabeller(_table_reward, "argmax")([np.array([5])] * n, comps,
                                                                  np.random.default_rng(1))
    assert (labels.reward_chosen_B > labels.reward_rejected_B).all()
    pair = np.sort(np.stack([labels.chosen_B, labels.rejected_B]), axis=0)
    counts = np.bincount(pair[0] * k + pair[1], minlength=k * k)[[1, 2, 5]]  # (0,1) (0,2) (1,2)
    assert np.all(np.abs(counts / n - 1 / 3) < 4 * math.sqrt(2 / 9 / n)), counts
    with pytest.raises(ValueError, match="K >= 2"):
        online.BradleyTerryLabeller(_table_reward)([np.array([5])], [[np.array([1])]], np.random.default_rng(0))


def count_t1(prompts, completions):
    """A 'module:function' reward: the number of t1 words of the completion."""
    return [c.split().count("t1") for c in completions]


def test_labeller_takes_a_module_function_reward_and_the_true_reward(tmp_path):
    world = synthetic_exact.make_world(synthetic_exact.WorldConfig())
    tok = synthetic.save_tokenizer(world, str(tmp_path / "tok"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok)
    t1 = 1 + synthetic.TOKEN_OFFSET
    comps = [[np.array([t1, t1, 2]), np.array([t1 + 1, 2])]] * 2000
    lab = online.BradleyTerryLabeller(sampled.make_reward("tests.test_online:count_t1", tok=tok))
    labels = lab([np.array([5, 6])] * 2000, comps, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(np.unique(labels.reward_chosen_B)), [0.0, 2.0])
    assert abs((labels.reward_chosen_B == 2).mean() - 1 / (1 + math.exp(-2))) < 0.04
    true = sampled.make_reward("", tok=tok, world=world)
    y = np.arange(world.completion_len) % world.vocab_size + synthetic.TOKEN_OFFSET
    r, bad = true([np.array([4])], [np.append(y, synthetic.EOS_ID)])
    assert not bad[0] and r[0] == pytest.approx(synthetic_exact.sequence_reward(world, np.array([0]),
                                                                                (y - 4)[None])[0])


# ----------------------------------------------------------------------------------------- runs


def online_config(**kw):
    from configs import online as online_config_file

    c = online_config_file.get_config("runlocal=1," + ",".join(f"{k}={v}" for k, v in kw.items()))
    c.train.update(progress=False)
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-round runlocal runs, reference 'fixed' and 'last_round', sharing one SFT model."""
    root = tmp_path_factory.mktemp("online")
    fixed = online_config()
    out = {"fixed": online.run(fixed, str(root / "fixed"))}
    last = online_config(reference="last_round")
    last.sft.model_dir = str(root / "fixed" / "sft" / "model")
    out["last_round"] = online.run(last, str(root / "last_round"))
    return root, out


def _train_rows(path):
    return [r for r in map(json.loads, open(path)) if "rewards/chosen" in r]


def test_two_round_run_writes_round_keys_and_pairs(runs):
    root, reports = runs
    report = reports["fixed"]
    for n in (1, 2):
        for key in ("sample/reward", "sample/kl", "frontier/regret", "frontier/reward_at_kl"):
            assert isinstance(report[f"online/round_{n}/{key}"], float), (n, key)
        assert report[f"online/round_{n}/pairs"] == 64.0 * n
        rows = [json.loads(line) for line in open(root / "fixed" / "online" / f"round_{n}" / "pairs.jsonl")]
        assert len(rows) == 64 and {"prompt", "chosen", "rejected", "reward_chosen"} <= set(rows[0])
        assert (root / "fixed" / "online" / f"round_{n}" / "final" / "config.json").exists()
    last_round = json.load(open(root / "fixed" / "online" / "round_2" / "report.json"))
    for key in ("sample/reward", "sample/kl", "frontier/regret", "optimum/kl"):  # the last round's as ordinary keys
        assert report[key] == last_round[key], key
    assert report["online/pairs"] == 128.0 and report["online/rounds"] == 2
    assert report["frontier/regret"] == pytest.approx(report["frontier/reward_at_kl"] - report["sample/reward"])
    on_disk = json.load(open(root / "fixed" / "report.json"))
    assert on_disk["online/round_1/sample/kl"] == report["online/round_1/sample/kl"]
    # round 2 samples the round-1 policy: its pairs are not round 1's
    p1, p2 = (open(root / "fixed" / "online" / f"round_{n}" / "pairs.jsonl").read() for n in (1, 2))
    assert p1 != p2


def test_reference_rules_differ_in_the_reference_used(runs):
    """At the first logged step of a round (lr 0 at step 1: warm-up) the implicit rewards are exactly 0
    iff the reference is the round's initial policy: round 1 in both, round 2 only for 'last_round'."""
    root, _ = runs
    first = {mode: [_train_rows(root / mode / "online" / f"round_{n}" / "metrics.jsonl")[0] for n in (1, 2)]
             for mode in ("fixed", "last_round")}
    for mode in ("fixed", "last_round"):
        assert first[mode][0]["rewards/chosen"] == 0.0 and first[mode][0]["loss"] == pytest.approx(math.log(2))
    assert first["last_round"][1]["rewards/chosen"] == 0.0 and first["last_round"][1]["rewards/rejected"] == 0.0
    assert first["fixed"][1]["rewards/chosen"] != 0.0 and first["fixed"][1]["rewards/rejected"] != 0.0
    info = {m: json.load(open(root / m / "online" / "round_2" / "round.json")) for m in ("fixed", "last_round")}
    assert info["last_round"]["reference"].endswith(os.path.join("round_1", "final"))
    assert info["fixed"]["reference"].startswith("pi_0")


def test_resume_skips_finished_rounds(runs, tmp_path, monkeypatch):
    """A run killed in round 2 (its report.json and the run's missing) redoes neither round 1 nor
    round 2's pairs: nothing is sampled again and only round 2 reaches the trainer."""
    root, reports = runs
    work = tmp_path / "resumed"
    shutil.copytree(root / "fixed", work)
    (work / "report.json").unlink()
    (work / "online" / "round_2" / "report.json").unlink()
    r1 = work / "online" / "round_1"
    before = {p: os.stat(p).st_mtime_ns for p in (r1 / "report.json", r1 / "pairs.jsonl",
                                                  work / "online" / "round_2" / "pairs.jsonl")}
    calls = {"label": 0, "train": []}
    monkeypatch.setattr(online, "label_round", lambda *a, **k: calls.__setitem__("label", calls["label"] + 1))
    real = online._train_round  # pylint: disable=protected-access

    def train(config, workdir, rdir, n, *a):
        calls["train"].append(n)
        return real(config, workdir, rdir, n, *a)

    monkeypatch.setattr(online, "_train_round", train)
    config = online_config()
    report = online.run(config, str(work))
    assert calls == {"label": 0, "train": [2]}
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    assert (work / "online" / "round_2" / "report.json").exists()
    assert report["online/round_1/sample/kl"] == reports["fixed"]["online/round_1/sample/kl"]
    # a finished run is returned as it is
    assert online.run(config, str(work)) == report and calls["train"] == [2]


def test_notebook_reads_the_runs(runs, tmp_path, kernel_env):  # noqa: F811
    """The notebook on a root holding an online run and an offline-format run (round 1's directory)."""
    root, _ = runs
    bench = tmp_path / "bench"
    bench.mkdir()
    os.symlink(root / "fixed", bench / "online_fixed_128")
    os.symlink(root / "fixed" / "online" / "round_1", bench / "offline_64")
    out = tmp_path / "figures"
    nb = execute("online_vs_offline.ipynb", {"root": str(bench), "out_dir": str(out)}, tmp_path, kernel_env)
    assert (out / "online_vs_offline.png").stat().st_size > 0 and images(nb) >= 1
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "online_fixed_128" in text and "offline_64" in text


def test_the_runner_refuses_an_online_config_and_main_sends_it_to_the_online_loop(tmp_path, monkeypatch):
    """runner.run trains offline runs only (an online config cannot be a fused member); the
    entrypoint calls online.run for it."""
    from dpo_jax import main

    config = online_config()
    with pytest.raises(ValueError, match="config.online.rounds > 0"):
        runner.run(config, str(tmp_path / "w"))
    called = []
    monkeypatch.setattr(online, "run", lambda c, w: called.append(w) or {})
    monkeypatch.setattr(main, "_CONFIG", type("F", (), {"value": config})())
    monkeypatch.setattr(main, "_WORKDIR", type("F", (), {"value": str(tmp_path / "w")})())
    main.main(["dpo_jax.main"])
    assert called == [str(tmp_path / "w")]
