"""allocation="token": per-token depth with the request's mean exact (within half a layer after every token),
per-token plans in every planner, teacher-forced scoring == decode, mixed batches, depth head files."""

import threading

import pytest
import torch
from conftest import tiny_backbone
from test_router import random_router, stepwise

from buddy.allocation import (
    AllocationError,
    DepthConfig,
    DepthFileError,
    DepthHead,
    DepthMeta,
    TokenAccount,
    depth_levels,
    fit_mu_table,
    fit_ridge,
    load_depth,
    save_depth,
)
from buddy.config import ConfigError, GenerateConfig
from buddy.engine import Engine
from buddy.planner import StaticPlanner
from buddy.router import RouterPlanner, prior_scores

L = 10


def random_head(hidden=64, n_layers=L, seed=0, spread=3.0):
    """A depth head with random weights and a mu table fitted on random features (plans vary per token)."""
    g = torch.Generator().manual_seed(seed)
    levels = depth_levels(n_layers)
    head = DepthHead(DepthConfig(hidden_dim=hidden, n_layers=n_layers, levels=tuple(levels)))
    head.weight.copy_(torch.randn(hidden + 1, len(levels), generator=g) * spread / hidden ** 0.5)
    head.weight[-1] -= torch.linspace(0, 2, len(levels))  # deeper is better on average
    x = DepthHead.features(torch.randn(2000, hidden, generator=g))
    head.mu_table.copy_(fit_mu_table(x @ head.weight, levels, n_layers))
    return head


def router_engine(bb, head=None, policy="fill"):
    order = list(range(1, bb.n_layers - 1))
    return Engine(bb, RouterPlanner(random_router(bb, 1), prior_scores(order, bb.n_layers)), policy, depth=head)


def test_the_mean_stays_within_half_a_layer_after_every_token():
    torch.manual_seed(0)
    head = random_head()
    targets = [5, 6, 7, 8, 6]
    acc = TokenAccount(head, targets, [True, True, True, True, False], L)
    seen = acc.depths(torch.randn(5, 7, 64), prompt=True)
    assert (seen == torch.tensor(targets)[:, None]).all()  # the prompt runs at the target
    counts, totals = acc.count.clone(), acc.total.clone()
    assert counts.tolist() == [1] * 5
    depths = []
    for chunk in [1, 1, 3, 1, 5, 1, 1, 8, 2, 1] * 6:
        d = acc.depths(torch.randn(5, chunk, 64) * 2, prompt=False)
        for t in range(chunk):
            counts += 1
            totals += d[:, t]
            assert ((totals - counts * torch.tensor(targets)).abs() <= counts // 2).all()
        depths.append(d)
    d = torch.cat(depths, dim=1)
    assert acc.count.tolist() == counts.tolist() and acc.total.tolist() == totals.tolist()
    assert (d[4] == 6).all()  # a per-request row in the batch runs its k every token
    assert all(len(set(d[r].tolist())) > 2 for r in range(4))  # the others really vary
    assert ((d >= 2) & (d <= L)).all()
    for mean, k in zip(acc.mean(), targets):
        assert abs(mean - k) <= 0.5


def test_targets_at_the_ends_of_the_levels_are_exact():
    head = random_head()
    lo, hi = head.cfg.levels[0], head.cfg.levels[-1]
    acc = TokenAccount(head, [lo, hi], True, L)
    acc.depths(torch.randn(2, 3, 64), prompt=True)
    d = torch.cat([acc.depths(torch.randn(2, 1, 64), prompt=False) for _ in range(40)], dim=1)
    assert abs(acc.mean()[0] - lo) <= 0.5 and (d[1] == hi).all()


def test_per_token_counts_in_the_planners_run_exactly_those_layers():
    bb = tiny_backbone("llama", n_layers=L)
    eng = router_engine(bb)
    ks = torch.randint(2, L + 1, (3, 9))
    cache = eng.new_cache(3, 9)
    from buddy.engine import prologue

    h, _ = prologue(bb, torch.randint(0, 97, (3, 9)), cache)
    plan = eng.planner.plan(h, cache, ks)
    assert torch.equal(plan.sum(-1), ks) and plan[..., 0].all() and plan[..., -1].all()
    for v in ks.unique().tolist():  # each token's plan is the router's plan at its own count
        ref = eng.planner.routed(h, cache, torch.full((3,), v))
        assert torch.equal(plan[ks == v], ref[ks == v])
    static = StaticPlanner("static-x", list(range(L - 2, 0, -1)), L)
    sp = static.plan(h, cache, ks)
    assert torch.equal(sp.sum(-1), ks)
    assert torch.equal(sp, static.table[ks])


@pytest.mark.parametrize("policy", ["fill", "zero"])
def test_teacher_forced_token_allocation_equals_stepwise_decode(policy):
    from buddy.eval.ppl import window_logits

    bb = tiny_backbone("qwen2", n_layers=L)
    eng = router_engine(bb, random_head(), policy)
    ids = torch.randint(0, 97, (2, 20))
    logits, plan = window_logits(eng, ids, 6, prefill=5, allocation="token")

    cache = eng.new_cache(2, 20)
    cache.account = eng.token_account([6, 6])
    h, p = eng.forward(ids[:, :5], cache, 6)
    outs, plans = [eng.bb.head(h)], [p]
    for t in range(5, 20):
        h, p = eng.forward(ids[:, t:t + 1], cache, 6)
        outs.append(eng.bb.head(h))
        plans.append(p)
    assert torch.equal(plan, torch.cat(plans, 1))
    assert (logits - torch.cat(outs, 1)).abs().max() <= 1e-4
    assert len(set(plan[:, 5:].sum(-1).flatten().tolist())) > 1
    ref_logits, ref_plan = stepwise(eng, ids, 6, prompt_len=5)  # without an account: k every token
    assert (ref_plan.sum(-1) == 6).all()


def tiny_routed(tiny_ckpt):
    """The tiny checkpoint (it has a tokenizer) with a random router and a random depth head."""
    from buddy.api import load

    m = load(str(tiny_ckpt), planner="random", device="cpu", dtype="float32")
    n = m.n_layers
    m.planner = RouterPlanner(random_router(m.bb, 1), prior_scores(list(range(1, n - 1)), n))
    m.depth = random_head(hidden=m.bb.shapes.hidden, n_layers=n)
    return m


def test_generate_with_token_allocation_keeps_the_mean_and_reports_each_depth(tiny_ckpt):
    eng = tiny_routed(tiny_ckpt)
    steps = list(eng.generate([5, 6, 7, 8], layers=4, max_new_tokens=30, ignore_eos=True, allocation="token"))
    depths = [len(s.layers) for s in steps]
    assert len(steps) == 30 and depths[0] == 4 and len(set(depths)) > 1
    for n in range(1, 31):
        assert abs(sum(depths[:n]) - 4 * n) <= n // 2
    rows = list(eng.generate_batch([[5, 6, 7], [9, 8]], [0.5, 0.8], max_new_tokens=12, ignore_eos=True,
                                   allocation="token"))
    for r, k in ((0, 3), (1, 5)):
        d = [len(step[r].layers) for step in rows]
        assert abs(sum(d) / len(d) - k) <= 0.5


def test_token_allocation_without_a_depth_head_is_a_clear_error(tiny_ckpt):
    eng = tiny_routed(tiny_ckpt)
    eng.depth = None
    with pytest.raises(AllocationError, match="buddy train depth"):
        list(eng.generate([5, 6], layers=6, max_new_tokens=2, allocation="token"))
    with pytest.raises(ConfigError, match="invalid allocation 'layer'"):
        GenerateConfig(allocation="layer")
    assert len(list(eng.generate([5, 6], layers=6, max_new_tokens=2, ignore_eos=True))) == 2  # request: no head needed


def test_ridge_and_mu_table_hit_their_means():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(500, 8, generator=g), torch.ones(500, 1)], dim=1)
    w = torch.randn(9, 3, generator=g)
    assert (fit_ridge(x, x @ w, 1e-6) - w).abs().max() < 1e-3
    levels = [3, 6, 10]
    pred = x @ w
    table = fit_mu_table(pred, levels, 10)
    assert torch.isnan(table[:3]).all() and not torch.isnan(table[3:]).any()
    assert (table[3:].diff() <= 0).all()  # more layers on average <-> a cheaper layer
    ks = torch.tensor(levels, dtype=torch.float32)
    for k in (4, 6, 8):
        mean = float(ks[(pred + table[k] * ks).argmin(-1)].mean())
        assert abs(mean - k) < 0.2


def test_depth_files_round_trip_and_refuse_another_model(tmp_path):
    head = random_head()
    meta = DepthMeta(model="tiny", checksum="abc", n_layers=L, kv_policy="fill", router="router",
                     config={"hidden_dim": 64, "n_layers": L, "levels": list(head.cfg.levels), "horizon": 16})
    save_depth(head, meta, tmp_path / "d")
    back, m2 = load_depth(tmp_path / "d", checksum="abc", n_layers=L)
    assert torch.equal(back.weight, head.weight) and m2.model == "tiny"
    assert torch.equal(back.mu_table.nan_to_num(-1), head.mu_table.nan_to_num(-1))
    with pytest.raises(DepthFileError, match="other weights"):
        load_depth(tmp_path / "d", checksum="xyz")
    with pytest.raises(DepthFileError, match="10-layer model, this one has 12"):
        load_depth(tmp_path / "d", n_layers=12)
    with pytest.raises(DepthFileError, match="not a depth head directory"):
        load_depth(tmp_path)
    (tmp_path / "d" / "depth.json").write_text("{not json")
    with pytest.raises(DepthFileError, match="corrupt"):
        load_depth(tmp_path / "d")


def test_scheduler_rows_keep_their_own_allocation(tiny_ckpt, tmp_path):
    """A server batch mixes token- and request-allocation rows that join at different steps; each row's mean
    stays exact and request rows run k every token."""
    from buddy.serve.scheduler import Request, Scheduler

    m = tiny_routed(tiny_ckpt)
    sched = Scheduler({"fill": m}, max_batch=8, stop_ids=set())
    done, depths, lock = {}, {}, threading.Lock()

    def events(i):
        def on_event(kind, payload):
            with lock:
                if kind == "done":
                    done[i] = payload
                else:
                    depths.setdefault(i, []).append(len(payload[1]))
        return on_event

    reqs = [Request(prompt=[5, 6, 7 + i], k=3 + i % 3, kv_policy="fill", max_tokens=20 + 3 * i, on_event=events(i),
                    allocation="token" if i % 2 == 0 else "request") for i in range(5)]
    sched.start()
    try:
        for r in reqs:
            sched.submit(r)
            threading.Event().wait(0.05)  # rows join while others decode
        for _ in range(3000):
            if len(done) == 5:
                break
            threading.Event().wait(0.01)
    finally:
        sched.shutdown()
    assert all(done[i] == "length" for i in range(5)), done
    for i, r in enumerate(reqs):
        d = depths[i]
        assert len(d) == r.max_tokens
        if r.allocation == "request":
            assert set(d) == {r.k}
        else:
            assert abs(sum(d) / len(d) - r.k) <= 0.5 and r.layer_sum == sum(d)
    assert any(len(set(depths[i])) > 1 for i in (0, 2, 4))


def test_cli_offers_allocation_and_train_depth():
    import subprocess
    import sys

    for cmd in (["generate", "--help"], ["eval", "ppl", "--help"], ["eval", "code", "--help"],
                ["eval", "zeroshot", "--help"], ["sweep", "--help"], ["train", "depth", "--help"]):
        r = subprocess.run([sys.executable, "-m", "buddy", *cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert ("--allocation" in r.stdout) or ("--ridge" in r.stdout)
        assert ("--depth" in r.stdout) == (cmd[0] != "train")


def test_a_span_keeps_every_token_near_k():
    head = random_head()
    head.cfg.span = 2
    acc = TokenAccount(head, [6, 7], True, L)
    acc.depths(torch.randn(2, 3, 64), prompt=True)
    d = torch.cat([acc.depths(torch.randn(2, 1, 64) * 2, prompt=False) for _ in range(60)], dim=1)
    assert ((d - torch.tensor([[6], [7]])).abs() <= 2).all() and len(set(d[0].tolist())) > 1
    assert all(abs(m - k) <= 0.5 for m, k in zip(acc.mean(), (6, 7)))


def test_generation_evals_spend_the_budget_per_token(tiny_ckpt):
    """eval code / gsm8k / lambada decode through generate_until, which takes the allocation."""
    from buddy.eval.generation import generate_until

    eng = tiny_routed(tiny_ckpt)
    prompts, stops = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"], [["w999"]] * 3
    texts, layer_sum, n = generate_until(eng, prompts, 4, 16, stops, batch_size=2, allocation="token")
    assert n == 3 * 16 and abs(layer_sum / n - 4) <= 0.5
    same, req_sum, _ = generate_until(eng, prompts, 4, 16, stops, batch_size=2)
    assert req_sum == 4 * n and layer_sum != req_sum
