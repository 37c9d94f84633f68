"""Per-token depth under an exact mean budget: `allocation="token"`.

With `allocation="request"` (the default) every generated token runs exactly k = round(budget * L) layers.
With `allocation="token"` each token gets its own depth, and the request's mean over its generated tokens
stays within half a layer of k after every token, however early the request ends:

    pred = depth_head(h0)                  # predicted next-token NLL at each depth level, from layer 0's output
    goal = k - surplus / horizon           # pay back layers spent above k (or spend those saved) over a horizon
    level = argmin(pred + mu(goal) * levels)   # mu(goal): the NLL a layer must buy, fitted on training text
    depth = clamp(level, exact-mean bounds)    # |layers so far - count * k| <= count // 2, always

The depth head is a ridge regression (`buddy train depth`): features are layer 0's LayerNorm'd output (the
router's own token input), targets the token's NLL under the router at each level. The first generated
token comes from the prompt's forward, which runs every prompt token at k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .budget import ALWAYS_ON
from .errors import BuddyError

DEPTH_LEVELS = (0.35, 0.42, 0.5, 0.58, 0.63, 0.7, 0.77, 0.83, 0.9, 1.0)  # fractions of L: the depths a token may take
HORIZON = 16  # tokens over which a surplus (or saving) of layers is paid back
SPAN = 4  # a token's depth stays within SPAN layers of k (0: any level); chosen on validation by research/depth_span.py


class AllocationError(BuddyError):
    """allocation="token" asked for without a depth head."""


class DepthFileError(BuddyError):
    """A depth head file is missing, corrupt, or made for another model."""


def depth_levels(n_layers: int, fractions=DEPTH_LEVELS) -> list[int]:
    """The distinct layer counts of the level fractions (never below the always-on layers)."""
    return sorted({max(ALWAYS_ON, min(n_layers, round(f * n_layers))) for f in fractions})


@dataclass
class DepthConfig:
    hidden_dim: int
    n_layers: int
    levels: tuple[int, ...]
    horizon: int = HORIZON
    span: int = SPAN

    def __post_init__(self):
        self.levels = tuple(int(x) for x in self.levels)
        if len(self.levels) < 2 or list(self.levels) != sorted(set(self.levels)) or not (
                ALWAYS_ON <= self.levels[0] and self.levels[-1] <= self.n_layers):
            raise ValueError(f"invalid depth levels {self.levels}: increasing layer counts in [2, {self.n_layers}]")
        if self.horizon < 1:
            raise ValueError(f"invalid horizon {self.horizon}: must be >= 1")
        if self.span < 0:
            raise ValueError(f"invalid span {self.span}: must be >= 0 (0: any level)")


class DepthHead(nn.Module):
    """Layer-0 output [B, T, H] -> predicted next-token NLL at each level [B, T, n_levels] (a linear map)."""

    def __init__(self, cfg: DepthConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("weight", torch.zeros(cfg.hidden_dim + 1, len(cfg.levels)))
        self.register_buffer("ks", torch.tensor(cfg.levels, dtype=torch.float32))
        # mu for each integer mean k (index = k); NaN outside [levels[0], levels[-1]]
        self.register_buffer("mu_table", torch.full((cfg.n_layers + 1,), float("nan")))

    @staticmethod
    def features(h0: torch.Tensor) -> torch.Tensor:
        h = nn.functional.layer_norm(h0.float(), h0.shape[-1:])
        return torch.cat([h, torch.ones(*h.shape[:-1], 1, device=h.device)], dim=-1)

    def forward(self, h0: torch.Tensor) -> torch.Tensor:
        return self.features(h0) @ self.weight

    def mu(self, goal: torch.Tensor) -> torch.Tensor:
        """Linear interpolation of the mu table at fractional mean layer counts goal [B] (clamped to the levels)."""
        lo_k, hi_k = self.cfg.levels[0], self.cfg.levels[-1]
        g = goal.clamp(lo_k, hi_k)
        i0 = g.floor().long().clamp(lo_k, hi_k - 1)
        w = g - i0
        t = self.mu_table.to(g.device)
        return t[i0] * (1 - w) + t[i0 + 1] * w

    def choose(self, pred: torch.Tensor, mu: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Level (layer count) minimising predicted NLL + mu * k: pred [B, n_levels], mu [B] -> [B] long. With a
        span and the rows' targets [B], levels farther than `span` from the target are out (the nearest stays)."""
        ks = self.ks.to(pred.device)
        cost = pred + mu[:, None] * ks
        if self.cfg.span and target is not None:
            off = (ks[None] - target[:, None].float()).abs()
            cost = torch.where(off <= self.cfg.span, cost, 1e4 * (1 + off))
        return ks[cost.argmin(-1)].long()


def fit_mu_table(pred: torch.Tensor, levels: list[int], n_layers: int, iters: int = 60) -> torch.Tensor:
    """[n_layers + 1] mu for every integer mean k between the levels: bisection so that the tokens of `pred`
    ([N, n_levels], training predictions) choose levels whose mean is k (larger mu -> fewer layers)."""
    ks = torch.tensor(levels, dtype=torch.float32)
    table = torch.full((n_layers + 1,), float("nan"))
    scale = float((pred.max(0).values - pred.min(0).values).max()) + 1.0
    for k in range(levels[0], levels[-1] + 1):
        lo, hi = 0.0, scale
        for _ in range(iters):
            mu = (lo + hi) / 2
            mean = float(ks[(pred + mu * ks).argmin(-1)].mean())
            lo, hi = (mu, hi) if mean > k else (lo, mu)
        table[k] = (lo + hi) / 2
    table[levels[0]], table[levels[-1]] = scale, 0.0  # the ends (targets there run k every token)
    return table


def fit_ridge(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """Weights [F, n] minimising |x w - y|^2 + ridge |w|^2 (x [N, F] with a bias column, y [N, n])."""
    x, y = x.double(), y.double()
    return torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y).float()


class TokenAccount:
    """The running layer account of each row: target k, generated tokens so far and the layers they ran.

    Rows with per_token False run their target at every token (allocation="request" rows in a mixed batch)."""

    def __init__(self, head: DepthHead | None, targets, per_token, n_layers: int):
        self.head, self.n_layers = head, n_layers
        self.target = torch.as_tensor(targets, dtype=torch.long).view(-1).clone()
        self.per_token = torch.as_tensor(per_token, dtype=torch.bool).view(-1).expand_as(self.target).clone()
        if self.per_token.any() and head is None:
            raise AllocationError("allocation 'token' needs a depth head: train one with `buddy train depth`")
        self.count = torch.zeros_like(self.target)
        self.total = torch.zeros_like(self.target)

    def depths(self, h0: torch.Tensor, prompt: bool) -> torch.Tensor:
        """Layer counts [B, T] for the T new tokens of each row. A prompt forward runs every token at the
        target and counts its last position as the first generated token; later forwards allocate token by
        token (teacher-forced scoring and decode alike)."""
        B, T = h0.shape[:2]
        out = self.target.to(h0.device)[:, None].repeat(1, T)
        if prompt:
            self.count += 1
            self.total += self.target
            return out
        lv = self.head.cfg.levels if self.head is not None else (0, 0)
        inside = (self.target > lv[0]) & (self.target < lv[-1])  # at or past the end levels: k every token
        free = (self.per_token & inside).to(h0.device)
        pred = self.head(h0) if bool(free.any()) else None
        for t in range(T):
            k = self.target.to(h0.device)
            c = self.count.to(h0.device) + 1
            spent = self.total.to(h0.device)
            if pred is not None:
                surplus = (spent - (c - 1) * k).float()
                goal = k.float() - surplus / self.head.cfg.horizon
                chosen = self.head.choose(pred[:, t], self.head.mu(goal), k)
                lo = (c * k - c // 2 - spent).clamp(min=ALWAYS_ON)
                hi = (c * k + c // 2 - spent).clamp(max=self.n_layers)
                k = torch.where(free, torch.maximum(torch.minimum(chosen, hi), lo), k)
            out[:, t] = k
            self.count += 1
            self.total += k.cpu()
        return out

    def mean(self) -> list[float]:
        """Realised mean layers per generated token of each row."""
        return (self.total.float() / self.count.clamp(min=1)).tolist()

    def take_rows(self, index: torch.Tensor) -> None:
        index = index.cpu()
        self.target, self.per_token = self.target[index], self.per_token[index]
        self.count, self.total = self.count[index], self.total[index]

    @classmethod
    def join(cls, parts: list[tuple["TokenAccount | None", int, int]], head, n_layers: int) -> "TokenAccount | None":
        """One account for rows (account or None, row, target k); None when no row allocates per token."""
        if all(a is None or not bool(a.per_token[r]) for a, r, _ in parts):
            return None
        new = cls(head, [k for _, _, k in parts], [bool(a.per_token[r]) if a else False for a, r, _ in parts], n_layers)
        for i, (a, r, _) in enumerate(parts):
            if a is not None:
                new.count[i], new.total[i] = a.count[r], a.total[r]
        return new


@dataclass
class DepthMeta:
    model: str
    checksum: str
    n_layers: int
    kv_policy: str
    router: str
    config: dict
    ridge: float = 0.0
    ahead: int = 0  # the training targets' look-ahead (buddy/train/depth.py); 0: own NLL only
    ahead_weight: float = 0.0
    data: str = ""
    command: str = ""
    git_commit: str = ""
    validation: dict | None = None


def save_depth(head: DepthHead, meta: DepthMeta, out_dir: Path) -> None:
    from .artifacts import write_artifact

    write_artifact(head, meta, out_dir, "depth")


def load_depth(path: Path, checksum: str | None = None, n_layers: int | None = None) -> tuple[DepthHead, DepthMeta]:
    """(DepthHead, DepthMeta) from a depth directory; checks it was made for this model."""
    from .artifacts import read_artifact

    head, meta = read_artifact(path, "depth", DepthMeta, lambda m: DepthHead(DepthConfig(**m.config)), DepthFileError,
                               "depth head", checksum, n_layers)
    if not torch.isfinite(head.weight).all() or math.isnan(float(head.mu_table[head.cfg.levels[0]])):
        raise DepthFileError(f"{Path(path) / 'depth.safetensors'} is corrupt (non-finite weights or an empty mu table)")
    return head, meta
