"""The router against the best static plan, per domain and layer count, from `buddy sweep` perplexity rows.

    .venv/bin/buddy sweep --model smollm2 --methods dense,static-bi,static-greedy,router --layers 15,19,23,26 \
        --tasks ppl:sotu,ppl:lambada,...,ppl:moby_dick,ppl:qasper --out runs/domains.jsonl
    .venv/bin/python benchmarks/router_vs_static.py runs/domains.jsonl

For every `ppl:<domain>` task and layer count k it prints the router's perplexity over the best static
plan's at that k (the lower of static-bi and static-greedy, per cell), with a 95% paired bootstrap interval
over windows (the same windows for both), and marks held-out domains. The last line is JSON; its `never_worse`
compares perplexities (router <= best static in every cell, up to float32 rounding: `buddy.eval.stats.no_worse`),
as the held-out tests do, so that a router whose plan is the static plan's counts as level.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from buddy.corpus import HELDOUT_DOMAINS
from buddy.eval.stats import no_worse, paired_bootstrap
from buddy.eval.sweep import read_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--method", default="router")
    ap.add_argument("--statics", default="static-bi,static-greedy")
    ap.add_argument("--earlier", help="router rows of another results file (an earlier router on the same windows), "
                                      "compared to the same best static plans")
    ap.add_argument("--pivot", action="store_true", help="also a compact table: domains x k, ratio [95%% CI]")
    ap.add_argument("--allocation", default="request", help="compare the rows of this allocation (default request)")
    args = ap.parse_args()
    rows = [r for r in read_results(args.results) if r["task"].startswith("ppl:") and "per_doc" in r
            and r.get("allocation", "request") == args.allocation]
    cell = {(r["method"], r["task"], r["k"]): r for r in rows}
    if args.earlier:
        for r in read_results(args.earlier):
            if (r["method"] == args.method and r["task"].startswith("ppl:") and "per_doc" in r
                    and r.get("allocation", "request") == args.allocation):
                cell[("earlier", r["task"], r["k"])] = r
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
        if ("earlier", task, k) in cell:
            e = np.asarray(cell[("earlier", task, k)]["per_doc"]["nll"]) - np.asarray(best["per_doc"]["nll"])
            out[-1]["earlier_ratio"], *out[-1]["earlier_ci"] = (math.exp(x) for x in paired_bootstrap(e))
    if args.pivot:
        ks = sorted({x["k"] for x in out})
        for key, title in (("ratio", args.method), ("earlier_ratio", "earlier router")):
            if not any(key in x for x in out):
                continue
            print(f"\n{title} / best static, per domain (95% paired bootstrap interval over windows)\n")
            print("| domain | " + " | ".join(f"k={k}" for k in ks) + " |")
            print("|---|" + "---|" * len(ks))
            by = {(x["domain"], x["k"]): x for x in out}
            for dom in sorted({x["domain"] for x in out}, key=lambda d: (d in HELDOUT_DOMAINS, d)):
                ci = "ci" if key == "ratio" else "earlier_ci"
                cells = [f"{by[dom, k][key]:.3f} [{by[dom, k][ci][0]:.3f}, {by[dom, k][ci][1]:.3f}]"
                         if (dom, k) in by and key in by[dom, k] else "" for k in ks]
                print(f"| {dom}{' (held out)' if dom in HELDOUT_DOMAINS else ''} | " + " | ".join(cells) + " |")
    worst = max(out, key=lambda x: x["ratio"], default=None)
    significant = sum(x["ci"][1] < 1 for x in out)
    print(json.dumps({"cells": len(out), "better": sum(x["ratio"] < 1 for x in out), "better_ci_below_1": significant,
                      "worst": worst, "never_worse": all(no_worse(x["router_ppl"], x["static_ppl"]) for x in out)}))


if __name__ == "__main__":
    main()
