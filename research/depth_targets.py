"""Which targets should the depth head of allocation="token" learn? Two alternatives to `buddy train depth`'s.

    .venv/bin/python research/depth_targets.py --mode mixed --passes 6 --out runs/depth-smollm2-mixed   # 5 min
    .venv/bin/python research/depth_targets.py --mode smooth --alphas 0,0.3,0.6 --out runs/depth-smollm2-smooth
    .venv/bin/python research/depth_span.py --depth DIR1,DIR2,... --spans 4 --targets 15,19,26     # judge them

`buddy train depth` records each token's NLL with the whole window at one level, for every level, so a
token's target at a shallow level includes what a shallow context costs it.
- `mixed`: what a token loses at a level while its neighbours run near k. Each training window runs
  `--passes` times with random per-token levels: a centre c per window (uniform over the integer counts
  between the end levels), each token a level drawn uniformly among the levels within the span of c. Each
  token's NLL counts for the level it ran at; the ridge regression is fitted per level on those tokens.
- `smooth`: the whole-window tables, with each token's target at a level mixed with the mean NLL of the next
  `--ahead` tokens at that level: (1 - alpha) * own + alpha * ahead (alpha 0 is `buddy train depth`'s head),
  so that a token whose shallow run goes with a costly stretch after it is kept deep. One head per alpha,
  written to OUT-a<alpha>. (`buddy train depth --ahead-weight A --ahead N` fits the same head.)
Same windows, features, ridge and mu fit as `buddy train depth` (with the shipped head's levels, span and
horizon); `research/depth_span.py --depth DIR` judges each end to end on the validation split.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buddy.allocation import DepthHead, DepthMeta, fit_mu_table, fit_ridge, save_depth  # noqa: E402
from buddy.api import load  # noqa: E402
from buddy.artifacts import git_commit  # noqa: E402
from buddy.corpus import describe, mix_windows  # noqa: E402
from buddy.engine import layer0  # noqa: E402
from buddy.eval.ppl import token_nll  # noqa: E402
from buddy.train.depth import DepthTrainConfig, fit_targets, tables  # noqa: E402


@torch.inference_mode()
def mixed_tables(engine, windows, levels, span, passes, cfg, seed=0):
    """(features [N, H+1], level index [P, N], NLL [P, N]) over `passes` random per-token level draws."""
    g = torch.Generator().manual_seed(seed)
    ks = torch.tensor(levels)
    feats, idx, nlls = [], [], []
    for s in tqdm(range(0, windows.shape[0], cfg.batch_size), desc="mixed tables", unit="batch"):
        ids = windows[s:s + cfg.batch_size].to(engine.bb.device)
        B, T = ids.shape
        _, h0, _ = layer0(engine.bb, ids, engine.kv_policy)
        feats.append(DepthHead.features(h0[:, cfg.prefill:-1]).reshape(-1, h0.shape[-1] + 1).cpu())
        pi, pn = [], []
        for _ in range(passes):
            c = torch.randint(levels[0] + 1, levels[-1], (B,), generator=g)
            allowed = (ks[None] - c[:, None]).abs() <= span  # [B, n_levels]
            w = allowed.float()[:, None, :].expand(B, T - cfg.prefill, len(levels)).reshape(-1, len(levels))
            j = torch.multinomial(w, 1, generator=g).view(B, T - cfg.prefill)
            depth = torch.cat([c[:, None].expand(B, cfg.prefill), ks[j]], dim=1)
            cache = engine.new_cache(B, T)
            h1, _ = engine.forward(ids[:, :cfg.prefill], cache, depth[:, :cfg.prefill])
            h2, _ = engine.forward(ids[:, cfg.prefill:], cache, depth[:, cfg.prefill:])
            logits = engine.bb.head(torch.cat([h1, h2], dim=1))
            pn.append(token_nll(logits, ids)[:, cfg.prefill:].reshape(-1).float().cpu())
            pi.append(j[:, :-1].reshape(-1))
        idx.append(torch.stack(pi))
        nlls.append(torch.stack(pn))
    return torch.cat(feats), torch.cat(idx, dim=1), torch.cat(nlls, dim=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mode", choices=("mixed", "smooth"), default="mixed")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--passes", type=int, default=6, help="mixed: random level draws per window")
    ap.add_argument("--alphas", default="0,0.3,0.6", help="smooth: weights of the tokens ahead")
    ap.add_argument("--ahead", type=int, default=8, help="smooth: how many tokens ahead")
    ap.add_argument("--tables", help="smooth: a .pt file that keeps the training tables (read if it exists)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    commit = git_commit()
    eng = load(args.model, dtype=args.dtype)  # the shipped router and depth head (its levels, span, horizon)
    if eng.depth is None:
        raise SystemExit(f"{args.model} ships no depth head to take the levels from")
    cfg = DepthTrainConfig(windows=args.windows)
    train = mix_windows(eng.tokenizer, "train", cfg.window, cfg.windows)
    levels = list(eng.depth.cfg.levels)
    command = "research/depth_targets.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    data = (f"training mix (buddy/corpus.py), {cfg.window}-token windows, first {cfg.prefill} as the prompt, "
            f"mode {args.mode}: {describe(train)}")

    def save(x, weight, out, ahead=0, ahead_weight=0.0):
        head = DepthHead(eng.depth.cfg)
        head.weight.copy_(weight)
        head.mu_table.copy_(fit_mu_table(x @ head.weight, levels, eng.n_layers))
        meta = DepthMeta(model=eng.bb.name, checksum=eng.bb.checksum, n_layers=eng.n_layers,
                         kv_policy=eng.kv_policy, router=eng.planner.name, config=asdict(head.cfg),
                         ridge=cfg.ridge, ahead=ahead, ahead_weight=ahead_weight, data=data, command=command,
                         git_commit=commit)
        save_depth(head, meta, Path(out))
        print(f"wrote {out}")

    if args.mode == "mixed":
        x, idx, y = mixed_tables(eng, torch.cat(list(train.values())), levels, eng.depth.cfg.span, args.passes, cfg)
        w = torch.zeros(x.shape[1], len(levels))
        for j in range(len(levels)):
            m = idx == j  # [P, N]
            w[:, j] = fit_ridge(x[m.nonzero()[:, 1]], y[m][:, None], cfg.ridge)[:, 0]
            print(f"level {levels[j]}: {int(m.sum())} tokens, mean NLL {float(y[m].mean()):.3f}")
        save(x, w, args.out)
        return
    if args.tables and Path(args.tables).is_file():
        x, y = torch.load(args.tables, weights_only=True)
    else:
        x, y = tables(eng, torch.cat(list(train.values())), levels, cfg, "train tables")
        if args.tables:
            torch.save((x, y), args.tables)
    for a in (float(v) for v in args.alphas.split(",")):
        c = replace(cfg, ahead=args.ahead, ahead_weight=a)
        save(x, fit_ridge(x, fit_targets(y, c), cfg.ridge), f"{args.out}-a{a:g}", args.ahead if a else 0, a)


if __name__ == "__main__":
    main()
