"""The per-k weight of the router's scores against the prior (`buddy train router --scales`): applied at
inference only, 0 gives the prior's plan, fitted on validation so that no validation domain is worse than the
prior, and routers written before it load with weight 1."""

import json

import pytest
import torch
from conftest import tiny_backbone
from safetensors.torch import load_file, save_file
from test_router import random_router

from buddy.config import ConfigError
from buddy.engine import Engine
from buddy.router import (
    RouterMeta,
    RouterPlanner,
    load_router,
    prior_scores,
    save_router,
)
from buddy.train.router import RouterTrainer, TrainConfig, interpolate


def test_interpolate_between_points_and_nearest_outside():
    assert interpolate(8, {3: 0.0, 5: 1.0}) == [0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert interpolate(3, {2: 0.5}) == [0.5] * 4


def test_heads_weigh_each_rows_scores_by_its_k():
    bb = tiny_backbone("llama", n_layers=8)
    m = random_router(bb)
    kv0, h0 = torch.randn(2, 5, m.cfg.kv_dim), torch.randn(2, 5, m.cfg.hidden_dim)
    frac = torch.tensor([4 / 8, 6 / 8])
    plain, _ = m.heads(kv0, h0, frac)
    assert torch.allclose(plain, m(kv0, h0, frac))  # weight 1: the scores as trained
    m.scale[4] = 0.0
    m.scale[6] = 2.0
    scaled, _ = m.heads(kv0, h0, frac)
    assert torch.equal(scaled[0], torch.zeros_like(scaled[0])) and torch.allclose(scaled[1], 2 * plain[1])
    assert torch.allclose(m(kv0, h0, frac), plain)  # training's forward is never scaled


def test_scale_zero_runs_the_priors_plan():
    bb = tiny_backbone("qwen2", n_layers=8)
    m = random_router(bb)
    prior = prior_scores([3, 1, 5, 2, 6, 4], 8)
    ids = torch.randint(0, 97, (2, 9))
    m.scale.zero_()
    routed = Engine(bb, RouterPlanner(m, prior), "fill")
    only_prior = Engine(bb, RouterPlanner(m, prior, use_router=False), "fill")
    for eng in (routed, only_prior):
        eng.cache = eng.new_cache(2, 9)
    h1, plan1 = routed.forward(ids, routed.cache, 5)
    h2, plan2 = only_prior.forward(ids, only_prior.cache, 5)
    assert torch.equal(plan1, plan2) and torch.equal(h1, h2)


def test_routers_written_before_the_scale_load_with_weight_one(tmp_path):
    bb = tiny_backbone("llama", n_layers=8)
    m = random_router(bb)
    m.scale[5] = 0.25
    meta = RouterMeta(model="tiny", checksum=bb.checksum, n_layers=8, kv_policy="fill", budgets=(0.5, 1.0),
                      prior="static-greedy", prior_order=list(range(1, 7)), config=m.cfg.__dict__)
    save_router(m, meta, tmp_path)
    loaded, _ = load_router(tmp_path, checksum=bb.checksum, n_layers=8)
    assert float(loaded.scale[5]) == 0.25 and float(loaded.scale[4]) == 1.0
    state = load_file(tmp_path / "router.safetensors")
    del state["scale"]
    save_file(state, tmp_path / "router.safetensors")
    old, _ = load_router(tmp_path, checksum=bb.checksum, n_layers=8)
    assert torch.equal(old.scale, torch.ones(9)) and torch.equal(old.fc2.weight, m.fc2.weight)


def make(bb, out, scales="", steps=2, **kw):
    cfg = TrainConfig(steps=steps, batch=2, seq_len=12, val_every=2, val_windows=2, width=16, lr=1e-2,
                      budgets="0.5:1.0", val_layers="4,6", scales=scales, **kw)
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 97, (8, 12), generator=g)
    val = {"a": torch.randint(0, 97, (2, 12), generator=g), "b": torch.randint(0, 97, (2, 12), generator=g)}
    return RouterTrainer(bb, cfg, list(range(1, 7)), train, val, out, command="test", data="random")


def test_fit_picks_the_best_scale_that_no_domain_finds_worse(tmp_path, monkeypatch):
    bb = tiny_backbone("llama", n_layers=8)
    tr = make(bb, tmp_path / "run")
    tr.run(progress=False)
    # synthetic validation: at k=4 the full router wins on average but loses on domain b; at k=6 it wins on both
    tr.baseline = {"domains": {"a": {4: 3.0, 6: 2.0}, "b": {4: 3.0, 6: 2.0}}}
    tr.best["domains"] = {"a": {4: 2.0, 6: 1.5}, "b": {4: 3.1, 6: 1.9}}
    half = {"a": {4: 2.5, 6: 1.8}, "b": {4: 3.0, 6: 1.95}}

    tr.best["step"] = 2  # a trained best checkpoint: weight 1 is its own validation, not measured again

    def validate(module=None, **kw):  # measures the module it is given, at the weight it carries
        assert module is not tr.module and float(module.scale.min()) == float(module.scale.max()) == 0.5
        return {"domains": half}

    monkeypatch.setattr(tr, "validate", validate)
    chosen = tr.fit_scales([0.0, 0.5, 1.0], progress=False)
    assert chosen == {4: 0.5, 6: 1.0}
    router, meta = load_router(tmp_path / "run", n_layers=8)
    assert router.scale.tolist() == pytest.approx([0.5] * 5 + [0.75, 1.0, 1.0, 1.0])
    assert meta.validation["scale"]["by_k"] == {"4": 0.5, "6": 1.0}
    # when every scale loses somewhere, the prior's plan (0) is kept
    half["b"][6] = 2.5
    tr.best["domains"]["b"][6] = 2.1
    assert tr.fit_scales([0.5, 1.0], progress=False)[6] == 0.0


def test_scales_fit_at_the_end_of_a_run_and_on_a_finished_one(tmp_path):
    bb = tiny_backbone("llama", n_layers=8)
    make(bb, tmp_path / "run").run(progress=False)
    assert "scale" not in json.loads((tmp_path / "run" / "router.json").read_text())["validation"]
    again = make(bb, tmp_path / "run", scales="0,1")  # the same settings: a resume; scales are not one of them
    assert again.load_state() and again.step == 2
    again.run(progress=False)
    v = json.loads((tmp_path / "run" / "router.json").read_text())["validation"]["scale"]
    assert set(v["by_k"]) == {"4", "6"} and set(v["by_k"].values()) <= {0.0, 1.0}
    assert set(v["ppl"]) == {"0", "1"}


def test_bad_scales():
    for bad in ("x", "-1", "0,5"):
        with pytest.raises(ConfigError, match="invalid scales"):
            TrainConfig(scales=bad)


def test_init_from_a_scaled_router_trains_from_weight_one(tmp_path):
    bb = tiny_backbone("llama", n_layers=8)
    m = random_router(bb)
    m.scale[4:] = 0.25
    meta = RouterMeta(model="tiny", checksum=bb.checksum, n_layers=8, kv_policy="fill", budgets=(0.5, 1.0),
                      prior="static-greedy", prior_order=list(range(1, 7)), config=m.cfg.__dict__)
    save_router(m, meta, tmp_path / "init")
    cfg = TrainConfig(steps=1, batch=2, seq_len=12, width=32, init=str(tmp_path / "init"))
    tr = RouterTrainer(bb, cfg, list(range(1, 7)), torch.randint(0, 97, (4, 12)), torch.randint(0, 97, (2, 12)),
                       tmp_path / "run")
    assert torch.equal(tr.module.scale, torch.ones(9)) and torch.equal(tr.module.fc2.weight, m.fc2.weight)


def test_scales_fit_on_their_own_windows_measure_every_weight_afresh(tmp_path, monkeypatch):
    """With scale_windows the prior and every weight (1 included) are measured on the fit's own windows, and the
    choice follows them, not the checkpoint's validation."""
    bb = tiny_backbone("llama", n_layers=8)
    tr = make(bb, tmp_path / "run")
    tr.run(progress=False)
    tr.best["step"] = 2
    tr.baseline = {"domains": {"a": {4: 3.0, 6: 2.0}}}
    tr.best["domains"] = {"a": {4: 2.0, 6: 1.0}}  # on the checkpoint's windows weight 1 wins everywhere
    own = {"a": torch.zeros(3, 16, dtype=torch.long)}
    tr.scale_windows = own
    seen = []

    def validate(use_router=True, module=None, windows=None, per_window=False):
        assert windows is own
        seen.append(None if not use_router else float(module.scale.max()))
        return {"domains": {"a": {4: 2.4, 6: 2.3}} if not use_router else {"a": {4: 2.5, 6: 2.2}}}

    monkeypatch.setattr(tr, "validate", validate)
    # the checkpoint's validation would give {4: 1, 6: 1} and the stored baseline {4: 1, 6: 0}: the fresh one decides
    assert tr.fit_scales([0.0, 1.0], progress=False) == {4: 0.0, 6: 1.0}
    assert seen == [None, 1.0]
    v = json.loads((tmp_path / "run" / "router.json").read_text())["validation"]["scale"]
    assert v["windows"] == {"a": 3}
    assert v["worst_domain"]["1"]["4"] == ["a", pytest.approx(2.718 ** 0.1, rel=1e-3)]
    with pytest.raises(ConfigError, match="invalid scale_windows"):
        TrainConfig(scale_windows=-1, scales="0,1")
    with pytest.raises(ConfigError, match="give scales too"):
        TrainConfig(scale_windows=4)


def test_interval_rule_drops_a_weight_only_for_a_significant_loss(tmp_path, monkeypatch):
    """scale_rule=interval: a weight that loses on one window of a domain but not reliably stays allowed; one
    that loses on every window of a domain is ruled out, and every weight is measured per window."""
    from buddy.train.router import significantly_worse

    assert significantly_worse([1.1, 1.2, 1.1, 1.3], [1.0, 1.0, 1.0, 1.0])
    assert not significantly_worse([1.5, 0.8, 0.9, 0.9], [1.0, 1.0, 1.0, 1.0])
    bb = tiny_backbone("llama", n_layers=8)
    tr = make(bb, tmp_path / "run")
    tr.run(progress=False)
    tr.cfg.scale_rule = "interval"
    prior = {"a": [2.0, 2.0, 2.0, 2.0], "b": [2.0, 2.0, 2.0, 2.0]}
    router = {"a": [1.0, 1.0, 1.0, 1.0], "b": [2.6, 1.9, 1.9, 1.9]}  # b: one bad window, mean 2.075 > 2.0
    calls = []

    def validate(use_router=True, module=None, windows=None, per_window=False):
        assert per_window
        calls.append(use_router)
        w = prior if not use_router else router
        return {"domains": {d: {k: sum(x) / 4 for k in (4, 6)} for d, x in w.items()},
                "window_nll": {d: {k: x for k in (4, 6)} for d, x in w.items()}}

    monkeypatch.setattr(tr, "validate", validate)
    assert tr.fit_scales([0.0, 1.0], progress=False) == {4: 1.0, 6: 1.0}  # strict would keep 0 (b is worse)
    assert calls == [False, True]  # the prior and weight 1 measured afresh, per window
    router["b"] = [2.2, 2.1, 2.2, 2.3]  # worse on every window of b: ruled out
    assert tr.fit_scales([0.0, 1.0], progress=False) == {4: 0.0, 6: 0.0}
    with pytest.raises(ConfigError, match="invalid scale_rule"):
        TrainConfig(scale_rule="loose")


def test_steps_zero_fits_the_weights_of_a_trained_router_without_training_it(tmp_path):
    """`--init DIR --steps 0 --scales ...`: the init router's scores are kept bit for bit, step 0's checkpoint is
    the init router validated as itself (not the prior's numbers), and only the per-k weight changes."""
    bb = tiny_backbone("llama", n_layers=8)
    m = random_router(bb)
    with torch.no_grad():
        m.fc2.weight.mul_(50.0)  # scores far from the prior's, so the router's plan differs from the prior's
    meta = RouterMeta(model="tiny", checksum=bb.checksum, n_layers=8, kv_policy="fill", budgets=(0.5, 1.0),
                      prior="static-greedy", prior_order=list(range(1, 7)), config=m.cfg.__dict__)
    save_router(m, meta, tmp_path / "init")
    cfg = TrainConfig(steps=0, batch=2, seq_len=12, width=32, val_windows=2, init=str(tmp_path / "init"),
                      scales="0,1")
    g = torch.Generator().manual_seed(0)
    tr = RouterTrainer(bb, cfg, list(range(1, 7)), torch.randint(0, 97, (4, 12), generator=g),
                       torch.randint(0, 97, (2, 12), generator=g), tmp_path / "fit")
    tr.run(progress=False)
    fitted, fmeta = load_router(tmp_path / "fit", n_layers=8)
    assert torch.equal(fitted.fc2.weight, m.fc2.weight) and fmeta.steps == 0 and fmeta.best_step == 0
    v = fmeta.validation
    assert v["router_ppl"] != v["prior_only_ppl"]  # the init router's own validation, not the prior's
    assert v["router_ppl"] == pytest.approx({k: v["scale"]["ppl"]["1"][k] for k in v["router_ppl"]}, rel=1e-3)
    assert fmeta.init["sha256"] and set(v["scale"]["by_k"].values()) <= {0.0, 1.0}


def test_steps_zero_needs_a_router_and_weights_to_fit():
    for bad in ({}, {"init": "r"}, {"scales": "0,1"}):
        with pytest.raises(ConfigError, match="steps 0 fits the per-k weights"):
            TrainConfig(steps=0, **bad)
    with pytest.raises(ConfigError, match="invalid steps -1: must be >= 0"):
        TrainConfig(steps=-1, init="r", scales="0,1")
