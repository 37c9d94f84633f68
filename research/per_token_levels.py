"""Would choosing the budget level per token (instead of per prompt) beat fixed budgets on SOTU perplexity?

    .venv/bin/python benchmarks/per_token_levels.py            # about 12 min on a 2-core CPU

A probe, not a feature. On SOTU training windows it records every token's next-token NLL at each budget level
(one routed run per level, 512-token windows with a 128-token prompt as in `ppl-sotu`) and the token's state
after layer 0 (the router's own input). A ridge regression from that state predicts the per-token NLL at
each level; a token then takes the level minimising predicted NLL + mu * k, with mu set on the training
windows so that the mean layer count hits a target. On the validation windows (never the test split) it
prints, per target:
- `table`: the NLL the choices would get if each token scored as in the fixed run of its level (ignores that
  a token's depth changes the KV that later tokens read);
- `end to end`: the real routed run with per-token layer counts (every token's plan = the router's plan at
  the token's own level, KV policy fill);
- `fixed`: fixed budgets at the same mean, interpolated in log-ppl between the two neighbouring integer k;
- `oracle`: the best per-token choice on the table at the same mean (uses the answers; an upper bound).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buddy.api import load  # noqa: E402
from buddy.budget import Budget  # noqa: E402
from buddy.data import sotu_texts, token_windows  # noqa: E402
from buddy.eval.ppl import evaluate_windows, token_nll, window_logits  # noqa: E402
from buddy.predictor import DEFAULT_LEVELS  # noqa: E402

WINDOW, PREFILL, BATCH = 512, 128, 4


def features(h0):
    h = torch.nn.functional.layer_norm(h0.float(), h0.shape[-1:])
    return torch.cat([h, torch.ones(*h.shape[:-1], 1)], dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--train-windows", type=int, default=96)
    ap.add_argument("--val-windows", type=int, default=32)
    ap.add_argument("--targets", default="19,22,26", help="mean layer counts to compare at")
    ap.add_argument("--ridge", type=float, default=10.0)
    args = ap.parse_args()
    try:
        targets = [float(t) for t in args.targets.split(",")]
    except ValueError:
        ap.error(f"invalid --targets {args.targets!r}: use mean layer counts such as 19,22,26")
    if min(args.train_windows, args.val_windows) < 1:
        ap.error("--train-windows and --val-windows must be >= 1")
    torch.manual_seed(0)
    eng = load(args.model)
    L = eng.n_layers
    ks = torch.tensor(sorted({Budget(fraction=x).k(L) for x in DEFAULT_LEVELS}))
    if not all(ks[0] < t < ks[-1] for t in targets):
        ap.error(f"invalid --targets {args.targets!r}: each must lie between the levels' {int(ks[0])} and {int(ks[-1])} layers")
    route = eng.planner.plan
    seen = []

    def recording(h0, cache, k):
        seen.append(h0.float().clone())
        return route(h0, cache, k)

    def tables(split, n):
        windows = token_windows(eng.tokenizer, sotu_texts(split), WINDOW, n)
        nll, feats = torch.zeros(len(windows), WINDOW - 1, len(ks)), []
        for s in tqdm(range(0, len(windows), BATCH), desc=f"{split} tables", unit="batch"):
            ids = windows[s:s + BATCH]
            for j, k in enumerate(ks.tolist()):
                seen.clear()
                nll[s:s + BATCH, :, j] = token_nll(window_logits(eng, ids, k, PREFILL)[0], ids)
                if j == 0:
                    feats.append(features(torch.cat(seen, dim=1)[:, :-1]))
        return windows, nll, torch.cat(feats)

    eng.planner.plan = recording
    _, y_tr, x_tr = tables("train", args.train_windows)
    windows, y_va, x_va = tables("validation", args.val_windows)
    eng.planner.plan = route
    x, y = x_tr.reshape(-1, x_tr.shape[-1]), y_tr.reshape(-1, len(ks))
    w = torch.linalg.solve(x.T @ x + args.ridge * torch.eye(x.shape[1]), x.T @ y)
    pred_tr = x @ w

    def mu_for(score, target):  # bisection: larger mu -> fewer layers
        lo, hi = 0.0, 10.0
        for _ in range(60):
            mu = (lo + hi) / 2
            lo, hi = (mu, hi) if ks[(score + mu * ks).argmin(-1)].float().mean() > target else (lo, mu)
        return mu

    def per_token(mu):
        def plan(h0, cache, k):
            level = (features(h0) @ w + mu * ks).argmin(-1)  # [B, T] index into ks
            plans = torch.stack([route(h0, cache, int(kk)) for kk in ks])  # [levels, B, T, L]
            return plans.gather(0, level[None, ..., None].expand(1, *plans.shape[1:]))[0]
        return plan

    def run(k, plan=None):  # (mean NLL, layers per token) on the validation windows
        eng.planner.plan = plan or route
        r = evaluate_windows(eng, windows, layers=k, batch_size=BATCH, prefill=PREFILL)
        eng.planner.plan = route
        return r.nll, r.layers_per_token

    y_flat, x_va = y_va.reshape(-1, len(ks)), x_va.reshape(-1, x.shape[1])
    print(f"\n{args.model}: levels k = {ks.tolist()}, {args.train_windows} training / {args.val_windows} validation "
          f"SOTU windows, ridge {args.ridge}")
    print("| target mean k | table: layers, ppl | end to end: layers, ppl | fixed at the same layers | "
          "end to end vs fixed | oracle (table) |")
    print("|---|---|---|---|---|---|")
    fixed_cache: dict[int, float] = {int(k): float(y_va[..., j].mean()) for j, k in enumerate(ks.tolist())}
    for target in targets:
        mu = mu_for(pred_tr, target)
        choice = (x_va @ w + mu * ks).argmin(-1)
        t_layers = float(ks[choice].float().mean())
        t_nll = float(y_flat.gather(1, choice[:, None]).mean())
        e_nll, e_layers = run(L, per_token(mu))
        lo, hi = math.floor(e_layers), math.ceil(e_layers)
        for k in {lo, hi} - set(fixed_cache):
            fixed_cache[k] = run(k)[0]
        f_nll = float(np.interp(e_layers, [lo, hi + 1e-9], [fixed_cache[lo], fixed_cache[hi]]))
        o_choice = (y_flat + mu_for(y_flat, t_layers) * ks).argmin(-1)
        o_nll = float(y_flat.gather(1, o_choice[:, None]).mean())
        print(f"| {target:g} | {t_layers:.2f}, {math.exp(t_nll):.2f} | {e_layers:.2f}, {math.exp(e_nll):.2f} | "
              f"{math.exp(f_nll):.2f} | {100 * (math.exp(e_nll - f_nll) - 1):+.1f}% | {math.exp(o_nll):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
