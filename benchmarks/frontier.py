"""Sigmoid DPO on the default synthetic world against the exact reward-KL frontier.

  python benchmarks/frontier.py --out /tmp/dpo_frontier                  # beta in {0.25, 0.5, 1, 2}
  python benchmarks/frontier.py --out /tmp/dpo_frontier --small          # + the T=4 exact-KL check
  python benchmarks/frontier.py --out /tmp/dpo_frontier --betas= \\
      --variant 'pairs100k_b1|configs/synthetic.py:beta=1|--config.synthetic.n_pairs=100000'

Each run is `python -m dpo_jax.main --config=configs/synthetic.py:beta=B --workdir=OUT/NAME`, one at
a time (a run with a report.json is reused). Per run it reads report.json and prints: the sampled
KL (to the run's SFT reference) with its standard error, KL(pi*_beta) and E_{pi*}[r] at the run's
beta, the sampled reward, the frontier reward at the sampled KL, the regret and whether
regret <= 10% of (frontier reward at that KL - E_{pi_ref}[r]), the malformed fraction and its share
of the KL, and the projected (format-constrained) policy's KL to the world's pi_ref, reward and
regret/gain. The exact KL of the trained
transformer by enumeration needs the (vocab - 1)^T = 11^8 = 214M non-EOS prefixes per prompt of
the default world (too many), so `--small` trains a T=4 world (11^4 = 14,641) and compares, on its
first 64 eval prompts, the sampled KL and reward (256 samples per prompt) with the exact ones. Writes
OUT/summary.json and OUT/frontier.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dpo_jax.data import synthetic, synthetic_exact  # noqa: E402
from dpo_jax.evaluation import exact as ex  # noqa: E402
from dpo_jax.evaluation import format as fm  # noqa: E402
from dpo_jax.evaluation import plots  # noqa: E402
from dpo_jax.evaluation import policies as pol  # noqa: E402
from dpo_jax.evaluation import sampled as ev  # noqa: E402

KEYS = ("sample/kl", "sample/kl_stderr", "optimum/kl", "optimum/reward", "sample/reward", "sample/reward_stderr",
        "sample/reward_ref", "optimum/reward_ref", "frontier/reward_at_kl", "frontier/regret", "frontier/regret_frac",
        "sample/win_rate", "sample/malformed_frac", "sample/malformed/past_length", "sample/malformed/early_eos",
        "sample/malformed/special_token", "sample/malformed_kl_share", "sample/kl_world", "sample/kl_ref_world",
        "projected/kl", "projected/kl_stderr", "projected/reward", "projected/reward_stderr", "projected/reward_at_kl",
        "projected/regret", "projected/regret_frac", "eval/accuracy", "eval/loss")


def run(name: str, args: list[str], out: str, sft_dir: str = "") -> dict:
    """Train (unless OUT/NAME/report.json exists) and return the report plus the wall time. `sft_dir`:
    the SFT model every run of the same world and SFT settings shares (trained by the first)."""
    workdir = os.path.join(out, name)
    if sft_dir:
        args = [*args, f"--config.sft.model_dir={sft_dir}"]
    report_path = os.path.join(workdir, "report.json")
    wall = None
    if not os.path.exists(report_path):
        config, *overrides = args
        cmd = [sys.executable, "-m", "dpo_jax.main", f"--config={config}", f"--workdir={workdir}",
               "--config.train.progress=False", *overrides]
        print("$", " ".join(cmd[1:]), flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(report_path) as f:
        report = json.load(f)
    report.update(label=name, workdir=workdir, command=" ".join(["python -m dpo_jax.main", *args]), wall_s=wall)
    keys = ("frontier/regret", "frontier/reward_at_kl", "optimum/reward_ref")
    report["within_10pct"] = all(k in report for k in keys) and bool(
        report["frontier/regret"] <= 0.1 * (report["frontier/reward_at_kl"] - report["optimum/reward_ref"]))
    return report


def small_world_check(out: str, prompts: int = 64, samples: int = 256) -> dict:
    """T=4 world: sampled vs exact KL(pi || pi_ref model) and E[r] of the trained transformer."""
    from dpo_jax import build
    from dpo_jax.models import hf

    args = ["configs/synthetic.py:beta=1", "--config.synthetic.completion_len=4"]
    report = run("small_T4_beta1", args, out)
    workdir = report["workdir"]
    tok = build.tokenizer(os.path.join(workdir, "data", "tokenizer"))
    world = synthetic.load_world(os.path.join(workdir, "data"))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "data", "eval_pairs.jsonl"))]
    ids = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows[:prompts]]
    policy, ref = (pol.ModelPolicy(hf.load_model(os.path.join(workdir, p)), eos_id=tok.eos_token_id,
                                   batch_size=1024) for p in ("final", "sft/model"))
    p = pol.make_prompts(ids)
    t = time.perf_counter()
    sampled = ev.Evaluator(reference=ref, prompts=p, reward=ev.SyntheticReward(world), world=world,
                           beta=1.0, samples_per_prompt=samples)(policy)
    t_sampled = time.perf_counter() - t
    t = time.perf_counter()
    exact = ex.exact_model_report(policy, ref, p, world, vocab=len(tok))
    t_exact = time.perf_counter() - t
    return {"run": {k: report.get(k) for k in (*KEYS, "within_10pct", "command", "wall_s")},
            "prompts": prompts, "samples_per_prompt": samples, "sampled": sampled, "exact": exact,
            "sampled_s": t_sampled, "exact_s": t_exact}


def format_breakdown(workdir: str, prompts: int = 256, samples: int = 4) -> dict:
    """Where the final policy's samples leave the data's format (T content tokens then EOS), and the
    mean true reward of its well-formed samples, on the first eval prompts (fresh samples)."""
    import jax

    from dpo_jax import build
    from dpo_jax.models import hf

    tok = build.tokenizer(os.path.join(workdir, "data", "tokenizer"))
    world = synthetic.load_world(os.path.join(workdir, "data"))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "data", "eval_pairs.jsonl"))][:prompts]
    p = pol.make_prompts([tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows])
    policy = pol.ModelPolicy(hf.load_model(os.path.join(workdir, "final")), eos_id=tok.eos_token_id)
    comps = policy.sample(p.repeat(samples), jax.random.key(7), max_new_tokens=world.completion_len + 1)
    reward_fn = ev.SyntheticReward(world, eos_id=tok.eos_token_id)
    completions = [comps.ids(i) for i in range(len(comps.logps_N))]
    rewards, bad = reward_fn([p.ids(i // samples) for i in range(len(completions))], completions)
    kinds = reward_fn.kinds(completions)  # the kinds of `evaluation/format.py`, as sample/malformed/*
    return {"well_formed": float(np.mean(~bad)), **{k.split("/")[-1]: v for k, v in fm.breakdown(kinds).items()},
            "reward_well_formed": float(rewards[~bad].mean()), "reward_all": float(rewards.mean())}


@functools.lru_cache(maxsize=None)
def commit() -> str:
    """The git revision the figures come from (with '+local changes' when the tree differs from it),
    read once: before this script writes into a tracked doc."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + (" + local changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_doc_block(path: str, name: str, body: str) -> None:
    """Replace the text between `<!-- frontier.py:NAME -->` and `<!-- /frontier.py:NAME -->` in `path`
    with `body` plus the command and the commit that produced it: the tables of docs/evaluation.md
    are regenerated, never edited by hand."""
    start, end = f"<!-- frontier.py:{name} -->", f"<!-- /frontier.py:{name} -->"
    with open(path) as f:
        text = f.read()
    if start not in text or end not in text:
        raise ValueError(f"{path}: no block {start} ... {end} to write table {name!r} into")
    stamp = f"Written by `python {shlex.join(['benchmarks/frontier.py', *sys.argv[1:]])}` at commit {commit()}."
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{stamp}\n\n{body.strip()}\n{end}{tail}")


def fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/dpo_frontier")
    ap.add_argument("--betas", default="0.25,0.5,1,2")
    ap.add_argument("--small", action="store_true", help="also the T=4 sampled-vs-exact KL check")
    ap.add_argument("--breakdown", action="store_true", help="also how each run's samples break the format")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME|CONFIG[|--config.key=value...]: an extra run (e.g. more pairs or steps)")
    ap.add_argument("--share-sft", action="store_true", help="runs of the same SFT settings share one SFT model "
                    "(OUT/sft_model, trained once)")
    ap.add_argument("--write-doc", default="", help="write the tables into this markdown file's "
                    "<!-- frontier.py:runs --> and <!-- frontier.py:small_world --> blocks")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    commit()  # the revision as it is before any table is written
    def sft_dir(args):  # mask=1 changes the SFT stage (sweep_plan.SFT_CHANGING: synthetic.*)
        return os.path.join(a.out, "sft_model") if a.share_sft and "mask=1" not in args[0] else ""

    runs = [run(f"beta_{b}", [f"configs/synthetic.py:beta={b}"], a.out, sft_dir(["beta"]))
            for b in filter(None, a.betas.split(","))]
    runs += [run(name, rest, a.out, sft_dir(rest)) for name, *rest in (v.split("|") for v in a.variant)]
    summary = {"runs": [{k: r.get(k) for k in (*KEYS, "label", "within_10pct", "command", "wall_s")} for r in runs]}
    header = ("run", "KL(sampled)", "+-", "KL(pi*)", "reward", "frontier@KL", "regret", "regret/gain", "<=10%",
              "malformed", "malformed KL share", "KL(projected)", "reward(projected)", "regret/gain(projected)", "win",
              "KL(SFT\\|\\|ref)")
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = (r["label"], fmt(r["sample/kl"]), fmt(r["sample/kl_stderr"]), fmt(r["optimum/kl"]),
                 fmt(r["sample/reward"]), fmt(r["frontier/reward_at_kl"]), fmt(r["frontier/regret"]),
                 fmt(r.get("frontier/regret_frac")), "yes" if r["within_10pct"] else "no",
                 fmt(r["sample/malformed_frac"]), fmt(r.get("sample/malformed_kl_share")), fmt(r.get("projected/kl")),
                 fmt(r.get("projected/reward")), fmt(r.get("projected/regret_frac")), fmt(r["sample/win_rate"]),
                 fmt(r.get("sample/kl_ref_world")))
        table.append("| " + " | ".join(cells) + " |")
    print("\n".join(table))
    if a.write_doc:
        write_doc_block(a.write_doc, "runs", "\n".join(table))
    if runs:
        workdir = runs[0]["workdir"]
        world = synthetic.load_world(os.path.join(workdir, "data"))
        rows = [json.loads(line) for line in open(os.path.join(workdir, "data", "eval_pairs.jsonl"))]
        kept = [r for r in rows if r["chosen"] != r["rejected"]][: int(runs[0]["sample/num_prompts"])]  # as tokenized
        last = np.array([[synthetic.text_to_tokens(r["prompt"])[-1]] for r in kept])  # the eval prompts' x_k
        kl, reward = synthetic_exact.frontier(world, np.geomspace(0.05, 50, 120), last)
        summary["plot"] = plots.plot_reward_kl(
            runs, (kl, reward), path=os.path.join(a.out, "frontier.png"),
            reference_reward=runs[0]["optimum/reward_ref"],
            title="Sigmoid DPO on the synthetic world (default): reward vs KL")
    if a.breakdown:
        for r in runs:
            r["format"] = summary["runs"][runs.index(r)]["format"] = format_breakdown(r["workdir"])
            print(r["label"], "format:", {k: round(v, 3) for k, v in r["format"].items()})
    if a.small:
        summary["small_world"] = s = small_world_check(a.out)
        print(f"T=4 world, {s['prompts']} prompts x {s['samples_per_prompt']} samples: sampled KL "
              f"{s['sampled']['sample/kl']:.4f} +- {s['sampled']['sample/kl_stderr']:.4f} vs exact "
              f"{s['exact']['exact_model/kl']:.4f} (well-formed {s['exact']['exact_model/well_formed']:.4f}, "
              f"total mass {s['exact']['exact_model/mass']:.6f}); "
              f"reward {s['sampled']['sample/reward']:.4f} +- {s['sampled']['sample/reward_stderr']:.4f} vs exact "
              f"{s['exact']['exact_model/reward']:.4f}; times {s['sampled_s']:.1f}s / {s['exact_s']:.1f}s")
        if a.write_doc:
            sm, ex_ = s["sampled"], s["exact"]
            write_doc_block(a.write_doc, "small_world", "\n".join([
                f"{s['prompts']} eval prompts, {s['samples_per_prompt']} samples per prompt.", "",
                "| | sampled | exact |", "|---|---|---|",
                f"| KL(pi \\|\\| SFT reference) | {sm['sample/kl']:.3f} ± {sm['sample/kl_stderr']:.3f} | "
                f"{ex_['exact_model/kl']:.3f} |",
                f"| E[r] | {sm['sample/reward']:.3f} ± {sm['sample/reward_stderr']:.3f} | "
                f"{ex_['exact_model/reward']:.3f} |",
                f"| well-formed fraction | {1 - sm['sample/malformed_frac']:.3f} | "
                f"{ex_['exact_model/well_formed']:.3f} (total mass {ex_['exact_model/mass']:.6f}) |"]))
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    print("wrote", os.path.join(a.out, "summary.json"))


if __name__ == "__main__":
    main()
