"""How much could knowing the domain gain over the mix's static plan, per model?

The router's prior is one static plan per layer count (static-greedy on the training mix). A router that only
recognised a text's domain and ran that domain's best static plan would gain whatever per-domain plans gain over
the mix plan; per-token routing can add to that. This probe measures the per-domain part, as a lower bound on a
router's headroom, so that the two backbones' gains can be compared with what their layers allow.

For each model and layer count k, starting from the mix plan (the top k of the mix calibration's static-greedy
order), a best-improvement swap search (one kept and one dropped intermediate layer, among the `--band` kept
layers of lowest prior rank and the `--band` dropped of highest, up to `--rounds` accepted swaps) is run twice:
- on the pooled training windows of all the chosen domains (a better static plan for the mix as a whole);
- on each domain's own training windows (that domain's plan).
Each plan is then scored on the domain's validation windows (never searched on). The table gives validation
perplexity ratios to the mix plan: pooled search / mix plan and domain search / mix plan.

    .venv/bin/python research/domain_plans.py --models smollm2,qwen-coder-0.5b
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from buddy.backbone import load_backbone
from buddy.calibration import load_calibration
from buddy.corpus import domain_windows
from buddy.engine import Engine
from buddy.eval.ppl import evaluate_windows
from buddy.planner import GivenPlanner


def engine(bb, layers) -> Engine:
    """An engine that runs exactly `layers` (a static plan) under `fill`."""
    return Engine(bb, GivenPlanner(sorted(layers), bb.n_layers), "fill")


def nll(bb, layers, windows) -> float:
    return math.log(evaluate_windows(engine(bb, layers), windows, layers=len(layers), batch_size=4).ppl)


def search(bb, order, k, windows, band, rounds):
    """Best-improvement swaps from the top k of `order` (intermediate layers by prior rank) -> the plans after 0,
    1, ... accepted swaps (the last is the search's result; research/static_search.py picks one on validation)."""
    L = bb.n_layers
    rank = {layer: r for r, layer in enumerate(order)}
    kept = set(order[:k - 2])
    best = nll(bb, [0, *kept, L - 1], windows)
    plans = [[0, *sorted(kept), L - 1]]
    for _ in range(rounds):
        weak = sorted(kept, key=rank.get)[-band:]
        strong = sorted(set(order) - kept, key=rank.get)[:band]
        cand = None
        for a in weak:
            for c in strong:
                v = nll(bb, [0, *(kept - {a} | {c}), L - 1], windows)
                if v < best - 1e-4 and (cand is None or v < cand[0]):
                    cand = (v, a, c)
        if cand is None:
            break
        best, a, c = cand
        kept = kept - {a} | {c}
        rank[a], rank[c] = rank[c], rank[a]  # the swapped-in layer takes the swapped-out one's rank
        plans.append([0, *sorted(kept), L - 1])
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,qwen-coder-0.5b")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--domains", default="sotu,lambada,gsm8k,hellaswag,chat,code")
    ap.add_argument("--fractions", default="0.5,0.67", help="layer counts as fractions of L (rounded)")
    ap.add_argument("--train-windows", type=int, default=4, help="per domain, for the searches")
    ap.add_argument("--val-windows", type=int, default=4, help="per domain, for the scores")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--band", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    domains = args.domains.split(",")
    print("| model | k | domain | mix plan ppl | pooled search / mix | domain search / mix | swaps (pooled, domain) |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        t0 = time.time()
        bb = load_backbone(model, dtype=args.dtype)
        L = bb.n_layers
        order = load_calibration(bb, "mix")["orders"]["static-greedy"]
        train = {d: domain_windows(bb.tokenizer, d, "train", args.window, args.train_windows) for d in domains}
        val = {d: domain_windows(bb.tokenizer, d, "validation", args.window, args.val_windows) for d in domains}
        pooled = torch.cat([train[d][:max(1, args.train_windows // 2)] for d in domains])
        with torch.no_grad():
            for f in (float(x) for x in args.fractions.split(",")):
                k = round(f * L)
                mix_plan = [0, *sorted(order[:k - 2]), L - 1]
                pooled_plan = search(bb, order, k, pooled, args.band, args.rounds)[-1]
                ratios = []
                for d in domains:
                    dom_plan = search(bb, order, k, train[d], args.band, args.rounds)[-1]
                    base = nll(bb, mix_plan, val[d])
                    rp = math.exp(nll(bb, pooled_plan, val[d]) - base)
                    rd = math.exp(nll(bb, dom_plan, val[d]) - base)
                    ratios.append((rp, rd))
                    n_p = len(set(pooled_plan) - set(mix_plan))
                    n_d = len(set(dom_plan) - set(mix_plan))
                    print(f"| {model} | {k} | {d} | {math.exp(base):.2f} | {rp:.3f} | {rd:.3f} | {n_p}, {n_d} |",
                          flush=True)
                gp = math.exp(sum(math.log(r[0]) for r in ratios) / len(ratios))
                gd = math.exp(sum(math.log(r[1]) for r in ratios) / len(ratios))
                print(f"| {model} | {k} | geometric mean | | {gp:.3f} | {gd:.3f} | |", flush=True)
        print(f"<!-- {model}: {time.time() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
