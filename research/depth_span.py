"""How far from the request's k should a token's depth go? allocation="token" on the mix's validation split.

    .venv/bin/python research/depth_span.py --depth runs/depth-smollm2-fill      # about 10 min on 2 cores
    .venv/bin/python research/depth_span.py --depth DIR1,DIR2 --spans 4          # several heads, same fixed cells

The depth head's table estimate (each token scored as if the whole window ran at its level) ignores that a
shallow token leaves poorer K/V for the tokens after it. This probe measures the real thing end to end on
validation windows (never test): for each span (a token's depth stays within `span` layers of k; 0 = any
level) and target k, the perplexity of allocation="token" over fixed budgets at the same measured mean
(interpolated between the neighbouring integer counts), pooled over the training domains.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buddy.api import load, make_depth  # noqa: E402
from buddy.corpus import mix_windows  # noqa: E402
from buddy.eval.ppl import evaluate_windows  # noqa: E402
from buddy.eval.sweep import DOMAIN_PREFILL, DOMAIN_WINDOW  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--depth", required=True, help="depth head directory, or several, comma-separated")
    ap.add_argument("--spans", default="0,2,4,6")
    ap.add_argument("--targets", default="15,19,26")
    ap.add_argument("--windows", type=int, default=2, help="validation windows per domain")
    args = ap.parse_args()
    dirs = args.depth.split(",")
    eng = load(args.model, dtype="float32", depth=dirs[0])
    windows = torch.cat(list(mix_windows(eng.tokenizer, "validation", DOMAIN_WINDOW, args.windows).values()))
    fixed: dict[int, float] = {}

    def nll(k, allocation="request"):
        r = evaluate_windows(eng, windows, layers=k, prefill=DOMAIN_PREFILL, allocation=allocation)
        return r.nll, r.layers_per_token

    print(f"{args.model}: {windows.shape[0]} validation windows x {DOMAIN_WINDOW} tokens")
    targets = [int(t) for t in args.targets.split(",")]
    lead = ["depth", "span"] if len(dirs) > 1 else ["span"]
    print("| " + " | ".join(lead + [f"k={t}" for t in targets]) + " |")
    print("|" + "---|" * (len(lead) + len(targets)))
    for d in dirs:
        eng.depth = make_depth(eng.bb, eng.kv_policy, d)
        for span in (int(x) for x in args.spans.split(",")):
            eng.depth.cfg.span = span
            cells = [d] if len(dirs) > 1 else []
            cells.append(str(span or "any"))
            for k in targets:
                n, m = nll(k, "token")
                lo, hi = math.floor(m), math.ceil(m)
                for j in {lo, hi} - set(fixed):
                    fixed[j] = nll(j)[0]
                f = float(np.interp(m, [lo, hi + 1e-9], [fixed[lo], fixed[hi]]))
                cells.append(f"{100 * (math.exp(n - f) - 1):+.1f}% ({m:.2f} layers)")
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
