"""Is budget="auto"'s per-window choice on SOTU test perplexity better than a random one with the same counts?

    .venv/bin/python benchmarks/auto_sotu_windows.py --predictor runs/mix-l2.5

The windows are those of `buddy sweep --tasks ppl-sotu` (16 x 512 tokens of SOTU 2011-2021, 128-token prompt).
It measures each window's NLL at every layer count the predictor picks, then prints auto's perplexity and the
distribution of the perplexity when the same layer counts are shuffled among the windows at random (2,000
permutations): if auto sits inside it, its per-window choice carries no information on this corpus.
"""

from __future__ import annotations

import argparse
import math

import torch

import buddy
from buddy.data import sotu_texts, token_windows
from buddy.eval.ppl import evaluate_windows
from buddy.eval.sweep import PPL_PREFILL, PPL_WINDOW, PPL_WINDOWS


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--predictor", default=None, help="predictor directory (default: the shipped one)")
    ap.add_argument("--permutations", type=int, default=2000)
    args = ap.parse_args()
    m = buddy.load(args.model, dtype="bfloat16", predictor=args.predictor)
    w = token_windows(m.bb.tokenizer, sotu_texts("test"), PPL_WINDOW, PPL_WINDOWS)
    ks = torch.tensor(m.choose_k(w[:, :PPL_PREFILL].tolist()))
    nll = {k: torch.tensor(evaluate_windows(m, w, layers=k, prefill=PPL_PREFILL, per_window=True).window_nll)
           for k in sorted(set(ks.tolist()))}

    def ppl(assign):
        return math.exp(float(torch.stack([nll[int(k)][i] for i, k in enumerate(assign)]).mean()))

    auto = ppl(ks)
    g = torch.Generator().manual_seed(0)
    rand = sorted(ppl(ks[torch.randperm(len(ks), generator=g)]) for _ in range(args.permutations))
    n = len(rand)
    counts = ", ".join(f"k={k}: {int((ks == k).sum())}" for k in sorted(nll))
    print(f"windows per layer count: {counts}")
    print(f"auto ppl {auto:.2f}; shuffled: median {rand[n // 2]:.2f}, 5%-95% {rand[n // 20]:.2f}-{rand[19 * n // 20]:.2f}; "
          f"{sum(r < auto for r in rand) / n:.0%} of shuffles are better than auto")


if __name__ == "__main__":
    main()
