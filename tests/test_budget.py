"""Budget parsing, validation and exact layer counts; planners keep exactly k layers with the always-on ones."""

import math

import pytest
import torch

from buddy.budget import Budget, BudgetError, as_budget, parse_fraction, parse_layers
from buddy.planner import FullPlanner, StaticPlanner, plan_table, topk_plan


@pytest.mark.parametrize("b,k", [(1.0, 30), (0.5, 15), (0.75, 23), (0.7, 21), (0.01, 2), (1, 30), (0.9, 27)])
def test_fraction_to_k(b, k):
    assert Budget(fraction=b).k(30) == k


@pytest.mark.parametrize("text", ["0", "-0.5", "1.01", "nan", "NaN", "inf", "abc", "", "0.5x"])
def test_bad_fractions_are_rejected_with_the_value(text):
    with pytest.raises(BudgetError) as e:
        parse_fraction(text)
    assert repr(text) in str(e.value) or text in str(e.value)
    assert "(0, 1]" in str(e.value)


@pytest.mark.parametrize("text", ["1", "0", "-3", "2.5", "x"])
def test_bad_layer_counts_are_rejected(text):
    with pytest.raises(BudgetError):
        parse_layers(text)


def test_layer_count_above_model_depth():
    with pytest.raises(BudgetError, match=r"\[2, 30\]"):
        parse_layers("31").k(30)
    assert parse_layers("30").k(30) == 30 and parse_layers("2").k(30) == 2


def test_api_budget_forms():
    assert as_budget(None).k(24) == 24
    assert as_budget(0.5).k(24) == 12
    assert as_budget(layers=7).k(24) == 7
    with pytest.raises(BudgetError):
        as_budget(0.5, layers=3)
    with pytest.raises(BudgetError):
        as_budget(True)
    with pytest.raises(BudgetError):
        Budget(fraction=math.nan)


def test_plan_table_exact_k_and_always_on():
    order = [3, 1, 4, 2, 5, 6]
    t = plan_table(order, 8)
    for k in range(2, 9):
        assert int(t[k].sum()) == k and t[k, 0] and t[k, 7]
        assert set(t[k].nonzero().flatten().tolist()) == {0, 7, *order[: k - 2]}
    with pytest.raises(ValueError):
        plan_table([1, 2, 2, 4, 5, 6], 8)


def test_topk_plan_exact_k_per_row_and_token():
    scores = torch.randn(3, 5, 10)
    k = torch.tensor([2, 7, 12])
    plan = topk_plan(scores, k)
    assert plan.shape == (3, 5, 12)
    assert (plan.sum(-1) == k[:, None]).all()
    assert plan[..., 0].all() and plan[..., -1].all()


def test_static_planner_per_row_budgets():
    p = StaticPlanner("static-greedy", [4, 3, 2, 1], 6)
    plan = p.plan(torch.zeros(2, 3, 8), None, [3, 5])
    assert plan.sum(-1).tolist() == [[3, 3, 3], [5, 5, 5]]
    assert plan[0, 0].nonzero().flatten().tolist() == [0, 4, 5]


def test_full_planner_refuses_partial_budget():
    with pytest.raises(BudgetError, match="static-greedy"):
        FullPlanner(6).check(4, 6)


def test_cost_model_against_hand_counts():
    from buddy.budget import (
        CostShapes,
        decode_cost,
        ideal_speedup,
        kv_only_params,
        layer_params,
    )

    s = CostShapes(n_layers=4, hidden=8, intermediate=16, n_heads=2, n_kv_heads=1, head_dim=4, vocab=10)
    # q 8x8, k 8x4, v 8x4, o 8x8, mlp 3 x 8x16, 2 norms of 8
    assert layer_params(s) == 64 + 32 + 32 + 64 + 384 + 16
    assert kv_only_params(s) == 8 + 32 + 32
    c = decode_cost(s, 4, context=5, dtype_bytes=2)
    assert c["weight_bytes"] == 2 * (8 + 4 * 592 + 8 + 80)
    assert c["flops"] == 2 * (4 * 576 + 80) + 4 * (4 * 2 * 4 * 5)
    assert c["kv_bytes"] == 4 * 2 * 4 * 5 * 2
    half = decode_cost(s, 2, kv_policy="fill", dtype_bytes=1)
    assert half["weight_bytes"] == 8 + 2 * 592 + 2 * 72 + 8 + 80
    assert ideal_speedup(s, 4) == 1.0
    assert ideal_speedup(s, 2, "mask") == pytest.approx((16 + 4 * 592 + 80) / (16 + 2 * 592 + 80))
    assert ideal_speedup(s, 2, "fill") < ideal_speedup(s, 2, "mask")
    biased = CostShapes(**{**s.__dict__, "qkv_bias": True})
    assert layer_params(biased) - layer_params(s) == 8 + 4 + 4


def test_cost_model_on_smollm2_shapes():
    from buddy.budget import CostShapes, decode_cost, ideal_speedup

    s = CostShapes(n_layers=30, hidden=576, intermediate=1536, n_heads=9, n_kv_heads=3, head_dim=64, vocab=49152)
    dense = decode_cost(s, 30, dtype_bytes=4)
    assert 134e6 < dense["weight_bytes"] / 4 < 136e6  # SmolLM2-135M with its tied embedding read once per token
    assert 1.3 < ideal_speedup(s, 15) < 2.0  # the LM head is a large fixed cost at this size
