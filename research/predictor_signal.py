"""How predictable is a prompt's depth sensitivity from the prompt itself? (Budget Predictor diagnostics.)

    .venv/bin/python benchmarks/predictor_signal.py [--model smollm2] [--limit N]

Uses the cached SOTU quality tables of `buddy train predictor --data sotu` (384 training and 96 validation
windows: 128-token prompt, 32-token continuation; quality = negative mean KL to the dense model over the
continuation, per budget level). For each split it prints Pearson correlations between a prompt-side signal
and the continuation's quality at a level:
- `mean log token id`, `distinct tokens`: cheap prompt statistics;
- `probe KL`: the depth sensitivity measured directly on the prompt's own last 32 tokens (first 96 tokens
  routed as a prompt, the last 32 as decode, KL of the routed model to the dense one, at the same k). This
  costs a dense pass, so a served predictor cannot use it; it bounds what any prompt-only feature can know.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import buddy
from buddy.budget import Budget
from buddy.data import sotu_texts, token_windows
from buddy.train.predictor import PredictorTrainConfig, cached_table, quality_table

PROBE = 32


def corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=float), np.asarray(b, dtype=float))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--limit", type=int, default=0, help="first N windows per split (default all)")
    args = ap.parse_args()
    engine = buddy.load(args.model, planner="router", dtype="bfloat16")
    bb, cfg = engine.bb, PredictorTrainConfig(data="sotu", prompts=384, val_prompts=96)
    L = engine.n_layers
    levels = cfg.level_list[:-1]  # the full level has quality 0 by definition
    ks = [Budget(fraction=x).k(L) for x in levels]
    print("| split | signal | " + " | ".join(f"quality at {x:g} (k={k})" for x, k in zip(levels, ks)) + " |")
    print("|---|---|" + "---|" * len(levels))
    for split, n in (("train", cfg.prompts), ("validation", cfg.val_prompts)):
        _, q = cached_table(engine, bb, cfg, split, n)
        w = token_windows(bb.tokenizer, sotu_texts(split), cfg.prompt_len + cfg.cont_len, n)[:, :cfg.prompt_len]
        if args.limit:
            q, w = q[:args.limit], w[:args.limit]
        signals = {"mean log token id": torch.log1p(w.float()).mean(1),
                   "distinct tokens": torch.tensor([len(set(r.tolist())) for r in w], dtype=torch.float)}
        for name, v in signals.items():
            print(f"| {split} | {name} | " + " | ".join(f"{corr(v, q[:, j]):+.2f}" for j in range(len(levels))) + " |")
        # the same measurement as the tables, with the prompt's last PROBE tokens as the continuation
        probe = quality_table(engine, w, levels, cfg.prompt_len - PROBE, progress=False)
        print(f"| {split} | probe KL at the same k | "
              + " | ".join(f"{corr(probe[:, j], q[:, j]):+.2f}" for j in range(len(levels))) + " |")


if __name__ == "__main__":
    main()
