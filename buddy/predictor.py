"""The Budget Predictor: `budget="auto"` picks a budget level per request from its prompt.

Input: the router's own context features of the prompt (the pooled layer-0 K/V after the last prompt token,
the mean and the last of the prompt's layer-0 states), LayerNorm'd. Output: a categorical distribution over
budget levels (default 0.5, 0.625, 0.75, 0.875, 1.0). Serving takes the most likely level; training (GRPO,
buddy/train/predictor.py) samples. Costs one layer-0 pass over the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .budget import Budget
from .config import DEFAULT_KV_POLICY
from .engine import router_features
from .errors import BuddyError

DEFAULT_LEVELS = (0.5, 0.625, 0.75, 0.875, 1.0)


class PredictorFileError(BuddyError):
    """A predictor file is missing, corrupt, or made for another model."""


@dataclass
class PredictorConfig:
    """kv_dim: pooled layer-0 K/V size; hidden_dim: model hidden size; levels: budget fractions; width: MLP width."""

    kv_dim: int
    hidden_dim: int
    levels: tuple[float, ...] = DEFAULT_LEVELS
    width: int = 128

    def __post_init__(self):
        self.levels = tuple(float(x) for x in self.levels)
        if not self.levels or any(not 0 < x <= 1 for x in self.levels) or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"invalid budget levels {self.levels}: increasing fractions in (0, 1]")


class BudgetPredictor(nn.Module):
    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.norm_kv = nn.LayerNorm(cfg.kv_dim, elementwise_affine=False)
        self.norm_h = nn.LayerNorm(cfg.hidden_dim, elementwise_affine=False)
        self.fc1 = nn.Linear(cfg.kv_dim + 2 * cfg.hidden_dim, cfg.width)
        self.fc2 = nn.Linear(cfg.width, len(cfg.levels))
        nn.init.zeros_(self.fc2.weight)  # starts uniform over levels: the GRPO reference policy
        nn.init.zeros_(self.fc2.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, kv_dim + 2 * hidden] (raw, from `prompt_features`) -> level logits [B, n_levels]."""
        kv, h = feats.float().split([self.cfg.kv_dim, 2 * self.cfg.hidden_dim], dim=-1)
        hm, hl = h.chunk(2, dim=-1)
        x = torch.cat([self.norm_kv(kv), self.norm_h(hm), self.norm_h(hl)], dim=-1)
        return self.fc2(nn.functional.gelu(self.fc1(x)))

    @torch.no_grad()
    def choose(self, feats: torch.Tensor) -> list[float]:
        """The most likely level for each row of features."""
        return [self.cfg.levels[i] for i in self(feats).argmax(dim=-1).tolist()]

    def choose_budgets(self, bb, prompts: list[list[int]], policy: str) -> list[Budget]:
        """One Budget per prompt (token ids), each prompt featurized alone (no padding)."""
        feats = torch.cat([prompt_features(bb, torch.tensor([p]), policy) for p in prompts])
        return [Budget(fraction=x) for x in self.choose(feats)]


@torch.no_grad()
def prompt_features(bb, ids: torch.Tensor, policy: str = DEFAULT_KV_POLICY) -> torch.Tensor:
    """[B, T] prompts (same length) -> [B, kv_dim + 2 * hidden]: pooled layer-0 K/V after the last token,
    mean and last layer-0 state."""
    kv0_mean, h = router_features(bb, ids.to(bb.device), policy)
    return pool_features(kv0_mean, h).cpu()


def pool_features(kv0_mean: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The predictor's input from a prompt's layer-0 outputs: kv0_mean [B, T, kv_dim] (running prefix means)
    and h [B, T, hidden] -> [B, kv_dim + 2 * hidden]: the pooled K/V after the last token, mean and last state."""
    return torch.cat([kv0_mean[:, -1].float(), h.float().mean(dim=1), h[:, -1].float()], dim=-1)


# --- predictor files: safetensors weights + JSON metadata -------------------------------------------
@dataclass
class PredictorMeta:
    model: str
    checksum: str
    config: dict
    tradeoff: float
    planner: str = "router"
    kv_policy: str = DEFAULT_KV_POLICY
    quality: str = "kl"
    group: int = 0
    steps: int = 0
    data: str = ""
    command: str = ""
    git_commit: str = ""
    train_seconds: float = 0.0
    validation: dict = field(default_factory=dict)


def save_predictor(module: BudgetPredictor, meta: PredictorMeta, out_dir: Path) -> None:
    """Write predictor.safetensors and predictor.json atomically into out_dir."""
    from .artifacts import write_artifact

    write_artifact(module, meta, out_dir, "predictor")


def load_predictor(path: Path, checksum: str | None = None) -> tuple[BudgetPredictor, PredictorMeta]:
    from .artifacts import read_artifact

    module, meta = read_artifact(path, "predictor", PredictorMeta, lambda m: BudgetPredictor(PredictorConfig(**m.config)),
                                 PredictorFileError, "predictor", checksum)
    return module.eval(), meta
