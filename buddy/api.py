"""Python API: `buddy.load(model, planner=..., kv_policy=...)` returns a ready Engine.

    import buddy
    m = buddy.load("smollm2", planner="static-greedy", kv_policy="fill")
    for step in m.generate("The capital of France is", budget=0.5, max_new_tokens=16):
        print(step.text, end="", flush=True)
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .backbone import Backbone, load_backbone
from .config import DEFAULT_KV_POLICY, LoadConfig
from .engine import Engine
from .errors import BuddyError
from .planner import FullPlanner, Planner, StaticPlanner

STATIC_PLANNERS = ("static-bi", "static-greedy", "random")
RANDOM_SEED = 0  # the `random` static baseline: a seeded random layer order, the same on every run
ROUTER_PLANNERS = {  # name -> RouterPlanner options (ablations of the trained router)
    "router": {},
    "router-frozen": {"reroute_every": 0},
    "router-noprior": {"use_prior": False},
    "prior": {"use_router": False},
    "router-nogate": {"use_gate": False},
}
PLANNERS = ("full", *STATIC_PLANNERS, *ROUTER_PLANNERS)
ROUTERS = Path(__file__).parent / "data" / "routers"
PREDICTORS = Path(__file__).parent / "data" / "predictors"
DEPTHS = Path(__file__).parent / "data" / "depth"


def make_predictor(bb: Backbone, path: str | None = None):
    """The budget predictor for budget="auto": from `path`, else the one shipped for the model, else None."""
    from .predictor import load_predictor

    d = Path(path) if path else PREDICTORS / bb.name
    if not path and not (d / "predictor.json").is_file():
        return None
    module, _ = load_predictor(d, checksum=bb.checksum)
    return module.to(bb.device)


def depth_dir(bb: Backbone, kv_policy: str, path: str | None = None) -> Path | None:
    """Where the depth head comes from: `path`, else the one shipped for the model and KV policy, else None."""
    if path:
        return Path(path)
    d = DEPTHS / f"{bb.name}-{kv_policy}"
    return d if (d / "depth.json").is_file() else None


def make_depth(bb: Backbone, kv_policy: str, path: str | None = None):
    """The depth head for allocation="token" from `depth_dir`, or None."""
    from .allocation import load_depth

    d = depth_dir(bb, kv_policy, path)
    if d is None:
        return None
    head, _ = load_depth(d, checksum=bb.checksum, n_layers=bb.n_layers)
    return head.to(bb.device)


def router_dir(bb: Backbone, kv_policy: str, fallback: bool = True) -> Path | None:
    """The shipped router for this model: the one trained for `kv_policy`, else (with `fallback`) the `fill` one."""
    for policy in (kv_policy, DEFAULT_KV_POLICY) if fallback else (kv_policy,):
        d = ROUTERS / f"{bb.name}-{policy}"
        if (d / "router.json").is_file():
            return d
    return None


class PlannerError(BuddyError):
    """Unknown planner, or one this model cannot use yet."""


def make_planner(name: str | None, bb: Backbone, kv_policy: str = LoadConfig.kv_policy, router: str | None = None,
                 reroute_every: int | None = None, calibration: str | None = LoadConfig.calibration) -> Planner:
    """Build a planner by name; None picks the best available: the router (`router`, else the one shipped),
    if it was trained for this KV policy, else static-greedy (full without a calibration). A `fill` router is
    measured worse than static-greedy under `zero` (docs/results.md, "KV policy zero") and `mask`
    (docs/results-history.md, KV policies), so it runs under them only when asked for by name."""
    from .calibration import calibration_path, load_calibration
    from .router import RouterPlanner, load_router, prior_scores

    rdir = Path(router) if router else router_dir(bb, kv_policy)
    wants_router = name is None or name in ROUTER_PLANNERS
    loaded = load_router(rdir, checksum=bb.checksum, n_layers=bb.n_layers) if router and wants_router else None
    if name is None:
        own = router_dir(bb, kv_policy, fallback=False) if router is None else loaded[1].kv_policy == kv_policy
        if router is not None and not own:
            warnings.warn(f"router {rdir} was trained for kv policy {loaded[1].kv_policy!r}, not {kv_policy!r}: "
                          "the default planner is static-greedy (--planner router uses it anyway)", stacklevel=2)
        name = "router" if own else ("static-greedy" if calibration_path(bb, calibration).is_file() else "full")
    if name in ROUTER_PLANNERS:
        if rdir is None:
            raise PlannerError(f"no trained router for model {bb.name!r}: train one with "
                               f"`buddy train router --model {bb.name}` and pass --router DIR")
        module, meta = loaded or load_router(rdir, checksum=bb.checksum, n_layers=bb.n_layers)
        if meta.kv_policy != kv_policy:
            warnings.warn(f"router {rdir} was trained for kv policy {meta.kv_policy!r}, not {kv_policy!r}: "
                          "expect lower quality (docs/results-history.md, KV policies)", stacklevel=2)
        opts = dict(ROUTER_PLANNERS[name])
        if reroute_every is not None and name != "router-frozen":
            opts["reroute_every"] = reroute_every
        return RouterPlanner(module.to(bb.device), prior_scores(meta.prior_order, bb.n_layers), name=name, **opts)
    if name == "full":
        return FullPlanner(bb.n_layers)
    if name == "random":
        import torch

        gen = torch.Generator().manual_seed(RANDOM_SEED)
        order = (torch.randperm(bb.n_layers - 2, generator=gen) + 1).tolist()
        return StaticPlanner(name, order, bb.n_layers)
    if name in STATIC_PLANNERS:
        cal = load_calibration(bb, calibration)
        return StaticPlanner(name, cal["orders"][name], bb.n_layers)
    raise PlannerError(f"unknown planner {name!r}: use one of {', '.join(PLANNERS)}")


def load(model: str = LoadConfig.model, **options) -> Engine:
    """A ready Engine. `options` are the fields of `buddy.config.LoadConfig` (planner, kv_policy, device,
    dtype, router, reroute_every, predictor, calibration, depth); unknown names raise ConfigError."""
    from dataclasses import fields

    from .config import ConfigError

    known = {f.name for f in fields(LoadConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown load option(s) {', '.join(unknown)}: use {', '.join(sorted(known - {'model'}))}")
    cfg = LoadConfig(model=model, **options)
    bb = load_backbone(cfg.model, cfg.device, cfg.dtype, cfg.quant)
    return Engine(bb, make_planner(cfg.planner, bb, cfg.kv_policy, cfg.router, cfg.reroute_every, cfg.calibration),
                  cfg.kv_policy, make_predictor(bb, cfg.predictor), make_depth(bb, cfg.kv_policy, cfg.depth))
