"""Does averaging two routers' weights beat either? Validation split of the training mix, per layer count.

    .venv/bin/python research/router_average.py --a buddy/data/routers/smollm2-fill \
        --b runs/router-smollm2-mix-fill-cont/state.pt --weights 0,0.5,1 --windows 4 --layers 15,21,24,27

`--a` is a router directory; `--b` is another router directory, or a training state (`state.pt`: its latest
weights). Both must share the shape and the prior. For each weight w it validates the router with weights
(1 - w) * a + w * b (w = 0 is `a`, 1 is `b`) and the prior alone: exp of the mean over domains of the mean NLL,
and the worst domain's ratio to the prior. Validation only: judge a choice on the test split.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from buddy.artifacts import load_state
from buddy.backbone import load_backbone
from buddy.corpus import mix_windows
from buddy.engine import Engine
from buddy.eval.ppl import evaluate_windows
from buddy.router import DecisionModule, RouterPlanner, load_router, prior_scores


def weights_of(path: str, bb, prior_order: list[int]) -> dict:
    """A router directory's or a training state's weights (a state's own prior is checked when it is resumed)."""
    p = Path(path)
    if p.is_file():
        return load_state(p, bb.device)["module"]
    module, meta = load_router(p, checksum=bb.checksum, n_layers=bb.n_layers)
    if list(meta.prior_order) != list(prior_order):
        raise SystemExit(f"{path} was trained with another prior than --a: their weights do not average")
    return module.state_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--weights", default="0,0.5,1")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--layers", default="15,21,24,27")
    ap.add_argument("--kv-policy", default="fill")
    args = ap.parse_args()
    bb = load_backbone(args.model, "cpu", args.dtype)
    a_mod, meta = load_router(Path(args.a), checksum=bb.checksum, n_layers=bb.n_layers)
    wa, wb = a_mod.state_dict(), weights_of(args.b, bb, meta.prior_order)
    prior = prior_scores(meta.prior_order, bb.n_layers)
    ks = [int(x) for x in args.layers.split(",")]
    val = mix_windows(bb.tokenizer, "validation", 256, args.windows)

    def validate(module, use_router=True):
        eng = Engine(bb, RouterPlanner(module, prior, use_router=use_router), args.kv_policy)
        return {d: {k: evaluate_windows(eng, w, layers=k, batch_size=4).nll for k in ks} for d, w in val.items()}

    base = validate(a_mod, use_router=False)
    print("| router | " + " | ".join(f"k={k}" for k in ks) + " | worst domain / prior |")
    print("|---|" + "---|" * (len(ks) + 1))

    def row(name, res):
        cells = [f"{math.exp(sum(res[d][k] for d in res) / len(res)):.2f}" for k in ks]
        worst = max((math.exp(res[d][k] - base[d][k]), d, k) for d in res for k in ks)
        print(f"| {name} | " + " | ".join(cells) + f" | {worst[0]:.3f} ({worst[1]}, k={worst[2]}) |", flush=True)

    row("prior", base)
    for w in (float(x) for x in args.weights.split(",")):
        module = DecisionModule(a_mod.cfg)
        mixed = {n: (1 - w) * wa[n].float() + w * wb.get(n, wa[n]).float() if wa[n].is_floating_point() else wa[n]
                 for n in wa}
        module.load_state_dict({n: v.to(wa[n].dtype) for n, v in mixed.items()})
        module.scale.fill_(1.0)  # a fitted per-k weight belongs to the weights it was fitted for
        with torch.no_grad():
            row(f"w={w:g}", validate(module))


if __name__ == "__main__":
    main()
