"""How much of each Decision Module input varies across tokens, as the module sees it?

The Decision Module reads two features per token: the running mean of layer 0's K/V (`kv0`) and the token's
state after layer 0 (`h0`), each through a LayerNorm without affine parameters. If a feature is nearly constant
across tokens (a large bias), the LayerNorm divides by the constant part's scale and the varying part, which is
all that can tell one token's plan from another's, reaches the MLP scaled down to a few percent.

For each model and feature, on training-mix windows (`--per-domain` windows per domain, positions after the
first `--skip`): the share of the feature's energy (mean square, summed over dimensions) that is variance
across tokens, as read raw, after the LayerNorm, and after per-feature standardization then the LayerNorm
(`RouterConfig.standardize`, statistics from the same windows).

    .venv/bin/python research/router_inputs.py --models smollm2,qwen-coder-0.5b
"""

from __future__ import annotations

import argparse

import torch

from buddy.backbone import load_backbone
from buddy.corpus import mix_windows
from buddy.engine import router_features


def varying_share(x: torch.Tensor) -> float:
    """[N, D] -> sum over D of the variance across N, over the sum over D of the mean square."""
    return float(x.var(0).sum() / (x**2).mean(0).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,qwen-coder-0.5b")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--per-domain", type=int, default=2)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--skip", type=int, default=8, help="leading positions left out (the running mean settles)")
    args = ap.parse_args()
    print("| model | feature | raw | LayerNorm | standardized + LayerNorm |")
    print("|---|---|---|---|---|")
    for model in args.models.split(","):
        bb = load_backbone(model, dtype=args.dtype)
        feats: dict[str, list[torch.Tensor]] = {"kv0": [], "h0": []}
        for windows in mix_windows(bb.tokenizer, "train", args.window, args.per_domain).values():
            kv0, h0 = router_features(bb, windows.to(bb.device), "fill")
            feats["kv0"].append(kv0[:, args.skip:].reshape(-1, kv0.shape[-1]).float().cpu())
            feats["h0"].append(h0[:, args.skip:].reshape(-1, h0.shape[-1]).float().cpu())
        for name, parts in feats.items():
            x = torch.cat(parts)
            ln = torch.nn.functional.layer_norm(x, x.shape[-1:])
            z = torch.nn.functional.layer_norm((x - x.mean(0)) / x.std(0).clamp_min(1e-6), x.shape[-1:])
            print(f"| {model} | {name} | {varying_share(x):.4f} | {varying_share(ln):.4f} | {varying_share(z):.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
