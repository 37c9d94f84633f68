"""Budget Predictor: shapes, GRPO on a toy problem, determinism, resume, files, and budget="auto"."""

import zlib

import pytest
import torch
from conftest import tiny_backbone

from buddy.budget import AUTO, BudgetError
from buddy.engine import Engine
from buddy.planner import StaticPlanner
from buddy.predictor import (
    BudgetPredictor,
    PredictorConfig,
    PredictorFileError,
    PredictorMeta,
    load_predictor,
    prompt_features,
    save_predictor,
)
from buddy.train.predictor import (
    PredictorTrainConfig,
    PredictorTrainer,
    grpo_step,
    rewards,
)


def tiny_engine(predictor=None):
    bb = tiny_backbone("llama")
    return Engine(bb, StaticPlanner("static", [4, 3, 2, 1], bb.n_layers), "fill", predictor)


def feat_dim(bb):
    return 2 * bb.shapes.n_kv_heads * bb.shapes.head_dim + 2 * bb.model.config.hidden_size


def test_shapes():
    bb = tiny_backbone("llama")
    f = prompt_features(bb, torch.randint(0, 97, (3, 10)))
    kv = 2 * bb.shapes.n_kv_heads * bb.shapes.head_dim
    assert f.shape == (3, feat_dim(bb))
    p = BudgetPredictor(PredictorConfig(kv, bb.model.config.hidden_size, (0.5, 0.75, 1.0)))
    logits = p(f)
    assert logits.shape == (3, 3)
    assert torch.allclose(torch.softmax(logits, -1), torch.full((3, 3), 1 / 3))  # starts uniform (the reference)
    with pytest.raises(ValueError):
        PredictorConfig(kv, 64, (0.75, 0.5))


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
    e = toy_trainer(tmp_path / "e", 50, seed=1)
    e.run(progress=False)
    assert not torch.equal(e.policy.fc1.weight, a.policy.fc1.weight)


def test_predictor_files_round_trip_and_reject_other_models(tmp_path):
    p = BudgetPredictor(PredictorConfig(8, 4, (0.5, 1.0), 16))
    torch.nn.init.normal_(p.fc2.weight)
    meta = PredictorMeta(model="tiny", checksum="abc", config={"kv_dim": 8, "hidden_dim": 4, "levels": [0.5, 1.0],
                                                                "width": 16}, tradeoff=1.0)
    save_predictor(p, meta, tmp_path)
    q, m = load_predictor(tmp_path, checksum="abc")
    x = torch.randn(2, 16)
    assert torch.equal(p(x), q(x)) and m.tradeoff == 1.0
    with pytest.raises(PredictorFileError, match="other weights"):
        load_predictor(tmp_path, checksum="def")
    (tmp_path / "predictor.safetensors").write_bytes(b"junk")
    with pytest.raises(PredictorFileError, match="corrupt"):
        load_predictor(tmp_path)


def test_auto_budget_in_generate_and_scoring(tiny_ckpt):
    from buddy.backbone import load_backbone

    bb = load_backbone(str(tiny_ckpt), "cpu", "float32")
    engine = Engine(bb, StaticPlanner("static", [4, 3, 2, 1], bb.n_layers), "fill")
    with pytest.raises(BudgetError, match="predictor"):
        list(engine.generate([1, 2, 3], budget=AUTO, max_new_tokens=2))
    bb = engine.bb
    p = BudgetPredictor(PredictorConfig(2 * bb.shapes.n_kv_heads * bb.shapes.head_dim, bb.model.config.hidden_size,
                                        (0.5, 1.0), 16))
    with torch.no_grad():
        p.fc2.bias.copy_(torch.tensor([5.0, 0.0]))  # always the 0.5 level
    engine.predictor = p
    assert engine.choose_k([[1, 2, 3], [4]]) == [3, 3]
    steps = list(engine.generate([1, 2, 3], budget=AUTO, max_new_tokens=3, ignore_eos=True))
    assert [len(s.layers) for s in steps] == [3, 3, 3]  # round(0.5 * 6) = 3 layers
    from buddy.eval.zeroshot import score_requests

    pairs = [([1, 2, 3], [4, 5]), ([6, 7], [8])]
    auto, _, layers, tokens = score_requests(engine, pairs, AUTO)
    fixed, _, _, _ = score_requests(engine, pairs, 3)
    assert auto == pytest.approx(fixed) and layers == 3 * tokens


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


class WordTokenizer:
    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [zlib.crc32(w.encode()) for w in text.split()]}


def test_prompt_mix_splits_are_disjoint_and_test_is_what_the_sweep_evaluates():
    from buddy.eval.tasks import load_mc
    from buddy.eval.zeroshot import tokenize_pair
    from buddy.prompt_mix import mix_items

    tok, doms = WordTokenizer(), ("lambada", "squad", "gsm8k", "arc_easy")
    splits = {s: mix_items(tok, s, 20, prompt_len=32, cont_len=8, domains=doms) for s in ("train", "validation", "test")}
    for s, items in splits.items():
        assert [it.domain for it in items] == [d for d in doms for _ in range(20)]
        assert all(1 <= len(it.prompt) <= 4 * 32 and 1 <= len(it.continuation) <= 8 for it in items)
    keys = {s: {(it.domain, tuple(it.prompt)) for it in items} for s, items in splits.items()}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    docs = load_mc("arc_easy", 100)  # the documents `buddy sweep --limit 100` scores
    gold = {tuple(tokenize_pair(tok, *d.requests[d.gold])[0]) for d in docs}
    test_arc = [it for it in splits["test"] if it.domain == "arc_easy"]
    assert all(tuple(it.prompt) in gold for it in test_arc)
    with pytest.raises(ValueError, match="unknown domain"):
        mix_items(tok, "train", 2, domains=("nope",))
    with pytest.raises(ValueError, match="unknown split"):
        mix_items(tok, "dev", 2, domains=doms)


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
