"""Router training (buddy/train/router.py): the training forward equals cached decode, gradients reach the router, resumable and deterministic runs that refuse changed settings, the swap and straight-through estimators, gate training."""

import hashlib
import json
import math

import pytest
import torch
from conftest import tiny_backbone
from test_router import TOL, random_router, stepwise

from buddy.config import KV_POLICIES, ConfigError
from buddy.engine import Engine
from buddy.router import (
    RouterPlanner,
    load_router,
    prior_scores,
    save_router,
)
from buddy.train.router import RouterTrainer, TrainConfig, routed_train_forward


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
    other = make_trainer(bb, tmp_path / "b", 4)
    other.cfg.lr = 1e-3  # a changed setting is refused on resume, and named
    with pytest.raises(ConfigError, match=r"lr 0.01 \(now 0.001\)"):
        other.load_state()


def test_standardize_measures_the_inputs_on_training_windows_and_resumes_with_them(tmp_path):
    from buddy.engine import router_features

    bb = tiny_backbone("llama", n_layers=8)
    t = make_trainer(bb, tmp_path / "z", 2)
    assert not t.module.cfg.standardize
    t.cfg.standardize, t.cfg.standardize_windows = True, 4
    t = RouterTrainer(bb, t.cfg, list(range(1, 7)), t.train_windows, t.val_windows["validation"], tmp_path / "z",
                      command="test", data="random")
    idx = torch.linspace(0, len(t.train_windows) - 1, 4).round().long()  # evenly spaced
    kv0, h0 = router_features(bb, t.train_windows[idx], "fill")
    assert torch.allclose(t.module.mu_kv, kv0.reshape(-1, kv0.shape[-1]).mean(0), atol=1e-5)
    assert torch.allclose(t.module.sd_h, h0.reshape(-1, h0.shape[-1]).std(0), atol=1e-5)
    t.run(progress=False)
    meta = json.loads((tmp_path / "z" / "router.json").read_text())
    assert meta["config"]["standardize"] is True
    loaded, _ = load_router(tmp_path / "z", n_layers=8)
    assert torch.equal(loaded.mu_kv, t.module.mu_kv)
    resumed = RouterTrainer(bb, t.cfg, list(range(1, 7)), t.train_windows, t.val_windows["validation"],
                            tmp_path / "z", command="test", data="random")
    resumed.module.mu_kv.zero_()
    assert resumed.load_state() and torch.equal(resumed.module.mu_kv, t.module.mu_kv)


def test_standardize_is_refused_where_it_cannot_hold(tmp_path):
    bb = tiny_backbone("llama", n_layers=8)
    t = make_trainer(bb, tmp_path / "raw", 2)
    t.run(progress=False)  # a router trained on raw inputs, and its state
    with pytest.raises(ConfigError, match="standardize_windows 0"):
        TrainConfig(standardize=True, standardize_windows=0)
    cfg = TrainConfig(**{**vars(t.cfg), "standardize": True, "init": str(tmp_path / "raw")})
    with pytest.raises(ConfigError, match="without --standardize"):
        RouterTrainer(bb, cfg, list(range(1, 7)), t.train_windows, t.val_windows["validation"], tmp_path / "x")
    cfg = TrainConfig(**{**vars(t.cfg), "standardize": True})
    resumed = RouterTrainer(bb, cfg, list(range(1, 7)), t.train_windows, t.val_windows["validation"], tmp_path / "raw")
    state = torch.load(tmp_path / "raw" / "state.pt", weights_only=True)
    del state["settings"]["standardize"]  # a state written before the option existed
    torch.save(state, tmp_path / "raw" / "state.pt")
    with pytest.raises(ConfigError, match=r"standardize False \(now True\)"):
        resumed.load_state()


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


def test_sparse_swaps_swap_one_token_in_n_and_credit_it_with_the_tokens_after_it():
    from buddy.train.router import sparse_swaps, swap_plans, window_sum

    scores = torch.randn(4, 13, 10)
    k = torch.tensor([6, 7, 8, 6])
    gen = torch.Generator().manual_seed(0)
    plan, swapped, a, c, valid = swap_plans(scores, k, band=2, gen=gen)
    sparse, v = sparse_swaps(plan, swapped, valid, 4, gen)
    assert (sparse.sum(-1) == k[:, None]).all()
    for b in range(4):
        at = v[b].nonzero()[:, 0]
        assert len(at) >= 3 and (at.diff() == 4).all() and at[0] < 4  # one token in 4, from a random offset
        assert torch.equal(sparse[b, at], swapped[b, at])
        rest = torch.ones(13, dtype=torch.bool)
        rest[at] = False
        assert torch.equal(sparse[b, rest], plan[b, rest])
    offsets = {int(v[b].nonzero()[0, 0]) for b in range(4)}
    assert len(offsets) > 1  # the offset is drawn per row
    x = torch.arange(12.0).view(2, 6)
    assert torch.equal(window_sum(x, 3)[0], torch.tensor([3.0, 6, 9, 12, 9, 5]))
    assert torch.equal(window_sum(x, 1), x)


def test_sparse_swaps_draw_for_the_global_batch_so_a_shard_matches_one_process():
    from buddy.train.router import sparse_swaps, swap_plans

    scores = torch.randn(4, 13, 10)
    k = torch.tensor([6, 7, 8, 6])
    gen = torch.Generator().manual_seed(3)
    plan, swapped, a, c, valid = swap_plans(scores, k, band=2, gen=gen)
    whole, v_whole = sparse_swaps(plan, swapped, valid, 4, gen)
    gen = torch.Generator().manual_seed(3)
    rows = slice(2, 4)
    plan, swapped, a, c, valid = swap_plans(scores[rows], k[rows], band=2, gen=gen, rows=rows, batch=4)
    part, v_part = sparse_swaps(plan, swapped, valid, 4, gen, rows=rows, batch=4)
    assert torch.equal(part, whole[rows]) and torch.equal(v_part, v_whole[rows])


def test_swap_loss_credits_each_sparse_swap_with_its_window(tmp_path, monkeypatch):
    """Inside the training loss, a swap's label is the gain summed over its token and the next N-1: with a gain of
    +1 at each swapped token and -1 at every other, the window credit is negative where the own-token one is not."""
    import buddy.train.router as tr

    bb = tiny_backbone("llama", n_layers=8)
    t = make_trainer(bb, tmp_path / "s", 1)
    t.cfg.swap_every = 4
    seen, calls = {}, []
    real_swap, real_sparse = tr.swap_plans, tr.sparse_swaps

    def swap_plans(scores, *args, **kw):
        out = real_swap(scores, *args, **kw)
        seen.update(scores=scores, a=out[2], c=out[3])
        return out

    def sparse_swaps(*args, **kw):
        out = real_sparse(*args, **kw)
        seen["valid"] = out[1]
        return out

    def kl(dense, plan, ids, k):
        calls.append(plan)
        if len(calls) == 1:
            return torch.zeros(plan.shape[:2])
        return torch.where((plan != calls[0]).any(-1), -1.0, 1.0)  # gain +1 at a swapped token, -1 elsewhere

    monkeypatch.setattr(tr, "swap_plans", swap_plans)
    monkeypatch.setattr(tr, "sparse_swaps", sparse_swaps)
    monkeypatch.setattr(t, "_kl", kl)
    ids = torch.randint(0, 97, (2, 12))
    loss, _ = t.swap_loss(ids, torch.tensor([5, 6]), dense=None)
    valid, scores, a, c = seen["valid"], seen["scores"], seen["a"], seen["c"]
    gain = torch.where(valid, 1.0, -1.0)
    num = den = 0.0
    negative = 0
    for b, i in valid.nonzero().tolist():
        credit = float(gain[b, i:i + 4].sum())
        negative += credit < 0
        margin = float(scores[b, i, c[b, i]] - scores[b, i, a[b, i]])
        num += abs(credit) * math.log1p(math.exp(-math.copysign(1.0, credit) * margin)) if credit else 0.0
        den += abs(credit)
    assert negative >= 2  # the window flips labels that the own-token credit (+1) would have kept
    assert loss.item() == pytest.approx(num / den, rel=1e-5)


def test_swap_every_trains_resumes_and_is_refused_where_it_cannot_hold(tmp_path):
    bb = tiny_backbone("llama", n_layers=8)
    t = make_trainer(bb, tmp_path / "s", 3)
    t.cfg.swap_every = 4
    t.run(progress=False)
    assert len(t.history) == 3 and all(math.isfinite(h["loss"]) for h in t.history)
    resumed = make_trainer(bb, tmp_path / "s", 3)
    with pytest.raises(ConfigError, match=r"swap_every 4 \(now 1\)"):
        resumed.load_state()
    with pytest.raises(ConfigError, match="swap estimator"):
        TrainConfig(estimator="st", swap_every=4)
    with pytest.raises(ConfigError, match="swap_every 0"):
        TrainConfig(swap_every=0)
    with pytest.raises(ConfigError, match="longer than seq_len 12"):
        TrainConfig(seq_len=12, swap_every=13)


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
    # the metadata names the router it started from, by content, so it survives that directory being overwritten
    weights = (tmp_path / "router" / "router.safetensors").read_bytes()
    assert meta.init == {"path": str(tmp_path / "router"), "sha256": hashlib.sha256(weights).hexdigest(),
                         "git_commit": first.meta.git_commit, "steps": 1, "data": "random"}
    with pytest.raises(Exception, match="--init"):
        TrainConfig(estimator="gate")


def test_a_resumed_run_keeps_naming_the_router_it_started_from(tmp_path):
    bb = tiny_backbone("llama", n_layers=8)
    make_trainer(bb, tmp_path / "start", 1).run(progress=False)
    started = hashlib.sha256((tmp_path / "start" / "router.safetensors").read_bytes()).hexdigest()

    def cont(steps):
        cfg = TrainConfig(steps=steps, batch=2, seq_len=12, val_every=2, val_windows=2, width=16, lr=1e-2,
                          budgets="0.5:1.0", init=str(tmp_path / "start"))
        g = torch.Generator().manual_seed(1)
        return RouterTrainer(bb, cfg, list(range(1, 7)), torch.randint(0, 97, (8, 12), generator=g),
                             torch.randint(0, 97, (2, 12), generator=g), tmp_path / "cont", command="test",
                             data="random")

    cont(2).run(progress=False)
    module, meta = load_router(tmp_path / "start", n_layers=8)  # the start directory now holds other weights
    with torch.no_grad():
        module.fc2.weight.add_(1.0)
    save_router(module, meta, tmp_path / "start")
    assert hashlib.sha256((tmp_path / "start" / "router.safetensors").read_bytes()).hexdigest() != started
    t = cont(4)
    with pytest.warns(UserWarning, match="other weights than the router this run started from"):
        assert t.load_state()
    t.run(progress=False)
    assert load_router(tmp_path / "cont", n_layers=8)[1].init["sha256"] == started


def test_ema_validates_and_writes_the_moving_average_and_resumes_with_it(tmp_path):
    bb = tiny_backbone("llama", n_layers=8)

    def trainer(out, steps):
        t = make_trainer(bb, out, steps)
        t.cfg.ema = 0.5
        return RouterTrainer(bb, t.cfg, list(range(1, 7)), t.train_windows, t.val_windows["validation"], out,
                             command="test", data="random")

    t = trainer(tmp_path / "u", 1)
    before = {n: v.clone() for n, v in t.ema_module.state_dict().items()}
    with torch.no_grad():
        t.module.fc1.weight.add_(1.0)
    t.update_average()  # average = 0.5 * average + 0.5 * weights
    assert torch.allclose(t.ema_module.fc1.weight, before["fc1.weight"] + 0.5)
    assert torch.equal(t.ema_module.freqs, before["freqs"]) and not t.ema_module.fc1.weight.requires_grad

    straight = trainer(tmp_path / "a", 4)
    straight.run(progress=False)
    assert not torch.allclose(straight.ema_module.fc2.weight, straight.module.fc2.weight)  # the average lags
    first = trainer(tmp_path / "b", 2)
    first.run(progress=False)
    resumed = trainer(tmp_path / "b", 4)
    assert resumed.load_state() and resumed.step == 2
    resumed.run(progress=False)
    for n, v in straight.ema_module.state_dict().items():
        assert torch.allclose(v, resumed.ema_module.state_dict()[n], atol=1e-6), n
    # what is written is the average at the best validated step (or the starting weights at step 0)
    written, _ = load_router(tmp_path / "a", n_layers=8)
    assert {n: v for n, v in written.state_dict().items()}.keys() == straight.best["module"].keys()
    assert all(torch.equal(written.state_dict()[n], v) for n, v in straight.best["module"].items() if n != "scale")
    if straight.best["step"] == 4:
        assert torch.equal(written.fc2.weight, straight.ema_module.fc2.weight)
    plain = make_trainer(bb, tmp_path / "b", 4)  # a run with the average is not resumed without it
    with pytest.raises(ConfigError, match="ema"):
        plain.load_state()
    with pytest.raises(ConfigError, match="invalid ema"):
        TrainConfig(ema=1.0)
