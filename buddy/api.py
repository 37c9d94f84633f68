"""Python API: `buddy.load(model, planner=..., kv_policy=...)` returns a ready Engine.

    import buddy
    m = buddy.load("smollm2", planner="static-greedy", kv_policy="fill")
    for step in m.generate("The capital of France is", budget=0.5, max_new_tokens=16):
        print(step.text, end="", flush=True)
"""

from __future__ import annotations

from .backbone import Backbone, load_backbone
from .config import LoadConfig
from .engine import Engine
from .planner import FullPlanner, Planner, StaticPlanner

STATIC_PLANNERS = ("static-bi", "static-greedy")
PLANNERS = ("full", *STATIC_PLANNERS)


class PlannerError(ValueError):
    """Unknown planner, or one this model cannot use yet."""


def make_planner(name: str | None, bb: Backbone) -> Planner:
    """Build a planner by name; None picks the best available for the model."""
    from .prior import CalibrationError, calibration_path, load_calibration

    if name is None:
        name = "static-greedy" if calibration_path(bb).is_file() else "full"
    if name == "full":
        return FullPlanner(bb.n_layers)
    if name in STATIC_PLANNERS:
        cal = load_calibration(bb)
        return StaticPlanner(name, cal["orders"][name], bb.n_layers)
    raise PlannerError(f"unknown planner {name!r}: use one of {', '.join(PLANNERS)}")


def load(model: str = LoadConfig.model, planner: str | None = LoadConfig.planner,
         kv_policy: str = LoadConfig.kv_policy, device: str = LoadConfig.device,
         dtype: str = LoadConfig.dtype) -> Engine:
    cfg = LoadConfig(model=model, planner=planner, kv_policy=kv_policy, device=device, dtype=dtype)
    bb = load_backbone(cfg.model, cfg.device, cfg.dtype)
    return Engine(bb, make_planner(cfg.planner, bb), cfg.kv_policy)
