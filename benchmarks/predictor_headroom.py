"""How much a per-prompt budget could gain, and how much a trained predictor gains, on the quality tables.

    .venv/bin/python benchmarks/predictor_headroom.py --predictors runs/pred-l2.5,runs/pred-l3.5,runs/pred-l5,runs/pred-l7

Reads the cached quality tables of `buddy train predictor` (default settings; computed on first use). For each
trade-off lambda it prints, on the training and the validation table:
- the oracle: each prompt takes its own best level (reward = quality - lambda * level). This is the mean
  level and quality (negative mean KL, nats) it reaches;
- the chord: fixed budgets mixed to the same mean level, interpolated linearly between fixed levels.
For each given predictor directory it prints the argmax policy's mean level and quality on the validation
table, and its gain over the chord (positive = better than fixed budgets).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import buddy
from buddy.predictor import load_predictor
from buddy.train.predictor import PredictorTrainConfig, cached_table


def chord(level: float, levels: np.ndarray, quality: torch.Tensor) -> float:
    return float(np.interp(level, levels, quality.mean(dim=0).numpy()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tradeoffs", default="2.5,3.5,5,7")
    ap.add_argument("--predictors", default="", help="comma list of predictor directories")
    args = ap.parse_args()
    engine = buddy.load(args.model, planner="router", dtype="bfloat16")
    cfg = PredictorTrainConfig()
    tables = {"train": cached_table(engine, engine.bb, cfg, "train", cfg.prompts),
              "validation": cached_table(engine, engine.bb, cfg, "validation", cfg.val_prompts)}
    levels = torch.tensor(cfg.level_list)
    print("| lambda | table | oracle mean level | oracle quality | chord at that level | oracle - chord |")
    print("|---|---|---|---|---|---|")
    for lam in [float(x) for x in args.tradeoffs.split(",")]:
        for name, (_, q) in tables.items():
            pick = (q - lam * levels).argmax(dim=1)
            lv, oq = float(levels[pick].mean()), float(q.gather(1, pick[:, None]).mean())
            c = chord(lv, levels.numpy(), q)
            print(f"| {lam:g} | {name} | {lv:.3f} | {oq:.3f} | {c:.3f} | {oq - c:+.3f} |")
    if args.predictors:
        feats, q = tables["validation"]
        print("\n| predictor | lambda | mean level (validation) | quality | chord | gain over chord |")
        print("|---|---|---|---|---|---|")
        for d in args.predictors.split(","):
            p, meta = load_predictor(d, checksum=engine.bb.checksum)
            with torch.no_grad():
                pick = p(feats).argmax(dim=1)
            lv, pq = float(levels[pick].mean()), float(q.gather(1, pick[:, None]).mean())
            c = chord(lv, levels.numpy(), q)
            print(f"| {d} | {meta.tradeoff:g} | {lv:.3f} | {pq:.3f} | {c:.3f} | {pq - c:+.4f} |")


if __name__ == "__main__":
    main()
