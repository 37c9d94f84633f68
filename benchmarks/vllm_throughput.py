"""Throughput of Buddy inside vLLM against vLLM on the plain model, and against Buddy's own server.

    make setup-vllm
    .venv/bin/buddy export --format vllm --model smollm2 --out exported/smollm2-vllm
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --export exported/smollm2-vllm \\
        --dense ~/.cache/buddy/models/smollm2 --concurrency 1,8,32 --max-tokens 64

Runs in vLLM's environment (`make setup-vllm`). Each model runs in its own process (vLLM's CPU build keeps one
engine per process): vLLM dense on the plain checkpoint, then the Buddy export at budgets 1.0, 0.75, 0.5 and
mixed (0.5 / 0.75 / 1.0 cycling over the requests), and mixed-grouped (the same requests submitted one budget at a
time, each group's generate call after the last: path-aware batching, where every step's batch shares one layer
count). At concurrency c it submits c requests at once (greedy,
`ignore_eos`, `--max-tokens` each; at c = 1 four requests in turn; each cell first runs its own batch for 8
tokens untimed) and counts generated tokens per second of wall time; each cell is timed `--repeats` times and
reports the median (single runs on a 2-core machine vary by several percent). The repeats run in rounds: a
dense process, then a Buddy process, each timing every one of its cells once, so that a slow spell of the
machine falls on both sides alike.
`--buddy-server` adds Buddy's own server at the largest concurrency and budgets 1.0, 0.75 and 0.5, through
benchmarks/serve_load.py in the main environment (the same repeats).
Ratios are to vLLM dense at the same concurrency (of the medians, and the median of the per-round ratios),
and for Buddy in vLLM at the largest concurrency also to Buddy's own server at the same budget
(`--serve-model`, the export's source model; the server streams over HTTP and stops a request at end of
sequence, where vLLM's requests here ignore it). The last line is JSON; `--table FILE` prints the table again
from a saved output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is",
           "In 1969, astronauts", "My favourite food is", "Water boils at", "The stock market"]
MIXED = [{"budget": 0.5}, {"budget": 0.75}, {"budget": 1.0}]
SETTINGS = {"1.0": [{"budget": 1.0}], "0.75": [{"budget": 0.75}], "0.5": [{"budget": 0.5}],
            "mixed": MIXED, "mixed-grouped": MIXED}
GROUPED = {"mixed-grouped"}  # path-aware batching: the same requests, submitted one budget group at a time


def batches(prompts: list, params: list, grouped: bool) -> list[tuple[list, list]]:
    """The generate calls of one timed cell: all requests at once, or one call per budget (grouped), so that
    every step's batch shares one layer count."""
    if not grouped:
        return [(prompts, params)]
    groups: dict[str, tuple[list, list]] = {}
    for p, sp in zip(prompts, params):
        g = groups.setdefault(json.dumps(sp.extra_args, sort_keys=True), ([], []))
        g[0].append(p)
        g[1].append(sp)
    return list(groups.values())


def run_model(model: str, settings: list[str], concurrency: list[int], max_tokens: int, dtype: str,
              repeats: int = 1) -> list[dict]:
    """In this process: load `model` once and time every (setting, concurrency) cell."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, enforce_eager=True, enable_prefix_caching=False, max_model_len=512)
    cells = []
    for setting in settings:
        extra = SETTINGS.get(setting, [None])
        for c in concurrency:
            n = 4 if c == 1 else c
            params = [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                     extra_args=extra[i % len(extra)]) for i in range(n)]
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
            warm = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, extra_args=p.extra_args)
                    for p in params]
            for ps, sps in batches(prompts, warm, setting in GROUPED):  # warm-up: the cell's own batches
                llm.generate(ps, sps, use_tqdm=False)
            cells.append({"impl": "vllm dense" if setting == "dense" else "buddy in vllm", "setting": setting,
                          "concurrency": c, "requests": n, "prompts": prompts, "params": params, "tok_s_runs": []})
    for _ in range(repeats):  # cells interleaved: a slow spell of the machine hits every cell of a round alike
        for cell in cells:
            t0 = time.perf_counter()
            prompts, params = cell["prompts"], cell["params"]
            if cell["concurrency"] == 1:
                outs = [o for p, sp in zip(prompts, params) for o in llm.generate([p], [sp], use_tqdm=False)]
            else:
                outs = [o for ps, sps in batches(prompts, params, cell["setting"] in GROUPED)
                        for o in llm.generate(ps, sps, use_tqdm=False)]
            wall = time.perf_counter() - t0
            cell["tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
            cell["tok_s_runs"].append(cell["tokens"] / wall)
    rows = []
    for cell in cells:
        del cell["prompts"], cell["params"]
        rows.append({**cell, "tok_s": statistics.median(cell["tok_s_runs"])})
        print(f"{cell['setting']} c={cell['concurrency']}: {rows[-1]['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    return rows


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per cell from several rounds' rows: every round's runs, and their median."""
    out: dict[tuple, dict] = {}
    for rows in rounds:
        for r in rows:
            key = (r["impl"], r["setting"], r["concurrency"])
            if key in out:
                out[key]["tok_s_runs"] = out[key]["tok_s_runs"] + r["tok_s_runs"]
            else:
                out[key] = dict(r)
    for r in out.values():
        r["tok_s"] = statistics.median(r["tok_s_runs"])
    return list(out.values())


def child(args, settings: str) -> list[dict]:
    """One round in a fresh process: each cell of `settings` timed once."""
    cmd = [sys.executable, __file__, "--one", args.dense if settings == "dense" else args.export,
           "--settings", settings, "--concurrency", args.concurrency, "--max-tokens", str(args.max_tokens),
           "--dtype", args.dtype, "--repeats", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", help="a `buddy export --format vllm` directory")
    ap.add_argument("--dense", help="the plain checkpoint directory the export came from")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the median is reported")
    ap.add_argument("--serve-model", default="smollm2", help="the model Buddy's own server loads (--buddy-server)")
    ap.add_argument("--buddy-server", action="store_true", help="also time Buddy's own server (main environment)")
    ap.add_argument("--table", metavar="FILE", help="print the table again from a saved run's output (its JSON line)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    args = ap.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.one:
        print(json.dumps(run_model(args.one, args.settings.split(","), conc, args.max_tokens, args.dtype,
                                   args.repeats)))
        return
    if args.table:
        try:
            rows = json.loads(Path(args.table).read_text().strip().splitlines()[-1])["rows"]
        except (OSError, IndexError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--table {args.table}: not a saved output of this benchmark (its last line, JSON with "
                     f"'rows'): {type(e).__name__}: {e}")
        print_table(rows)
        return
    if not (args.export and args.dense):
        ap.error("give --export (a buddy export --format vllm directory) and --dense (the plain checkpoint)")
    # dense and Buddy alternate, a round each, so that their ratios are measured side by side in time
    rows = merge_rounds([child(args, s) for _ in range(args.repeats) for s in ("dense", ",".join(SETTINGS))])
    if args.buddy_server:
        main_py = os.environ.get("BUDDY_MAIN_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
        c = max(conc)
        for budget in ("1.0", "0.75", "0.5"):
            r = subprocess.run([main_py, str(ROOT / "benchmarks" / "serve_load.py"), "--concurrency",
                                ",".join([str(c)] * args.repeats), "--requests", str(c), "--max-tokens",
                                str(args.max_tokens), "--budgets", budget, "--dtype", args.dtype,
                                "--model", args.serve_model],
                               capture_output=True, text=True)
            if r.returncode == 0:
                runs = [lv["tok_s"] for lv in json.loads(r.stdout.strip().splitlines()[-1])["levels"]]
                rows.append({"impl": "buddy serve", "setting": budget, "concurrency": c,
                             "tok_s": statistics.median(runs), "tok_s_runs": runs})
            else:
                print(f"buddy serve run failed: {r.stderr[-2000:]}", file=sys.stderr)
    print_table(rows)
    print(json.dumps({"dtype": args.dtype, "max_tokens": args.max_tokens, "repeats": args.repeats, "rows": rows}))


def paired(a: dict, b: dict) -> float | None:
    """Median over rounds of a's tokens/s over b's in the same round (both timed in that round, so a slow
    spell of the machine cancels); None without runs from the same rounds."""
    ra, rb = a.get("tok_s_runs") or [], b.get("tok_s_runs") or []
    if not ra or len(ra) != len(rb):
        return None
    return statistics.median(x / y for x, y in zip(ra, rb))


def print_table(rows: list[dict]) -> None:
    """Adds to the rows x_dense (the ratio of medians to vLLM dense at the same concurrency), x_dense_paired (the
    median of the per-round ratios), and x_buddy_serve (to Buddy's server at the same budget and concurrency)."""
    dense = {r["concurrency"]: r for r in rows if r["impl"] == "vllm dense"}
    serve = {(r["setting"], r["concurrency"]): r["tok_s"] for r in rows if r["impl"] == "buddy serve"}
    print("| impl | budget | concurrency | tokens/s | x vLLM dense | x vLLM dense, paired by round | x Buddy serve |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d = dense.get(r["concurrency"])
        r["x_dense"] = r["tok_s"] / d["tok_s"] if d else None
        r["x_dense_paired"] = paired(r, d) if d and r["impl"] == "buddy in vllm" else None
        key = (r["setting"], r["concurrency"])
        r["x_buddy_serve"] = r["tok_s"] / serve[key] if r["impl"] == "buddy in vllm" and key in serve else None
        x, xp, xs = (f"{r[k]:.2f}" if r[k] else "" for k in ("x_dense", "x_dense_paired", "x_buddy_serve"))
        print(f"| {r['impl']} | {r['setting']} | {r['concurrency']} | {r['tok_s']:.1f} | {x} | {xp} | {xs} |")


if __name__ == "__main__":
    main()
