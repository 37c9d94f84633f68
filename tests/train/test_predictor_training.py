"""Budget predictor training (buddy/train/predictor.py): GRPO moves probability to the better level, the reward's trade-off, deterministic and resumable runs that refuse changed settings, quality tables."""

import pytest
import torch
from test_predictor import feat_dim, tiny_engine

from buddy.config import ConfigError
from buddy.predictor import (
    BudgetPredictor,
    PredictorConfig,
    prompt_features,
)
from buddy.train.predictor import (
    PredictorTrainConfig,
    PredictorTrainer,
    grpo_step,
    rewards,
)


def test_grpo_step_moves_probability_to_the_better_level():
    torch.manual_seed(0)
    cfg = PredictorTrainConfig(group=4, batch=32, inner=2, lr=1e-2, beta=0.0)
    p = BudgetPredictor(PredictorConfig(8, 4, (0.5, 0.75, 1.0), 16))
    opt = torch.optim.Adam(p.parameters(), lr=cfg.lr)
    feats = torch.randn(32, 16)
    reward = torch.tensor([[0.0, 1.0, 0.2]]).expand(32, 3)
    gen = torch.Generator().manual_seed(0)
    before = torch.softmax(p(feats), -1)[:, 1].mean()
    for _ in range(5):
        grpo_step(p, opt, feats, reward, cfg, gen)
    after = torch.softmax(p(feats), -1)[:, 1].mean()
    assert after > before + 0.05


def test_reward_trades_quality_for_cost():
    q = torch.tensor([[-2.0, -0.5, 0.0]])
    lv = torch.tensor([0.5, 0.75, 1.0])
    assert rewards(q, lv, 0.0).argmax() == 2
    assert rewards(q, lv, 10.0).argmax() == 0


def toy_trainer(tmp_path, steps, seed=0):
    engine = tiny_engine()
    cfg = PredictorTrainConfig(steps=steps, batch=16, group=4, seed=seed, tradeoff=1.0, width=16,
                               levels="0.5,0.75,1")
    t = PredictorTrainer(engine, cfg, tmp_path, command="test")
    g = torch.Generator().manual_seed(1)
    F = feat_dim(engine.bb)
    feats = torch.randn(64, F, generator=g)
    hard = feats[:, 0] > 0  # a feature the predictor can see decides which prompts need depth
    quality = torch.stack([torch.where(hard, -2.0, -0.1), torch.where(hard, -1.0, -0.05), torch.zeros(64)], 1)
    t.train = (feats, quality)
    t.val = (feats[:32], quality[:32])
    return t


def test_training_is_deterministic_and_resumes(tmp_path):
    a = toy_trainer(tmp_path / "a", 50)
    va = a.run(progress=False)
    b = toy_trainer(tmp_path / "b", 50)
    b.run(progress=False)
    for x, y in zip(a.policy.state_dict().values(), b.policy.state_dict().values()):
        assert torch.equal(x, y)
    # the policy learned the context: deep levels for hard prompts, shallow for easy ones
    with torch.no_grad():
        pick = a.policy(a.train[0]).argmax(-1)
    hard = a.train[0][:, 0] > 0
    assert (pick[hard] >= 1).float().mean() > 0.8 and (pick[~hard] == 0).float().mean() > 0.8
    assert 0.5 < va["mean_level"] < 1.0
    c = toy_trainer(tmp_path / "c", 25)  # interrupted at 25 ...
    c.run(progress=False)
    d = toy_trainer(tmp_path / "c", 50)  # ... and resumed to 50
    assert d.load_state() and d.step == 25
    d.run(progress=False)
    for x, y in zip(a.policy.state_dict().values(), d.policy.state_dict().values()):
        assert torch.equal(x, y)
    with pytest.raises(ConfigError, match="seed 0 \\(now 1\\)"):  # resuming with a changed setting
        toy_trainer(tmp_path / "c", 50, seed=1).load_state()
    e = toy_trainer(tmp_path / "e", 50, seed=1)
    e.run(progress=False)
    assert not torch.equal(e.policy.fc1.weight, a.policy.fc1.weight)


def test_item_table_batches_by_shape_and_keeps_item_order():
    from buddy.prompt_mix import MixItem
    from buddy.train.predictor import item_table, quality_table

    engine = tiny_engine()
    g = torch.Generator().manual_seed(3)
    shapes = [(6, 3), (4, 2), (6, 3), (5, 4), (4, 2), (6, 3)]
    items = [MixItem("d", torch.randint(0, 97, (p,), generator=g).tolist(),
                     torch.randint(0, 97, (c,), generator=g).tolist()) for p, c in shapes]
    levels = (0.5, 0.75, 1.0)
    feats, q = item_table(engine, items, levels, progress=False)
    assert feats.shape == (6, feat_dim(engine.bb)) and q.shape == (6, 3)
    for i, it in enumerate(items):  # each row equals the item measured alone
        ids = torch.tensor([it.prompt + it.continuation])
        alone = quality_table(engine, ids, levels, len(it.prompt), progress=False)
        assert torch.allclose(q[i], alone[0], atol=1e-5)
        assert torch.allclose(feats[i], prompt_features(engine.bb, ids[:, :len(it.prompt)])[0], atol=1e-5)
    assert (q[:, -1] == 0).all() and (q[:, 0] < 0).all()  # full depth is the dense model


def test_quality_tables_are_computed_once_and_written_atomically(tmp_path):
    from buddy.train.predictor import _cached

    calls = []

    def compute():
        calls.append(1)
        return {"quality": torch.arange(6.0).reshape(3, 2).t()}  # non-contiguous on purpose

    path = tmp_path / "sub" / "t.safetensors"
    a = _cached(path, compute)
    b = _cached(path, compute)
    assert len(calls) == 1 and torch.equal(a["quality"], b["quality"])
    assert [p.name for p in path.parent.iterdir()] == ["t.safetensors"]  # no temporary file left


def test_quality_tables_are_keyed_by_the_router_and_the_static_order():
    """A table measured with one router (or calibration) is never read back for another."""
    from conftest import tiny_backbone

    from buddy.planner import StaticPlanner
    from buddy.router import DecisionModule, RouterConfig, RouterPlanner, prior_scores
    from buddy.train.predictor import _table_path, planner_fingerprint

    bb = tiny_backbone("llama")
    cfg = PredictorTrainConfig()
    torch.manual_seed(0)
    rcfg = RouterConfig(n_layers=bb.n_layers, kv_dim=2 * bb.shapes.n_kv_heads * bb.shapes.head_dim,
                        hidden_dim=bb.shapes.hidden, width=8)
    a, b = DecisionModule(rcfg), DecisionModule(rcfg)
    prior = prior_scores([4, 3, 2, 1], bb.n_layers)
    path = lambda p: _table_path(bb, p, "fill", cfg, "train", 8)  # noqa: E731
    assert path(RouterPlanner(a, prior)) == path(RouterPlanner(a, prior.clone()))
    assert path(RouterPlanner(a, prior)) != path(RouterPlanner(b, prior))
    assert path(RouterPlanner(a, prior)) != path(RouterPlanner(a, prior_scores([1, 2, 3, 4], bb.n_layers)))
    s1, s2 = StaticPlanner("static", [4, 3, 2, 1], bb.n_layers), StaticPlanner("static", [1, 2, 3, 4], bb.n_layers)
    assert path(s1) != path(s2) and planner_fingerprint(s1).startswith("static-")


def test_bucket_items_keep_the_prompts_end_and_the_continuations_start():
    from buddy.prompt_mix import MixItem
    from buddy.train.predictor import bucket_items, bucket_length

    items = [MixItem("d", list(range(100)), list(range(1000, 1030))), MixItem("d", list(range(130)), [7, 8, 9]),
             MixItem("d", list(range(9)), list(range(1000, 1005)))]
    a, b, c = bucket_items(items)
    assert a.prompt == list(range(4, 100)) and a.continuation == list(range(1000, 1024))  # 96 and 24 tokens
    assert b.prompt == list(range(2, 130)) and b.continuation == [7, 8, 9]  # 128; shorter than every bucket: whole
    assert c.prompt == list(range(9)) and c.continuation == list(range(1000, 1004))
    # no cap: longer settings keep longer buckets
    assert [bucket_length(n, True) for n in (15, 16, 127, 130, 511, 600)] == [15, 16, 112, 128, 480, 576]
    assert [bucket_length(n, False) for n in (3, 7, 33, 64, 100)] == [3, 4, 32, 64, 96]
    # a tokenizer's leading BOS stays first
    (d,) = bucket_items([MixItem("d", [1, *range(10, 110)], [5] * 8)], bos=1)
    assert d.prompt == [1, *range(14, 110)] and len(d.prompt) == 97
