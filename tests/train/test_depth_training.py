"""Depth head fitting (buddy/train/depth.py, `buddy train depth`): a fitted head is usable, and the CLI trains one that generate and eval then use."""

import torch
from conftest import tiny_backbone
from test_allocation import L, router_engine

from buddy.allocation import (
    load_depth,
    save_depth,
)


def test_fit_depth_on_a_tiny_model_gives_a_usable_head(tmp_path):
    from buddy.train.depth import DepthTrainConfig, fit_depth

    bb = tiny_backbone("llama", n_layers=L)
    eng = router_engine(bb)
    g = torch.Generator().manual_seed(0)
    train, val = torch.randint(0, 97, (6, 24), generator=g), torch.randint(0, 97, (4, 24), generator=g)
    cfg = DepthTrainConfig(window=24, prefill=4, batch_size=3, targets="5,7")
    head, meta = fit_depth(eng, train, val, cfg, data="random ids", command="test")
    assert meta.validation["tokens"] == 4 * (24 - 4 - 1) and set(meta.validation["table"]) == {"5", "7"}
    assert torch.isfinite(head.weight).all() and not torch.isnan(head.mu_table[head.cfg.levels[0]:]).any()
    save_depth(head, meta, tmp_path / "d")
    eng.depth, _ = load_depth(tmp_path / "d", checksum=bb.checksum, n_layers=L)
    from buddy.eval.ppl import evaluate_windows

    r = evaluate_windows(eng, val, layers=6, prefill=4, allocation="token")
    assert abs(r.layers_per_token - 6) <= 0.5


def test_ahead_targets_mix_each_tokens_nll_with_the_mean_of_the_next_ones():
    import pytest

    from buddy.config import ConfigError
    from buddy.train.depth import DepthTrainConfig, ahead_mean, fit_targets

    y = torch.arange(12.0).view(1, 6, 2)  # one window, 6 positions, 2 levels
    assert ahead_mean(y, 2)[0].tolist() == [[3, 4], [5, 6], [7, 8], [9, 10], [10, 11], [10, 11]]
    cfg = DepthTrainConfig(window=8, prefill=1, ahead=2, ahead_weight=0.5)  # 8 - 1 - 1 = 6 positions per window
    flat = torch.cat([y, y + 100]).reshape(-1, 2)  # two windows, rows in order
    got = fit_targets(flat, cfg).view(2, 6, 2)
    assert torch.equal(got[0], 0.5 * y[0] + 0.5 * ahead_mean(y, 2)[0])  # windows do not leak into each other
    assert torch.equal(got[1], got[0] + 100)
    assert fit_targets(flat, DepthTrainConfig(window=8, prefill=1, ahead_weight=0.0)) is flat
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="ahead_weight"):
            DepthTrainConfig(ahead_weight=bad)


def test_train_depth_then_generate_and_eval_with_it(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """`buddy train depth` end to end (the mix replaced by random windows), then `generate --allocation token`
    and `eval ppl --allocation token` with the head it wrote."""
    import json

    import buddy.corpus as corpus
    from buddy.cli import main

    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(corpus, "mix_windows",
                        lambda tok, split, window, per, domains=None: {"prose": torch.randint(2, 97, (3, window), generator=g)})
    common = ["--model", str(tiny_ckpt), "--planner", "random", "--dtype", "float32", "--device", "cpu"]
    assert main(["train", "depth", *common, "--window", "16", "--prefill", "2", "--windows", "1", "--val-windows", "1",
                 "--ahead", "3", "--ahead-weight", "0.5", "--out", str(tmp_path / "d")]) == 0
    head, meta = load_depth(tmp_path / "d")
    assert meta.command.startswith("buddy train depth") and meta.kv_policy == "fill"
    assert (meta.ahead, meta.ahead_weight) == (3, 0.5)
    capsys.readouterr()
    assert main(["generate", *common, "--depth", str(tmp_path / "d"), "--allocation", "token", "--layers", "4",
                 "--max-new-tokens", "12", "--trace", str(tmp_path / "t.jsonl"), "w1 w2 w3"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    depths = [len(r["executed_layers"]) for r in rows]
    assert abs(sum(depths) / len(depths) - 4) <= 0.5
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(400)))
    capsys.readouterr()
    assert main(["eval", "ppl", *common, "--depth", str(tmp_path / "d"), "--allocation", "token", "--layers", "4",
                 "--text-file", str(text), "--window", "32", "--prefill", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["allocation"] == "token" and abs(out["layers_per_token"] - 4) <= 0.5
    # the sweep: per-token depth on a perplexity domain, a row per allocation, multiple choice refused
    sweep = ["sweep", "--model", str(tiny_ckpt), "--dtype", "float32", "--device", "cpu", "--depth", str(tmp_path / "d"),
             "--methods", "dense,random", "--layers", "4", "--tasks", "ppl:code", "--limit", "2",
             "--out", str(tmp_path / "s.jsonl")]
    assert main([*sweep, "--allocation", "token"]) == 0 and main(sweep) == 0
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["allocation"]) for r in rows) == [
        ("dense", "request"), ("dense", "token"), ("random", "request"), ("random", "token")]
    routed = {r["allocation"]: r for r in rows if r["method"] == "random"}
    assert abs(routed["token"]["layers_per_token"] - 4) <= 0.5 and routed["request"]["layers_per_token"] == 4
    assert routed["token"]["ppl"] != routed["request"]["ppl"]
    assert main([*sweep, "--allocation", "token"]) == 0  # resumed: nothing left to run
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    assert main([*sweep[:-1], str(tmp_path / "mc.jsonl"), "--allocation", "token", "--tasks", "piqa"]) == 2
    assert "multiple-choice" in capsys.readouterr().err
