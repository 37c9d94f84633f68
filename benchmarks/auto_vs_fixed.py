"""budget="auto" against fixed budgets at equal mean executed layers, from `buddy sweep` results.

    .venv/bin/python benchmarks/auto_vs_fixed.py docs/sweep_smollm2.jsonl --method router \
        --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa

For each budget-predictor run (one per trade-off lambda) it prints the measured mean executed layers per token,
its quality, and the quality of fixed budgets at the same mean layers, interpolated linearly between fixed
layer counts (log-perplexity for `ppl-sotu`, accuracy for the average over the multiple-choice tasks), two ways:
- `fixed`: between all of the method's fixed layer counts in the file and the dense model at k = L;
- `fixed, levels`: only between the layer counts of the predictor's own levels (k = round(level * L)), i.e.
  what a mix of the fixed budgets that `auto` chooses among reaches at the same mean.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from buddy.budget import Budget
from buddy.eval.sweep import read_results
from buddy.predictor import DEFAULT_LEVELS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--method", default="router")
    ap.add_argument("--predictors", default="", help="comma list: only these predictors' auto rows (default all)")
    ap.add_argument("--tasks", required=True, help="multiple-choice tasks averaged for the accuracy comparison")
    args = ap.parse_args()
    rows = read_results(args.results)
    tasks = args.tasks.split(",")

    def fixed_curve(task, metric, only=None):
        pts = {}
        for r in rows:
            if r["task"] == task and (r["method"] == args.method and r["k"] != "auto" or r["method"] == "dense"):
                if only is None or r["k"] in only:
                    pts[r["k"]] = (r["layers_per_token"], r[metric])
        return sorted(pts.values())

    def level_ks(pred, n_layers):
        f = Path(pred) / "predictor.json"
        levels = json.loads(f.read_text())["config"]["levels"] if f.is_file() else DEFAULT_LEVELS
        return {Budget(fraction=x).k(n_layers) for x in levels}

    def ppl_at(curve, x):
        xs, ys = zip(*curve)
        return math.exp(np.interp(x, xs, np.log(ys)))

    def avg_acc_at(curves, x):
        ks = sorted(set.intersection(*[{round(a, 6) for a, _ in c} for c in curves]))
        avg = [(k, sum(dict((round(a, 6), y) for a, y in c)[k] for c in curves) / len(curves)) for k in ks]
        xs, ys = zip(*avg)
        return float(np.interp(x, xs, ys))

    print("| predictor | lambda | task | auto layers/token | auto | fixed | auto - fixed | fixed, levels | "
          "auto - fixed, levels |")
    print("|---|---|---|---|---|---|---|---|---|")
    autos = sorted({(r["predictor"], r["tradeoff"]) for r in rows if r["k"] == "auto" and r["method"] == args.method})
    if args.predictors:
        autos = [a for a in autos if a[0] in args.predictors.split(",")]
    for pred, lam in autos:
        mine = {r["task"]: r for r in rows if r["k"] == "auto" and r.get("predictor") == pred and r["method"] == args.method}
        only = level_ks(pred, next(iter(mine.values()))["n_layers"])
        if "ppl-sotu" in mine:
            r = mine["ppl-sotu"]
            cells = []
            for fixed in (ppl_at(fixed_curve("ppl-sotu", "ppl"), r["layers_per_token"]),
                          ppl_at(fixed_curve("ppl-sotu", "ppl", only), r["layers_per_token"])):
                cells += [f"{fixed:.2f}", f"{r['ppl'] - fixed:+.2f} ({100 * (r['ppl'] / fixed - 1):+.1f}%)"]
            print(f"| {pred} | {lam} | ppl-sotu (ppl, lower is better) | {r['layers_per_token']:.2f} | {r['ppl']:.2f} | "
                  + " | ".join(cells) + " |")
        if all(t in mine for t in tasks):
            lpt = sum(mine[t]["layers_per_token"] for t in tasks) / len(tasks)
            acc = sum(mine[t]["acc"] for t in tasks) / len(tasks)
            cells = []
            for o in (None, only):
                fixed = avg_acc_at([fixed_curve(t, "acc", o) for t in tasks], lpt)
                cells += [f"{100 * fixed:.1f}", f"{100 * (acc - fixed):+.1f}"]
            print(f"| {pred} | {lam} | average of {len(tasks)} tasks (acc %) | {lpt:.2f} | {100 * acc:.1f} | "
                  + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
