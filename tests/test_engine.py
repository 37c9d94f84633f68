"""Engine invariants on tiny random models: full budget == transformers; cached decode == parallel forward."""

import pytest
import torch
from conftest import random_plans, tiny_backbone

from buddy.config import KV_POLICIES
from buddy.engine import Engine
from buddy.planner import FullPlanner, GivenPlanner

TOL = 1e-4


def decode_stepwise(engine, ids, k, prompt_len):
    """Prefill `prompt_len` tokens, then feed the rest one at a time; logits for every position."""
    B, S = ids.shape
    cache = engine.new_cache(B, S)
    h, _ = engine.forward(ids[:, :prompt_len], cache, k)
    out = [engine.bb.head(h)]
    for t in range(prompt_len, S):
        h, _ = engine.forward(ids[:, t:t + 1], cache, k)
        out.append(engine.bb.head(h))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("policy", KV_POLICIES)
def test_full_budget_equals_transformers(arch, policy):
    bb = tiny_backbone(arch)
    eng = Engine(bb, FullPlanner(bb.n_layers), policy)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = bb.model(ids).logits
        # HF's own cached decode, step by step
        from transformers import DynamicCache

        past = DynamicCache(config=bb.model.config)
        hf_steps = [bb.model(ids[:, :5], cache=past, use_cache=True).logits]
        for t in range(5, 12):
            hf_steps.append(bb.model(ids[:, t:t + 1], cache=past, use_cache=True).logits)
        hf_cached = torch.cat(hf_steps, dim=1)
    ours_parallel, plan = eng.logits(ids, layers=bb.n_layers)
    assert plan.all()
    assert (ours_parallel - ref).abs().max() <= TOL
    ours_cached = decode_stepwise(eng, ids, bb.n_layers, prompt_len=5)
    assert (ours_cached - hf_cached).abs().max() <= TOL
    assert (ours_cached - ref).abs().max() <= TOL


@pytest.mark.parametrize("policy", KV_POLICIES)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_cached_decode_equals_parallel_forward(arch, policy, k):
    bb = tiny_backbone(arch, n_layers=6)
    B, S = 2, 14
    plans = random_plans(B, S, bb.n_layers, k, seed=k)
    eng = Engine(bb, GivenPlanner(plans), policy)
    ids = torch.randint(0, 97, (B, S))
    parallel, plan = eng.logits(ids, layers=k)
    assert torch.equal(plan, plans)
    for prompt_len in (1, 6):
        cached = decode_stepwise(eng, ids, k, prompt_len)
        assert (cached - parallel).abs().max() <= TOL, (policy, prompt_len)


def test_policies_differ_when_layers_are_skipped():
    """The three KV policies are really different computations (guards against a policy being a no-op)."""
    bb = tiny_backbone("llama", n_layers=6)
    plans = random_plans(1, 10, 6, 3, seed=1)
    ids = torch.randint(0, 97, (1, 10))
    outs = {p: Engine(bb, GivenPlanner(plans), p).logits(ids, layers=3)[0] for p in KV_POLICIES}
    assert (outs["fill"] - outs["mask"]).abs().max() > 1e-3
    assert (outs["fill"] - outs["zero"]).abs().max() > 1e-3
    assert (outs["mask"] - outs["zero"]).abs().max() > 1e-3


def test_skipped_layer_leaves_the_policy_in_the_cache():
    bb = tiny_backbone("llama", n_layers=4)
    plans = torch.ones(1, 3, 4, dtype=torch.bool)
    plans[0, 1, 1] = False  # token 1 skips layer 1
    ids = torch.randint(0, 97, (1, 3))
    caches = {}
    for p in KV_POLICIES:
        eng = Engine(bb, GivenPlanner(plans), p)
        caches[p] = eng.new_cache(1, 3)
        eng.forward(ids, caches[p], 3)
    assert caches["zero"].k[1, 0, :, 1].abs().max() == 0 and caches["zero"].v[1, 0, :, 1].abs().max() == 0
    assert caches["fill"].k[1, 0, :, 1].abs().max() > 0 and caches["fill"].filled[1, 0, 1]
    assert not caches["mask"].filled[1, 0, 1] and caches["mask"].filled[2, 0, 1]


def test_left_padding_does_not_change_a_row():
    bb = tiny_backbone("qwen2", n_layers=6)
    plans = random_plans(1, 8, 6, 4, seed=3)
    ids = torch.randint(0, 97, (1, 8))
    for policy in KV_POLICIES:
        alone = Engine(bb, GivenPlanner(plans), policy).logits(ids, layers=4)[0]
        padded_ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
        padded_plans = torch.cat([plans[:, :3], plans], dim=1)
        valid = torch.tensor([[False] * 3 + [True] * 8])
        padded = Engine(bb, GivenPlanner(padded_plans), policy).logits(padded_ids, layers=4, valid=valid)[0]
        assert (padded[:, 3:] - alone).abs().max() <= TOL
