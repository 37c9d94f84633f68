"""Is static-greedy the best static plan? A swap search from it, scored against the router on the test windows.

static-greedy removes one layer at a time and keeps each removal, so its plan at k need not be the best k-layer
plan. From the mix calibration's static-greedy plan at each k, a best-improvement search over swaps of one kept
and one dropped intermediate layer (the `--band` weakest kept by prior rank against the `--band` strongest
dropped) runs on pooled training-mix windows (`--train-windows` per training domain); after each accepted swap the
plan is scored on the mix's validation windows, and the number of swaps with the lowest validation NLL is kept
(0 keeps static-greedy). Test windows are never searched on.

The kept plans are scored on the same test windows as `buddy sweep --tasks ppl:<domain>` (`--limit` windows of
256 tokens per domain) and written as sweep rows with method `static-search`, so the router can be compared
with the best of three static plans:

    .venv/bin/python research/static_search.py --model smollm2 --layers 15,19,23,26 --limit 16 \\
        --out docs/domains_smollm2_static_search.jsonl
    cat docs/domains_smollm2.jsonl docs/domains_smollm2_static_search.jsonl > all.jsonl
    .venv/bin/python benchmarks/router_vs_static.py all.jsonl --statics static-greedy --method static-search --pivot
    .venv/bin/python benchmarks/router_vs_static.py all.jsonl --statics static-bi,static-greedy,static-search --pivot
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from buddy.backbone import load_backbone
from buddy.calibration import load_calibration
from buddy.corpus import domain_windows, mix_windows
from buddy.eval.ppl import evaluate_windows
from buddy.eval.sweep import DOMAIN_PREFILL, DOMAIN_WINDOW
from domain_plans import engine, nll, search  # research/, on the path when run as a script

DOMAINS = "sotu,lambada,squad,drop,coqa,gsm8k,chat,code,moby_dick,qasper"


def mean_nll(bb, layers, windows: dict) -> float:
    return sum(nll(bb, layers, w) for w in windows.values()) / len(windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layers", default="15,19,23,26")
    ap.add_argument("--train-windows", type=int, default=2, help="per training domain, 128 tokens, for the search")
    ap.add_argument("--val-windows", type=int, default=2, help="per training domain, 256 tokens, to pick the swaps")
    ap.add_argument("--band", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--domains", default=DOMAINS, help="test domains (sweep's ppl:<domain> windows)")
    ap.add_argument("--limit", type=int, default=16, help="test windows per domain")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.band < 1 or args.rounds < 0:
        ap.error("--band must be at least 1 and --rounds at least 0")
    bb = load_backbone(args.model, dtype=args.dtype)
    L = bb.n_layers
    ks = [int(x) for x in args.layers.split(",")]
    if any(not 3 <= k < L for k in ks):
        ap.error(f"every --layers count must be in [3, {L - 1}] for {args.model} ({L} layers)")
    order = load_calibration(bb, "mix")["orders"]["static-greedy"]
    tok = bb.tokenizer
    train = torch.cat(list(mix_windows(tok, "train", 128, args.train_windows).values()))
    val = mix_windows(tok, "validation", 256, args.val_windows)
    test = {d: domain_windows(tok, d, "test", DOMAIN_WINDOW, args.limit) for d in args.domains.split(",")}
    with torch.no_grad(), open(args.out, "a") as f:
        for k in ks:
            t0 = time.time()
            plans = search(bb, order, k, train, args.band, args.rounds)
            scores = [mean_nll(bb, p, val) for p in plans]
            pick = min(range(len(plans)), key=scores.__getitem__)
            plan = plans[pick]
            print(f"k={k}: {len(plans) - 1} swaps found on train; validation ppl by swaps "
                  f"{[round(math.exp(s), 2) for s in scores]}; kept {pick}: {plan} ({time.time() - t0:.0f} s)",
                  flush=True)
            for d, w in test.items():
                t1 = time.perf_counter()
                r = evaluate_windows(engine(bb, plan), w, layers=k, prefill=DOMAIN_PREFILL, per_window=True)
                row = {"model": bb.name, "method": "static-search", "kv_policy": "fill", "k": k, "n_layers": L,
                       "layer_fraction": k / L, "task": f"ppl:{d}", "limit": args.limit, "ppl": r.ppl,
                       "docs": w.shape[0], "tokens": r.tokens, "layers_per_token": r.layers_per_token,
                       "wall_s": time.perf_counter() - t1, "per_doc": {"nll": [round(x, 5) for x in r.window_nll]},
                       "plan": plan, "swaps": pick, "calibration": "mix", "allocation": "request",
                       "val_ppl_by_swaps": [round(math.exp(x), 4) for x in scores],
                       "search": {"train_windows": args.train_windows, "val_windows": args.val_windows,
                                  "band": args.band, "rounds": args.rounds, "dtype": args.dtype},
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                f.write(json.dumps(row) + "\n")
                f.flush()


if __name__ == "__main__":
    main()
