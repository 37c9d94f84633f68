"""Perplexity of text in fixed windows, teacher-forced with per-token plans exactly as in decode.

    buddy eval ppl --model smollm2 --planner static-greedy --layers 21 --text-file FILE --json
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm


@dataclass
class PplResult:
    ppl: float
    nll: float
    tokens: int
    layers_per_token: float


@torch.inference_mode()
def window_logits(engine, ids: torch.Tensor, k: int, prefill: int = 0):
    """Teacher-forced logits of ids [B, T]: the first `prefill` tokens as a prompt, the rest as decode
    (one parallel forward each; equal to step-by-step decode). prefill=0: the whole window as a prompt."""
    if not 0 < prefill < ids.shape[1]:
        return engine.logits(ids, layers=k)
    cache = engine.new_cache(ids.shape[0], ids.shape[1])
    h1, p1 = engine.forward(ids[:, :prefill], cache, k)
    h2, p2 = engine.forward(ids[:, prefill:], cache, k)
    return engine.bb.head(torch.cat([h1, h2], dim=1)), torch.cat([p1, p2], dim=1)


def evaluate_windows(engine, windows: torch.Tensor, budget=None, layers=None, batch_size: int = 4,
                     progress: bool = False, prefill: int = 0) -> PplResult:
    """Mean next-token NLL over windows [N, T] (the first token of each window is context only).
    `prefill`: tokens of each window routed as the prompt; later ones follow decode-time rerouting."""
    total, count, layer_sum = 0.0, 0, 0.0
    k = engine.resolve_k(budget, layers)
    it = range(0, windows.shape[0], batch_size)
    for s in tqdm(it, desc="ppl", unit="batch", disable=not progress, leave=False):
        ids = windows[s:s + batch_size].to(engine.bb.device)
        logits, plan = window_logits(engine, ids, k, prefill)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
        layer_sum += float(plan[:, 1:].sum())
    nll = total / count
    return PplResult(ppl=math.exp(nll), nll=nll, tokens=count, layers_per_token=layer_sum / count)
