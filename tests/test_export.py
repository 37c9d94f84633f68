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
