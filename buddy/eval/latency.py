"""Decode latency: `transformers` generate against the Buddy engine (full depth, static and router planners)
at several budgets, with the analytic bound beside each measurement.

    buddy bench latency --model smollm2 --batch 1 --prompt-len 128 --new-tokens 64 --budgets 1,0.75,0.5

Prints a table for people and ends with one JSON line. Times are medians over --repeats runs after a
warm-up; the first generated token's time is the time to first token (prefill included), the rest give
ms per output token.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import torch

from ..api import make_planner
from ..backbone import load_backbone
from ..backbone.loading import MODELS, gguf_file
from ..budget import Budget, CostShapes, decode_cost, ideal_speedup, layer_params
from ..config import ConfigError, LatencyConfig, LoadConfig
from ..engine import Engine
from ..errors import require_extra
from ..planner import FullPlanner
from ..quant import weight_bytes


def matvec_bandwidth(dtype: torch.dtype, device, mbytes: int = 256, repeats: int = 20) -> float:
    """GB/s a large matrix-vector product streams its weights at (the batch-1 decode floor)."""
    elem = torch.finfo(dtype).bits // 8
    n = int(math.sqrt(mbytes * 2**20 / elem))
    w = torch.randn(n, n, device=device).to(dtype)
    x = torch.randn(n, 1, device=device).to(dtype)
    times = []
    for i in range(repeats + 3):
        _sync(device)
        t0 = time.perf_counter()
        w @ x
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return n * n * elem / statistics.median(times) / 1e9


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_hf(model, ids: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(time to first token ms, median ms per later token) of transformers' greedy generate, from the time
    each token reaches a streamer (robust to run-to-run noise, unlike differences of whole runs)."""
    class Stamps:  # transformers calls put() with the prompt, then once per generated token
        def __init__(self):
            self.t = []

        def put(self, value):
            _sync(ids.device)
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def run(n):
        st = Stamps()
        _sync(ids.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=model.config.eos_token_id, streamer=st)
        tokens = st.t[1:]  # the first put() is the prompt
        return (tokens[0] - t0) * 1e3, statistics.median(1e3 * (b - a) for a, b in zip(tokens, tokens[1:]))

    run(2)  # warm-up
    runs = [run(new_tokens) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def time_engine(engine, prompts: list[list[int]], k, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(time to first token ms, median ms per later token) of the Buddy engine at k layers (or a list of
    per-row layer counts)."""
    ks = k if isinstance(k, (list, tuple)) else [k] * len(prompts)
    budgets = [Budget(layers=x) for x in ks]
    list(engine.generate_batch(prompts, budgets, max_new_tokens=2, ignore_eos=True))  # warm-up
    ttfts, steps = [], []
    for _ in range(repeats):
        ms = [s[0].ms for s in engine.generate_batch(prompts, budgets, max_new_tokens=new_tokens, ignore_eos=True)]
        ttfts.append(ms[0])
        steps.append(statistics.median(ms[1:]))
    return statistics.median(ttfts), statistics.median(steps)


def run_latency(model: str, dtype: str, device: str, cfg: LatencyConfig, progress=print,
                quant: str = LoadConfig.quant) -> dict:
    """Time transformers and the Buddy engines for every cell of `cfg` (see LatencyConfig); `quant` is the
    weight mode (buddy/quant.py), and the bounds count its own weight bytes."""
    batches, prompt_lens, new_tokens, budgets = cfg.batch, cfg.prompt_len, cfg.new_tokens, cfg.budgets
    repeats, kv_policy, planners = cfg.repeats, cfg.kv_policy, cfg.planners
    if cfg.compare == "llama.cpp":
        require_extra("llama_cpp", "llamacpp", "--compare llama.cpp")
        if model not in MODELS:
            raise ConfigError(f"--compare llama.cpp times the registry models' GGUF files ({', '.join(MODELS)}); "
                              f"{model!r} is a checkpoint directory")
    bb = load_backbone(model, device, dtype, quant)
    L = bb.n_layers
    engines = {"full": Engine(bb, FullPlanner(L), kv_policy)}
    for name in planners:
        try:
            engines[name] = Engine(bb, make_planner(name, bb, kv_policy), kv_policy)
        except ValueError as e:
            progress(f"skipping planner {name}: {e}")
    router_params = 0
    if "router" in engines:
        router_params = sum(p.numel() for p in engines["router"].planner.module.parameters())
    shapes = CostShapes.from_config(bb.config, router_params)
    static_shapes = CostShapes.from_config(bb.config)
    elem = torch.finfo(bb.dtype).bits // 8
    per_weight = head_bytes = None
    if bb.quant:  # bytes per weight as stored (codes, scales and zeros), layers and LM head apart
        wb = weight_bytes(bb)
        per_weight = wb["layer"] / layer_params(static_shapes)
        head_bytes = wb["head"] / (bb.shapes.vocab * bb.shapes.hidden)
    bw = matvec_bandwidth(bb.dtype, bb.device)
    dense_bytes = decode_cost(static_shapes, L, dtype_bytes=elem, weight_bytes=per_weight,
                              head_bytes=head_bytes)["weight_bytes"]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for B in batches:
        for P in prompt_lens:
            prompts = torch.randint(bb.shapes.vocab // 4, bb.shapes.vocab // 2, (B, P), generator=gen)  # ordinary tokens
            if cfg.compare == "llama.cpp" and B == 1:
                from .llamacpp import time_llamacpp

                with gguf_file(MODELS[model]) as gguf_path:
                    lc_ttft, lc_ms = time_llamacpp(gguf_path, prompts[0].tolist(), new_tokens, repeats,
                                                   torch.get_num_threads())
                rows.append({"impl": "llama.cpp", "planner": "full", "batch": 1, "prompt_len": P, "k": L,
                             "ttft_ms": lc_ttft, "ms_per_token": lc_ms, "gguf": MODELS[model].parts[-1]})
                progress(f"B=1 P={P} llama.cpp: {lc_ms:.2f} ms/token")
            hf_ttft, hf_ms = time_hf(bb.reference_model, prompts.to(bb.device), new_tokens, repeats)
            rows.append({"impl": "transformers", "planner": "full", "batch": B, "prompt_len": P, "k": L,
                         "ttft_ms": hf_ttft, "ms_per_token": hf_ms})
            progress(f"B={B} P={P} transformers generate: {hf_ms:.2f} ms/token")
            dense = None
            for b in budgets:
                k = Budget(fraction=b).k(L)
                for name, eng in engines.items():
                    if (name == "full") != (k == L):
                        continue
                    ttft, ms = time_engine(eng, prompts.tolist(), k, new_tokens, repeats)
                    if k == L:
                        dense = ms
                    bound = ideal_speedup(shapes if name.startswith("router") else static_shapes, k, kv_policy,
                                          context=P + new_tokens // 2, dtype_bytes=elem, weight_bytes=per_weight,
                                          head_bytes=head_bytes)
                    row = {"impl": "buddy", "planner": name, "batch": B, "prompt_len": P, "budget": b, "k": k,
                           "ttft_ms": ttft, "ms_per_token": ms, "ideal_speedup": bound}
                    if dense:
                        row["speedup"] = dense / ms
                        row["of_bound"] = row["speedup"] / bound
                    rows.append(row)
                    progress(f"B={B} P={P} {name:14s} k={k:2d}: {ms:.2f} ms/token")
            mixed_planner = next((n for n in ("router", "static-greedy") if n in engines), None)
            if B > 1 and mixed_planner and dense:  # every row its own budget, cycling through the list
                ks = [Budget(fraction=budgets[r % len(budgets)]).k(L) for r in range(B)]
                ttft, ms = time_engine(engines[mixed_planner], prompts.tolist(), ks, new_tokens, repeats)
                rows.append({"impl": "buddy", "planner": f"{mixed_planner} (mixed)", "batch": B, "prompt_len": P,
                             "k": sum(ks) / B, "ks": ks, "ttft_ms": ttft, "ms_per_token": ms, "speedup": dense / ms})
                progress(f"B={B} P={P} mixed budgets {ks}: {ms:.2f} ms/step")
    for r in rows:
        lc = next((c for c in rows if c["impl"] == "llama.cpp" and c["prompt_len"] == r["prompt_len"]), None)
        if lc and r["impl"] == "buddy" and r["batch"] == 1:
            r["x_llamacpp"] = lc["ms_per_token"] / r["ms_per_token"]  # tokens/s over llama.cpp's at full depth
        if r["planner"] == "router":
            static = next((s for s in rows if s["planner"] == "static-greedy" and s["k"] == r["k"]
                           and s["batch"] == r["batch"] and s["prompt_len"] == r["prompt_len"]), None)
            dense = next(s for s in rows if s["planner"] == "full" and s["impl"] == "buddy"
                         and s["batch"] == r["batch"] and s["prompt_len"] == r["prompt_len"])
            if static:
                r["router_overhead_ms"] = r["ms_per_token"] - static["ms_per_token"]
                r["router_overhead_pct_of_dense"] = 100 * r["router_overhead_ms"] / dense["ms_per_token"]
    return {"model": bb.name, "dtype": str(bb.dtype).replace("torch.", ""), "device": str(bb.device), "quant": quant,
            "kv_policy": kv_policy, "new_tokens": new_tokens, "repeats": repeats,
            "matvec_gb_s": bw, "dense_weight_bytes": dense_bytes,
            "floor_ms_per_token": dense_bytes / bw / 1e6, "rows": rows,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def format_table(res: dict) -> str:
    head = (f"model {res['model']}  dtype {res['dtype']}  quant {res.get('quant', 'none')}  device {res['device']}  "
            f"kv {res['kv_policy']}  "
            f"threads {res['threads']}  torch {res['torch']}\n"
            f"matrix-vector bandwidth {res['matvec_gb_s']:.1f} GB/s -> batch-1 floor "
            f"{res['floor_ms_per_token']:.2f} ms/token for {res['dense_weight_bytes'] / 1e6:.0f} MB of weights\n")
    lc = any(r["impl"] == "llama.cpp" for r in res["rows"])
    lines = ["| impl | planner | batch | prompt | k | TTFT ms | ms/token | tokens/s | speedup | ideal | of bound |"
             " router overhead |" + (" x llama.cpp |" if lc else ""), "|" + "---|" * (13 if lc else 12)]
    for r in res["rows"]:
        tps = r["batch"] * 1000 / r["ms_per_token"]
        ov = (f"{r['router_overhead_ms']:+.2f} ms ({r['router_overhead_pct_of_dense']:+.1f}%)"
              if "router_overhead_ms" in r else "")
        lines.append(f"| {r['impl']} | {r['planner']} | {r['batch']} | {r['prompt_len']} | {r['k']} | "
                     f"{r['ttft_ms']:.1f} | {r['ms_per_token']:.2f} | {tps:.1f} | "
                     f"{r.get('speedup', float('nan')):.2f} | {r.get('ideal_speedup', float('nan')):.2f} | "
                     f"{100 * r.get('of_bound', float('nan')):.0f}% | {ov} |"
                     + (f" {r['x_llamacpp']:.2f} |" if "x_llamacpp" in r else " |" if lc else ""))
    return head + "\n".join(lines)


def to_json_line(res: dict) -> str:
    return json.dumps(res, default=float)
