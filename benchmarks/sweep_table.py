"""Markdown tables from `buddy sweep` results: one row per (method, k), one column per task, plus the average.

    .venv/bin/python benchmarks/sweep_table.py docs/sweep_smollm2.jsonl --tasks arc_easy,arc_challenge,... \
        [--metric acc|acc_norm|ppl] [--methods dense,static-greedy,router]
"""

from __future__ import annotations

import argparse

from buddy.eval.sweep import read_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--metric", default="acc")
    ap.add_argument("--methods", help="comma list, in this order (default: all, as found)")
    ap.add_argument("--no-average", action="store_true")
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    rows = read_results(args.results)
    cells = {}
    for r in rows:
        if r["task"] in tasks and args.metric in r:
            name = r["method"] if r["k"] != "auto" else f"{r['method']} auto ({r.get('predictor')}, λ={r.get('tradeoff')})"
            if r.get("allocation", "request") != "request":  # per-token depth rows are their own method
                name += f" ({r['allocation']} allocation)"
            cells[(name, r["k"], r["task"])] = r
    methods = args.methods.split(",") if args.methods else list(dict.fromkeys(m for m, _, _ in cells))
    methods += [m for m in dict.fromkeys(m for m, _, _ in cells) if m not in methods and " auto " in m
                and m.split(" auto ")[0] in methods]
    avg = not args.no_average and len(tasks) > 1
    head = ["method", "k", "layers/token"] + tasks + (["average"] if avg else []) + ["wall s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    keys = sorted({(m, k) for m, k, _ in cells if m in methods},
                  key=lambda mk: (methods.index(mk[0]), 99 if mk[1] == "auto" else mk[1]))
    for m, k in keys:
        got = [cells.get((m, k, t)) for t in tasks]
        if any(g is None for g in got):
            continue
        vals = [g[args.metric] for g in got]
        fmt = (lambda v: f"{v:.2f}") if args.metric == "ppl" else (lambda v: f"{100 * v:.1f}")
        lpt = sum(g["layers_per_token"] for g in got) / len(got)
        line = [m, str(k), f"{lpt:.2f}"] + [fmt(v) for v in vals]
        if avg:
            line.append(fmt(sum(vals) / len(vals)))
        line.append(f"{sum(g['wall_s'] for g in got):.0f}")
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
