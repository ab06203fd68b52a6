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
