"""Online against offline sigmoid DPO on the default synthetic world, at equal labelled pairs.

  python benchmarks/online_vs_offline.py --out /tmp/dpo_online --budgets 5000,20000 --rounds 4

For each budget N of labelled pairs (same beta, same batch, the same preference steps per pair:
`--steps-per-1k` steps per 1,000 pairs):
- offline: `configs/synthetic.py:beta=B,steps=S --config.synthetic.n_pairs=N`, N pairs sampled
  from pi_ref (the world's pairs file) and S = N * steps-per-1k / 1000 steps;
- online: `configs/online.py:beta=B,rounds=R,pairs=N/R,steps=S/R,reference=REF` for each REF of
  `--references`: R rounds of N/R pairs sampled from the current policy, on the prompts of the same
  N rows, S/R steps each.
Every run shares one SFT model (OUT/sft_model) and a run with a report.json is reused. Prints (and
writes to OUT/table.md) one markdown row per run: the final report's sampled KL (to the SFT model),
reward, frontier reward at that KL, regret/gain (`frontier/regret_frac`), malformed fraction, the
projected policy's KL (to the world's pi_ref) and regret/gain; then the online runs round by round.
"""

from __future__ import annotations

import argparse
import os
import time

import frontier  # benchmarks/frontier.py: one run of the synthetic world, its report



def run(name: str, config: str, overrides: list[str], out: str) -> dict:
    """Train OUT/NAME unless its report.json exists (`frontier.run`, every run sharing OUT/sft_model)."""
    return frontier.run(name, [config, *overrides], out, sft_dir=os.path.join(out, "sft_model"))


def fmt(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def row(label: str, pairs, steps, r: dict, prefix: str = "") -> str:
    g = lambda k: r.get(prefix + k)  # noqa: E731
    cells = [label, pairs, steps, g("sample/kl"), g("sample/kl_stderr"), g("sample/reward"),
             g("frontier/reward_at_kl"), g("frontier/regret_frac"), g("sample/malformed_frac"), g("projected/kl"),
             g("projected/regret_frac"), g("eval/accuracy")]
    return "| " + " | ".join(fmt(c) for c in cells) + " |"


HEADER = ("| run | labelled pairs | steps | KL(sampled) | +- | reward | frontier@KL | regret/gain | malformed | "
          "KL(projected) | regret/gain(projected) | eval acc |\n" + "|---" * 12 + "|")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/dpo_online")
    ap.add_argument("--budgets", default="5000,20000", help="total labelled pairs, comma-separated")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--steps-per-1k", type=float, default=30.0,
                    help="preference steps (of 64 pairs) per 1,000 labelled pairs; 30 = the default 600 on 20k")
    ap.add_argument("--references", default="fixed", help="online.reference values, comma-separated")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    table, rounds = [HEADER], ["| run | round | labelled pairs | steps | KL(sampled) | +- | reward | frontier@KL | "
                               "regret/gain | malformed | KL(projected) | regret/gain(projected) | eval acc |\n"
                               + "|---" * 13 + "|"]
    for n in (int(x) for x in a.budgets.split(",")):
        steps = int(round(n * a.steps_per_1k / 1000))
        per_round, round_steps = n // a.rounds, steps // a.rounds
        off = run(f"offline_{n}", f"configs/synthetic.py:beta={a.beta},steps={steps}",
                  [f"--config.synthetic.n_pairs={n}"], a.out)
        table.append(row(f"offline_{n}", n, steps, off))
        for ref in a.references.split(","):
            name = f"online_{ref}_{n}"
            on = run(name, f"configs/online.py:beta={a.beta},rounds={a.rounds},pairs={per_round},"
                     f"steps={round_steps},reference={ref}", [], a.out)
            table.append(row(name, int(on["online/pairs"]), round_steps * a.rounds, on))
            for k in range(1, a.rounds + 1):
                rounds.append(row(name, int(on[f"online/round_{k}/pairs"]), round_steps * k, on,
                                  prefix=f"online/round_{k}/").replace(f"| {name} |", f"| {name} | {k} |", 1))
    text = "\n".join(table) + "\n\nRound by round (KL and frontier against the SFT model and the world's pi_ref):\n\n" \
        + "\n".join(rounds) + "\n"
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
