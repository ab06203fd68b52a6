"""Plots of evaluation results (matplotlib, Agg backend: files only, no display).

Style of a sweep: one colour per loss (`loss_colors`, distinct for any number of losses), one marker
per beta value (`beta_markers`), each loss's points joined in order of beta, the legend outside the
axes. `figure_*` build a matplotlib Figure (inspectable); `plot_*` write it to a PNG.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from absl import logging

from dpo_jax import paths
from dpo_jax.data import synthetic, synthetic_exact

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


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


def _figure(width: float, height: float):
    import matplotlib  # pylint: disable=g-import-not-at-top  (heavy; needed by the plots only)

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    return Figure(figsize=(width, height), dpi=120)


def _save(fig, path: str) -> str:
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"plot path {path!r} must end with .png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # keeps the legend outside the axes
    paths.write_bytes(path, buf.getvalue())  # a local path or a bucket URI
    return str(path)


def loss_colors(losses: Sequence[str]) -> dict[str, Any]:
    """{loss: colour}, distinct for every loss: tab10 up to 10 losses, tab20 up to 20, else evenly
    spaced hues."""
    from matplotlib import colormaps  # pylint: disable=g-import-not-at-top

    names = list(dict.fromkeys(losses))
    n = len(names)
    if n <= 10:
        cols = [colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        cols = [colormaps["tab20"](i) for i in range(n)]
    else:
        cols = [colormaps["hsv"](i / n) for i in range(n)]
    return dict(zip(names, cols))


def beta_markers(betas: Sequence[float]) -> dict[float, str]:
    """{beta: marker}: one marker per distinct beta value, in ascending order of beta."""
    values = sorted({float(b) for b in betas if b is not None and np.isfinite(float(b))})
    return {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(values)}


def _legend_outside(ax, fig, handles=None, labels=None) -> None:
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.98), fontsize=8, frameon=False)


def _style_legend(colors: Mapping[str, Any], markers: Mapping[float, str]):
    """Handles: one line per loss (its colour), one grey marker per beta."""
    from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top

    handles = [Line2D([], [], color=c, lw=1.5, label=loss) for loss, c in colors.items()]
    handles += [Line2D([], [], color="0.35", ls="none", marker=m, label=f"beta={b:g}") for b, m in markers.items()]
    return handles, [h.get_label() for h in handles]


def figure_reward_kl(runs: Sequence[Mapping[str, Any]],
                     frontier: Optional[tuple[Sequence[float], Sequence[float]]] = None,
                     *, title: str = "Reward vs KL(pi || pi_ref)", reference_reward: Optional[float] = None):
    """The Figure of `plot_reward_kl`."""
    points = [_point(r, i) for i, r in enumerate(runs)]
    projected = [_projected_point(r, i) for i, r in enumerate(runs)]
    styled = bool(runs) and all(r.get("loss") is not None for r in runs)
    colors = loss_colors([str(r["loss"]) for r in runs]) if styled else {}
    markers = beta_markers([r.get("beta") for r in runs if r.get("beta") is not None]) if styled else {}
    fig = _figure(6.4, 4.6)
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
    if styled:  # each series (a loss, or a loss and other swept keys) joined along beta
        series: dict[str, list[int]] = {}
        for j, r in enumerate(runs):
            series.setdefault(str(r.get("series", r["loss"])), []).append(j)
        for idx in series.values():
            idx = sorted(idx, key=lambda j: float(runs[j].get("beta") or 0.0))
            ax.plot([points[j][1] for j in idx], [points[j][2] for j in idx], "-", lw=1.0, alpha=0.7,
                    color=colors[str(runs[idx[0]]["loss"])])
    for j, (label, kl, reward, kl_se, reward_se) in enumerate(points):
        r = runs[j]
        color = colors[str(r["loss"])] if styled else r.get("color", f"C{j % 10}")
        beta = r.get("beta")
        marker = markers.get(float(beta), "o") if styled and beta is not None else r.get("marker", "o")
        ax.errorbar([kl], [reward], xerr=[kl_se], yerr=[reward_se], fmt=marker, ms=6, capsize=3, color=color,
                    label=None if styled else label)
        if projected[j] is not None:
            p_kl, p_reward, p_kl_se, p_reward_se = projected[j]
            ax.plot([kl, p_kl], [reward, p_reward], "--", color=color, lw=0.8)
            ax.errorbar([p_kl], [p_reward], xerr=[p_kl_se], yerr=[p_reward_se], fmt=marker, ms=6, mfc="none",
                        capsize=3, color=color, label=None if styled else f"{label}, projected")
    ax.set_xlabel("KL(pi || pi_ref) [nats]")
    ax.set_ylabel("E[reward]")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if styled:
        handles, labels = ax.get_legend_handles_labels()
        extra, extra_labels = _style_legend(colors, markers)
        _legend_outside(ax, fig, [*handles, *extra], [*labels, *extra_labels])
    elif points or frontier is not None:
        _legend_outside(ax, fig)
    fig.tight_layout()
    return fig


def plot_reward_kl(runs: Sequence[Mapping[str, Any]],
                   frontier: Optional[tuple[Sequence[float], Sequence[float]]] = None,
                   *, path: str, title: str = "Reward vs KL(pi || pi_ref)",
                   reference_reward: Optional[float] = None) -> str:
    """Runs as points on the reward-KL plane, with KL and reward standard-error bars, over the exact
    frontier curve (kl_F, reward_F) if given; writes a PNG to `path` and returns it.

    A run is a mapping with `label`, `kl`, `reward` (or a report's `sample/kl`, `sample/reward`) and
    optional `kl_stderr`, `reward_stderr` (or `sample/kl_stderr`, `sample/reward_stderr`). When every
    run has a `loss` (and optionally `beta`, `series`), runs are coloured by loss, marked by beta and
    joined along beta per `series` (default: the loss); otherwise each run has its own colour (or its
    `color`, `marker`) and legend entry. A run with `projected_kl`, `projected_reward` (or a report's
    `projected/*`) also shows its projected (format-constrained) policy as a hollow marker of the same
    colour, joined to the raw point by a dashed line. `reference_reward` draws a horizontal line.
    """
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"plot_reward_kl: path {path!r} must end with .png")
    return _save(figure_reward_kl(runs, frontier, title=title, reference_reward=reference_reward), path)


def figure_vs_beta(lines: Sequence[Mapping[str, Any]], *, ylabel: str, panel_per_loss: bool = False):
    """The Figure of `plot_vs_beta`."""
    colors = loss_colors([str(s["loss"]) for s in lines])
    markers = beta_markers([b for s in lines for b in s["beta"]])
    panels = list(colors) if panel_per_loss else ["all"]
    n = len(panels)
    cols = 2 if n == 4 else min(n, 3)
    rows = -(-n // cols)
    fig = _figure(4.0 * cols if n > 1 else 6.0, 3.3 * rows if n > 1 else 4.2)
    axes = {p: fig.add_subplot(rows, cols, i + 1) for i, p in enumerate(panels)}
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    for s in lines:
        loss = str(s["loss"])
        ax = axes[loss if panel_per_loss else "all"]
        k = seen[loss] = seen.get(loss, -1) + 1
        order = np.argsort(np.asarray(s["beta"], float))
        x = np.asarray(s["beta"], float)[order]
        y = np.asarray(s["y"], float)[order]
        err = None if s.get("yerr") is None else np.nan_to_num(np.asarray(s["yerr"], float)[order])
        ax.errorbar(x, y, yerr=err, fmt=styles[k % len(styles)], color=colors[loss], lw=1.5, capsize=3,
                    label=str(s.get("label", loss)))
        for xi, yi in zip(x, y):
            ax.plot([xi], [yi], ls="none", marker=markers[float(xi)], ms=6, color=colors[loss])
    for p, ax in axes.items():
        ax.set_xscale("log", base=2)
        ax.set_xlabel("loss.beta")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        if panel_per_loss:
            ax.set_title(p, fontsize=10, color=colors[p])
    handles, labels = [], []
    for ax in axes.values():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    extra, extra_labels = _style_legend({}, markers)
    _legend_outside(None, fig, [*handles, *extra], [*labels, *extra_labels])
    fig.tight_layout()
    return fig


def plot_vs_beta(lines: Sequence[Mapping[str, Any]], *, path: str, ylabel: str, panel_per_loss: bool = False) -> str:
    """A metric against loss.beta (log2 axis): each line {loss, beta: [...], y: [...], yerr: [...] or
    None, label} in its loss's colour (lines of one loss in different dash styles), a marker per beta
    value, standard-error bars where `yerr` is given, the legend outside; `panel_per_loss`: one
    panel per loss, each with its own y scale (for metrics whose scale differs between losses)."""
    return _save(figure_vs_beta(lines, ylabel=ylabel, panel_per_loss=panel_per_loss), path)


# ----------------------------------------------------------------------------------------------
# The exact frontier of the synthetic world, and the plot of one run.

def exact_frontier(data_dir: str, num_prompts: Optional[int] = None,
                   kl_max: float = 0.0) -> Optional[tuple[np.ndarray, np.ndarray, float]]:
    """(kl_F, reward_F, reward of pi_ref) of the synthetic world in `data_dir` (world.json), averaged
    over its first `num_prompts` eval prompts (eval_pairs.jsonl) like a run's report, KL ascending
    from 0 to at least `kl_max`; None when `data_dir` holds no world."""
    if not os.path.exists(os.path.join(data_dir, "world.json")):
        return None
    world = synthetic.load_world(data_dir)
    prompts = None
    eval_path = os.path.join(data_dir, "eval_pairs.jsonl")
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = rows[:num_prompts] if num_prompts else rows
        prompts = np.stack([synthetic.text_to_tokens(r["prompt"]) for r in rows]) if rows else None
    kl, reward = synthetic_exact.frontier(world, np.geomspace(100.0, 0.02, 160), prompts)  # KL ascending
    ref = float(synthetic_exact.expected_reward(world, synthetic_exact.reference_policy(world), prompts))
    kl, reward = np.concatenate([[0.0], kl]), np.concatenate([[ref], reward])
    if kl_max > kl[-1]:  # past the last beta: flat at the maximal reward
        kl = np.append(kl, kl_max)
        reward = np.append(reward, synthetic_exact.frontier_reward_at_kl(world, kl_max, prompts))
    return kl, reward, ref


def run_points(report: Mapping[str, Any], label: str = "policy") -> list[dict]:
    """The points of one run's reward-KL plot: the policy (with its projection, if any), its reference
    model (sample/reward_ref at KL 0) and pi*_beta (optimum/kl, optimum/reward) when the report has it."""
    points = [{**{k: v for k, v in report.items() if k.startswith(("sample/", "projected/"))},
               "label": label, "color": "C0", "marker": "o"}]
    if report.get("sample/reward_ref") is not None:
        points.append({"label": "reference model", "kl": 0.0, "reward": report["sample/reward_ref"],
                       "color": "0.4", "marker": "s"})
    if report.get("optimum/kl") is not None and report.get("optimum/reward") is not None:
        points.append({"label": "pi*_beta (exact optimum)", "kl": report["optimum/kl"],
                       "reward": report["optimum/reward"], "color": "C3", "marker": "*"})
    return points


def write_run_plot(config, workdir: str, report: Mapping[str, Any], eval_path: Optional[str] = None) -> Optional[str]:
    """workdir/plots/reward_kl.png (written through etils.epath: a local directory or a bucket URI) of
    one finished run (`run_points`), over the exact frontier (up to twice the largest KL shown) when
    the run is on the synthetic world (its data files beside `eval_path`); None without sample/kl.
    A failure to plot is logged, never raised: the run's results are written already."""
    if report.get("sample/kl") is None or report.get("sample/reward") is None:
        return None
    try:
        points = run_points(report, label=f"{config.loss.name} beta={config.loss.beta:g}")
        exact = None
        if config.data.source == "synthetic" and eval_path:
            kl_max = max(float(p["kl"] if "kl" in p else p["sample/kl"]) for p in points)
            exact = exact_frontier(os.path.dirname(eval_path), config.eval.num_prompts, kl_max=kl_max)
            if exact is not None:  # the frontier up to twice the largest KL shown: the run's region in view
                keep = exact[0] <= 2.0 * max(kl_max, 0.5)
                exact = (exact[0][keep], exact[1][keep], exact[2])
        out = paths.path(workdir) / "plots"
        out.mkdir(parents=True, exist_ok=True)
        return plot_reward_kl(points, (exact[0], exact[1]) if exact else None, path=str(out / "reward_kl.png"),
                              title=f"{os.path.basename(os.path.normpath(workdir))}: sample/reward vs sample/kl"
                              + (" over the exact frontier" if exact else ""))
    except Exception as e:  # pylint: disable=broad-except
        logging.warning("%s: no plots/reward_kl.png: %s", workdir, e)
        return None
