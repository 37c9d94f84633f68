"""Shipped artifacts (calibrations, routers, predictors, depth heads) agree with each other and name how they were made.

These read only the packaged files, so they run without any model installed.
"""

import json
import re

import pytest

from buddy.allocation import load_depth
from buddy.api import DEPTHS, PREDICTORS, ROUTERS
from buddy.calibration import PACKAGED
from buddy.predictor import load_predictor
from buddy.router import load_router

ROUTER_DIRS = sorted(p for p in ROUTERS.iterdir() if p.is_dir())
PREDICTOR_DIRS = sorted(p for p in PREDICTORS.iterdir() if p.is_dir())
DEPTH_DIRS = sorted(p for p in DEPTHS.iterdir() if p.is_dir()) if DEPTHS.is_dir() else []


def _calibration(model: str, data: str = "sotu") -> dict:
    path = PACKAGED / f"{model}-{data}.json"
    assert path.is_file(), f"no packaged {data} calibration for {model}"
    return json.loads(path.read_text())


def test_every_shipped_model_has_calibration_and_router():
    names = {p.stem for p in PACKAGED.glob("*.json")}
    assert {"smollm2-sotu", "smollm2-mix"} <= names
    for name in names:
        model, data = name.rsplit("-", 1)
        assert data in ("sotu", "mix")
        cal = _calibration(model, data)
        assert cal["model"] == model and cal.get("calibration_data", "sotu") == data
        assert (ROUTERS / f"{model}-fill").is_dir(), f"calibration for {model} ships without a router"


@pytest.mark.parametrize("d", ROUTER_DIRS, ids=lambda p: p.name)
def test_shipped_router_matches_its_calibration(d):
    module, meta = load_router(d)
    cal = _calibration(meta.model, meta.calibration)
    assert d.name == f"{meta.model}-{meta.kv_policy}"
    assert meta.checksum == cal["checksum"] and meta.n_layers == cal["n_layers"]
    assert meta.prior_order == cal["orders"][meta.prior]
    assert sorted(meta.prior_order) == list(range(1, meta.n_layers - 1))
    assert module.cfg.n_layers == meta.n_layers
    assert meta.command.startswith("buddy train router") and f"--model {meta.model}" in meta.command
    assert meta.data
    if meta.steps == 0:  # a weight fit of a trained router (`--init DIR --steps 0 --scales`): init names the training
        assert "--steps 0" in meta.command and "--scales" in meta.command and meta.validation["scale"]["by_k"]
        assert meta.init["steps"] > 0 and re.fullmatch(r"[0-9a-f]{64}", meta.init["sha256"])
        assert re.fullmatch(r"[0-9a-f]{40}", meta.init["git_commit"])
    else:
        assert meta.train_seconds > 0
    assert re.fullmatch(r"[0-9a-f]{40}", meta.git_commit)  # a clean commit reproduces it ("+dirty" would not)
    v = meta.validation
    assert set(v["router_ppl"]) == set(v["prior_only_ppl"]) and v["router_ppl"]


@pytest.mark.parametrize("d", PREDICTOR_DIRS, ids=lambda p: p.name)
def test_shipped_predictor_matches_its_model(d):
    cal = _calibration(d.name)
    module, meta = load_predictor(d, checksum=cal["checksum"])
    assert meta.model == d.name and meta.steps > 0 and meta.command.startswith("buddy train predictor")
    assert re.fullmatch(r"[0-9a-f]{40}", meta.git_commit)
    assert module.cfg.levels == tuple(sorted(module.cfg.levels))


@pytest.mark.parametrize("d", DEPTH_DIRS, ids=lambda p: p.name)
def test_shipped_depth_head_matches_its_model_and_router(d):
    head, meta = load_depth(d)
    cal = _calibration(meta.model, "mix")
    assert d.name == f"{meta.model}-{meta.kv_policy}" and (ROUTERS / d.name).is_dir()
    assert meta.checksum == cal["checksum"] and meta.n_layers == cal["n_layers"] == head.cfg.n_layers
    assert meta.command.startswith("buddy train depth") and f"--model {meta.model}" in meta.command
    assert re.fullmatch(r"[0-9a-f]{40}", meta.git_commit) and meta.data and meta.validation["table"]
