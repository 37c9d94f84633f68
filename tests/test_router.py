"""Decision Module and router planner: training forward == cached decode, rerouting, exact k, no future
leakage, router files, resumable training."""

import json
import math

import pytest
import torch
from conftest import tiny_backbone

from buddy.config import KV_POLICIES
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
from buddy.train.router import RouterTrainer, TrainConfig, routed_train_forward

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


@pytest.mark.parametrize("policy", KV_POLICIES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_training_forward_equals_cached_decode(arch, policy):
    bb = tiny_backbone(arch, n_layers=8)
    router = random_router(bb)
    prior = prior_scores([3, 1, 5, 2, 6, 4], 8)
    ids = torch.randint(0, 97, (2, 12))
    k = torch.tensor([4, 6])
    with torch.no_grad():
        train_logits, train_plan = routed_train_forward(bb, router, prior, ids, k, policy, tau=0.1)
    eng = Engine(bb, RouterPlanner(router, prior), policy)
    for prompt_len in (1, 5):
        logits, plan = stepwise(eng, ids, [4, 6], prompt_len)
        assert torch.equal(plan, train_plan)
        assert (logits - train_logits).abs().max() <= TOL


def test_training_forward_gives_router_gradients():
    bb = tiny_backbone("llama", n_layers=8)
    router = random_router(bb)
    for p in bb.model.parameters():
        p.requires_grad_(False)
    logits, _ = routed_train_forward(bb, router, prior_scores(list(range(1, 7)), 8), torch.randint(0, 97, (2, 10)),
                                     torch.tensor([4, 5]), "fill", tau=0.5)
    logits.logsumexp(-1).mean().backward()
    assert router.fc2.weight.grad is not None and router.fc2.weight.grad.abs().sum() > 0


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


def make_trainer(bb, out, steps):
    cfg = TrainConfig(steps=steps, batch=2, seq_len=12, val_every=2, val_windows=2, width=16, lr=1e-2, tau=0.5,
                      budgets="0.5:1.0")
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 97, (8, 12), generator=g)
    val = torch.randint(0, 97, (2, 12), generator=g)
    return RouterTrainer(bb, cfg, list(range(1, 7)), train, val, out, command="test", data="random")


def test_training_resumes_to_the_same_result(tmp_path):
    bb = tiny_backbone("llama", n_layers=8)
    straight = make_trainer(bb, tmp_path / "a", 4)
    straight.run(progress=False)
    first = make_trainer(bb, tmp_path / "b", 2)
    first.run(progress=False)
    resumed = make_trainer(bb, tmp_path / "b", 4)
    assert resumed.load_state() and resumed.step == 2
    resumed.run(progress=False)
    for k, v in straight.module.state_dict().items():
        assert torch.allclose(v, resumed.module.state_dict()[k], atol=1e-6), k
    assert [h["loss"] for h in straight.history] == pytest.approx([h["loss"] for h in resumed.history], abs=1e-6)
    assert straight.history[0]["loss"] != straight.history[-1]["loss"]
    meta = json.loads((tmp_path / "a" / "router.json").read_text())
    assert meta["steps"] == 4 and meta["kv_policy"] == "fill" and "prior_only_ppl" in meta["validation"]
    load_router(tmp_path / "a", n_layers=8)


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


def test_swap_plans_keep_exact_k_and_swap_near_the_threshold():
    from buddy.train.router import swap_plans

    scores = torch.randn(3, 7, 10)
    k = torch.tensor([2, 6, 12])
    plan, swapped, a, c, valid = swap_plans(scores, k, band=2, gen=torch.Generator().manual_seed(0))
    assert (plan.sum(-1) == k[:, None]).all() and (swapped.sum(-1) == k[:, None]).all()
    assert not valid[0].any() and not valid[2].any() and valid[1].all()  # nothing to swap at k=2 or k=L
    diff = (plan != swapped).sum(-1)
    assert (diff[1] == 2).all() and (diff[0] == 0).all()
    ranks = scores.argsort(-1, descending=True).argsort(-1)
    ra, rc = ranks[1].gather(-1, a[1, :, None]), ranks[1].gather(-1, c[1, :, None])
    assert ((ra >= 2) & (ra <= 3)).all() and ((rc >= 4) & (rc <= 5)).all()


def test_straight_through_estimator_training_runs(tmp_path):
    bb = tiny_backbone("llama", n_layers=8)
    t = make_trainer(bb, tmp_path / "s", 3)
    t.cfg.estimator = "st"
    fc2 = t.module.fc2.weight.detach().clone()
    assert (fc2 == 0).all()  # starts as the prior
    t.run(progress=False)
    assert len(t.history) == 3 and all(math.isfinite(h["loss"]) for h in t.history)
    # the straight-through estimator must carry the loss's gradient into the scoring layer: it moved
    assert not torch.equal(t.module.fc2.weight.detach(), fc2)


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


def test_gate_training_changes_only_the_gate_and_round_trips(tmp_path):
    bb = tiny_backbone("llama", n_layers=8)
    first = make_trainer(bb, tmp_path / "router", 1)
    first.run(progress=False)
    torch.manual_seed(0)  # a router whose plans differ from the prior's, so the gate has something to learn
    torch.nn.init.normal_(first.best["module"]["fc2.weight"], std=2.0)
    first._write_best()
    cfg = TrainConfig(steps=3, batch=2, seq_len=12, val_every=3, val_windows=2, width=16, lr=1e-1,
                      budgets="0.5:1.0", estimator="gate", init=str(tmp_path / "router"), select="safe")
    g = torch.Generator().manual_seed(1)
    t = RouterTrainer(bb, cfg, list(range(1, 7)), torch.randint(0, 97, (8, 12), generator=g),
                      torch.randint(0, 97, (2, 12), generator=g), tmp_path / "gate", command="test", data="random")
    before = {k: v.clone() for k, v in t.module.state_dict().items()}
    assert (t.module.fc_gate.weight == 0).all()  # starts closed: exactly the prior
    t.run(progress=False)
    after = t.module.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) == (not k.startswith("fc_gate")), k
    module, meta = load_router(tmp_path / "gate", n_layers=8)
    assert module.cfg.gate and meta.steps == 3
    with pytest.raises(Exception, match="--init"):
        TrainConfig(estimator="gate")
