"""Multiple-choice scoring by log-likelihood, with routed decode semantics.

    buddy eval zeroshot --model smollm2 --planner router --budget 0.75 --tasks arc_easy,piqa --limit 100

Each document's context runs once as a prompt (prefill, routed like a prompt); its cache is then repeated
for every choice and the continuations are scored teacher-forced with per-token plans, exactly as cached
decode would produce them. Documents are batched (contexts left-padded). Metrics: `acc` (highest summed
log-likelihood) and `acc_norm` (log-likelihood per UTF-8 byte of the continuation, as lm-eval's acc_norm).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from ..budget import AUTO
from .tasks import MCDoc


@dataclass
class MCResult:
    task: str
    acc: float
    acc_norm: float
    docs: int
    layers_per_token: float
    wall_s: float
    per_doc: dict[str, list[int]] = field(default_factory=dict)  # "acc" / "acc_norm": 1 if a document is right

    def as_dict(self) -> dict:
        return asdict(self)


def tokenize_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them: encode the whole, cut at the context's length.
    An empty context becomes the end-of-sequence token."""
    ctx = tokenizer(context)["input_ids"] if context else []
    whole = tokenizer(context + continuation)["input_ids"]
    if not ctx:
        return [tokenizer.eos_token_id], whole
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def score_requests(engine, pairs: list[tuple[list[int], list[int]]], k, contexts_per_batch: int = 8,
                   progress: bool = False, desc: str = "score") -> tuple[list[float], list[bool], float, int]:
    """Summed log-likelihood of each continuation given its context (token ids).

    Identical contexts share one prefill; k is a layer count or "auto" (chosen per context). Returns (logliks, whether each continuation is the greedy one,
    executed layer-token count, token count)."""
    dev = engine.bb.device
    order: dict[tuple[int, ...], int] = {}
    for ctx, _ in pairs:
        order.setdefault(tuple(ctx), len(order))
    contexts = list(order)
    by_ctx: list[list[int]] = [[] for _ in contexts]
    for r, (ctx, _) in enumerate(pairs):
        by_ctx[order[tuple(ctx)]].append(r)
    out, greedy = [0.0] * len(pairs), [False] * len(pairs)
    ctx_k = engine.choose_k([list(c) for c in contexts]) if k == AUTO else [k] * len(contexts)  # per context
    layers, tokens = 0.0, 0
    starts = range(0, len(contexts), contexts_per_batch)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        group = list(range(s, min(s + contexts_per_batch, len(contexts))))
        rows = [r for c in group for r in by_ctx[c]]
        P = max(len(contexts[c]) for c in group)
        conts = [pairs[r][1] for r in rows]
        Tc = max(len(c) for c in conts)
        cache = engine.new_cache(len(group), P + max(Tc - 1, 0))
        x = torch.tensor([[0] * (P - len(contexts[c])) + list(contexts[c]) for c in group], device=dev)
        valid = torch.tensor([[False] * (P - len(contexts[c])) + [True] * len(contexts[c]) for c in group], device=dev)
        h, plan = engine.forward(x, cache, [ctx_k[c] for c in group], None if valid.all() else valid)
        layers += float(plan[valid].sum())
        tokens += int(valid.sum())
        row_ctx = torch.tensor([order[tuple(pairs[r][0])] - s for r in rows], device=dev)
        last = h[row_ctx, -1:]  # predicts each continuation's first token
        if Tc > 1:  # the continuations' own tokens (but the last) run as decode, one row per choice
            cache.take_rows(row_ctx)
            y = torch.tensor([c[:-1] + [0] * (Tc - len(c)) for c in conts], device=dev)
            h2, plan2 = engine.forward(y, cache, [ctx_k[c + s] for c in row_ctx.tolist()])
            real = torch.arange(Tc - 1, device=dev)[None] < torch.tensor([len(c) - 1 for c in conts], device=dev)[:, None]
            layers += float(plan2[real].sum())
            tokens += int(real.sum())
            last = torch.cat([last, h2], dim=1)
        logp = torch.log_softmax(engine.bb.head(last), dim=-1)  # [R, Tc, V] float32
        target = torch.tensor([c + [0] * (Tc - len(c)) for c in conts], device=dev)
        ll = logp.gather(-1, target[..., None])[..., 0]
        mask = torch.arange(Tc, device=dev)[None] < torch.tensor([len(c) for c in conts], device=dev)[:, None]
        is_greedy = ((logp.argmax(dim=-1) == target) | ~mask).all(dim=1)
        for r, v, g in zip(rows, (ll * mask).sum(dim=1).tolist(), is_greedy.tolist()):
            out[r], greedy[r] = v, g
    return out, greedy, layers, tokens


def evaluate_mc(engine, task: str, docs: list[MCDoc], budget=None, layers=None, contexts_per_batch: int = 8,
                progress: bool = False) -> MCResult:
    """acc and acc_norm of the engine at a budget on multiple-choice documents."""
    k = engine.resolve_k(budget, layers)
    t0 = time.perf_counter()
    tok = engine.tokenizer
    pairs, spans = [], []
    for d in docs:
        spans.append((len(pairs), len(d.requests)))
        pairs.extend(tokenize_pair(tok, c, x) for c, x in d.requests)
    ll, _, layer_sum, n_tok = score_requests(engine, pairs, k, contexts_per_batch, progress, desc=task)
    acc, acc_norm = [], []
    for d, (s, n) in zip(docs, spans):
        scores = ll[s:s + n]
        norm = [v / max(len(x.encode("utf-8")), 1) for v, (_, x) in zip(scores, d.requests)]
        acc.append(int(max(range(n), key=scores.__getitem__) == d.gold))
        acc_norm.append(int(max(range(n), key=norm.__getitem__) == d.gold))
    n = max(len(docs), 1)
    return MCResult(task, sum(acc) / n, sum(acc_norm) / n, len(docs), layer_sum / max(n_tok, 1),
                    time.perf_counter() - t0, {"acc": acc, "acc_norm": acc_norm})
