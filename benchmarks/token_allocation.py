"""Per-token depth (allocation="token") against fixed budgets at the same measured mean, per domain.

    .venv/bin/buddy train depth --model smollm2 --dtype float32 --out runs/depth-smollm2-fill
    .venv/bin/python benchmarks/token_allocation.py --model smollm2 --dtype float32 --depth runs/depth-smollm2-fill \
        --out runs/token_allocation.jsonl

For each domain's test windows (those of `buddy sweep --tasks ppl:<domain> --limit N`: 256 tokens, the first 64
as the prompt) and each target mean k, it scores the windows with allocation="token" and measures the mean
layers per token; then fixed budgets at the two neighbouring integer counts, interpolated per window in NLL to
that mean. It prints perplexity per-token / fixed with a 95% paired bootstrap interval over windows, marks
held-out domains, and writes one JSON line per (domain, k) to --out (resumable: rows already there are kept).
The last printed line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from buddy.corpus import HELDOUT_DOMAINS
from buddy.eval.stats import paired_bootstrap

DOMAINS = "sotu,lambada,squad,drop,coqa,gsm8k,chat,code,moby_dick,qasper"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--depth", help="depth head directory (default: the one shipped for the model)")
    ap.add_argument("--domains", default=DOMAINS)
    ap.add_argument("--targets", default="", help="mean layer counts (default 0.5L, 0.63L, 0.87L)")
    ap.add_argument("--limit", type=int, default=16, help="test windows per domain")
    ap.add_argument("--out", default="runs/token_allocation.jsonl")
    args = ap.parse_args()
    if args.limit < 2:
        ap.error("--limit must be >= 2 (intervals need windows)")

    from buddy.api import load
    from buddy.corpus import domain_windows
    from buddy.eval.ppl import evaluate_windows
    from buddy.eval.sweep import DOMAIN_PREFILL, DOMAIN_WINDOW
    from buddy.train.depth import default_targets

    eng = load(args.model, dtype=args.dtype, depth=args.depth)
    L = eng.n_layers
    targets = [int(t) for t in args.targets.split(",")] if args.targets else default_targets(L)
    out = Path(args.out)
    done = {}
    if out.is_file():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done[(r["domain"], r["k"])] = r
    rows = []
    for d in args.domains.split(","):
        windows = domain_windows(eng.tokenizer, d, "test", DOMAIN_WINDOW, args.limit)
        fixed: dict[int, list[float]] = {}

        def fixed_nll(k):
            if k not in fixed:
                fixed[k] = evaluate_windows(eng, windows, layers=k, prefill=DOMAIN_PREFILL, per_window=True).window_nll
            return np.array(fixed[k])

        for k in targets:
            if (d, k) in done:
                rows.append(done[(d, k)])
                continue
            r = evaluate_windows(eng, windows, layers=k, prefill=DOMAIN_PREFILL, per_window=True, allocation="token")
            m = r.layers_per_token
            lo, hi = math.floor(m), min(math.ceil(m), L)
            w = 0.0 if hi == lo else (m - lo) / (hi - lo)
            ref = (1 - w) * fixed_nll(lo) + w * fixed_nll(hi)
            diff = np.array(r.window_nll) - ref
            mean, a, b = paired_bootstrap(diff)
            row = {"domain": d, "held_out": d in HELDOUT_DOMAINS, "k": k, "layers_per_token": round(m, 3),
                   "ppl_token": round(math.exp(float(np.mean(r.window_nll))), 4),
                   "ppl_fixed": round(math.exp(float(ref.mean())), 4), "ratio": round(math.exp(mean), 4),
                   "ci": [round(math.exp(a), 4), round(math.exp(b), 4)], "windows": int(windows.shape[0]),
                   "model": eng.bb.name, "planner": eng.planner.name, "kv_policy": eng.kv_policy}
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(f"{d} k={k}: {m:.2f} layers, ppl {row['ppl_token']:.2f} vs fixed {row['ppl_fixed']:.2f} "
                  f"= {row['ratio']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]", flush=True)
    print("\n| domain | " + " | ".join(f"k={k}" for k in targets) + " |")
    print("|---|" + "---|" * len(targets))
    for d in args.domains.split(","):
        cells = {r["k"]: r for r in rows if r["domain"] == d}
        name = d + (" (held out)" if d in HELDOUT_DOMAINS else "")
        print(f"| {name} | " + " | ".join(f"{cells[k]['ratio']:.3f} [{cells[k]['ci'][0]:.3f}, {cells[k]['ci'][1]:.3f}]"
                                          if k in cells else "" for k in targets) + " |")
    summary = {}
    for k in targets:
        ks = [r for r in rows if r["k"] == k]
        summary[str(k)] = {"geo_mean_ratio": round(math.exp(np.mean([math.log(r["ratio"]) for r in ks])), 4),
                           "better_ci_below_1": sum(r["ci"][1] < 1 for r in ks),
                           "worse_ci_above_1": sum(r["ci"][0] > 1 for r in ks), "domains": len(ks)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
