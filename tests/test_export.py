"""`buddy export`: a plain transformers checkpoint whose logits equal Buddy's static plan at that k."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_checkpoint

from buddy.backbone import load_backbone
from buddy.engine import Engine
from buddy.export import ExportError, export_checkpoint, kept_layers
from buddy.planner import StaticPlanner

ORDER = [3, 1, 4, 2]  # intermediate layers of a 6-layer model, most important first


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [3, 5])
def test_export_logits_equal_static_plan(tmp_path, model_type, k):
    from transformers import AutoModelForCausalLM

    bb = load_backbone(str(save_tiny_checkpoint(tmp_path / "src", model_type)), "cpu", "float32")
    keep = kept_layers(ORDER, bb.n_layers, k)
    assert len(keep) == k and keep[0] == 0 and keep[-1] == bb.n_layers - 1
    out = export_checkpoint(bb, keep, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == k
    ids = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    for policy in ("fill", "mask"):
        ours, _ = Engine(bb, StaticPlanner("s", ORDER, bb.n_layers), policy).logits(ids, layers=k)
        assert torch.allclose(ours, ref, atol=1e-4)
    gen = hf.generate(ids[:1], max_new_tokens=4, do_sample=False)
    steps = [s.token for s in Engine(bb, StaticPlanner("s", ORDER, bb.n_layers)).generate(
        ids[0].tolist(), layers=k, max_new_tokens=4, ignore_eos=True)]
    assert gen[0, 12:].tolist() == steps
    assert json.loads((out / "buddy-export.json").read_text())["kept_layers"] == keep
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(bb, keep, out)


@pytest.mark.integration
def test_cli_export_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import buddy

    out = tmp_path / "k20"
    r = subprocess.run([sys.executable, "-m", "buddy", "export", "--layers", "20", "--dtype", "float32", "--out",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    m = buddy.load("smollm2", planner="static-greedy", dtype="float32", device="cpu")
    ours, _ = m.logits(ids, layers=20)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits.float(), ours, atol=1e-3)
    r = subprocess.run([sys.executable, "-m", "buddy", "export", "--layers", "20", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "not empty" in r.stderr


def test_vllm_export_holds_the_model_router_and_budget_settings(tiny_ckpt, tmp_path, capsys):
    import json

    import torch
    from safetensors.torch import load_file

    from buddy.backbone import load_backbone
    from buddy.cli import main
    from buddy.router import DecisionModule, RouterConfig, RouterMeta, save_router

    bb = load_backbone(str(tiny_ckpt), "cpu", "float32")
    cfg = RouterConfig(n_layers=6, kv_dim=64, hidden_dim=64, width=8)
    meta = RouterMeta(model="tiny", checksum=bb.checksum, n_layers=6, kv_policy="fill", budgets=(0.5, 0.9),
                      prior="static-greedy", prior_order=[3, 1, 4, 2], config=vars(cfg))
    module = DecisionModule(cfg)
    save_router(module, meta, tmp_path / "router")
    base = ["export", "--format", "vllm", "--model", str(tiny_ckpt), "--dtype", "float32", "--router",
            str(tmp_path / "router")]
    with pytest.warns(UserWarning, match="trained for kv policy 'fill', not 'zero'"):  # exported as asked
        assert main(base + ["--layers", "4", "--kv-policy", "zero", "--out", str(tmp_path / "v")]) == 0
    c = json.loads((tmp_path / "v" / "config.json").read_text())
    assert c["architectures"] == ["BuddyLlamaForCausalLM"] and c["model_type"] == "llama"
    b = c["buddy"]
    assert b["prior_order"] == [3, 1, 4, 2] and b["kv_policy"] == "zero" and b["default_layers"] == 4
    assert RouterConfig(**b["router"]) == cfg
    w = load_file(tmp_path / "v" / "buddy_router.safetensors")
    assert set(w) == {f"buddy_router.{k}" for k in module.state_dict()}
    assert torch.equal(w["buddy_router.fc1.weight"], module.fc1.weight)
    assert (tmp_path / "v" / "model.safetensors").is_file() and (tmp_path / "v" / "tokenizer.json").is_file()
    assert main(base + ["--out", str(tmp_path / "w")]) == 0
    assert json.loads((tmp_path / "w" / "config.json").read_text())["buddy"]["default_layers"] == 6  # all layers
    assert main(base + ["--default-budget", "0.5", "--out", str(tmp_path / "d")]) == 0  # the vLLM spelling
    assert json.loads((tmp_path / "d" / "config.json").read_text())["buddy"]["default_layers"] == 3
    assert "predictor" not in json.loads((tmp_path / "d" / "config.json").read_text())["buddy"]
    # with a budget predictor (budget "auto" inside vLLM): its config and float32 tensors ride along
    from buddy.predictor import (
        BudgetPredictor,
        PredictorConfig,
        PredictorMeta,
        save_predictor,
    )

    pred = BudgetPredictor(PredictorConfig(kv_dim=64, hidden_dim=64, width=8))
    save_predictor(pred, PredictorMeta(model="tiny", checksum=bb.checksum, config=vars(pred.cfg), tradeoff=1.0),
                   tmp_path / "pred")
    assert main(base + ["--predictor", str(tmp_path / "pred"), "--out", str(tmp_path / "p")]) == 0
    bp = json.loads((tmp_path / "p" / "config.json").read_text())["buddy"]["predictor"]
    assert PredictorConfig(**bp) == pred.cfg
    w = load_file(tmp_path / "p" / "buddy_router.safetensors")
    assert {k for k in w if k.startswith("buddy_predictor.")} == {f"buddy_predictor.{k}" for k in pred.state_dict()}
    assert w["buddy_predictor.fc1.weight"].dtype == torch.float32
    # with a depth head (allocation "token" inside vLLM): the same
    from buddy.allocation import (
        DepthConfig,
        DepthHead,
        DepthMeta,
        fit_mu_table,
        save_depth,
    )

    head = DepthHead(DepthConfig(hidden_dim=64, n_layers=6, levels=(2, 3, 4, 6)))
    head.weight.normal_()
    head.mu_table.copy_(fit_mu_table(torch.randn(100, 4), [2, 3, 4, 6], 6))
    save_depth(head, DepthMeta(model="tiny", checksum=bb.checksum, n_layers=6, kv_policy="fill", router="x",
                               config=vars(head.cfg)), tmp_path / "depth")
    assert main(base + ["--depth", str(tmp_path / "depth"), "--out", str(tmp_path / "q")]) == 0
    bd = json.loads((tmp_path / "q" / "config.json").read_text())["buddy"]
    assert DepthConfig(**bd["depth"]) == head.cfg and "predictor" not in bd
    w = load_file(tmp_path / "q" / "buddy_router.safetensors")
    assert torch.equal(w["buddy_depth.weight"], head.weight) and "buddy_depth.mu_table" in w
    capsys.readouterr()
    with pytest.raises(SystemExit):  # vLLM's attention kernel has no per-position mask
        main(base + ["--kv-policy", "mask", "--out", str(tmp_path / "x")])


def test_vllm_export_keeps_the_router_float32_in_a_bfloat16_model(tiny_ckpt, tmp_path):
    """A standardized router's input means (145 for Qwen2.5's pooled keys) would lose in bfloat16 the variation
    the router reads, and its top-k would differ from Buddy's float32 engine: the export keeps float32."""
    import torch
    from safetensors.torch import load_file

    from buddy.backbone import load_backbone
    from buddy.cli import main
    from buddy.router import DecisionModule, RouterConfig, RouterMeta, save_router

    bb = load_backbone(str(tiny_ckpt), "cpu", "float32")
    cfg = RouterConfig(n_layers=6, kv_dim=64, hidden_dim=64, width=8, standardize=True)
    module = DecisionModule(cfg)
    module.fit_standardization(145 + 0.05 * torch.randn(100, 64), torch.randn(100, 64))
    meta = RouterMeta(model="tiny", checksum=bb.checksum, n_layers=6, kv_policy="fill", budgets=(0.5, 0.9),
                      prior="static-greedy", prior_order=[3, 1, 4, 2], config=vars(cfg))
    save_router(module, meta, tmp_path / "router")
    assert main(["export", "--format", "vllm", "--model", str(tiny_ckpt), "--dtype", "bfloat16", "--router",
                 str(tmp_path / "router"), "--out", str(tmp_path / "v")]) == 0
    w = load_file(tmp_path / "v" / "buddy_router.safetensors")
    assert all(v.dtype == torch.float32 for v in w.values())
    assert torch.equal(w["buddy_router.mu_kv"], module.mu_kv) and torch.equal(w["buddy_router.sd_kv"], module.sd_kv)
