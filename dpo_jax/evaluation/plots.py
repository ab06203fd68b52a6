"""Plots of evaluation results (matplotlib, Agg backend: files only, no display)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np


def _get(run: Mapping[str, Any], i: int, *keys, default=None) -> float:
    for k in keys:
        if run.get(k) is not None:
            return float(run[k])
    if default is None:
        raise ValueError(f"runs[{i}] has none of the keys {keys} (keys present: {sorted(run)})")
    return default


def _point(run: Mapping[str, Any], i: int) -> tuple[str, float, float, float, float]:
    """(label, kl, reward, kl_stderr, reward_stderr) of a run given as {kl, reward, ...} or a report."""
    label = str(run.get("label", f"run {i}"))
    return (label, _get(run, i, "kl", "sample/kl"), _get(run, i, "reward", "sample/reward"),
            _get(run, i, "kl_stderr", "sample/kl_stderr", default=0.0),
            _get(run, i, "reward_stderr", "sample/reward_stderr", default=0.0))


def _projected_point(run: Mapping[str, Any], i: int) -> Optional[tuple[float, float, float, float]]:
    """(kl, reward, kl_stderr, reward_stderr) of the run's projected policy (`format`: projected_kl,
    projected_reward, ... or a report's projected/*), or None when the run has none."""
    kl, reward = (_get(run, i, f"projected_{k}", f"projected/{k}", default=np.nan) for k in ("kl", "reward"))
    if np.isnan(kl) or np.isnan(reward):
        return None
    return (kl, reward, _get(run, i, "projected_kl_stderr", "projected/kl_stderr", default=0.0),
            _get(run, i, "projected_reward_stderr", "projected/reward_stderr", default=0.0))


def plot_reward_kl(runs: Sequence[Mapping[str, Any]],
                   frontier: Optional[tuple[Sequence[float], Sequence[float]]] = None,
                   *, path: str, title: str = "Reward vs KL(pi || pi_ref)",
                   reference_reward: Optional[float] = None) -> str:
    """Runs as points on the reward-KL plane, with KL and reward standard-error bars and labels, over
    the exact frontier curve (kl_F, reward_F) if given; writes a PNG to `path` and returns it.

    A run is a mapping with `label`, `kl`, `reward` (or a report's `sample/kl`, `sample/reward`) and
    optional `kl_stderr`, `reward_stderr` (or `sample/kl_stderr`, `sample/reward_stderr`). A run with
    `projected_kl`, `projected_reward` (or a report's `projected/kl`, `projected/reward`, with optional
    standard errors likewise) also shows its projected (format-constrained) policy as a hollow marker
    of the same colour, joined to the raw point by a dashed line.
    `reference_reward` draws the reference's reward as a horizontal line.
    """
    # matplotlib is heavy and needed by the plots only: imported when one is drawn.
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    if not str(path).lower().endswith(".png"):
        raise ValueError(f"plot_reward_kl: path {path!r} must end with .png")
    points = [_point(r, i) for i, r in enumerate(runs)]
    projected = [_projected_point(r, i) for i, r in enumerate(runs)]
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
        if projected[j] is not None:
            p_kl, p_reward, p_kl_se, p_reward_se = projected[j]
            ax.plot([kl, p_kl], [reward, p_reward], "--", color=f"C{j % 10}", lw=0.8)
            ax.errorbar([p_kl], [p_reward], xerr=[p_kl_se], yerr=[p_reward_se], fmt="o", ms=6, mfc="none",
                        capsize=3, color=f"C{j % 10}", label=f"{label}, projected")
    ax.set_xlabel("KL(pi || pi_ref) [nats]")
    ax.set_ylabel("E[reward]")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if points or frontier is not None:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return str(path)
