"""Run in Buddy's main environment (transformers as pinned): tiny Llama and Qwen2 checkpoints, random routers,
their `export --format vllm` directories, and Buddy's own greedy tokens for the asks the vLLM test makes; the
same for the embedded SmolLM2 with its shipped router, when it is installed (`make`).

    .venv/bin/python tests_vllm/make_reference.py OUT_DIR      # writes OUT_DIR/model and OUT_DIR/reference.json
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import save_tiny_checkpoint  # noqa: E402

from buddy.allocation import (  # noqa: E402
    DepthConfig,
    DepthHead,
    depth_levels,
    fit_mu_table,
)
from buddy.backbone import load_backbone  # noqa: E402
from buddy.engine import Engine, router_features  # noqa: E402
from buddy.export import export_vllm  # noqa: E402
from buddy.predictor import BudgetPredictor, PredictorConfig  # noqa: E402
from buddy.router import (  # noqa: E402
    DecisionModule,
    RouterConfig,
    RouterMeta,
    RouterPlanner,
    prior_scores,
)

L, NEW = 8, 8
PROMPTS = [[2 + (7 * i + j) % 90 for j in range(6 + i)] for i in range(3)]  # token ids of the tiny vocabulary
ASKS = [(0, 4, "fill"), (1, 6, "fill"), (2, 8, "fill"), (0, 8, "fill"), (1, 4, "zero"), (2, 5, "zero"), (1, 6, "zero")]
FAMILIES = ("llama", "qwen2")


def main(out: Path) -> None:
    ref = {"n_layers": L, "new_tokens": NEW}
    for family in FAMILIES:
        ref[family] = family_reference(out, family)
    ref["smollm2"] = smollm2_reference(out)
    (out / "reference.json").write_text(json.dumps(ref))


def family_reference(out: Path, family: str) -> list[dict]:
    ckpt = save_tiny_checkpoint(out / f"tiny-{family}", family, n_layers=L, hidden_size=128, intermediate_size=192,
                                # head_dim 64 (vLLM's CPU kernels); llama's one KV head is replicated on two
                                # tensor-parallel ranks, qwen2's two are split over them
                                num_attention_heads=2, num_key_value_heads=1 if family == "llama" else 2)
    bb = load_backbone(str(ckpt), "cpu", "float32")
    cfg = RouterConfig(n_layers=L, kv_dim=2 * bb.shapes.n_kv_heads * bb.shapes.head_dim, hidden_dim=bb.shapes.hidden,
                       width=16, standardize=family == "qwen2")
    torch.manual_seed(0)
    module = DecisionModule(cfg)
    torch.nn.init.normal_(module.fc2.weight, std=1.0)  # a router whose plans differ by token
    if cfg.standardize:  # its input statistics reach vLLM through the export
        module.fit_standardization(*router_features(bb, torch.tensor([PROMPTS[0]]), "fill"))
    module.scale[4], module.scale[5] = 0.5, 0.0  # fitted per-k weights (`--scales`) reach vLLM through the export
    meta = RouterMeta(model=bb.name, checksum=bb.checksum, n_layers=L, kv_policy="fill", budgets=(0.5, 0.9),
                      prior="static-greedy", prior_order=[3, 1, 5, 2, 6, 4], config=vars(cfg), steps=1)
    predictor, depth = random_predictor(bb), random_depth_head(bb)
    for policy in ("fill", "zero"):
        export_vllm(bb, module, meta, out / f"model-{family}-{policy}", default_layers=L, command="test",
                    kv_policy=policy, predictor=predictor if policy == "fill" else None,
                    depth=depth if policy == "fill" else None)
    ref = []
    for p, k, policy in ASKS:
        eng = Engine(bb, RouterPlanner(module, prior_scores(meta.prior_order, L)), policy)
        ids = PROMPTS[p]
        toks = [s.token for s in eng.generate(ids, layers=k, max_new_tokens=NEW, ignore_eos=True)]
        ref.append({"prompt_ids": ids, "layers": k, "kv_policy": policy, "tokens": toks})
    eng = Engine(bb, RouterPlanner(module, prior_scores(meta.prior_order, L)), "fill", predictor=predictor)
    for ids in PROMPTS:  # budget "auto": the predictor picks each prompt's k
        steps = list(eng.generate(ids, budget="auto", max_new_tokens=NEW, ignore_eos=True))
        ref.append({"prompt_ids": ids, "layers": "auto", "kv_policy": "fill", "tokens": [s.token for s in steps],
                    "k": len(steps[0].layers)})
    eng = Engine(bb, RouterPlanner(module, prior_scores(meta.prior_order, L)), "fill", depth=depth)
    for ids, k in zip(PROMPTS, (5, 6, 5)):  # allocation "token": each generated token its own depth
        steps = list(eng.generate(ids, layers=k, max_new_tokens=NEW, ignore_eos=True, allocation="token"))
        ref.append({"prompt_ids": ids, "layers": k, "kv_policy": "fill", "allocation": "token",
                    "tokens": [s.token for s in steps], "depths": [len(s.layers) for s in steps]})
    return ref


def random_depth_head(bb):
    """A depth head whose choices vary by token: random weights, the mu table fitted to its own predictions."""
    levels = depth_levels(L)
    head = DepthHead(DepthConfig(hidden_dim=bb.shapes.hidden, n_layers=L, levels=levels))
    g = torch.Generator().manual_seed(0)
    head.weight.copy_(torch.randn(head.weight.shape, generator=g))
    pred = head(torch.randn(512, 1, bb.shapes.hidden, generator=g))[:, 0]
    head.mu_table.copy_(fit_mu_table(pred, levels, L))
    return head


def random_predictor(bb):
    """A budget predictor whose choice differs between the test prompts (the auto test can fail)."""
    for seed in range(100):
        torch.manual_seed(seed)
        pred = BudgetPredictor(PredictorConfig(kv_dim=2 * bb.shapes.n_kv_heads * bb.shapes.head_dim,
                                               hidden_dim=bb.shapes.hidden, width=16))
        torch.nn.init.normal_(pred.fc2.weight, std=3.0)
        ks = {b.k(L) for b in pred.choose_budgets(bb, PROMPTS, "fill")}
        if len(ks) > 1:
            return pred
    raise RuntimeError("no seed gave prompts different budgets")


SMOLLM2_PROMPTS = ("The capital of France is", "def fibonacci(n):")
SMOLLM2_ASKS = [(0, 15), (1, 23), (0, 30), (1, 30)]  # (prompt, layers)


def smollm2_reference(out: Path) -> dict | None:
    """The embedded model with its shipped fill router, float32: the export and Buddy's greedy tokens."""
    from buddy.api import load, router_dir
    from buddy.backbone.loading import ModelNotFoundError
    from buddy.config import cache_dir
    from buddy.router import load_router

    try:
        m = load("smollm2", device="cpu", dtype="float32")
    except ModelNotFoundError:
        return None
    bb = m.bb
    module, meta = load_router(router_dir(bb, "fill"), checksum=bb.checksum, n_layers=bb.n_layers)
    export_vllm(bb, module, meta, out / "model-smollm2", default_layers=bb.n_layers, command="test", kv_policy="fill")
    asks = []
    for p, k in SMOLLM2_ASKS:
        ids = m.encode(SMOLLM2_PROMPTS[p])
        toks = [s.token for s in m.generate(ids, layers=k, max_new_tokens=NEW, ignore_eos=True)]
        asks.append({"prompt_ids": ids, "layers": k, "tokens": toks})
    return {"n_layers": bb.n_layers, "dense": str(cache_dir() / "models" / "smollm2"), "asks": asks}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
