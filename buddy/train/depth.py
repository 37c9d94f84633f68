"""Fit the depth head of allocation="token" (`buddy train depth`): closed-form ridge regression.

For windows of the training mix it records, at every depth level, each token's next-token NLL under the
routed engine (teacher-forced, prompt part at the level, the rest as decode) and the token's layer-0 output.
A ridge regression maps the LayerNorm'd layer-0 output to a target at every level: the token's NLL there, mixed
with the mean NLL of the next `ahead` tokens at that level (`ahead_weight`), so that a token whose shallow run
goes with a costly stretch after it stays deep. The mu table (the NLL a layer must buy for each mean layer
count) is set on the same training tokens. Validation windows report the
table estimate: the NLL of per-token choices at a mean against fixed budgets at the same mean.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..allocation import (
    DepthConfig,
    DepthHead,
    DepthMeta,
    depth_levels,
    fit_mu_table,
    fit_ridge,
)
from ..artifacts import git_commit
from ..config import ConfigError, at_least
from ..engine import layer0


AHEAD_WEIGHT = 0.0  # 0.6 was best on validation (research/depth_targets.py) but failed the test check: docs/results.md


@dataclass
class DepthTrainConfig:
    """Settings of `buddy train depth`.

    windows: windows per domain of the training mix (train split).
    val_windows: windows per domain of the validation split (reported in depth.json).
    window: tokens per window.
    prefill: each window's first N tokens run as a prompt; the others are the tokens the head learns from.
    ridge: L2 penalty of the regression.
    batch_size: windows scored together.
    targets: mean layer counts at which validation is reported (comma-separated; default 0.5L, 0.63L, 0.87L).
    ahead: how many tokens after each token its target looks at.
    ahead_weight: the weight of those tokens' mean NLL in the target (0: the token's own NLL only).
    """

    windows: int = 8
    val_windows: int = 4
    window: int = 256
    prefill: int = 32
    ridge: float = 10.0
    batch_size: int = 8
    targets: str = ""
    ahead: int = 8
    ahead_weight: float = AHEAD_WEIGHT

    def __post_init__(self):
        at_least(self, 1, "windows", "val_windows", "batch_size", "prefill", "ahead")
        if not 0 <= self.ahead_weight <= 1:
            raise ConfigError(f"invalid ahead_weight {self.ahead_weight!r}: must be in [0, 1]")
        at_least(self, 2, "window")
        if self.prefill >= self.window - 1:
            raise ConfigError(f"invalid prefill {self.prefill}: must be below window - 1 ({self.window - 1})")
        if not self.ridge > 0:
            raise ConfigError(f"invalid ridge {self.ridge!r}: must be > 0")


def ahead_mean(y: torch.Tensor, ahead: int) -> torch.Tensor:
    """y [W, T, n] -> at each position, the mean of the next `ahead` positions (fewer near the end; the
    position itself at the last one)."""
    W, T, n = y.shape
    c = torch.cat([torch.zeros(W, 1, n, dtype=y.dtype, device=y.device), y.cumsum(1)], dim=1)  # c[t] = sum of y[:t]
    t = torch.arange(T, device=y.device)
    hi = (t + 1 + ahead).clamp(max=T)
    cnt = hi - t - 1
    out = (c[:, hi] - c[:, t + 1]) / cnt.clamp(min=1)[None, :, None]
    return torch.where((cnt > 0)[None, :, None], out, y)


def fit_targets(y: torch.Tensor, cfg: DepthTrainConfig) -> torch.Tensor:
    """The regression targets [N, n] from the tables' NLL y [N, n] (window by window, in order)."""
    if cfg.ahead_weight == 0:
        return y
    w = y.view(-1, cfg.window - cfg.prefill - 1, y.shape[-1])
    return ((1 - cfg.ahead_weight) * w + cfg.ahead_weight * ahead_mean(w, cfg.ahead)).reshape(y.shape)


def default_targets(n_layers: int) -> list[int]:
    return [round(f * n_layers) for f in (0.5, 0.63, 0.87)]


@torch.inference_mode()
def tables(engine, windows: torch.Tensor, levels: list[int], cfg: DepthTrainConfig, desc: str):
    """(features [N, H+1], NLL [N, n_levels]) of every decode-part token of the windows."""
    from ..eval.ppl import token_nll, window_logits

    feats, nlls = [], []
    for s in tqdm(range(0, windows.shape[0], cfg.batch_size), desc=desc, unit="batch"):
        ids = windows[s:s + cfg.batch_size].to(engine.bb.device)
        _, h0, _ = layer0(engine.bb, ids, engine.kv_policy)
        feats.append(DepthHead.features(h0[:, cfg.prefill:-1]).reshape(-1, h0.shape[-1] + 1).cpu())
        per = [token_nll(window_logits(engine, ids, k, cfg.prefill)[0], ids)[:, cfg.prefill:] for k in levels]
        nlls.append(torch.stack(per, dim=-1).reshape(-1, len(levels)).float().cpu())
    return torch.cat(feats), torch.cat(nlls)


def table_report(head: DepthHead, x: torch.Tensor, y: torch.Tensor, targets: list[int]) -> dict:
    """Per target mean k: the mean NLL of the head's choices (mu from its table, no controller) against fixed
    levels at the same mean (log-linear between the two neighbouring levels), on x [N, F], y [N, n_levels]."""
    ks = head.ks
    pred = x @ head.weight
    out = {}
    for k in targets:
        if not head.cfg.levels[0] <= k <= head.cfg.levels[-1]:
            continue
        mu = head.mu(torch.tensor([float(k)]))
        choice = (pred + mu * ks).argmin(-1)
        layers = float(ks[choice].mean())
        nll = float(y.gather(1, choice[:, None]).mean())
        fixed = float(np.interp(layers, ks.tolist(), [float(y[:, j].mean()) for j in range(len(ks))]))
        out[str(k)] = {"layers": round(layers, 3), "ppl": round(math.exp(nll), 4), "fixed_ppl": round(math.exp(fixed), 4),
                       "change": round(math.exp(nll - fixed) - 1, 4)}
    return out


def fit_depth(engine, train: torch.Tensor, val: torch.Tensor, cfg: DepthTrainConfig, data: str, command: str):
    """Fit the depth head for `engine` (its planner and KV policy) -> (DepthHead, DepthMeta)."""
    commit = git_commit()  # the code that runs the fit (edits made while it runs do not count)
    L = engine.n_layers
    levels = depth_levels(L)
    head = DepthHead(DepthConfig(hidden_dim=engine.bb.shapes.hidden, n_layers=L, levels=tuple(levels)))
    x, y = tables(engine, train, levels, cfg, "train tables")
    head.weight.copy_(fit_ridge(x, fit_targets(y, cfg), cfg.ridge))
    head.mu_table.copy_(fit_mu_table(x @ head.weight, levels, L))
    xv, yv = tables(engine, val, levels, cfg, "validation tables")
    targets = [int(t) for t in cfg.targets.split(",")] if cfg.targets else default_targets(L)
    meta = DepthMeta(model=engine.bb.name, checksum=engine.bb.checksum, n_layers=L, kv_policy=engine.kv_policy,
                     router=engine.planner.name, config=asdict(head.cfg), ridge=cfg.ridge,
                     ahead=cfg.ahead if cfg.ahead_weight else 0, ahead_weight=cfg.ahead_weight, data=data,
                     command=command, git_commit=commit,
                     validation={"tokens": int(xv.shape[0]), "table": table_report(head, xv, yv, targets)})
    return head, meta
