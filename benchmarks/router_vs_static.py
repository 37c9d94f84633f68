"""The router against the best static plan, per domain and layer count, from `buddy sweep` perplexity rows.

    .venv/bin/buddy sweep --model smollm2 --methods dense,static-bi,static-greedy,router --layers 15,19,23,26 \
        --tasks ppl:sotu,ppl:lambada,...,ppl:moby_dick,ppl:qasper --out runs/domains.jsonl
    .venv/bin/python benchmarks/router_vs_static.py runs/domains.jsonl

For every `ppl:<domain>` task and layer count k it prints the router's perplexity over the best static
plan's at that k (the lower of static-bi and static-greedy, per cell), with a 95% paired bootstrap interval
over windows (the same windows for both), and marks held-out domains. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from buddy.corpus import HELDOUT_DOMAINS
from buddy.eval.stats import paired_bootstrap
from buddy.eval.sweep import read_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--method", default="router")
    ap.add_argument("--statics", default="static-bi,static-greedy")
    args = ap.parse_args()
    rows = [r for r in read_results(args.results) if r["task"].startswith("ppl:") and "per_doc" in r]
    cell = {(r["method"], r["task"], r["k"]): r for r in rows}
    out = []
    print("| domain | held out | k | router ppl | best static | ppl | router / static [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for task, k in sorted({(r["task"], r["k"]) for r in rows if r["method"] == args.method}):
        mine = cell[(args.method, task, k)]
        statics = [cell[(s, task, k)] for s in args.statics.split(",") if (s, task, k) in cell]
        if not statics:
            continue
        best = min(statics, key=lambda r: r["ppl"])
        d = np.asarray(mine["per_doc"]["nll"]) - np.asarray(best["per_doc"]["nll"])
        m, lo, hi = (math.exp(x) for x in paired_bootstrap(d))
        dom = task[4:]
        held = dom in HELDOUT_DOMAINS
        print(f"| {dom} | {'yes' if held else ''} | {k} | {mine['ppl']:.2f} | {best['method']} | {best['ppl']:.2f} | "
              f"{m:.3f} [{lo:.3f}, {hi:.3f}] |")
        out.append({"domain": dom, "held_out": held, "k": k, "router_ppl": mine["ppl"], "static": best["method"],
                    "static_ppl": best["ppl"], "ratio": m, "ci": [lo, hi]})
    worst = max(out, key=lambda x: x["ratio"], default=None)
    print(json.dumps({"cells": len(out), "worst": worst, "never_worse": all(x["ratio"] <= 1 for x in out)}))


if __name__ == "__main__":
    main()
