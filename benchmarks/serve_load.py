"""Load test of `buddy serve`: concurrent streaming requests of mixed budgets; throughput and latency.

    .venv/bin/python benchmarks/serve_load.py --concurrency 1,8,32 --requests 32 --max-tokens 32

Starts a server on a free loopback port (or uses --url), sends `--requests` streaming completions per
concurrency level (budgets cycle through --budgets, prompts through a fixed list), and prints a markdown
table: wall time, completion tokens per second over all requests, time to first token and request latency
(median and p95), mean executed layers per token. Greedy decoding, so runs are repeatable. The last column
counts the streams whose text equals the same request's text at the first concurrency level (give 1 first:
then it counts the streams that batching left unchanged; in float32 that is all of them). The last line is JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import socket
import statistics
import subprocess
import sys
import time

import httpx2 as httpx

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is",
           "In 1969, astronauts", "My favourite food is", "Water boils at", "The stock market"]


def one(url: str, prompt: str, budget: float, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "budget": budget, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage, text = None, None, ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]
            elif d["choices"] and d["choices"][0]["text"]:
                text += d["choices"][0]["text"]
                ttft = ttft or time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": usage["completion_tokens"],
            "layers": usage["layers_per_token"] * usage["completion_tokens"], "text": text}


def p95(xs):
    return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--budgets", default="0.5,0.75,1.0")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    proc = None
    url = args.url
    if url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "buddy", "serve", "--model", args.model, "--dtype", args.dtype,
                                 "--port", str(port), "--max-batch", "64"])
        url = f"http://127.0.0.1:{port}"
        for _ in range(1200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
    try:
        jobs = [(PROMPTS[i % len(PROMPTS)], budgets[i % len(budgets)]) for i in range(args.requests)]
        one(url, "Warm up", 1.0, 4)
        print(f"{args.requests} streaming requests, {args.max_tokens} new tokens max, budgets {args.budgets} "
              f"(cycled), greedy; model {args.model}, dtype {args.dtype}\n")
        print("| concurrency | wall s | tokens/s (all requests) | TTFT p50 / p95 ms | latency p50 / p95 s | layers/token "
              "| equal to first level |")
        print("|---|---|---|---|---|---|---|")
        first, levels = None, []
        for c in [int(x) for x in args.concurrency.split(",")]:
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(c) as pool:
                res = list(pool.map(lambda j: one(url, j[0], j[1], args.max_tokens), jobs))
            wall = time.perf_counter() - t0
            toks = sum(r["tokens"] for r in res)
            ttft = [r["ttft"] * 1e3 for r in res]
            lat = [r["latency"] for r in res]
            first = first or [r["text"] for r in res]
            same = sum(a == r["text"] for a, r in zip(first, res))
            print(f"| {c} | {wall:.1f} | {toks / wall:.1f} | {statistics.median(ttft):.0f} / {p95(ttft):.0f} | "
                  f"{statistics.median(lat):.2f} / {p95(lat):.2f} | {sum(r['layers'] for r in res) / toks:.2f} | "
                  f"{same}/{len(res)} |", flush=True)
            levels.append({"concurrency": c, "wall_s": wall, "tok_s": toks / wall, "requests": len(res),
                           "ttft_p50_ms": statistics.median(ttft), "equal_to_first": same})
        print(json.dumps({"model": args.model, "dtype": args.dtype, "max_tokens": args.max_tokens, "levels": levels}))
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
