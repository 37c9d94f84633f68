"""Offline layer importance: Block Influence, greedy removal, calibration files."""

import json

import pytest
import torch
from conftest import tiny_backbone

from buddy.calibration import (
    CalibrationError,
    block_influence,
    calibrate,
    greedy_removal,
    load_calibration,
)
from buddy.engine import Engine
from buddy.eval.ppl import evaluate_windows
from buddy.planner import GivenPlanner


def test_block_influence_matches_hidden_state_cosines():
    bb = tiny_backbone("llama", n_layers=5)
    ids = torch.randint(0, 97, (2, 16))
    bi = block_influence(bb, ids)
    with torch.no_grad():
        hs = bb.model(ids, output_hidden_states=True).hidden_states  # embeddings, then each layer (last is normed)
    expect0 = 1 - torch.nn.functional.cosine_similarity(hs[0], hs[1], dim=-1).mean()
    assert len(bi) == 5 and abs(bi[0] - float(expect0)) < 1e-4


def test_greedy_removal_removes_the_cheapest_layer_first():
    bb = tiny_backbone("qwen2", n_layers=5)
    ids = torch.randint(0, 97, (2, 16))
    removed, ppls, dense = greedy_removal(bb, ids, progress=False)
    assert sorted(removed) == [1, 2, 3]
    first = {i: evaluate_windows(Engine(bb, GivenPlanner([j for j in range(5) if j != i], 5)), ids,
                                 layers=4).ppl for i in (1, 2, 3)}
    assert removed[0] == min(first, key=first.get) and abs(ppls[0] - first[removed[0]]) < 1e-6


def test_calibration_file_roundtrip_and_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDDY_CACHE", str(tmp_path))
    bb = tiny_backbone("llama", n_layers=5)
    bb.__dict__["checksum"] = "abc"  # the cached property's slot
    with pytest.raises(CalibrationError, match="buddy calibrate"):
        load_calibration(bb)
    cal = calibrate(bb, torch.randint(0, 97, (2, 16)), command="buddy calibrate --model tiny", data="random",
                    progress=False)
    assert sorted(cal["orders"]["static-bi"]) == sorted(cal["orders"]["static-greedy"]) == [1, 2, 3]
    from buddy.calibration import calibration_path, save_calibration

    save_calibration(cal, calibration_path(bb))
    assert load_calibration(bb)["orders"] == cal["orders"]
    bad = dict(cal, checksum="other")
    save_calibration(bad, calibration_path(bb))
    with pytest.raises(CalibrationError, match="another model"):
        load_calibration(bb)
    calibration_path(bb).write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        load_calibration(bb)
    json.dumps(cal)  # serialisable


def test_calibrate_writes_to_the_user_cache_never_into_the_package(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from buddy.calibration import PACKAGED
    from buddy.cli import main

    monkeypatch.setenv("BUDDY_CACHE", str(tmp_path / "cache"))
    shipped = {p: p.read_bytes() for p in PACKAGED.glob("*.json")}
    assert main(["calibrate", "--model", str(tiny_ckpt), "--data", "sotu", "--windows", "2", "--window", "16",
                 "--dtype", "float32", "--device", "cpu"]) == 0
    written = list((tmp_path / "cache" / "calibration").glob("*-sotu.json"))
    assert len(written) == 1 and {p: p.read_bytes() for p in PACKAGED.glob("*.json")} == shipped
    assert main(["calibrate", "--model", str(tiny_ckpt), "--data", "wiki"]) == 2
    assert "invalid data 'wiki'" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tiny_ckpt), "--out", str(tmp_path)]) == 2  # a directory
