"""The reward-KL plot writes a PNG with the runs (raw and projected points) and the frontier."""

import numpy as np
import pytest

from dpo_jax.data import synthetic_exact as sx
from dpo_jax.evaluation import plots


def test_plot_reward_kl_writes_png(tmp_path):
    w = sx.make_world(sx.WorldConfig())
    kl, reward = sx.frontier(w, np.geomspace(0.1, 20, 40))
    runs = [{"label": "beta 1", "kl": 3.5, "reward": 6.8, "kl_stderr": 0.1, "reward_stderr": 0.05},
            {"label": "report", "sample/kl": 8.0, "sample/reward": 9.0, "sample/kl_stderr": 0.2,
             "projected/kl": 5.0, "projected/reward": 8.5, "projected/kl_stderr": 0.1}]
    path = plots.plot_reward_kl(runs, (kl, reward), path=str(tmp_path / "frontier.png"), reference_reward=0.8)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert plots._projected_point(runs[0], 0) is None
    assert plots._projected_point(runs[1], 1) == (5.0, 8.5, 0.1, 0.0)
    assert plots._projected_point({"projected_kl": 1.0, "projected_reward": float("nan")}, 2) is None
    with pytest.raises(ValueError, match=r"runs\[0\] has none of the keys"):
        plots.plot_reward_kl([{"label": "x"}], path=str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="must end with .png"):
        plots.plot_reward_kl(runs, path=str(tmp_path / "bad.pdf"))


def test_loss_colours_are_distinct_past_the_ten_colour_cycle():
    for n in (4, 12, 25):
        colours = plots.loss_colors([f"loss{i}" for i in range(n)] * 2)
        assert len(colours) == n and len(set(colours.values())) == n
    assert plots.beta_markers([2.0, 0.5, 1.0, 0.5]) == {0.5: "o", 1.0: "s", 2.0: "^"}


def _run_report(**extra):
    return {"sample/kl": 3.0, "sample/reward": 5.0, "sample/kl_stderr": 0.1, "sample/reward_ref": 1.0,
            "optimum/kl": 2.5, "optimum/reward": 5.5, "eval/loss": 0.6, **extra}


def test_run_plot_shows_the_run_its_reference_and_the_optimum_on_the_frontier(tmp_path):
    from configs import synthetic as synthetic_config
    from dpo_jax.data import synthetic

    config = synthetic_config.get_config("runlocal=1")
    world = sx.make_world(sx.WorldConfig(vocab_size=4, prompt_len=2, completion_len=3))
    data = tmp_path / "run" / "data"
    synthetic.write_dataset(world, str(data), n_sft=4, n_pairs=4, n_eval=8, seed=0)
    points = plots.run_points(_run_report(), label="sigmoid beta=1")
    assert [(p["label"], p.get("kl", p.get("sample/kl"))) for p in points] == [
        ("sigmoid beta=1", 3.0), ("reference model", 0.0), ("pi*_beta (exact optimum)", 2.5)]
    exact = plots.exact_frontier(str(data), 4, kl_max=3.0)
    fig = plots.figure_reward_kl(points, exact[:2])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["exact frontier (pi*_beta)", "sigmoid beta=1", "reference model", "pi*_beta (exact optimum)"]
    path = plots.write_run_plot(config, str(tmp_path / "run"), _run_report(), str(data / "eval_pairs.jsonl"))
    assert path == str(tmp_path / "run" / "plots" / "reward_kl.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # no world (another data source): the run and its reference only; no sampled evaluation: no plot
    config.data.source = "file.jsonl"
    assert plots.write_run_plot(config, str(tmp_path / "other"), {"sample/kl": 1.0, "sample/reward": 2.0}, None)
    assert plots.write_run_plot(config, str(tmp_path / "none"), {"eval/loss": 0.6}) is None
    assert not (tmp_path / "none").exists()
