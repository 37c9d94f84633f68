"""Quality of the quantized weight modes against the dequantized model they come from.

    .venv/bin/python benchmarks/quant_quality.py --model smollm2 --modes gguf,gguf+int4head,int8

For each mode: perplexity on SOTU test (the sweep's `ppl-sotu` windows: 16 x 512 tokens, 128 routed as the
prompt) at full depth and at the router's 0.5 budget, and greedy-token agreement on 32-token continuations of
50 prompts (the first 32 tokens of the first 50 test documents of the training mix's domains, in turn). The
reference is `--quant none` in the same dtype. Targets (issue "CPU decode on the checkpoint's own 4-bit
weights"): perplexity within 0.5%, and at least 95% of continuations identical. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from buddy.api import load
from buddy.budget import Budget
from buddy.corpus import TRAIN_DOMAINS, documents
from buddy.data import sotu_texts, token_windows
from buddy.eval.ppl import evaluate_windows
from buddy.eval.sweep import PPL_PREFILL, PPL_WINDOW, PPL_WINDOWS


def prompts(tok, n: int = 50, length: int = 32) -> list[list[int]]:
    docs = {d: documents(d, "test", tok) for d in TRAIN_DOMAINS}
    out, i = [], 0
    while len(out) < n:
        for d in TRAIN_DOMAINS:
            if i < len(docs[d]) and len(out) < n:
                ids = tok(docs[d][i])["input_ids"]
                if len(ids) >= length:
                    out.append(ids[:length])
        i += 1
    return out


def continuations(engine, ps, k, new: int = 32) -> list[list[int]]:
    return [[s.token for s in engine.generate(p, layers=k, max_new_tokens=new, ignore_eos=True)] for p in ps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--modes", default="gguf,int8", help="quant modes, and gguf+int4head (the Q8_0 LM head as two "
                                                          "int4 halves instead of the model's dtype)")
    ap.add_argument("--prompts", type=int, default=50)
    args = ap.parse_args()
    ref = load(args.model, dtype=args.dtype, quant="none")
    L = ref.n_layers
    ks = (L, Budget(fraction=0.5).k(L))
    windows = token_windows(ref.tokenizer, sotu_texts("test"), PPL_WINDOW, PPL_WINDOWS)
    ps = prompts(ref.tokenizer, args.prompts)
    t0 = time.perf_counter()
    base = {k: evaluate_windows(ref, windows, layers=k, prefill=PPL_PREFILL).ppl for k in ks}
    base_tokens = continuations(ref, ps, L)
    del ref
    print(f"reference ({args.dtype}, quant none): ppl {base[ks[0]]:.3f} at k={ks[0]}, {base[ks[1]]:.3f} at k={ks[1]} "
          f"({time.perf_counter() - t0:.0f} s)")
    print("| mode | k | ppl | reference | change | identical continuations | tokens agreeing |")
    print("|---|---|---|---|---|---|---|")
    result = {"model": args.model, "dtype": args.dtype, "reference": {str(k): v for k, v in base.items()},
              "prompts": len(ps), "modes": {}}
    for mode in args.modes.split(","):
        if mode == "gguf+int4head":  # the Q8_0 LM head as two int4 halves (bfloat16 logits)
            from buddy.backbone.loading import MODELS, gguf_file
            from buddy.quant import apply_quant

            m = load(args.model, dtype=args.dtype)
            with gguf_file(MODELS[args.model]) as path:
                m.bb.quant = apply_quant(m.bb, "gguf", path, head="int4")
        else:
            m = load(args.model, dtype=args.dtype, quant=mode)
        ppl = {k: evaluate_windows(m, windows, layers=k, prefill=PPL_PREFILL).ppl for k in ks}
        toks = continuations(m, ps, L)
        same = sum(a == b for a, b in zip(toks, base_tokens)) / len(ps)
        agree = sum(x == y for a, b in zip(toks, base_tokens) for x, y in zip(a, b)) / sum(map(len, base_tokens))
        for k in ks:
            print(f"| {mode} | {k} | {ppl[k]:.3f} | {base[k]:.3f} | {100 * (ppl[k] / base[k] - 1):+.2f}% | "
                  + (f"{100 * same:.0f}% | {100 * agree:.1f}% |" if k == L else " | |"))
        result["modes"][mode] = {"ppl": {str(k): v for k, v in ppl.items()}, "identical": same, "agree": agree,
                                 "formats": m.bb.quant}
        del m
    print(json.dumps(result))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
