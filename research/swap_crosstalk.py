"""How much of the swap estimator's per-token signal is the token's own swap?

The router's `swap` estimator (buddy/train/router.py) swaps one kept and one dropped layer at every token in one
parallel forward, and credits token t's KL change to token t's swap. Under KV policies where a token's plan
changes the K/V that later tokens read (`fill`), token t's KL change also holds the effects of every earlier
token's swap (noise on the label), and leaves out the effect of t's own swap on later tokens (a bias).

For each model, on training-mix windows at the prior's plan (static-greedy order of the mix calibration), with
budgets drawn as in training: the same swaps (a, c) are measured twice at every `--every`-th position
(positions `--skip` and later):
- dense: every token swapped (what training measures);
- sparse: only every `--every`-th token swapped, so token t's KL change is (nearly) its own.
It prints the correlation of the two gains and how often their signs agree (the label the ranking loss uses),
and, in the sparse forward, the share of a swap's total effect (own token plus the next `--every` - 1 tokens)
that falls on later tokens. A third forward per swapped position swaps that token alone: its KL change summed
over the token and every later one is the swap's total effect, and the last columns give how often each label's
sign agrees with it (in brackets: weighted by the total effect's size): the dense per-token label (training's default), the sparse label summed over the token and
the next `--every` - 1 (`--swap-every`), and the isolated swap's own token.

    .venv/bin/python research/swap_crosstalk.py --models smollm2,qwen-coder-0.5b
"""

from __future__ import annotations

import argparse

import torch

from buddy.backbone import load_backbone
from buddy.calibration import load_calibration
from buddy.corpus import mix_windows
from buddy.engine import Engine
from buddy.planner import GivenPlanner
from buddy.router import prior_scores
from buddy.train.router import swap_plans


def kl_per_token(bb, plan, ids, k, dense_logp, policy):
    eng = Engine(bb, GivenPlanner(plan), policy)
    cache = eng.new_cache(ids.shape[0], ids.shape[1])
    h, _ = eng.forward(ids, cache, k)
    logp = torch.log_softmax(bb.head(h).float(), dim=-1)
    return (dense_logp.exp() * (dense_logp - logp)).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,qwen-coder-0.5b")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--per-domain", type=int, default=1)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--every", type=int, default=16)
    ap.add_argument("--skip", type=int, default=8)
    ap.add_argument("--band", type=int, default=3)
    ap.add_argument("--budgets", default="0.5:0.9")
    ap.add_argument("--policy", default="fill")
    args = ap.parse_args()
    lo_f, hi_f = (float(x) for x in args.budgets.split(":"))
    print("| model | tokens | corr(dense, sparse) | sign agreement | later tokens' share of a swap's effect "
          "| sign vs total: dense per-token | sparse window | isolated own |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        bb = load_backbone(model, dtype=args.dtype)
        L = bb.n_layers
        prior = prior_scores(load_calibration(bb, "mix")["orders"]["static-greedy"], L)
        gd, gs, own, later, total, win, iso = [], [], [], [], [], [], []
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for windows in mix_windows(bb.tokenizer, "train", args.window, args.per_domain).values():
                ids = windows.to(bb.device)
                B, T = ids.shape
                k = torch.randint(round(lo_f * L), min(round(hi_f * L), L - 1) + 1, (B,), generator=gen)
                scores = prior.expand(B, T, -1).clone()
                plan, swapped, a, c, valid = swap_plans(scores, k, args.band, gen)
                pick = torch.zeros(B, T, dtype=torch.bool)
                pick[:, args.skip::args.every] = True
                pick &= valid
                sparse = plan.clone()
                sparse[pick] = swapped[pick]
                dense_logp = torch.log_softmax(bb.dense_logits(ids).float(), dim=-1)
                base = kl_per_token(bb, plan, ids, k, dense_logp, args.policy)
                d_all = base - kl_per_token(bb, swapped, ids, k, dense_logp, args.policy)
                d_sp = base - kl_per_token(bb, sparse, ids, k, dense_logp, args.policy)
                gd.append(d_all[pick])
                gs.append(d_sp[pick])
                for b, t in pick.nonzero().tolist():
                    own.append(float(d_sp[b, t].abs()))
                    later.append(float(d_sp[b, t + 1:t + args.every].abs().sum()))
                    win.append(float(d_sp[b, t:t + args.every].sum()))
                    alone = plan[b:b + 1].clone()
                    alone[0, t] = swapped[b, t]
                    d_one = base[b:b + 1] - kl_per_token(bb, alone, ids[b:b + 1], k[b:b + 1], dense_logp[b:b + 1],
                                                         args.policy)
                    total.append(float(d_one[0, t:].sum()))
                    iso.append(float(d_one[0, t]))
        x, y = torch.cat(gd), torch.cat(gs)
        corr = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
        agree = float(((x > 0) == (y > 0)).float().mean())
        share = sum(later) / max(sum(later) + sum(own), 1e-12)
        tot = torch.tensor(total)

        def vs_total(label) -> str:  # plain share, and weighted by the size of the total effect
            ok = ((torch.as_tensor(label) > 0) == (tot > 0)).float()
            return f"{float(ok.mean()):.3f} ({float((ok * tot.abs()).sum() / tot.abs().sum()):.3f})"

        print(f"| {model} | {x.numel()} | {corr:.3f} | {agree:.3f} | {share:.3f} | {vs_total(x)} "
              f"| {vs_total(win)} | {vs_total(iso)} |", flush=True)


if __name__ == "__main__":
    main()
