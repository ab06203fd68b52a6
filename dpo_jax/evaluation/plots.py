"""Plots of evaluation results (matplotlib, Agg backend: files only, no display)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence


def _point(run: Mapping[str, Any], i: int) -> tuple[str, float, float, float, float]:
    """(label, kl, reward, kl_stderr, reward_stderr) of a run given as {kl, reward, ...} or a report."""
    def get(*keys, default=None):
        for k in keys:
            if run.get(k) is not None:
                return float(run[k])
        if default is None:
            raise ValueError(f"runs[{i}] has none of the keys {keys} (keys present: {sorted(run)})")
        return default

    label = str(run.get("label", f"run {i}"))
    return (label, get("kl", "sample/kl"), get("reward", "sample/reward"),
            get("kl_stderr", "sample/kl_stderr", default=0.0),
            get("reward_stderr", "sample/reward_stderr", default=0.0))


def plot_reward_kl(runs: Sequence[Mapping[str, Any]],
                   frontier: Optional[tuple[Sequence[float], Sequence[float]]] = None,
                   *, path: str, title: str = "Reward vs KL(pi || pi_ref)",
                   reference_reward: Optional[float] = None) -> str:
    """Runs as points on the reward-KL plane, with KL and reward standard-error bars and labels, over
    the exact frontier curve (kl_F, reward_F) if given; writes a PNG to `path` and returns it.

    A run is a mapping with `label`, `kl`, `reward` (or a report's `sample/kl`, `sample/reward`) and
    optional `kl_stderr`, `reward_stderr` (or `sample/kl_stderr`, `sample/reward_stderr`).
    `reference_reward` draws the reference's reward as a horizontal line.
    """
    # matplotlib is heavy and needed by the plots only: imported when one is drawn.
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    if not str(path).lower().endswith(".png"):
        raise ValueError(f"plot_reward_kl: path {path!r} must end with .png")
    points = [_point(r, i) for i, r in enumerate(runs)]
    fig = Figure(figsize=(6.4, 4.6), dpi=120)
    ax = fig.add_subplot()
    if frontier is not None:
        kl_f, reward_f = frontier
        if len(kl_f) != len(reward_f):
            raise ValueError(f"frontier: {len(kl_f)} KL values but {len(reward_f)} rewards")
        order = sorted(range(len(kl_f)), key=lambda j: kl_f[j])
        ax.plot([kl_f[j] for j in order], [reward_f[j] for j in order], "-", color="0.3", lw=1.5,
                label="exact frontier (pi*_beta)")
    if reference_reward is not None:
        ax.axhline(reference_reward, color="0.6", ls=":", lw=1, label="reference")
    for j, (label, kl, reward, kl_se, reward_se) in enumerate(points):
        ax.errorbar([kl], [reward], xerr=[kl_se], yerr=[reward_se], fmt="o", ms=5, capsize=3, color=f"C{j % 10}",
                    label=label)
        ax.annotate(label, (kl, reward), textcoords="offset points", xytext=(6, -10), fontsize=8)
    ax.set_xlabel("KL(pi || pi_ref) [nats]")
    ax.set_ylabel("E[reward]")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if points or frontier is not None:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return str(path)
