"""Perplexity of text in fixed windows, teacher-forced with per-token plans exactly as in decode.

    buddy eval ppl --model smollm2 --planner static-greedy --layers 21 --text-file FILE --json
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..budget import AUTO
from ..config import PplConfig

AUTO_PROMPT = 128  # budget="auto" with prefill=0: the predictor sees this many leading tokens of a window


@dataclass
class PplResult:
    ppl: float
    nll: float
    tokens: int
    layers_per_token: float
    chosen_k: dict[int, int] = field(default_factory=dict)  # budget="auto": windows per chosen layer count
    window_nll: list[float] = field(default_factory=list)  # per_window=True: each window's mean NLL, in order
    kl: float | None = None  # kl=True: mean KL(dense || routed) per scored token, in nats
    window_kl: list[float] = field(default_factory=list)  # kl=True and per_window=True: each window's mean KL


@torch.inference_mode()
def window_logits(engine, ids: torch.Tensor, k: int, prefill: int = 0, allocation: str = PplConfig.allocation):
    """Teacher-forced logits of ids [B, T]: the first `prefill` tokens as a prompt, the rest as decode
    (one parallel forward each; equal to step-by-step decode). prefill=0: the whole window as a prompt.
    k: one layer count, or one per row. allocation="token": the decode part takes per-token depths with the
    row's mean exact (buddy/allocation.py); prefill 0 then acts as 1."""
    cache = engine.new_cache(ids.shape[0], ids.shape[1])
    if allocation == "token":
        cache.account = engine.token_account([k] * ids.shape[0] if isinstance(k, int) else list(k))
        prefill = prefill or 1
    if not 0 < prefill < ids.shape[1]:
        h, plan = engine.forward(ids, cache, k)
        return engine.bb.head(h), plan
    h1, p1 = engine.forward(ids[:, :prefill], cache, k)
    h2, p2 = engine.forward(ids[:, prefill:], cache, k)
    return engine.bb.head(torch.cat([h1, h2], dim=1)), torch.cat([p1, p2], dim=1)


def token_kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(dense || routed) of each position's next-token distribution, [B, T, V] each -> [B, T] (nats)."""
    p = torch.log_softmax(dense_logits.float(), dim=-1)
    q = torch.log_softmax(logits.float(), dim=-1)
    return (p.exp() * (p - q)).sum(dim=-1)


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of each position of ids [B, T] under logits [B, T, V]: [B, T-1]."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


def evaluate_windows(engine, windows: torch.Tensor, budget=None, layers=None, batch_size: int = PplConfig.batch_size,
                     progress: bool = False, prefill: int = 0, per_window: bool = False,
                     allocation: str = PplConfig.allocation, kl: bool = False) -> PplResult:
    """Mean next-token NLL over windows [N, T] (the first token of each window is context only).
    `prefill`: tokens of each window routed as the prompt; later ones follow decode-time rerouting.
    `per_window`: also return each window's mean NLL (`window_nll`).
    `allocation`: `request` (every token k layers) or `token` (per-token depth, mean exact; see window_logits).
    `kl`: also the mean KL from the dense model's next-token distribution (transformers' own forward) over
    the same positions (`kl`, and `window_kl` with per_window)."""
    total, count, layer_sum, window_nll, kl_sum, window_kl = 0.0, 0, 0.0, [], 0.0, []
    k = engine.resolve_k(budget, layers)
    ks = None
    if k == AUTO:  # one choice per window, from its prompt part
        ks = engine.choose_k(windows[:, :prefill or AUTO_PROMPT].tolist())
    it = range(0, windows.shape[0], batch_size)
    for s in tqdm(it, desc="ppl", unit="batch", disable=not progress, leave=False):
        ids = windows[s:s + batch_size].to(engine.bb.device)
        logits, plan = window_logits(engine, ids, ks[s:s + batch_size] if ks else k, prefill, allocation)
        # one flat sum, as always: documented perplexities and the calibration reproduce bit for bit
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        if per_window:
            window_nll += token_nll(logits, ids).mean(dim=1).tolist()
        if kl:
            with torch.inference_mode():  # transformers' own forward: no autograd graph
                d = token_kl(engine.bb.dense_logits(ids)[:, :-1], logits[:, :-1])  # [b, T-1]
            kl_sum += float(d.sum())
            if per_window:
                window_kl += d.mean(dim=1).tolist()
        count += ids[:, 1:].numel()
        layer_sum += float(plan[:, 1:].sum())
    nll = total / count
    chosen = {x: ks.count(x) for x in sorted(set(ks))} if ks else {}
    return PplResult(ppl=math.exp(nll), nll=nll, tokens=count, layers_per_token=layer_sum / count, chosen_k=chosen,
                     window_nll=window_nll, kl=kl_sum / count if kl else None, window_kl=window_kl)
