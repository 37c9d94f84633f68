"""How much could a router gain by choosing among plans near the prior's: per token, per window, or once?

For each model and layer count k, on the mix's validation split (the windows that select checkpoints; no test
text), the candidate plans are the prior's plan (the mix calibration's static-greedy order) and every single swap
of one of its `--band` weakest kept layers with one of the `--band` strongest dropped layers (band^2 + 1 plans:
what the `swap` estimator explores around the threshold). Each candidate runs as a static plan over whole windows,
so every token's K/V are consistent with it. From each token's KL to the dense model under each candidate:
- best static: the one candidate with the lowest mean KL over all windows (a better static plan);
- per window: each window takes the candidate with its lowest mean KL (a router that recognises the text);
- per span: each run of `--span` consecutive tokens of a window takes the candidate with its lowest mean KL
  (local context, as a router rerouting on what it has read lately);
- per token: each token takes the candidate with its lowest KL (an oracle over these candidates). It ignores that
  a token's plan changes the K/V later tokens read (optimistic), and it sees only band^2 + 1 plans (a trained
  router can move further from the prior: pessimistic).
Each column is the perplexity of the true next tokens under the chosen candidates, over the prior's. Choices are
made by KL to the dense model, never by the true token. `per-token prior share`: how often the oracle keeps the
prior's plan.

    .venv/bin/python research/selection_headroom.py --models smollm2,qwen-coder-0.5b
"""

from __future__ import annotations

import argparse
import math

import torch

from buddy.backbone import load_backbone
from buddy.budget import ALWAYS_ON
from buddy.calibration import load_calibration
from buddy.corpus import mix_windows
from buddy.engine import Engine
from buddy.planner import GivenPlanner


def candidate_plans(order: list[int], n_layers: int, k: int, band: int) -> torch.Tensor:
    """[C, L] bool: the prior's plan at k (the first k-2 of `order`, plus layers 0 and L-1), then each swap of one
    of the `band` last kept layers with one of the `band` first dropped ones."""
    m = k - ALWAYS_ON
    kept, dropped = order[:m], order[m:]
    sets = [set(kept)] + [(set(kept) - {a}) | {c} for a in kept[-band:] for c in dropped[:band]]
    plans = torch.zeros(len(sets), n_layers, dtype=torch.bool)
    plans[:, 0] = plans[:, -1] = True
    for i, s in enumerate(sets):
        plans[i, sorted(s)] = True
    return plans


@torch.no_grad()
def kl_and_nll(bb, plan: torch.Tensor, ids: torch.Tensor, k: int, dense_logp: torch.Tensor, policy: str):
    """Per-token KL to the dense model and NLL of the next token [B, T-1] with one static plan [L]."""
    B, T = ids.shape
    eng = Engine(bb, GivenPlanner(plan), policy)
    cache = eng.new_cache(B, T)
    h, _ = eng.forward(ids, cache, k)
    logp = torch.log_softmax(bb.head(h).float(), dim=-1)[:, :-1]
    kl = (dense_logp.exp() * (dense_logp - logp)).sum(-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    return kl, nll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,qwen-coder-0.5b")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--fractions", default="0.5,0.67,0.83", help="layer counts as fractions of the model's depth")
    ap.add_argument("--per-domain", type=int, default=1, help="validation windows per domain")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--band", type=int, default=3)
    ap.add_argument("--span", type=int, default=16)
    ap.add_argument("--policy", default="fill")
    args = ap.parse_args()
    print(f"| model | k | candidates | tokens | prior ppl | best static | per window | per {args.span} tokens | per token "
          "| per-token prior share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        bb = load_backbone(model, dtype=args.dtype)
        L = bb.n_layers
        order = load_calibration(bb, "mix")["orders"]["static-greedy"]
        windows = list(mix_windows(bb.tokenizer, "validation", args.window, args.per_domain).values())
        dense = [torch.log_softmax(bb.dense_logits(w.to(bb.device)).float(), dim=-1)[:, :-1] for w in windows]
        # each predicted token's window and span, in the order the per-token results are concatenated below
        rows = [row for w in windows for row in w]
        per_window = torch.cat([torch.full((len(row) - 1,), i) for i, row in enumerate(rows)])
        span_of = torch.cat([torch.arange(len(row) - 1) // args.span + i * len(row) for i, row in enumerate(rows)])
        span_of = torch.unique(span_of, return_inverse=True)[1]
        for f in (float(x) for x in args.fractions.split(",")):
            k = min(L - 1, max(ALWAYS_ON + 1, round(f * L)))
            plans = candidate_plans(order, L, k, args.band)
            kl, nll = [], []  # [C, N]: per candidate, every predicted token of every window
            for plan in plans:
                per = [kl_and_nll(bb, plan, w.to(bb.device), k, d, args.policy) for w, d in zip(windows, dense)]
                kl.append(torch.cat([x.reshape(-1) for x, _ in per]))
                nll.append(torch.cat([y.reshape(-1) for _, y in per]))
            kl, nll = torch.stack(kl).cpu(), torch.stack(nll).cpu()
            prior = float(nll[0].mean())
            best = int(kl.mean(1).argmin())
            win_kl = torch.zeros(len(plans), len(rows)).index_add_(1, per_window, kl)
            pick_w = win_kl.argmin(0)[per_window]  # [N] the candidate each token's window takes
            span_kl = torch.zeros(len(plans), int(span_of.max()) + 1).index_add_(1, span_of, kl)
            pick_s = span_kl.argmin(0)[span_of]
            pick_t = kl.argmin(0)
            ratio = lambda pick: math.exp(float(nll.gather(0, pick[None])[0].mean()) - prior)  # noqa: E731
            print(f"| {model} | {k} | {len(plans)} | {kl.shape[1]} | {math.exp(prior):.2f} "
                  f"| {math.exp(float(nll[best].mean()) - prior):.3f} | {ratio(pick_w):.3f} | {ratio(pick_s):.3f} "
                  f"| {ratio(pick_t):.3f} "
                  f"| {float((pick_t == 0).float().mean()):.2f} |", flush=True)


if __name__ == "__main__":
    main()
