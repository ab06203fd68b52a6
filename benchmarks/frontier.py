"""Sigmoid DPO on the default synthetic world against the exact reward-KL frontier.

  python benchmarks/frontier.py --out /tmp/dpo_frontier                  # beta in {0.25, 0.5, 1, 2}
  python benchmarks/frontier.py --out /tmp/dpo_frontier --small          # + the T=4 exact-KL check
  python benchmarks/frontier.py --out /tmp/dpo_frontier --betas= \\
      --variant 'pairs100k_b1|configs/synthetic.py:beta=1|--config.synthetic.n_pairs=100000'

Each run is `python -m dpo_jax.main --config=configs/synthetic.py:beta=B --workdir=OUT/NAME`, one at
a time (a run with a report.json is reused). Per run it reads report.json and prints: the sampled
KL (to the run's SFT reference) with its standard error, KL(pi*_beta) and E_{pi*}[r] at the run's
beta, the sampled reward, the frontier reward at the sampled KL, the regret and whether
regret <= 10% of (frontier reward at that KL - E_{pi_ref}[r]). The exact KL of the trained
transformer by enumeration needs the (vocab - 1)^T = 11^8 = 214M non-EOS prefixes per prompt of
the default world (too many), so `--small` trains a T=4 world (11^4 = 14,641) and compares, on its
first 64 eval prompts, the sampled KL and reward (256 samples per prompt) with the exact ones. Writes
OUT/summary.json and OUT/frontier.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dpo_jax.data import synthetic, synthetic_exact  # noqa: E402
from dpo_jax.evaluation import exact as ex  # noqa: E402
from dpo_jax.evaluation import plots  # noqa: E402
from dpo_jax.evaluation import policies as pol  # noqa: E402
from dpo_jax.evaluation import sampled as ev  # noqa: E402

KEYS = ("sample/kl", "sample/kl_stderr", "exact/kl", "exact/reward", "sample/reward", "sample/reward_stderr",
        "sample/reward_ref", "exact/reward_ref", "frontier/reward_at_kl", "frontier/regret", "frontier/regret_frac",
        "sample/win_rate", "sample/malformed_frac", "sample/kl_world", "sample/kl_ref_world", "eval/accuracy",
        "eval/loss")


def run(name: str, args: list[str], out: str) -> dict:
    """Train (unless OUT/NAME/report.json exists) and return the report plus the wall time."""
    workdir = os.path.join(out, name)
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
    report["within_10pct"] = bool(report["frontier/regret"] <= 0.1 * (report["frontier/reward_at_kl"] -
                                                                      report["exact/reward_ref"]))
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
    n_t, off, eos = world.completion_len, synthetic.TOKEN_OFFSET, tok.eos_token_id
    comps = policy.sample(p.repeat(samples), jax.random.key(7), max_new_tokens=n_t + 1)
    rewards, bad = ev.SyntheticReward(world, eos_id=eos)(
        [p.ids(i // samples) for i in range(len(comps.logps_N))], [comps.ids(i) for i in range(len(comps.logps_N))])
    kinds = {"well_formed": 0, "no_eos_after_T": 0, "eos_before_T": 0, "special_token_before_T": 0}
    for i in range(len(comps.logps_N)):
        ids = comps.ids(i)
        m = next((j for j, t in enumerate(ids) if t < off), len(ids))
        if m >= n_t:  # T content tokens, then EOS or not
            kind = "well_formed" if len(ids) == n_t + 1 and ids[n_t] == eos else "no_eos_after_T"
        else:
            kind = "eos_before_T" if m < len(ids) and ids[m] == eos else "special_token_before_T"
        kinds[kind] += 1
    n = len(comps.logps_N)
    return {**{k: v / n for k, v in kinds.items()}, "reward_well_formed": float(rewards[~bad].mean()),
            "reward_all": float(rewards.mean())}


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
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    runs = [run(f"beta_{b}", [f"configs/synthetic.py:beta={b}"], a.out) for b in filter(None, a.betas.split(","))]
    runs += [run(name, rest, a.out) for name, *rest in (v.split("|") for v in a.variant)]
    summary = {"runs": [{k: r.get(k) for k in (*KEYS, "label", "within_10pct", "command", "wall_s")} for r in runs]}
    header = ("run", "KL(sampled)", "+-", "KL(pi*)", "reward", "frontier@KL", "regret", "regret/gain", "<=10%",
              "malformed", "win", "KL(SFT||ref)")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in runs:
        cells = (r["label"], fmt(r["sample/kl"]), fmt(r["sample/kl_stderr"]), fmt(r["exact/kl"]),
                 fmt(r["sample/reward"]), fmt(r["frontier/reward_at_kl"]), fmt(r["frontier/regret"]),
                 fmt(r.get("frontier/regret_frac")), "yes" if r["within_10pct"] else "no",
                 fmt(r["sample/malformed_frac"]), fmt(r["sample/win_rate"]), fmt(r.get("sample/kl_ref_world")))
        print("| " + " | ".join(cells) + " |")
    if runs:
        workdir = runs[0]["workdir"]
        world = synthetic.load_world(os.path.join(workdir, "data"))
        rows = [json.loads(line) for line in open(os.path.join(workdir, "data", "eval_pairs.jsonl"))]
        kept = [r for r in rows if r["chosen"] != r["rejected"]][: int(runs[0]["sample/num_prompts"])]  # as tokenized
        last = np.array([[synthetic.text_to_tokens(r["prompt"])[-1]] for r in kept])  # the eval prompts' x_k
        kl, reward = synthetic_exact.frontier(world, np.geomspace(0.05, 50, 120), last)
        summary["plot"] = plots.plot_reward_kl(
            runs, (kl, reward), path=os.path.join(a.out, "frontier.png"), reference_reward=runs[0]["exact/reward_ref"],
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
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    print("wrote", os.path.join(a.out, "summary.json"))


if __name__ == "__main__":
    main()
