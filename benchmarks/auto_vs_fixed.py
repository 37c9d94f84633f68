"""budget="auto" against fixed budgets at equal mean executed layers, from `buddy sweep` results.

    .venv/bin/python benchmarks/auto_vs_fixed.py docs/sweep_smollm2.jsonl --method router \
        --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa

For each budget-predictor run (one per trade-off lambda) it prints the measured mean executed layers per token,
its quality, and the quality of the fixed-budget curve at the same mean layers. The fixed curve
interpolates linearly between the method's fixed layer counts and the dense model at k = L: log-perplexity
for `ppl-sotu`, and accuracy for the average over the multiple-choice tasks.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from buddy.eval.sweep import read_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--method", default="router")
    ap.add_argument("--predictors", default="", help="comma list: only these predictors' auto rows (default all)")
    ap.add_argument("--tasks", required=True, help="multiple-choice tasks averaged for the accuracy comparison")
    args = ap.parse_args()
    rows = read_results(args.results)
    tasks = args.tasks.split(",")

    def fixed_curve(task, metric):
        pts = {}
        for r in rows:
            if r["task"] == task and (r["method"] == args.method and r["k"] != "auto" or r["method"] == "dense"):
                pts[r["k"]] = (r["layers_per_token"], r[metric])
        return sorted(pts.values())

    print("| predictor | lambda | task | auto layers/token | auto | fixed at the same layers | auto - fixed |")
    print("|---|---|---|---|---|---|---|")
    autos = sorted({(r["predictor"], r["tradeoff"]) for r in rows if r["k"] == "auto" and r["method"] == args.method})
    if args.predictors:
        autos = [a for a in autos if a[0] in args.predictors.split(",")]
    for pred, lam in autos:
        mine = {r["task"]: r for r in rows if r["k"] == "auto" and r.get("predictor") == pred and r["method"] == args.method}
        if "ppl-sotu" in mine:
            r = mine["ppl-sotu"]
            xs, ys = zip(*fixed_curve("ppl-sotu", "ppl"))
            fixed = math.exp(np.interp(r["layers_per_token"], xs, np.log(ys)))
            print(f"| {pred} | {lam} | ppl-sotu (ppl, lower is better) | {r['layers_per_token']:.2f} | {r['ppl']:.2f} | "
                  f"{fixed:.2f} | {r['ppl'] - fixed:+.2f} ({100 * (r['ppl'] / fixed - 1):+.1f}%) |")
        if all(t in mine for t in tasks):
            lpt = sum(mine[t]["layers_per_token"] for t in tasks) / len(tasks)
            acc = sum(mine[t]["acc"] for t in tasks) / len(tasks)
            curves = [fixed_curve(t, "acc") for t in tasks]
            ks = sorted(set.intersection(*[{round(x, 6) for x, _ in c} for c in curves]))
            avg = [(k, sum(dict((round(x, 6), y) for x, y in c)[k] for c in curves) / len(tasks)) for k in ks]
            xs, ys = zip(*avg)
            fixed = float(np.interp(lpt, xs, ys))
            print(f"| {pred} | {lam} | average of {len(tasks)} tasks (acc %) | {lpt:.2f} | {100 * acc:.1f} | {100 * fixed:.1f} | "
                  f"{100 * (acc - fixed):+.1f} |")


if __name__ == "__main__":
    main()
