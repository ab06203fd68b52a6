"""launch.aggregate on fake sweep directories: the table (varying keys, final metrics, report), CSV
and parquet, the plots, and the exact frontier of the synthetic world."""

import json
import os
import pathlib

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes

from dpo_jax.evaluation import plots
from dpo_jax.data import synthetic, synthetic_exact
from launch import aggregate

from tests.test_paths import bucket  # noqa: F401  (the stand-in gs:// bucket)

PNG = b"\x89PNG\r\n\x1a\n"


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def fake_run(root, name, loss, beta, *, report=True, world_dir=None, steps=100, seed=0, report_extra=None):
    """A run directory as dpo_jax.main leaves it (config.json, metrics.jsonl, report.json, data/)."""
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    config = {"seed": seed, "loss": {"name": loss, "beta": beta, "weights": None},
              "train": {"steps": steps, "log_every": 50}, "eval": {"num_prompts": 6},
              "model": {"lora": {"targets": ["attention", "mlp"]}}}
    write_json(os.path.join(workdir, "config.json"), config)
    rows = [{"step": 50, "sft/loss": 9.0},
            {"step": 50, "loss": 0.6, "rewards/margins": 0.1 * beta},
            {"step": 100, "loss": 0.5 - 0.1 * beta, "rewards/margins": 0.2 * beta},
            {"step": 100, "eval/loss": 0.55}]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"step": 150, "loss": 0.')  # cut short by a killed process
    if report:
        rep = {"loss": loss, "steps": steps, "eval/accuracy": 0.6 + 0.05 * beta, "eval/rewards/margins": beta,
               "sample/kl": 4.0 / beta, "sample/reward": 3.0 + beta, "sample/kl_stderr": 0.1,
               "sample/kl_world": 2.0 / beta, **(report_extra or {})}
        write_json(os.path.join(workdir, "report.json"), rep)
    else:
        os.makedirs(os.path.join(workdir, "checkpoints"))
    if world_dir:
        os.symlink(world_dir, os.path.join(workdir, "data"))
    return workdir


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("world"))
    world = synthetic_exact.make_world(synthetic_exact.WorldConfig(vocab_size=4, prompt_len=2, completion_len=3))
    synthetic.write_dataset(world, d, n_sft=4, n_pairs=4, n_eval=10, seed=0)
    return d


def make_sweep(root, world_dir=None):
    specs = [("loss.name=sigmoid,loss.beta=0.5", "sigmoid", 0.5), ("loss.name=sigmoid,loss.beta=1.0", "sigmoid", 1.0),
             ("loss.name=ipo,loss.beta=1.0", "ipo", 1.0), ("loss.name=ipo,loss.beta=2.0", "ipo", 2.0)]
    runs = []
    for i, (name, loss, beta) in enumerate(specs):
        workdir = fake_run(root, name, loss, beta, report=i != 3, world_dir=world_dir)
        runs.append({"name": name, "workdir": workdir, "overrides": {"loss.name": loss, "loss.beta": beta},
                     "status": "finished" if i != 3 else "interrupted"})
    write_json(os.path.join(root, "manifest.json"), {"config": "configs/synthetic.py", "runs": runs})
    return runs


def test_table_has_varying_keys_final_metrics_and_report(tmp_path, world_dir):
    root = str(tmp_path)
    make_sweep(root, world_dir)
    paths = aggregate.aggregate(root)
    df = pd.read_csv(paths["csv"])
    assert list(df["run"]) == ["loss.name=sigmoid,loss.beta=0.5", "loss.name=sigmoid,loss.beta=1.0",
                               "loss.name=ipo,loss.beta=1.0", "loss.name=ipo,loss.beta=2.0"]
    assert list(df["status"]) == ["finished", "finished", "finished", "interrupted"]
    _, swept = aggregate.load_table(root)
    assert swept == ["loss.name", "loss.beta"]  # seed, train.steps, lists ... are the same everywhere
    assert "train.steps" not in df and "model.lora.targets" not in df
    assert list(df["loss.beta"]) == [0.5, 1.0, 1.0, 2.0]
    # last logged value of each metric; the shared SFT stage's metrics left out; a cut row ignored
    np.testing.assert_allclose(df["last/loss"], [0.45, 0.4, 0.4, 0.3])
    np.testing.assert_allclose(df["last/rewards/margins"], [0.1, 0.2, 0.2, 0.4])
    assert (df["last/step"] == 100).all() and (df["last/eval/loss"] == 0.55).all()
    assert not any(c.startswith("last/sft/") for c in df.columns)
    np.testing.assert_allclose(df["eval/accuracy"][:3], [0.625, 0.65, 0.65])
    assert np.isnan(df["eval/accuracy"][3])  # interrupted: no report
    parquet = pd.read_parquet(paths["parquet"])
    pd.testing.assert_frame_equal(parquet.reset_index(drop=True), df, check_dtype=False)
    for what in ("reward_kl", "accuracy_vs_beta", "margins_vs_beta"):
        assert paths[what] == os.path.join(root, "plots", f"{what}.png")
        with open(paths[what], "rb") as f:
            assert f.read(8) == PNG, what


def test_reward_kl_plot_uses_the_exact_frontier_on_the_eval_prompts(tmp_path, world_dir, monkeypatch):
    root = str(tmp_path)
    make_sweep(root, world_dir)
    seen = {}

    def spy(runs, frontier=None, **kw):
        seen.update(runs=runs, frontier=frontier, **kw)
        return plots_plot(runs, frontier, **kw)
    plots_plot = plots.plot_reward_kl
    monkeypatch.setattr(plots, "plot_reward_kl", spy)
    out = aggregate.aggregate(root, str(tmp_path / "out"))
    assert out["reward_kl"] == str(tmp_path / "out" / "plots" / "reward_kl.png")
    assert [r["label"] for r in seen["runs"]] == ["sigmoid beta=0.5", "sigmoid beta=1.0", "ipo beta=1.0"]
    assert [r["kl"] for r in seen["runs"]] == [8.0, 4.0, 4.0]
    world = synthetic.load_world(world_dir)
    lines = pathlib.Path(world_dir, "eval_pairs.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines][:6]  # the first eval.num_prompts
    prompts = np.stack([synthetic.text_to_tokens(r["prompt"]) for r in rows])
    kl_f, reward_f = seen["frontier"]
    ref = synthetic_exact.expected_reward(world, synthetic_exact.reference_policy(world), prompts)
    assert kl_f[0] == 0.0 and reward_f[0] == pytest.approx(ref) and seen["reference_reward"] == pytest.approx(ref)
    kl1, r1 = synthetic_exact.frontier(world, [1.0], prompts)
    np.testing.assert_allclose(np.interp(kl1, kl_f, reward_f), r1, rtol=2e-3)  # on the exact curve
    assert np.all(np.diff(kl_f) > 0) and np.all(np.diff(reward_f) > 0)  # KL ascending, reward too
    aggregate.aggregate(root, str(tmp_path / "out"), kl_key="sample/kl_world")  # KL to the world's pi_ref
    assert [r["kl"] for r in seen["runs"]] == [4.0, 2.0, 2.0] and [r["kl_stderr"] for r in seen["runs"]] == [0, 0, 0]
    assert seen["title"] == "sample/reward vs sample/kl_world over the exact frontier"


def test_without_manifest_and_without_synthetic_world(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, "a", "sigmoid", 0.5)
    fake_run(root, "b", "sigmoid", 1.0, steps=200)
    os.makedirs(os.path.join(root, "not_a_run"))
    df, swept = aggregate.load_table(root)
    assert list(df["run"]) == ["a", "b"] and swept == ["loss.beta", "train.steps"]
    paths = aggregate.aggregate(root)
    assert "reward_kl" in paths  # points only: these runs have no data/world.json
    assert aggregate.main([root]) == 0
    out = capsys.readouterr().out
    assert "train.steps" in out and "results.csv" in out
    with pytest.raises(ValueError, match="no runs"):
        aggregate.load_table(os.path.join(root, "not_a_run"))


def test_seeds_give_means_standard_errors_and_error_bars(tmp_path, world_dir, monkeypatch):
    root = str(tmp_path)
    acc = {(0.5, 0): 0.6, (0.5, 1): 0.7, (0.5, 2): 0.9, (1.0, 0): 0.8}  # beta 1.0: one seed
    kl = {(0.5, 0): 7.0, (0.5, 1): 8.0, (0.5, 2): 12.0, (1.0, 0): 4.0}
    runs = []
    for (beta, seed), a in acc.items():
        name = f"loss.beta={beta},seed={seed}"
        workdir = fake_run(root, name, "sigmoid", beta, seed=seed, world_dir=world_dir,
                           report_extra={"eval/accuracy": a, "sample/kl": kl[beta, seed]})
        config = read_json(os.path.join(workdir, "config.json"))  # each seed its own SFT model
        write_json(os.path.join(workdir, "config.json"), {**config, "sft": {"model_dir": f"/s/sft_model.seed={seed}"}})
        runs.append({"name": name, "workdir": workdir, "overrides": {"loss.beta": beta, "seed": seed},
                     "status": "finished"})
    write_json(os.path.join(root, "manifest.json"), {"config": "configs/synthetic.py", "runs": runs})
    bars, seen = [], {}
    plots_errorbar = Axes.errorbar

    def spy_errorbar(self, x, y, *args, **kw):
        bars.append((list(np.ravel(x)), list(np.ravel(y)), kw.get("yerr")))
        return plots_errorbar(self, x, y, *args, **kw)
    monkeypatch.setattr(Axes, "errorbar", spy_errorbar)
    plots_plot = plots.plot_reward_kl

    def spy_plot(points, frontier=None, **kw):
        seen.update(points=points, frontier=frontier)
        return plots_plot(points, frontier, **kw)
    monkeypatch.setattr(plots, "plot_reward_kl", spy_plot)
    paths = aggregate.aggregate(root)

    df = pd.read_csv(paths["csv"])  # one row per seed
    assert list(df["run"]) == [r["name"] for r in runs] and list(df["seed"]) == [0, 1, 2, 0]
    means = pd.read_csv(paths["mean_csv"])
    assert paths["mean_csv"] == os.path.join(root, "results_mean.csv") and os.path.exists(paths["mean_parquet"])
    assert list(means["member"]) == ["loss.beta=0.5", "loss.beta=1.0"] and "seed" not in means
    assert "sft.model_dir" in df and "sft.model_dir" not in means  # follows the seed
    assert list(means["loss.beta"]) == [0.5, 1.0] and list(means["n_seeds"]) == [3, 1]
    assert list(means["n_finished"]) == [3, 1]
    assert json.loads(means["runs"][0]) == [r["name"] for r in runs[:3]]
    v = np.array([0.6, 0.7, 0.9])
    assert means["eval/accuracy"][0] == pytest.approx(v.mean())
    assert means["eval/accuracy_stderr"][0] == pytest.approx(v.std(ddof=1) / np.sqrt(3))
    assert means["eval/accuracy"][1] == pytest.approx(0.8) and np.isnan(means["eval/accuracy_stderr"][1])
    # the spread over seeds, not the mean of the runs' own sampling errors (0.1)
    assert means["sample/kl_stderr"][0] == pytest.approx(np.std([7.0, 8.0, 12.0], ddof=1) / np.sqrt(3))
    assert means["last/loss"][0] == pytest.approx(0.45) and means["last/loss_stderr"][0] == pytest.approx(0.0)
    for what in ("reward_kl", "accuracy_vs_beta", "margins_vs_beta"):
        with open(paths[what], "rb") as f:
            assert f.read(8) == PNG, what
    # every plot shows the members' means with standard-error bars
    acc_bar = next(b for b in bars if b[0] == [0.5, 1.0] and b[1] == pytest.approx([v.mean(), 0.8]))
    np.testing.assert_allclose(acc_bar[2], [v.std(ddof=1) / np.sqrt(3), 0.0])
    margins_bar = next(b for b in bars if b[0] == [0.5, 1.0] and b[1] == pytest.approx([0.5, 1.0]))
    np.testing.assert_allclose(margins_bar[2], [0.0, 0.0])  # equal over seeds
    assert [p["kl"] for p in seen["points"]] == pytest.approx([9.0, 4.0])
    assert [p["kl_stderr"] for p in seen["points"]] == pytest.approx([np.std([7.0, 8.0, 12.0], ddof=1) / np.sqrt(3), 0])
    assert seen["frontier"] is not None
    assert any(b[0] == pytest.approx([9.0]) for b in bars)  # the reward-KL points are error bars too


def twelve_runs(root, world_dir=None):
    """4 losses x 3 betas, every run finished, with margins on each loss's own scale."""
    runs = []
    for k, loss in enumerate(["sigmoid", "ipo", "simpo", "hinge"]):
        for beta in (0.5, 1.0, 2.0):
            name = f"loss.name={loss},loss.beta={beta}"
            workdir = fake_run(root, name, loss, beta, world_dir=world_dir,
                               report_extra={"eval/rewards/margins": (1 + 10 * k) * beta, "sample/reward": 3 + k + beta,
                                             "eval/accuracy": 0.5 + 0.1 * k + 0.01 * beta})
            runs.append({"name": name, "workdir": workdir, "overrides": {"loss.name": loss, "loss.beta": beta},
                         "status": "finished"})
    write_json(os.path.join(root, "manifest.json"), {"config": "configs/synthetic.py", "runs": runs})
    return runs


def _marks(ax):
    """{(x, y): (colour, marker)} of the single-point marker artists of an axes."""
    from matplotlib.colors import to_hex  # pylint: disable=g-import-not-at-top

    return {(float(line.get_xdata()[0]), float(line.get_ydata()[0])): (to_hex(line.get_color()), line.get_marker())
            for line in ax.lines
            if len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "", "_", "|")}  # not caps


def test_twelve_runs_colour_by_loss_marker_by_beta_legend_outside(tmp_path, world_dir):
    root = str(tmp_path)
    runs = twelve_runs(root, world_dir)
    df, swept = aggregate.load_table(root)
    losses, betas = ["sigmoid", "ipo", "simpo", "hinge"], [0.5, 1.0, 2.0]

    def check(marks, xy):
        style = {(r["overrides"]["loss.name"], r["overrides"]["loss.beta"]): marks[xy(r)] for r in runs}
        colours = {loss: {style[loss, b][0] for b in betas} for loss in losses}
        assert all(len(c) == 1 for c in colours.values()), colours  # one colour per loss
        assert len({c.pop() for c in colours.values()}) == 4  # distinct across the 4 losses
        markers = {b: {style[loss, b][1] for loss in losses} for b in betas}
        assert all(len(m) == 1 for m in markers.values()), markers  # one marker per beta
        assert len({m.pop() for m in markers.values()}) == 3

    points = aggregate.reward_kl_points(df, swept)
    exact = aggregate.exact_frontier(runs[0]["workdir"], kl_max=8.0)
    fig = plots.figure_reward_kl(points, exact[:2], reference_reward=exact[2])
    ax = fig.axes[0]
    check(_marks(ax), lambda r: (4.0 / r["overrides"]["loss.beta"],
                                 3 + losses.index(r["overrides"]["loss.name"]) + r["overrides"]["loss.beta"]))
    joined = [line for line in ax.lines if len(line.get_xdata()) == 3]  # each loss joined along beta
    assert len(joined) == 4 and all(list(line.get_xdata()) == [8.0, 4.0, 2.0] for line in joined)
    assert ax.get_legend() is None and fig.legends  # the legend is the figure's, outside the axes
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert all(x in labels for x in [*losses, "beta=0.5", "beta=1", "beta=2", "exact frontier (pi*_beta)"])

    fig = plots.figure_vs_beta(aggregate.vs_beta_lines(df, swept, "eval/accuracy"), ylabel="acc")
    assert len(fig.axes) == 1 and fig.legends and fig.axes[0].get_legend() is None
    def accuracy(r):
        return 0.5 + 0.1 * losses.index(r["overrides"]["loss.name"]) + 0.01 * r["overrides"]["loss.beta"]
    check(_marks(fig.axes[0]), lambda r: (r["overrides"]["loss.beta"], accuracy(r)))
    margins = aggregate.vs_beta_lines(df, swept, "eval/rewards/margins")
    fig = plots.figure_vs_beta(margins, ylabel="margins", panel_per_loss=True)
    assert [ax.get_title() for ax in fig.axes] == losses  # a panel per loss, each on its own scale
    marks = {}
    for k, ax in enumerate(fig.axes):
        panel = _marks(ax)
        assert {(x, y / (1 + 10 * k)) for x, y in panel} == {(b, b) for b in betas}  # only its loss's points
        marks.update({(losses[k], x): v for (x, _), v in panel.items()})
        lo, hi = ax.get_ylim()
        assert lo < 0.5 * (1 + 10 * k) and hi < 2.0 * (1 + 10 * k) * 1.5
    check(marks, lambda r: (r["overrides"]["loss.name"], r["overrides"]["loss.beta"]))
    paths = aggregate.aggregate(root)
    for what in ("reward_kl", "accuracy_vs_beta", "margins_vs_beta"):
        with open(paths[what], "rb") as f:
            assert f.read(8) == PNG, what


def test_a_directory_without_manifest_skips_the_shared_sft_model(tmp_path):
    root = str(tmp_path)
    fake_run(root, "a", "sigmoid", 0.5)
    os.makedirs(os.path.join(root, "sft_model"))  # an exported model: its config.json is no run's
    write_json(os.path.join(root, "sft_model", "config.json"), {"model_type": "llama", "hidden_size": 64})
    df, _ = aggregate.load_table(root)
    assert list(df["run"]) == ["a"] and list(df["status"]) == ["finished"]


def test_a_sweep_on_a_bucket_aggregates_and_keeps_its_manifest_there(bucket):
    """Runs, manifest, tables and plots under gs://b/sweep (the stand-in bucket of tests/test_paths.py):
    everything is read and written through dpo_jax.paths, nothing lands in the working directory."""
    from launch import manifest, sweep_plan

    local_root = bucket / "b" / "sweep"
    local_root.mkdir(parents=True)
    runs = make_sweep(str(local_root))
    for r in runs:  # the manifest names the runs by their bucket URIs
        r["workdir"] = "gs://b/sweep/" + r["name"]
    write_json(os.path.join(local_root, "manifest.json"), {"config": "configs/synthetic.py", "runs": runs})
    written = aggregate.aggregate("gs://b/sweep")
    assert written["csv"] == "gs://b/sweep/results.csv"
    df = pd.read_csv(local_root / "results.csv")
    assert list(df["status"]) == ["finished", "finished", "finished", "interrupted"]
    np.testing.assert_allclose(df["last/loss"], [0.45, 0.4, 0.4, 0.3])
    assert (local_root / "plots" / "accuracy_vs_beta.png").read_bytes().startswith(PNG)

    plan = [sweep_plan.Run(name=r["name"], workdir=r["workdir"], overrides=r["overrides"], args=[], command=["true"])
            for r in runs]
    state = manifest.initial_state("gs://b/sweep2", plan)
    assert [state[r.name]["status"] for r in plan] == ["finished", "finished", "finished", "interrupted"]
    assert manifest.write_manifest("gs://b/sweep2", plan, state, {"config": "c"}) == "gs://b/sweep2/manifest.json"
    assert [r["status"] for r in read_json(bucket / "b" / "sweep2" / "manifest.json")["runs"]] == [
        "finished", "finished", "finished", "interrupted"]
