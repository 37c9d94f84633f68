"""Is the shipped mix calibration too small? Greedy layer removal on more training windows, judged on validation.

The shipped mix calibrations (`buddy/data/calibration/<model>-mix.json`) ran greedy removal on 1 window of 128
tokens per training domain. This probe reruns `buddy.calibration.calibrate` on `--windows` windows of 128 tokens
per domain of the current training mix (train split), writes each calibration to `--out-dir` (the same JSON as
`buddy calibrate`, usable as `--calibration FILE`), and scores the static-greedy and static-bi plans of the
shipped and the new calibrations at each k on the mix validation split (`--val-windows` x 256 tokens per domain;
the mean over domains of the mean NLL, as router validation is). Test windows are never used. The shipped
SmolLM2 calibration was made on mix v1 (15 domains, no `code_chat`); the new ones use the current mix, so give
`--windows 1,4` to separate the effect of size from the mix version:

    .venv/bin/python research/calibration_size.py --model smollm2 --windows 1,4 --layers 15,19,23,26 \\
        --out-dir runs/calibration-size
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from buddy.artifacts import git_commit
from buddy.backbone import load_backbone
from buddy.calibration import calibrate, load_calibration, save_calibration
from buddy.corpus import VERSION, describe, mix_windows
from buddy.engine import Engine
from buddy.eval.ppl import evaluate_windows
from buddy.planner import GivenPlanner


def mean_nll(bb, layers, windows: dict) -> float:
    eng = Engine(bb, GivenPlanner(sorted(layers), bb.n_layers), "fill")
    return sum(math.log(evaluate_windows(eng, w, layers=len(layers), batch_size=4).ppl)
               for w in windows.values()) / len(windows)


def plan(order, k, L):
    return [0, *sorted(order[:k - 2]), L - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--windows", default="1,4", help="windows of 128 tokens per training domain, comma-separated")
    ap.add_argument("--val-windows", type=int, default=4)
    ap.add_argument("--layers", default="15,19,23,26")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()
    bb = load_backbone(args.model, dtype=args.dtype)
    L, tok = bb.n_layers, bb.tokenizer
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cals = {"shipped": load_calibration(bb, "mix")}
    for n in (int(x) for x in args.windows.split(",")):
        t0 = time.time()
        per = mix_windows(tok, "train", 128, n)
        data = (f"training mix v{VERSION}, train split, {n} evenly spaced windows x 128 tokens per domain "
                f"({describe(per)})")
        cal = calibrate(bb, torch.cat(list(per.values())), command="research/calibration_size.py", data=data)
        cal["calibration_data"], cal["git_commit"] = "mix", git_commit()
        save_calibration(cal, out / f"{bb.name}-mix-w{n}.json")
        cals[f"w{n}"] = cal
        print(f"calibration on {n} x 128 tokens per domain: {time.time() - t0:.0f} s; static-greedy order "
              f"{cal['orders']['static-greedy']}", flush=True)
    val = mix_windows(tok, "validation", 256, args.val_windows)
    ks = [int(x) for x in args.layers.split(",")]
    rows = []
    with torch.no_grad():
        for name, cal in cals.items():
            for method in ("static-greedy", "static-bi"):
                ppl = {k: math.exp(mean_nll(bb, plan(cal["orders"][method], k, L), val)) for k in ks}
                rows.append({"calibration": name, "method": method, "val_ppl": ppl})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n| calibration | method | {' | '.join(f'k={k}' for k in ks)} |")
    print(f"|---|---|{'---|' * len(ks)}")
    for r in rows:
        cells = " | ".join(f"{r['val_ppl'][k]:.2f}" for k in ks)
        print(f"| {r['calibration']} | {r['method']} | {cells} |")


if __name__ == "__main__":
    main()
