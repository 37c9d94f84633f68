"""The router against the best static plan on accuracy tasks (multiple choice, LAMBADA, GSM8K, HumanEval), from
`buddy sweep` rows with per-document results.

    .venv/bin/buddy sweep --model smollm2 --methods dense,static-bi,static-greedy,router --layers 19,23 --limit 100 \
        --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa --out runs/tasks.jsonl
    .venv/bin/python benchmarks/tasks_vs_static.py runs/tasks.jsonl \
        --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa

For every layer count k with router rows it prints one row per method (accuracy per task and the average over
`--tasks`), then the router minus the best static plan: per task against the better static method on that task,
and on the average against the static method with the higher average at that k (one method for all tasks, as a
user of static pruning would pick it), with 95% paired bootstrap intervals over documents (resampled within each
task). `--extra` tasks (e.g. mmlu, lambada) are reported the same way, outside the average. The last line is JSON.
HumanEval rows: `--tasks humaneval --metric pass_at_1` (paired over problems).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from buddy.eval.stats import paired_bootstrap, stratified_bootstrap
from buddy.eval.sweep import read_results


def mean_of_means(groups) -> float:
    return float(np.mean([g.mean() for g in groups]))


PER_DOC = {"pass_at_1": "passed"}  # a metric's per-document key where it differs (HumanEval: 0/1 per problem)


SETUP = ("model", "kv_policy", "limit", "calibration")  # rows of one cell that differ in these are not comparable
ARTIFACT = ("router", "calibration_sha256")  # a cell measured again after its router or calibration file changed


def cells_of(rows: list[dict], metric: str) -> dict:
    """{(method, task, k): row} of the rows with per-document results; one row per cell, or SystemExit. A cell
    measured again after its router or calibration file changed (`buddy sweep` does that into the same file) keeps
    the later row, as the other benchmarks do."""
    cell = {}
    for r in rows:
        per_doc = r.get("per_doc", {})
        if metric not in r or PER_DOC.get(metric, metric) not in per_doc or r.get("allocation", "request") != "request":
            continue
        key = (r["method"], r["task"], r["k"])
        old = cell.get(key)
        remeasured = old is not None and all(old.get(f) == r.get(f) for f in SETUP) \
            and any(old.get(f) != r.get(f) for f in ARTIFACT)
        if old is not None and old != r and not remeasured:
            raise SystemExit(f"two rows for {key} (model, KV policy, limit or calibration differ): compare them from "
                             "separate results files")
        cell[key] = r
    return cell


def compare(rows: list[dict], tasks: list[str], extra: list[str], method: str, statics: list[str],
            metric: str = "acc") -> list[dict]:
    """Per k: the router's and each static method's accuracies, and the paired differences (see the module doc)."""
    cell = cells_of(rows, metric)

    def acc(m, t, k):
        return np.asarray(cell[(m, t, k)]["per_doc"][PER_DOC.get(metric, metric)], dtype=float)

    def diff(t, k, static):
        a, b = acc(method, t, k), acc(static, t, k)
        if a.shape != b.shape:
            raise SystemExit(f"{t} at k={k}: {method} has {a.size} documents, {static} {b.size}: the rows are not "
                             "paired (rerun both with the same --limit into a fresh --out)")
        return a - b

    out = []
    for k in sorted({k for m, _, k in cell if m == method and k != "auto"}):
        res = {"k": k, "tasks": {}}
        for t in tasks + extra:
            have = [s for s in statics if (s, t, k) in cell]
            if (method, t, k) not in cell or not have:
                continue
            best = max(have, key=lambda s: cell[(s, t, k)][metric])
            d, lo, hi = paired_bootstrap(diff(t, k, best))
            res["tasks"][t] = {method: cell[(method, t, k)][metric], **{s: cell[(s, t, k)][metric] for s in have},
                               "best_static": best, "diff": d, "ci": [lo, hi], "docs": len(acc(method, t, k))}
        have = [s for s in statics if all((s, t, k) in cell for t in tasks)]
        if len(tasks) > 1 and have and all(t in res["tasks"] for t in tasks):
            avg = {m: float(np.mean([cell[(m, t, k)][metric] for t in tasks])) for m in [method] + have}
            best = max(have, key=avg.get)
            d, lo, hi = stratified_bootstrap([diff(t, k, best) for t in tasks], mean_of_means)
            worst = min(tasks, key=lambda t: res["tasks"][t]["diff"])
            res["average"] = {**avg, "best_static": best, "diff": d, "ci": [lo, hi],
                              "docs": sum(res["tasks"][t]["docs"] for t in tasks),
                              "worst_task": [worst, res["tasks"][worst]["diff"]]}
        if res["tasks"]:
            out.append(res)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--tasks", required=True, help="tasks averaged (comma list)")
    ap.add_argument("--extra", default="", help="tasks reported on their own, outside the average (comma list)")
    ap.add_argument("--method", default="router")
    ap.add_argument("--statics", default="static-bi,static-greedy")
    ap.add_argument("--metric", default="acc")
    args = ap.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    extra = [t for t in args.extra.split(",") if t]
    statics = args.statics.split(",")
    rows = read_results(args.results)
    res = compare(rows, tasks, extra, args.method, statics, args.metric)
    if not res:
        raise SystemExit(f"{args.results}: no {args.method} rows with per-document {args.metric} and static rows "
                         "at the same k (run `buddy sweep --methods dense,static-bi,static-greedy,router` into a "
                         "fresh --out: rows written before per-document results are kept and skipped)")
    dense = {t: r[args.metric] for (m, t, _), r in cells_of(rows, args.metric).items() if m == "dense"}
    cols = tasks + (["average"] if len(tasks) > 1 else []) + extra
    print("| method | k | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    if dense:
        avg = [f"{100 * np.mean([dense[t] for t in tasks]):.1f}"] if len(tasks) > 1 and all(t in dense for t in tasks) \
            else [""] * (len(tasks) > 1)
        print("| dense | L | " + " | ".join([f"{100 * dense[t]:.1f}" if t in dense else "" for t in tasks] + avg +
                                          [f"{100 * dense[t]:.1f}" if t in dense else "" for t in extra]) + " |")
    for r in res:
        for m in [args.method] + statics:
            cells = [f"{100 * r['tasks'][t][m]:.1f}" if t in r["tasks"] and m in r["tasks"][t] else "" for t in tasks]
            if len(tasks) > 1:
                cells.append(f"{100 * r['average'][m]:.1f}" if m in r.get("average", {}) else "")
            cells += [f"{100 * r['tasks'][t][m]:.1f}" if t in r["tasks"] and m in r["tasks"][t] else "" for t in extra]
            print(f"| {m} | {r['k']} | " + " | ".join(cells) + " |")
    print(f"\n{args.method} - best static, accuracy points (95% paired bootstrap interval over documents; per task "
          "against the better static method on it, the average against the static method with the higher average)\n")
    print("| k | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in res:
        def fmt(x):
            return f"{100 * x['diff']:+.1f} [{100 * x['ci'][0]:+.1f}, {100 * x['ci'][1]:+.1f}] ({x['best_static']})"
        cells = [fmt(r["tasks"][t]) if t in r["tasks"] else "" for t in tasks]
        if len(tasks) > 1:
            cells.append(fmt(r["average"]) if "average" in r else "")
        cells += [fmt(r["tasks"][t]) if t in r["tasks"] else "" for t in extra]
        print(f"| {r['k']} | " + " | ".join(cells) + " |")
    print(json.dumps({"method": args.method, "metric": args.metric, "by_k": res}))


if __name__ == "__main__":
    main()
