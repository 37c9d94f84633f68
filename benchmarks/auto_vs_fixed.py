"""budget="auto" against fixed budgets at equal mean executed layers, from `buddy sweep` results.

    .venv/bin/python benchmarks/auto_vs_fixed.py docs/sweep_smollm2.jsonl --method router \
        --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa

For each budget-predictor run (one per trade-off lambda) it prints the measured mean executed layers per token,
its quality, and the quality of fixed budgets at the same mean layers, interpolated linearly between fixed
layer counts (log-perplexity for `ppl-sotu`, accuracy for the average over the multiple-choice tasks), two ways:
- `fixed`: between all of the method's fixed layer counts in the file and the dense model at k = L;
- `fixed, levels`: only between the layer counts of the predictor's own levels (k = round(level * L)), i.e.
  what a mix of the fixed budgets that `auto` chooses among reaches at the same mean.

When the rows carry per-document results (`per_doc`, written by `buddy sweep`), a second table gives the
difference against `fixed` paired by document (the same documents and SOTU windows, fixed interpolated per
document with the same weights), with a 95% bootstrap interval over documents.
With `--tasks`, a per-task table follows: each task's accuracy against fixed budgets at auto's measured mean
layers on that task, paired by document (the average line above compares at auto's mean over all tasks).

Per-domain rows (`kl:<domain>` or `ppl:<domain>` tasks of the training mix, buddy/corpus.py) get a third
table: for each domain, auto's mean KL to the dense model and its perplexity against fixed budgets at auto's
measured mean layers on that domain, paired by window; a pooled line over every window of every domain
(bootstrap resampling windows within each domain); and a cross-domain line: auto on every window against one
fixed budget for all of them, interpolated to auto's mean layers over all windows (what a single fixed budget
gives at the same cost; this is where choosing per prompt across domains can gain):

    .venv/bin/buddy sweep --model smollm2 --methods dense,router --layers 15,19,23,26,auto --limit 16 \
        --tasks kl:sotu,kl:chat,kl:code,kl:moby_dick,kl:qasper --out runs/auto_domains.jsonl
    .venv/bin/python benchmarks/auto_vs_fixed.py runs/auto_domains.jsonl --method router
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from buddy.budget import Budget
from buddy.eval.stats import stratified_bootstrap
from buddy.eval.sweep import read_results
from buddy.predictor import DEFAULT_LEVELS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--method", default="router")
    ap.add_argument("--predictors", default="", help="comma list: only these predictors' auto rows (default all)")
    ap.add_argument("--tasks", default="", help="multiple-choice tasks averaged for the accuracy comparison")
    args = ap.parse_args()
    rows = read_results(args.results)
    tasks = [t for t in args.tasks.split(",") if t]

    def fixed_rows(task):
        """The method's fixed-budget rows and dense for a task, one per layer count (the last, preferring rows
        with per-document results), sorted by measured layers per token."""
        by_k = {}
        for r in rows:
            if r["task"] == task and (r["method"] == args.method and r["k"] != "auto" or r["method"] == "dense"):
                if "per_doc" in r or "per_doc" not in by_k.get(r["k"], {}):
                    by_k[r["k"]] = r
        return sorted(by_k.values(), key=lambda r: r["layers_per_token"])

    def fixed_curve(task, metric, only=None):
        return [(r["layers_per_token"], r[metric]) for r in fixed_rows(task) if only is None or r["k"] in only]

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

    def bracket(task, x):
        """[(weight, fixed row)] of the two fixed layer counts around x (linear interpolation weights)."""
        pts = fixed_rows(task)
        j = min(max(int(np.searchsorted([r["layers_per_token"] for r in pts], x)), 1), len(pts) - 1)
        ra, rb = pts[j - 1], pts[j]
        a, b = ra["layers_per_token"], rb["layers_per_token"]
        w = min(max((x - a) / (b - a), 0.0), 1.0)
        return [(1 - w, ra), (w, rb)]

    def paired(mine, x_of, key, tasks_):
        """Per-task arrays of auto - fixed per document, or None without per-document rows."""
        out = []
        for t in tasks_:
            pair = bracket(t, x_of(t))
            if any("per_doc" not in r for _, r in pair) or "per_doc" not in mine[t]:
                return None
            fixed = sum(w * np.asarray(r["per_doc"][key], float) for w, r in pair)
            out.append(np.asarray(mine[t]["per_doc"][key], float) - fixed)
        return out

    boot = stratified_bootstrap

    paired_lines, domain_lines, task_lines = [], [], []
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
            d = paired(mine, lambda t: r["layers_per_token"], "nll", ["ppl-sotu"])
            if d is not None:
                m, lo, hi = (100 * (math.exp(v) - 1) for v in boot(d, lambda ds: float(ds[0].mean())))
                paired_lines.append(f"| {pred} | {lam} | ppl-sotu: auto / fixed - 1 | {m:+.1f}% [{lo:+.1f}%, {hi:+.1f}%] "
                                    f"| {len(d[0])} windows |")
        domain_lines += domain_table(mine, pred, lam, bracket, boot)
        if tasks and all(t in mine for t in tasks):
            lpt = sum(mine[t]["layers_per_token"] for t in tasks) / len(tasks)
            acc = sum(mine[t]["acc"] for t in tasks) / len(tasks)
            cells = []
            for o in (None, only):
                fixed = avg_acc_at([fixed_curve(t, "acc", o) for t in tasks], lpt)
                cells += [f"{100 * fixed:.1f}", f"{100 * (acc - fixed):+.1f}"]
            print(f"| {pred} | {lam} | average of {len(tasks)} tasks (acc %) | {lpt:.2f} | {100 * acc:.1f} | "
                  + " | ".join(cells) + " |")
            d = paired(mine, lambda t: lpt, "acc", tasks)
            if d is not None:
                m, lo, hi = (100 * v for v in boot(d, lambda ds: float(np.mean([x.mean() for x in ds]))))
                paired_lines.append(f"| {pred} | {lam} | average of {len(tasks)} tasks: auto - fixed (acc points) | "
                                    f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}] | {sum(len(x) for x in d)} documents |")
            task_lines += task_table(mine, pred, lam, tasks, paired, boot)
    if paired_lines:
        print("\nPaired by document, against `fixed` (95% bootstrap interval over documents):\n")
        print("| predictor | lambda | measure | auto vs fixed [95% CI] | n |")
        print("|---|---|---|---|---|")
        print("\n".join(paired_lines))
    if task_lines:
        print("\nPer task, against fixed budgets at auto's measured mean layers on that task (paired by document, "
              "95% bootstrap interval):\n")
        print("| predictor | lambda | task | documents | auto layers/token | auto acc % | fixed acc % "
              "| auto - fixed (points) [95% CI] |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(task_lines))
    if domain_lines:
        print("\nPer domain, against fixed budgets at auto's measured mean layers on that domain (paired by window, "
              "95% bootstrap interval):\n")
        print("| predictor | lambda | domain | windows | auto layers/token | auto KL | fixed KL | auto - fixed KL [95% CI] "
              "| auto / fixed ppl [95% CI] |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(domain_lines))


def task_table(mine: dict, pred, lam, tasks, paired, boot) -> list[str]:
    """Markdown rows: each multiple-choice task's accuracy against fixed budgets at auto's mean layers on that
    task, paired by document (where `auto` spends its layers, and what each task gains or loses by it)."""
    lines = []
    for t in tasks:
        x = mine[t]["layers_per_token"]
        d = paired(mine, lambda _: x, "acc", [t])
        if d is None:
            continue
        auto = float(np.mean(mine[t]["per_doc"]["acc"]))
        fixed = auto - float(d[0].mean())  # the interpolated fixed accuracy, per document, averaged
        m, lo, hi = (100 * v for v in boot(d, lambda ds: float(ds[0].mean())))
        lines.append(f"| {pred} | {lam} | {t} | {len(d[0])} | {x:.2f} | {100 * auto:.1f} | {100 * fixed:.1f} | "
                     f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}] |")
    return lines


def domain_table(mine: dict, pred, lam, bracket, boot) -> list[str]:
    """Markdown rows for auto's `kl:<domain>` / `ppl:<domain>` tasks, then one pooled row."""
    lines, pooled_kl, pooled_nll = [], [], []
    for t in sorted(t for t in mine if t.split(":")[0] in ("kl", "ppl") and ":" in t):
        r = mine[t]
        pair = bracket(t, r["layers_per_token"])
        if "per_doc" not in r or any("per_doc" not in f for _, f in pair):
            continue
        nll = np.asarray(r["per_doc"]["nll"], float) - sum(w * np.asarray(f["per_doc"]["nll"], float) for w, f in pair)
        ratio = "{:.3f} [{:.3f}, {:.3f}]".format(*(math.exp(v) for v in boot([nll], lambda ds: float(ds[0].mean()))))
        pooled_nll.append(nll)
        kl_cells = ["-", "-", "-"]
        if "kl" in r["per_doc"] and all("kl" in f["per_doc"] for _, f in pair):
            fixed = sum(w * np.asarray(f["per_doc"]["kl"], float) for w, f in pair)
            d = np.asarray(r["per_doc"]["kl"], float) - fixed
            pooled_kl.append(d)
            kl_cells = [f"{r['kl']:.4f}", f"{fixed.mean():.4f}",
                        "{:+.4f} [{:+.4f}, {:+.4f}]".format(*boot([d], lambda ds: float(ds[0].mean())))]
        lines.append(f"| {pred} | {lam} | {t.split(':', 1)[1]} | {len(nll)} | {r['layers_per_token']:.2f} | "
                     + " | ".join(kl_cells) + f" | {ratio} |")
    if len(pooled_nll) > 1:
        def pooled(ds):
            return float(np.concatenate(ds).mean())

        kl = "{:+.4f} [{:+.4f}, {:+.4f}]".format(*boot(pooled_kl, pooled)) if len(pooled_kl) == len(pooled_nll) else "-"
        ratio = "{:.3f} [{:.3f}, {:.3f}]".format(*(math.exp(v) for v in boot(pooled_nll, pooled)))
        lines.append(f"| {pred} | {lam} | **all {len(pooled_nll)} domains, pooled** | "
                     f"{sum(len(x) for x in pooled_nll)} | | | | {kl} | {ratio} |")
        cross = cross_domain_row(mine, pred, lam, bracket, boot)
        if cross:  # every domain has per-window fixed rows at auto's overall mean
            lines.append(cross)
    return lines


def cross_domain_row(mine: dict, pred, lam, bracket, boot) -> str:
    """One row: auto over every window of every domain against ONE fixed budget for all of them, interpolated to
    auto's mean layers over all windows (what a user of a single fixed budget gets at the same cost), paired by
    window; the bootstrap resamples windows within each domain."""
    tasks = [t for t in sorted(mine) if t.split(":")[0] in ("kl", "ppl") and ":" in t and "per_doc" in mine[t]]
    n = {t: len(mine[t]["per_doc"]["nll"]) for t in tasks}
    x = sum(mine[t]["layers_per_token"] * n[t] for t in tasks) / sum(n.values())
    d_kl, d_nll, auto_kl, fixed_kl = [], [], [], []
    for t in tasks:
        pair = bracket(t, x)
        if any("per_doc" not in f for _, f in pair):
            return ""
        r = mine[t]["per_doc"]
        d_nll.append(np.asarray(r["nll"], float) - sum(w * np.asarray(f["per_doc"]["nll"], float) for w, f in pair))
        if "kl" in r and all("kl" in f["per_doc"] for _, f in pair):
            fixed = sum(w * np.asarray(f["per_doc"]["kl"], float) for w, f in pair)
            d_kl.append(np.asarray(r["kl"], float) - fixed)
            auto_kl.append(np.asarray(r["kl"], float))
            fixed_kl.append(fixed)

    def pooled(ds):
        return float(np.concatenate(ds).mean())

    kl = ["-", "-", "-"]
    if len(d_kl) == len(d_nll):
        kl = [f"{pooled(auto_kl):.4f}", f"{pooled(fixed_kl):.4f}", "{:+.4f} [{:+.4f}, {:+.4f}]".format(*boot(d_kl, pooled))]
    ratio = "{:.3f} [{:.3f}, {:.3f}]".format(*(math.exp(v) for v in boot(d_nll, pooled)))
    return (f"| {pred} | {lam} | **all {len(tasks)} domains, one fixed budget at auto's overall mean** | "
            f"{sum(n.values())} | {x:.2f} | " + " | ".join(kl) + f" | {ratio} |")


if __name__ == "__main__":
    main()
