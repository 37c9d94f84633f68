"""Choosing Budget Predictor settings on the validation table: GRPO across seeds and trade-offs.

    .venv/bin/python benchmarks/predictor_settings.py --grid beta=0.02,0.1

For each setting in the grid (one `PredictorTrainConfig` field and its values; other fields at their defaults)
it trains a predictor for every trade-off and seed on the cached prompt-mix training table (seconds each), then
prints its gain on the validation table over fixed budgets mixed to the same mean level (nats of KL; 0 means
a run that collapsed onto one level), and the mean and the worst over all runs. Never reads the test split.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

import buddy
from buddy.train.predictor import PredictorTrainConfig, PredictorTrainer, policy_report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--grid", default="beta=0.02,0.1", help="FIELD=V1,V2,... of PredictorTrainConfig")
    ap.add_argument("--tradeoffs", default="2.5,3.5,5,7")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    field, _, values = args.grid.partition("=")
    if not values or field in ("tradeoff", "seed") or not hasattr(PredictorTrainConfig, field):
        ap.error(f"invalid --grid {args.grid!r}: FIELD=V1,V2 with a PredictorTrainConfig field other than "
                 "tradeoff and seed (e.g. beta=0.02,0.1)")
    kind = type(getattr(PredictorTrainConfig, field))
    engine = buddy.load(args.model, planner="router", dtype="bfloat16")
    print(f"| {field} | lambda | validation gain per seed ({args.seeds}) |")
    print("|---|---|---|")
    summary = []
    for value in (kind(v) for v in values.split(",")):
        gains = []
        for lam in (float(x) for x in args.tradeoffs.split(",")):
            row = []
            for seed in (int(s) for s in args.seeds.split(",")):
                cfg = PredictorTrainConfig(tradeoff=lam, seed=seed, **{field: value})
                with tempfile.TemporaryDirectory() as out:
                    t = PredictorTrainer(engine, cfg, out)
                    t.tables(progress=False)
                    t.run(progress=False)
                levels = torch.tensor(cfg.level_list)
                v = policy_report(t.policy, *t.val, levels, lam)
                fixed = float(np.interp(v["mean_level"], levels.numpy(), t.val[1].mean(0).numpy()))
                row.append(v["quality"] - fixed)
            gains += row
            print(f"| {value} | {lam:g} | " + " ".join(f"{g:+.4f}" for g in row) + " |", flush=True)
        summary.append((value, np.mean(gains), np.min(gains)))
    print(f"\n| {field} | mean validation gain | worst run |\n|---|---|---|")
    for value, mean, worst in summary:
        print(f"| {value} | {mean:+.4f} | {worst:+.4f} |")


if __name__ == "__main__":
    main()
