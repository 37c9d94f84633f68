"""Perplexity table: planners x layer counts (x KV policies) on a SOTU split; markdown for people, JSONL for machines.

    .venv/bin/python benchmarks/ppl_table.py --model smollm2 --layers 15,18,21,24,27 \
        --planners static-bi,static-greedy,prior,router --split test --out runs/ppl_test.jsonl

Each window's first --prefill tokens are routed as a prompt, the rest as decode (so `router-frozen`
freezes the path there). Finished cells already in --out are skipped (the run is resumable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buddy.api import make_planner  # noqa: E402
from buddy.backbone import load_backbone  # noqa: E402
from buddy.data import sotu_texts, token_windows  # noqa: E402
from buddy.engine import Engine  # noqa: E402
from buddy.eval.ppl import evaluate_windows  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layers", default="15,18,21,24,27")
    ap.add_argument("--planners", default="static-bi,static-greedy,prior,router")
    ap.add_argument("--kv-policies", default="fill")
    ap.add_argument("--router", default=None, help="router directory (default: the shipped one)")
    ap.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", required=True, help="JSONL results (appended; finished cells are skipped)")
    args = ap.parse_args()

    bb = load_backbone(args.model, dtype=args.dtype)
    windows = token_windows(bb.tokenizer, sotu_texts(args.split), args.window, args.windows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.is_file():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done[(r["kv_policy"], r["planner"], r["k"])] = r
    ks = [int(x) for x in args.layers.split(",")]
    for policy in args.kv_policies.split(","):
        for name in args.planners.split(","):
            eng = Engine(bb, make_planner(name, bb, policy, args.router), policy)
            for k in ks:
                if (policy, name, k) in done:
                    continue
                t0 = time.perf_counter()
                r = evaluate_windows(eng, windows, layers=k, prefill=args.prefill)
                row = {"model": bb.name, "split": args.split, "kv_policy": policy, "planner": name, "k": k,
                       "ppl": round(r.ppl, 4), "tokens": r.tokens, "layers_per_token": round(r.layers_per_token, 3),
                       "windows": f"{windows.shape[0]}x{windows.shape[1]}", "prefill": args.prefill,
                       "dtype": args.dtype, "seconds": round(time.perf_counter() - t0, 1)}
                done[(policy, name, k)] = row
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{policy:5s} {name:15s} k={k:2d} ppl={r.ppl:8.3f}", file=sys.stderr)
    print(markdown(done, ks, args.kv_policies.split(","), args.planners.split(",")))
    return 0


def markdown(done: dict, ks: list[int], policies: list[str], planners: list[str]) -> str:
    lines = ["| KV policy | planner | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    for policy in policies:
        for name in planners:
            cells = [f"{done[(policy, name, k)]['ppl']:.2f}" if (policy, name, k) in done else "" for k in ks]
            lines.append(f"| {policy} | {name} | " + " | ".join(cells) + " |")
        statics = [n for n in planners if n.startswith("static")]
        if "router" in planners and statics:
            cells = []
            for k in ks:
                best = min(done[(policy, n, k)]["ppl"] for n in statics)
                cells.append(f"{100 * (done[(policy, 'router', k)]['ppl'] / best - 1):+.1f}%")
            lines.append(f"| {policy} | router vs best static | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
