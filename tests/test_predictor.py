"""Budget Predictor: shapes, files, and budget="auto" (its training is in tests/train/test_predictor_training.py)."""

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


class WordTokenizer:
    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [zlib.crc32(w.encode()) for w in text.split()]}


class ChatWordTokenizer(WordTokenizer):
    chat_template = "word"

    def __call__(self, text, add_special_tokens=True):
        return super().__call__(text)

    def apply_chat_template(self, turns, add_generation_prompt=False, tokenize=False):
        text = " ".join(f"<{t['role']}> {t['content']}" for t in turns)
        return text + (" <assistant>" if add_generation_prompt else "")


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


def test_prompt_mix_has_the_routers_domains_and_keeps_the_held_out_ones_to_test():
    """The predictor's mix is the router's: chat and code in training, moby_dick and qasper only in test."""
    from buddy.corpus import HELDOUT_DOMAINS, TRAIN_DOMAINS
    from buddy.prompt_mix import ALL_DOMAINS, DOMAINS, mix_items, split_domains

    assert DOMAINS == TRAIN_DOMAINS and "qasper" not in DOMAINS and set(ALL_DOMAINS) - set(DOMAINS) == set(HELDOUT_DOMAINS)
    assert split_domains("train") == split_domains("validation") == DOMAINS and split_domains("test") == ALL_DOMAINS
    for split in ("train", "validation"):
        with pytest.raises(ValueError, match="held out"):
            mix_items(WordTokenizer(), split, 2, domains=("qasper",))
    tok = ChatWordTokenizer()
    held = mix_items(tok, "test", 3, prompt_len=16, cont_len=8, domains=HELDOUT_DOMAINS)
    assert [it.domain for it in held] == ["moby_dick"] * 3 + ["qasper"] * 3
    assert all(len(it.prompt) == 16 and len(it.continuation) == 8 for it in held)
    chat = {s: mix_items(tok, s, 4, prompt_len=16, cont_len=8, domains=("chat", "code_chat"))
            for s in ("train", "validation", "test")}
    for items in chat.values():
        assert [it.domain for it in items] == ["chat"] * 4 + ["code_chat"] * 4
        # the prompt ends at the assistant's header, as `generate --chat` sends it; the answer is the continuation
        assert all(it.prompt[-1] == zlib.crc32(b"<assistant>") and 1 <= len(it.continuation) <= 8 for it in items)
    keys = {s: {tuple(it.prompt) for it in items} for s, items in chat.items()}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert mix_items(WordTokenizer(), "train", 4, domains=("chat",)) == []  # no chat template, no chat domain


