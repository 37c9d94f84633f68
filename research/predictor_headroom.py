"""How much a per-prompt budget could gain, and how much a trained predictor gains, on the quality tables.

    .venv/bin/python research/predictor_headroom.py --predictors runs/mix-l2.5,runs/mix-l3.5
    .venv/bin/python research/predictor_headroom.py --data sotu --prompts 384 --val-prompts 96 --predictors ...

Reads the cached quality tables of `buddy train predictor` (computed on first use). `--data mix` (default) also
reads the prompt mix's test split (`--test-prompts` items: the documents `buddy sweep --limit 100` evaluates,
SOTU 2011-2021, the test files of `code` and `code_chat`, and the held-out domains `moby_dick` and `qasper`;
never used in training or for choosing settings). For each trade-off lambda it prints, per table:
- the oracle: each prompt takes its own best level (reward = quality - lambda * level): the mean level and
  quality (negative mean KL to the dense model, nats) it reaches;
- (mix) the domain oracle: one level per domain, the best for that domain on the same table;
- the chord: fixed budgets mixed to the same mean level, interpolated linearly between fixed levels.
For each given predictor directory it prints the argmax policy's mean level and quality on the validation (and
test) table, and its gain over the chord (positive = better than fixed budgets at the same mean level), then
the mean level it picks per domain, and its gain by group of domains with a 95% bootstrap interval over items.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import buddy
from buddy.predictor import load_predictor
from buddy.prompt_mix import (
    ALL_DOMAINS,
    DOMAINS,
    HELDOUT_DOMAINS,
    MC_DOMAINS,
    PROSE_DOMAINS,
)
from buddy.train.predictor import PredictorTrainConfig, split_table

BOOT = 1000


def chord(level: float, levels: np.ndarray, quality: torch.Tensor) -> float:
    return float(np.interp(level, levels, quality.mean(dim=0).numpy()))


def gain(pick: torch.Tensor, q: torch.Tensor, levels: torch.Tensor) -> float:
    """Mean quality of the picked levels minus the chord of fixed levels at the same mean level."""
    return float(q.gather(1, pick[:, None]).mean()) - chord(float(levels[pick].mean()), levels.numpy(), q)


def gain_interval(pick, q, levels) -> tuple[float, float, float]:
    """The gain and its 95% bootstrap interval over items (seeded)."""
    rng = np.random.default_rng(0)
    boot = [gain(pick[b], q[b], levels) for b in (torch.from_numpy(rng.integers(0, len(pick), len(pick)))
                                                  for _ in range(BOOT))]
    return gain(pick, q, levels), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="mix", choices=["mix", "sotu"])
    ap.add_argument("--prompts", type=int, default=PredictorTrainConfig.prompts)
    ap.add_argument("--val-prompts", type=int, default=PredictorTrainConfig.val_prompts)
    ap.add_argument("--test-prompts", type=int, default=864, help="mix only: test items (48 per domain; 0: no test table)")
    ap.add_argument("--dtype", default="auto", help="as `buddy train predictor --dtype` (tables are cached per dtype)")
    ap.add_argument("--tradeoffs", default="2.5,3.5,5,7")
    ap.add_argument("--predictors", default="", help="comma list of predictor directories")
    args = ap.parse_args()
    engine = buddy.load(args.model, planner="router", dtype=args.dtype)
    cfg = PredictorTrainConfig(data=args.data, prompts=args.prompts, val_prompts=args.val_prompts)
    splits = {"train": args.prompts, "validation": args.val_prompts}
    if args.data == "mix" and args.test_prompts > 0:
        splits["test"] = args.test_prompts
    tables = {name: split_table(engine, cfg, name, n) for name, n in splits.items()}
    levels = torch.tensor(cfg.level_list)
    print("| lambda | table | oracle mean level | oracle quality | chord at that level | oracle - chord |")
    print("|---|---|---|---|---|---|")
    for lam in [float(x) for x in args.tradeoffs.split(",")]:
        for name, (_, q, dom) in tables.items():
            pick = (q - lam * levels).argmax(dim=1)
            lv, oq = float(levels[pick].mean()), float(q.gather(1, pick[:, None]).mean())
            c = chord(lv, levels.numpy(), q)
            print(f"| {lam:g} | {name} | {lv:.3f} | {oq:.3f} | {c:.3f} | {oq - c:+.3f} |")
            if dom is not None:  # one level per domain, the best on this table: what knowing the domain is worth
                r = q - lam * levels
                pick = torch.stack([r[dom == d].mean(0) if (dom == d).any() else torch.zeros(len(levels))
                                    for d in range(len(ALL_DOMAINS))]).argmax(1)[dom]
                lv, dq = float(levels[pick].mean()), float(q.gather(1, pick[:, None]).mean())
                c = chord(lv, levels.numpy(), q)
                print(f"| {lam:g} | {name} (one level per domain) | {lv:.3f} | {dq:.3f} | {c:.3f} | {dq - c:+.3f} |")
    if not args.predictors:
        return
    shown = [s for s in ("validation", "test") if s in tables]
    print("\n| predictor | lambda | table | mean level | quality | chord | gain over chord |")
    print("|---|---|---|---|---|---|---|")
    picks = {}
    for d in args.predictors.split(","):
        p, meta = load_predictor(d, checksum=engine.bb.checksum)
        for name in shown:
            feats, q, dom = tables[name]
            with torch.no_grad():
                pick = p(feats).argmax(dim=1)
            picks[d, name] = (pick, dom)
            lv, pq = float(levels[pick].mean()), float(q.gather(1, pick[:, None]).mean())
            c = chord(lv, levels.numpy(), q)
            print(f"| {d} | {meta.tradeoff:g} | {name} | {lv:.3f} | {pq:.3f} | {c:.3f} | {pq - c:+.4f} |")
    if args.data != "mix":
        return
    last = shown[-1]
    groups = {f"all {len(ALL_DOMAINS)} domains": ALL_DOMAINS, f"the {len(DOMAINS)} training domains": DOMAINS,
              "held out": HELDOUT_DOMAINS, "the 7 multiple-choice tasks": MC_DOMAINS,
              f"prose and code ({len(PROSE_DOMAINS)} domains)": PROSE_DOMAINS, "chat": ("chat", "code_chat")}
    print(f"\nGain over fixed budgets at the same mean level, by group of domains ({last} table; 95% bootstrap "
          f"interval over items, {BOOT} resamples):\n")
    print("| predictor | " + " | ".join(groups) + " |")
    print("|---|" + "---|" * len(groups))
    for d in args.predictors.split(","):
        pick, dom = picks[d, last]
        q = tables[last][1]
        cells = []
        for names in groups.values():
            idx = torch.isin(dom, torch.tensor([ALL_DOMAINS.index(n) for n in names])).nonzero()[:, 0]
            if not len(idx):
                cells.append("-")
                continue
            g, lo, hi = gain_interval(pick[idx], q[idx], levels)
            cells.append(f"{g:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        print(f"| {d} | " + " | ".join(cells) + " |")
    print(f"\nMean level picked per domain ({last} table):\n")
    print("| predictor | " + " | ".join(ALL_DOMAINS) + " |")
    print("|---|" + "---|" * len(ALL_DOMAINS))
    for d in args.predictors.split(","):
        pick, dom = picks[d, last]
        lv = levels[pick]
        print(f"| {d} | " + " | ".join(f"{float(lv[dom == i].mean()):.2f}" if (dom == i).any() else "-"
                                        for i in range(len(ALL_DOMAINS))) + " |")


if __name__ == "__main__":
    main()
