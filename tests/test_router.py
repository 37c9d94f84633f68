"""Decision Module and router planner: rerouting, exact k, no future leakage, router files, the gate (training
is in tests/train/test_router_training.py)."""


import pytest
import torch
from conftest import tiny_backbone

from buddy.engine import Engine
from buddy.router import (
    DecisionModule,
    RouterConfig,
    RouterFileError,
    RouterMeta,
    RouterPlanner,
    load_router,
    prior_scores,
    save_router,
)

TOL = 1e-4


def random_router(bb, seed=0):
    torch.manual_seed(seed)
    cfg = RouterConfig(n_layers=bb.n_layers, kv_dim=2 * bb.shapes.n_kv_heads * bb.shapes.head_dim,
                       hidden_dim=bb.shapes.hidden, width=32)
    m = DecisionModule(cfg)
    torch.nn.init.normal_(m.fc2.weight, std=1.0)  # not the zero init: plans must vary per token
    return m


def stepwise(eng, ids, k, prompt_len):
    cache = eng.new_cache(ids.shape[0], ids.shape[1])
    h, plan = eng.forward(ids[:, :prompt_len], cache, k)
    logits, plans = [eng.bb.head(h)], [plan]
    for t in range(prompt_len, ids.shape[1]):
        h, plan = eng.forward(ids[:, t:t + 1], cache, k)
        logits.append(eng.bb.head(h))
        plans.append(plan)
    return torch.cat(logits, 1), torch.cat(plans, 1)


def test_exact_k_rerouting_and_modes():
    bb = tiny_backbone("llama", n_layers=10)
    router, prior = random_router(bb, 1), prior_scores(list(range(1, 9)), 10)
    ids = torch.randint(0, 97, (1, 20))
    plans = {}
    for every in (1, 3, 0):
        eng = Engine(bb, RouterPlanner(router, prior, reroute_every=every), "fill")
        _, plan = stepwise(eng, ids, 5, prompt_len=6)
        assert (plan.sum(-1) == 5).all() and plan[..., 0].all() and plan[..., -1].all()
        plans[every] = plan[0]
    per_token = plans[1]
    assert len({tuple(p.tolist()) for p in per_token[6:]}) > 1  # rerouting changes plans between tokens
    assert (plans[0][6:] == plans[0][5]).all()  # frozen after prefill: the last prompt token's plan
    for t in range(6, 20):  # every 3rd decode token re-plans, others carry the last plan
        src = 6 + ((t - 6) // 3) * 3
        assert torch.equal(plans[3][t], per_token[src])


def test_prior_only_is_the_static_order_and_router_without_prior_differs():
    bb = tiny_backbone("llama", n_layers=8)
    order = [4, 2, 6, 1, 3, 5]
    router, prior = random_router(bb), prior_scores(order, 8)
    ids = torch.randint(0, 97, (1, 9))
    plan = Engine(bb, RouterPlanner(router, prior, use_router=False)).logits(ids, layers=5)[1]
    assert set(plan[0, 0].nonzero().flatten().tolist()) == {0, 7, 4, 2, 6} and (plan == plan[:, :1]).all()
    plan2 = Engine(bb, RouterPlanner(router, prior, use_prior=False)).logits(ids, layers=5)[1]
    assert (plan2.sum(-1) == 5).all()
    assert not torch.equal(plan, plan2)  # the random router alone picks other layers, and varies by token
    assert not (plan2 == plan2[:, :1]).all()


def test_router_never_sees_the_future():
    bb = tiny_backbone("qwen2", n_layers=8)
    eng = Engine(bb, RouterPlanner(random_router(bb, 2), prior_scores(list(range(1, 7)), 8)), "mask")
    ids = torch.randint(0, 97, (1, 16))
    other = ids.clone()
    other[0, 10:] = (other[0, 10:] + 7) % 97
    la, pa = eng.logits(ids, layers=4)
    lb, pb = eng.logits(other, layers=4)
    assert torch.equal(pa[:, :10], pb[:, :10]) and (la[:, :10] - lb[:, :10]).abs().max() <= TOL
    assert not torch.equal(pa[:, 10:], pb[:, 10:])


def test_router_files_roundtrip_and_errors(tmp_path):
    bb = tiny_backbone("llama", n_layers=8)
    m = random_router(bb)
    meta = RouterMeta(model="tiny", checksum="c0ffee", n_layers=8, kv_policy="fill", budgets=(0.5, 1.0),
                      prior="static-greedy", prior_order=list(range(1, 7)), config=vars(m.cfg))
    save_router(m, meta, tmp_path / "r")
    m2, meta2 = load_router(tmp_path / "r", checksum="c0ffee", n_layers=8)
    assert torch.equal(m2.fc2.weight, m.fc2.weight) and meta2.budgets == (0.5, 1.0)
    with pytest.raises(RouterFileError, match="other weights"):
        load_router(tmp_path / "r", checksum="beef", n_layers=8)
    with pytest.raises(RouterFileError, match="8-layer model, this one has 10"):
        load_router(tmp_path / "r", checksum="c0ffee", n_layers=10)
    (tmp_path / "r" / "router.safetensors").write_bytes(b"garbage")
    with pytest.raises(RouterFileError, match="corrupt"):
        load_router(tmp_path / "r")
    (tmp_path / "r" / "router.json").write_text("{")
    with pytest.raises(RouterFileError, match="corrupt"):
        load_router(tmp_path / "r")
    with pytest.raises(RouterFileError, match="not a router directory"):
        load_router(tmp_path / "missing")


def test_window_logits_with_prefill_equals_stepwise_decode():
    from buddy.eval.ppl import window_logits

    bb = tiny_backbone("llama", n_layers=8)
    eng = Engine(bb, RouterPlanner(random_router(bb, 3), prior_scores(list(range(1, 7)), 8), reroute_every=0), "zero")
    ids = torch.randint(0, 97, (2, 14))
    logits, plan = window_logits(eng, ids, 5, prefill=6)
    ref_logits, ref_plan = stepwise(eng, ids, 5, prompt_len=6)
    assert torch.equal(plan, ref_plan) and (logits - ref_logits).abs().max() <= TOL
    assert (plan[:, 6:] == plan[:, 5:6]).all()


def test_per_window_nll_matches_the_total():
    from buddy.eval.ppl import evaluate_windows

    bb = tiny_backbone("llama", n_layers=8)
    eng = Engine(bb, RouterPlanner(random_router(bb, 3), prior_scores(list(range(1, 7)), 8)), "fill")
    ids = torch.randint(0, 97, (5, 12))
    res = evaluate_windows(eng, ids, layers=5, batch_size=2, prefill=4, per_window=True)
    assert len(res.window_nll) == 5
    assert sum(res.window_nll) / 5 == pytest.approx(res.nll, rel=1e-5)
    for i in (0, 4):  # each entry is that window evaluated alone
        assert res.window_nll[i] == pytest.approx(evaluate_windows(eng, ids[i:i + 1], layers=5, prefill=4).nll, abs=1e-4)


def test_artifact_commit_says_when_the_checkout_was_dirty(tmp_path):
    import subprocess

    from buddy.artifacts import git_commit as _git_commit

    assert _git_commit(tmp_path) == ""  # not a checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f.py").write_text("a = 1\n")
    subprocess.run(git + ["add", "f.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    clean = _git_commit(tmp_path)
    assert len(clean) == 40 and "+" not in clean
    (tmp_path / "f.py").write_text("a = 2\n")
    assert _git_commit(tmp_path) == clean + "+dirty"


def gated_router(bb, bias: float, seed=0):
    torch.manual_seed(seed)
    cfg = RouterConfig(n_layers=bb.n_layers, kv_dim=2 * bb.shapes.n_kv_heads * bb.shapes.head_dim,
                       hidden_dim=bb.shapes.hidden, width=32, gate=True)
    m = DecisionModule(cfg)
    torch.nn.init.normal_(m.fc2.weight, std=1.0)
    torch.nn.init.normal_(m.fc_gate.weight, std=1.0 if bias == 0 else 0.0)
    torch.nn.init.constant_(m.fc_gate.bias, bias)
    return m


def test_gate_chooses_per_token_between_router_and_prior_plans():
    bb = tiny_backbone("llama", n_layers=8)
    prior = prior_scores([3, 1, 5, 2, 6, 4], 8)
    ids = torch.randint(0, 97, (2, 12))

    def plan(module, **kw):
        eng = Engine(bb, RouterPlanner(module, prior, **kw), "fill")
        return eng.forward(ids, eng.new_cache(2, 12), [4, 6])[1]

    prior_plan = plan(gated_router(bb, 0.0), use_router=False)
    router_plan = plan(gated_router(bb, 0.0), use_gate=False)
    assert not torch.equal(prior_plan, router_plan)
    assert torch.equal(plan(gated_router(bb, -50.0)), prior_plan)  # closed gate: the prior's plan
    assert torch.equal(plan(gated_router(bb, 50.0)), router_plan)  # open gate: the router's plan
    mixed = plan(gated_router(bb, 0.0))  # a per-token choice, always exactly k layers
    assert (mixed.sum(-1) == torch.tensor([4, 6])[:, None]).all()
    per_token = (mixed == router_plan).all(-1) | (mixed == prior_plan).all(-1)
    assert per_token.all()


def test_standardize_reads_the_varying_part_of_a_near_constant_feature_and_round_trips(tmp_path):
    bb = tiny_backbone("llama", n_layers=8)
    kv_dim = 2 * bb.shapes.n_kv_heads * bb.shapes.head_dim
    cfg = dict(n_layers=8, kv_dim=kv_dim, hidden_dim=bb.shapes.hidden, width=16)
    torch.manual_seed(0)
    std = DecisionModule(RouterConfig(**cfg, standardize=True))
    torch.nn.init.normal_(std.fc2.weight)
    plain = DecisionModule(RouterConfig(**cfg))
    plain.load_state_dict(std.state_dict(), strict=False)  # same weights, no standardization
    # a feature that is a large constant (a bias) plus a small part that varies by token
    bias_kv, bias_h = 100 * torch.randn(kv_dim), 50 * torch.randn(bb.shapes.hidden)
    kv, h = bias_kv + 0.01 * torch.randn(2, 64, kv_dim), bias_h + 0.01 * torch.randn(2, 64, bb.shapes.hidden)
    with pytest.raises(ValueError, match="without standardize"):
        plain.fit_standardization(kv, h)
    assert torch.equal(std.forward(kv, h, torch.full((2,), 0.5)), plain.forward(kv, h, torch.full((2,), 0.5)))
    std.fit_standardization(kv, h)
    assert torch.allclose(std.mu_kv, kv.reshape(-1, kv_dim).mean(0), atol=1e-4)
    frac = torch.full((2,), 0.5)
    # standardized: the module reads exactly what the plain one reads from standardized inputs
    z_kv = (kv - std.mu_kv) / std.sd_kv
    z_h = (h - std.mu_h) / std.sd_h
    assert torch.allclose(std.forward(kv, h, frac), plain.forward(z_kv, z_h, frac), atol=1e-5)
    # the plain module barely tells the tokens apart; the standardized one does
    spread = lambda s: s.std(dim=(0, 1)).mean().item()  # noqa: E731
    assert spread(std.forward(kv, h, frac)) > 20 * spread(plain.forward(kv, h, frac))
    meta = RouterMeta(model="tiny", checksum="c0ffee", n_layers=8, kv_policy="fill", budgets=(0.5, 1.0),
                      prior="static-greedy", prior_order=list(range(1, 7)), config=vars(std.cfg))
    save_router(std, meta, tmp_path / "r")
    loaded, _ = load_router(tmp_path / "r", checksum="c0ffee", n_layers=8)
    assert loaded.cfg.standardize and torch.equal(loaded.mu_h, std.mu_h) and torch.equal(loaded.sd_kv, std.sd_kv)
    assert torch.equal(loaded.forward(kv, h, frac), std.forward(kv, h, frac))


def test_rerouting_every_n_tokens_keeps_each_rows_own_schedule_in_a_continuous_batch(tiny_ckpt):
    """With reroute_every=3, a row re-plans at its own decode steps 0, 3, 6, ... however rows join and leave the
    server's (and the generation evals') continuous batch: each row's layers equal its solo generation's."""
    import threading

    from buddy.api import load
    from buddy.serve.scheduler import Request, Scheduler

    m = load(str(tiny_ckpt), planner="random", device="cpu", dtype="float32")
    m.planner = RouterPlanner(random_router(m.bb, 1), prior_scores(list(range(1, m.n_layers - 1)), m.n_layers),
                              reroute_every=3)
    jobs = [([5, 6, 7, 8, 9], 10), ([11, 12], 4), ([13, 14, 15], 9), ([16, 17, 18, 19], 7)]
    solo = [[s.layers for s in m.generate(p, layers=3, max_new_tokens=n, ignore_eos=True)] for p, n in jobs]
    assert any(x[i] != x[i + 1] for x in solo for i in range(1, len(x) - 1))  # a re-plan during decoding matters
    got, finished = [[] for _ in jobs], threading.Semaphore(0)

    def events(i):
        def on_event(kind, payload):
            if kind == "token":
                got[i].append(payload[1])
            else:
                finished.release()
        return on_event

    sched = Scheduler({"fill": m}, max_batch=2, stop_ids=set())  # rows 2 and 3 join as rows 0 and 1 leave
    for i, (p, n) in enumerate(jobs):
        sched.submit(Request(p, 3, "fill", n, events(i)))
    sched.start()
    try:
        assert all(finished.acquire(timeout=60) for _ in jobs)
    finally:
        sched.shutdown()
    assert got == solo
