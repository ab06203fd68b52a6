"""Aggregate a sweep directory into one table and plots.

  python -m launch.aggregate DIR [--out OUT]   (OUT defaults to DIR)

Runs: those of DIR/manifest.json (written by launch.sweep, plain or --fused), else every
subdirectory of DIR holding a run (`is_run`: report.json, run_info.json, or a trainer's config.json).
Table (OUT/results.csv and OUT/results.parquet), one row per run:
  run, status, workdir;
  the config keys that vary across runs (from each run's resolved config.json, else the manifest
  overrides), plus loss.name and loss.beta always;
  report.json as is (eval/*, sample/*, optimum/*, frontier/*, projected/* ...);
  last/<metric>: the last logged value of every metric of metrics.jsonl (the preference stage;
  the shared SFT stage's sft/* metrics belong to whichever run trained it and are left out).
Seeds (OUT/results_mean.csv and .parquet), one row per member (the runs whose names differ only in
their `seed=S` part, as `launch.sweep --seeds=N` names them): member (that name without `seed=`),
the swept keys equal within every member, n_seeds (runs), n_finished, runs (their names); for every numeric metric X of the table,
X = its mean over the runs that have it and X_stderr = std(ddof=1) / sqrt(n) over those n runs
(NaN when n = 1). A report's own X_stderr (one run's sampling error) is not averaged: the spread
over seeds includes it.
Plots (OUT/plots/), of the members' means with standard-error bars when some member has several
seeds, else of the runs; a colour per loss, a marker per beta, each loss's points joined along beta,
the legend outside the axes (`dpo_jax.evaluation.plots`): reward_kl.png (sample/reward vs
sample/kl, or --kl_key, of every run that has them, over the exact reward-KL frontier of the
synthetic world when the runs are on it, on the same eval prompts as the reports; one panel: reward
and KL are on the same scale for every loss), accuracy_vs_beta.png (eval/accuracy against loss.beta,
one panel) and margins_vs_beta.png (eval/rewards/margins against loss.beta, a panel per loss with its
own y scale: margins are implicit rewards on each loss's own scale, e.g. SimPO's length-normalized
margins of 16-29 against sigmoid DPO's ~2).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from dpo_jax import paths
from dpo_jax.evaluation import plots

ALWAYS = ("loss.name", "loss.beta")


def _read_json(path: str) -> Optional[dict]:
    if not paths.exists(path):
        return None
    return json.loads(paths.read_text(path))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'loss': {'beta': 1}} -> {'loss.beta': 1}; lists become tuples (hashable, comparable)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def final_metrics(path: str) -> dict[str, float]:
    """The last logged value of every metric in a metrics.jsonl (sft/* left out); {} if missing."""
    out: dict[str, float] = {}
    if not paths.exists(path):
        return out
    for line in paths.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a row cut short by a killed process
            continue
        out.update({k: v for k, v in row.items() if not k.startswith("sft/")})
    return out


def find_runs(root: str) -> list[dict]:
    """[{name, workdir, status, overrides}] from root/manifest.json, else from root's subdirectories."""
    manifest = _read_json(paths.join(root, "manifest.json"))
    if manifest is not None:
        runs = []
        for r in manifest.get("runs", []):
            workdir = r["workdir"]
            if paths.is_local(workdir) and not os.path.isabs(workdir) and not os.path.isdir(workdir):
                workdir = os.path.join(manifest.get("cwd", ""), workdir)  # relative to the launch directory
            if not paths.path(workdir).is_dir():  # the sweep directory was moved: same name under root
                workdir = paths.join(root, r["name"])
            runs.append({"name": r["name"], "workdir": workdir, "status": r.get("status"),
                         "overrides": r.get("overrides", {})})
        return runs
    runs = []
    for name in sorted(p.name for p in paths.path(root).iterdir()):
        workdir = paths.join(root, name)
        if is_run(workdir):
            runs.append({"name": name, "workdir": workdir, "status": None, "overrides": {}})
    return runs


def is_run(workdir: str) -> bool:
    """A run's workdir: report.json or run_info.json, or a config.json with a loss section (not the
    config.json of an exported model, e.g. a sweep's shared sft_model/)."""
    if any(paths.exists(paths.join(workdir, f)) for f in ("report.json", "run_info.json")):
        return True
    try:
        return isinstance((_read_json(paths.join(workdir, "config.json")) or {}).get("loss"), dict)
    except ValueError:
        return False


def _status(workdir: str) -> str:
    if paths.exists(paths.join(workdir, "report.json")):
        return "finished"
    return "interrupted" if paths.path(workdir).joinpath("checkpoints").is_dir() else "pending"


def _cell(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (tuple, list, dict)) else v


def load_table(root: str) -> tuple[pd.DataFrame, list[str]]:
    """(table, swept keys): one row per run of the sweep directory `root`."""
    runs = find_runs(root)
    if not runs:
        raise ValueError(f"{root}: no runs (no manifest.json and no subdirectory with config.json/report.json)")
    configs = []
    for r in runs:
        cfg = _read_json(paths.join(r["workdir"], "config.json"))
        configs.append(flatten(cfg) if cfg is not None else dict(r["overrides"]))
    keys = list(dict.fromkeys(k for c in configs for k in c))
    swept = [k for k in keys if len({json.dumps(c.get(k, "<unset>"), default=str) for c in configs}) > 1]
    swept.sort(key=lambda k: (k != "loss.name", k != "loss.beta"))  # the loss first, then its beta
    rows = []
    for r, cfg in zip(runs, configs):
        row = {"run": r["name"], "status": _status(r["workdir"]), "workdir": r["workdir"]}
        row.update({k: _cell(cfg.get(k)) for k in list(dict.fromkeys([*swept, *ALWAYS]))})
        report = _read_json(paths.join(r["workdir"], "report.json")) or {}
        row.update({k: _cell(v) for k, v in report.items()})
        row.update({f"last/{k}": v for k, v in final_metrics(paths.join(r["workdir"], "metrics.jsonl")).items()})
        rows.append(row)
    return pd.DataFrame(rows), swept


SEED = "seed"
_INFO = ("run", "status", "workdir")


def member_name(run: str) -> str:
    """'loss.name=ipo,loss.beta=0.5,seed=1' -> 'loss.name=ipo,loss.beta=0.5'."""
    return ",".join(p for p in str(run).split(",") if not p.startswith(f"{SEED}=")) or "run"


def mean_table(df: pd.DataFrame, swept: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """(table, swept keys but seed): one row per member, the mean and standard error over its seeds
    of every numeric metric (see the module docstring)."""
    keys = [k for k in swept if k != SEED]
    cfg_cols = [k for k in dict.fromkeys([*keys, *ALWAYS]) if k in df]
    num = {c: pd.to_numeric(df[c], errors="coerce") for c in df.columns
           if c not in (*_INFO, *cfg_cols, SEED)}
    metrics = [c for c, v in num.items() if v.notna().any()]
    metrics = [c for c in metrics if not (c.endswith("_stderr") and c[:-len("_stderr")] in metrics)]
    groups: dict[str, list] = {}
    for i, run in zip(df.index, df["run"]):
        groups.setdefault(member_name(run), []).append(i)
    same = lambda k: all(df.loc[idx, k].astype(str).nunique() == 1 for idx in groups.values())  # noqa: E731
    keys = [k for k in keys if same(k)]  # not those that follow the seed (e.g. sft.model_dir)
    cfg_cols = [k for k in cfg_cols if k in keys or k in ALWAYS]
    rows = []
    for member, idx in groups.items():
        sub = df.loc[idx]
        first = sub.iloc[0]
        row = {"member": member, **{k: first[k] for k in cfg_cols},
               "n_seeds": len(sub), "n_finished": int((sub["status"] == "finished").sum()),
               "runs": json.dumps(list(sub["run"]))}
        for c in metrics:
            v = num[c][idx].dropna().to_numpy(float)
            row[c] = v.mean() if len(v) else np.nan
            row[f"{c}_stderr"] = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows), keys


def _write(df: pd.DataFrame, out: str, stem: str, written: dict[str, str], key: str):
    written[key] = paths.join(out, f"{stem}.csv")
    paths.write_text(written[key], df.to_csv(index=False))
    try:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        written[key.replace("csv", "parquet")] = paths.join(out, f"{stem}.parquet")
        paths.write_bytes(written[key.replace("csv", "parquet")], buf.getvalue())
    except ImportError as e:
        print(f"aggregate: no {stem}.parquet: {e}", file=sys.stderr)


def write_table(df: pd.DataFrame, out: str, means: Optional[pd.DataFrame] = None) -> dict[str, str]:
    """out/results.csv and out/results.parquet (the latter needs pyarrow or fastparquet), and
    out/results_mean.csv and .parquet of `means` if given."""
    paths.path(out).mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    _write(df, out, "results", written, "csv")
    if means is not None:
        _write(means, out, "results_mean", written, "mean_csv")
    return written


# ----------------------------------------------------------------------------------------------
# Plots.

def label_keys(df: pd.DataFrame, swept: Sequence[str]) -> list[str]:
    """The swept keys worth a label: loss.name first, without keys that loss.name determines (e.g.
    reference.mode='none' for every simpo run)."""
    keys = [k for k in dict.fromkeys(["loss.name", *swept]) if k in df and (k in swept or k == "loss.name")]
    if "loss.name" not in df:
        return keys
    by_loss = df.astype(str).groupby("loss.name")
    return [k for k in keys if k == "loss.name" or (by_loss[k].nunique() > 1).any()]


def run_label(row: pd.Series, keys: Sequence[str]) -> str:
    """'ipo beta=0.5' (loss.name bare, other keys by their last component)."""
    parts = [str(row[k]) if k == "loss.name" else f"{k.rsplit('.', 1)[-1]}={row[k]}"
             for k in keys if k in row and pd.notna(row[k])]
    return " ".join(parts) or str(row.get("run", row.get("member")))


def exact_frontier(workdir: str, kl_max: float = 0.0) -> Optional[tuple[np.ndarray, np.ndarray, float]]:
    """(kl_F, reward_F, reward of pi_ref) of the synthetic world of a run's data/ on its first
    config.eval.num_prompts eval prompts (`plots.exact_frontier`); None if the run is not synthetic."""
    num_prompts = ((_read_json(paths.join(workdir, "config.json")) or {}).get("eval") or {}).get("num_prompts")
    return plots.exact_frontier(os.path.join(workdir, "data"), num_prompts, kl_max=kl_max)


def _num(df: pd.DataFrame, key: str) -> pd.Series:
    return pd.to_numeric(df[key], errors="coerce") if key in df else pd.Series(np.nan, index=df.index)


def _series(df: pd.DataFrame, swept: Sequence[str]) -> tuple[pd.Series, pd.Series]:
    """(loss, series label) of every row: the loss name, and the loss with the other swept keys
    (but beta) that vary within it, e.g. 'simpo gamma=1.0'."""
    loss = df["loss.name"].astype(str) if "loss.name" in df else pd.Series("runs", index=df.index)
    keys = [k for k in label_keys(df, swept) if k != "loss.beta"]
    label = df.apply(lambda row: run_label(row, keys), axis=1) if keys and len(df) else loss
    return loss, label


def vs_beta_lines(df: pd.DataFrame, swept: Sequence[str], metric: str) -> list[dict]:
    """The lines of `plots.plot_vs_beta`: metric against loss.beta per series (`_series`), with the
    column `metric`_stderr as error bars where the table has one."""
    beta, y, err = _num(df, "loss.beta"), _num(df, metric), _num(df, f"{metric}_stderr")
    ok = beta.notna() & y.notna()
    loss, label = _series(df, swept)
    lines = []
    for line in dict.fromkeys(label[ok]):
        sel = ok & (label == line)
        lines.append({"loss": loss[sel].iloc[0], "label": line, "beta": beta[sel].tolist(), "y": y[sel].tolist(),
                      "yerr": err[sel].fillna(0.0).tolist() if err.notna().any() else None})
    return lines


def plot_vs_beta(df: pd.DataFrame, swept: Sequence[str], metric: str, path: str, ylabel: str,
                 panel_per_loss: bool = False) -> Optional[str]:
    """metric against loss.beta: a colour per loss, a marker per beta, one line per series, error bars
    of `metric`_stderr where the table has it, a panel per loss if `panel_per_loss`; None when no run
    has both."""
    lines = vs_beta_lines(df, swept, metric)
    if not lines:
        return None
    return plots.plot_vs_beta(lines, path=path, ylabel=ylabel, panel_per_loss=panel_per_loss)


def reward_kl_points(df: pd.DataFrame, swept: Sequence[str], kl_key: str = "sample/kl") -> list[dict]:
    """The points of `plots.plot_reward_kl`: every row with sample/reward and `kl_key`, with its
    loss, beta, series and the table's standard errors."""
    kl, reward = _num(df, kl_key), _num(df, "sample/reward")
    beta = _num(df, "loss.beta")
    loss, series = _series(df, swept)
    keys = label_keys(df, swept)
    points = []
    for i in np.flatnonzero((kl.notna() & reward.notna()).to_numpy()):
        points.append({"label": run_label(df.iloc[i], keys), "kl": kl.iloc[i], "reward": reward.iloc[i],
                       "loss": loss.iloc[i], "series": series.iloc[i],
                       "beta": None if np.isnan(beta.iloc[i]) else float(beta.iloc[i]),
                       "kl_stderr": _num(df, f"{kl_key}_stderr").fillna(0.0).iloc[i],
                       "reward_stderr": _num(df, "sample/reward_stderr").fillna(0.0).iloc[i]})
    return points


def plot_reward_kl(df: pd.DataFrame, swept: Sequence[str], path: str, kl_key: str = "sample/kl",
                   workdir: Optional[str] = None) -> Optional[str]:
    """sample/reward vs `kl_key` of every run (or member) that has them, coloured by loss, marked by
    beta, joined along beta, with the table's `_stderr` columns as error bars, over the exact frontier
    (up to twice the largest KL) of the world in `workdir` (default: the first such row's) if synthetic.
    sample/kl is against the run's reference model (the SFT model), the frontier against the world's
    pi_ref; kl_key='sample/kl_world' plots the KL to the world's pi_ref (well-formed samples only)."""

    points = reward_kl_points(df, swept, kl_key)
    if not points:
        return None
    kl, reward = _num(df, kl_key), _num(df, "sample/reward")
    ok = kl.notna() & reward.notna()
    kl_max = float(kl[ok].max())
    exact = exact_frontier(workdir or df[ok].iloc[0]["workdir"], kl_max=kl_max)
    keep = exact[0] <= 2.0 * max(kl_max, 0.5) if exact else None  # up to twice the largest KL: the runs in view
    frontier = (exact[0][keep], exact[1][keep]) if exact else None
    ref = exact[2] if exact else None
    return plots.plot_reward_kl(points, frontier, path=path, reference_reward=ref,
                                title=f"sample/reward vs {kl_key}" + (" over the exact frontier" if exact else ""))


def aggregate(root: str, out: Optional[str] = None, kl_key: str = "sample/kl") -> dict[str, str]:
    """Write the table and the plots of the sweep directory `root` (to `out`, default root);
    returns {what: path}."""
    df, swept = load_table(root)
    return write_all(df, swept, out or root, kl_key)


def write_all(df: pd.DataFrame, swept: Sequence[str], out: str, kl_key: str = "sample/kl") -> dict[str, str]:
    """The tables and plots of the run table `df` (load_table) in `out`; returns {what: path}."""
    means, mean_keys = mean_table(df, swept)
    written = write_table(df, out, means)
    plot_dir = paths.join(out, "plots")
    paths.path(plot_dir).mkdir(parents=True, exist_ok=True)
    seeded = bool((means["n_seeds"] > 1).any())
    pdf, pswept = (means, mean_keys) if seeded else (df, swept)
    finished = df.loc[df["status"] == "finished", "workdir"]
    workdir = finished.iloc[0] if seeded and len(finished) else None
    made = {"reward_kl": plot_reward_kl(pdf, pswept, paths.join(plot_dir, "reward_kl.png"), kl_key, workdir),
            "accuracy_vs_beta": plot_vs_beta(pdf, pswept, "eval/accuracy",
                                             paths.join(plot_dir, "accuracy_vs_beta.png"),
                                             "eval/accuracy (preference accuracy)"),
            "margins_vs_beta": plot_vs_beta(pdf, pswept, "eval/rewards/margins",
                                            paths.join(plot_dir, "margins_vs_beta.png"),
                                            "eval/rewards/margins (beta-scaled)", panel_per_loss=True)}
    for what, p in made.items():
        if p is None:
            print(f"aggregate: no {what} plot: no run has the metrics it needs", file=sys.stderr)
        else:
            written[what] = p
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.aggregate", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="sweep directory (launch.sweep --root) or a directory of run workdirs")
    p.add_argument("--out", default=None, help="where to write results.* and plots/ (default: root)")
    p.add_argument("--kl_key", default="sample/kl", help="report key of the reward-KL plot's x axis "
                   "(sample/kl: to the run's reference model; sample/kl_world: to the synthetic world's pi_ref)")
    a = p.parse_args(argv)
    try:
        df, swept = load_table(a.root)
    except ValueError as e:
        p.error(str(e))
    paths = write_all(df, swept, a.out or a.root, a.kl_key)
    cols = [c for c in ["run", "status", *swept, "eval/accuracy", "eval/rewards/margins", "sample/kl",
                        "sample/reward", "frontier/regret"] if c in df]
    means, mean_keys = mean_table(df, swept)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df[cols].to_string(index=False))
        if (means["n_seeds"] > 1).any():
            stats = [c for c in cols if c not in ("run", "status", *swept)]
            mcols = ["member", *mean_keys, "n_seeds", *(c + s for c in stats for s in ("", "_stderr"))]
            print(means[[c for c in mcols if c in means]].to_string(index=False))
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
