"""Planners: turn a layer budget k into a Plan, a [B, T, L] boolean tensor (True = the token runs the layer).

Every plan executes exactly k layers per token, layer 0 and layer L-1 among them; k is one count, one per
row, or one per token ([B, T], allocation="token"). A planner is called
by the engine after layer 0 has run, with layer 0's output for the new tokens and the KV cache (whose
pooled layer-0 K/V is the router's context feature).
"""

from __future__ import annotations

import torch

from .budget import ALWAYS_ON, BudgetError


def plan_table(order: list[int], n_layers: int) -> torch.Tensor:
    """[L+1, L] bool: row k keeps the always-on layers plus the first k-2 layers of `order`.

    `order` lists the intermediate layers 1..L-2, most important first. Rows k < 2 are unused (all False).
    """
    if sorted(order) != list(range(1, n_layers - 1)):
        raise ValueError(f"layer order must be a permutation of the intermediate layers 1..{n_layers - 2}")
    table = torch.zeros(n_layers + 1, n_layers, dtype=torch.bool)
    for k in range(ALWAYS_ON, n_layers + 1):
        table[k, 0] = table[k, n_layers - 1] = True
        table[k, order[: k - ALWAYS_ON]] = True
    return table


def topk_plan(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Exact top-(k-2) of the intermediate-layer scores [B, T, L-2] -> plan [B, T, L]; k is [B] (per row) or
    [B, T] (per token)."""
    B, T, M = scores.shape
    ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = best
    mid = ranks < (k.view(B, -1, 1) - ALWAYS_ON)
    on = torch.ones(B, T, 1, dtype=torch.bool, device=scores.device)
    return torch.cat([on, mid, on], dim=-1)


def as_row_budgets(k, batch: int, device) -> torch.Tensor:
    """An int or a sequence of per-row layer counts -> LongTensor [B]; per-token counts [B, T] pass through."""
    if isinstance(k, int):
        return torch.full((batch,), k, dtype=torch.long, device=device)
    k = torch.as_tensor(k, dtype=torch.long, device=device)
    return k if k.dim() == 2 else k.view(batch)


class Planner:
    """Base class. `plan(h0, cache, k)` -> [B, T, L] bool for the T new tokens in flight."""

    name = "planner"
    needs_kv0 = False  # whether the cache must keep the pooled layer-0 K/V

    def plan(self, h0: torch.Tensor, cache, k) -> torch.Tensor:
        raise NotImplementedError

    def check(self, k: int, n_layers: int) -> None:
        """Raise BudgetError if this planner cannot serve k layers."""


class FullPlanner(Planner):
    name = "full"

    def __init__(self, n_layers: int):
        self.n_layers = n_layers

    def check(self, k, n_layers):
        if k != n_layers:
            raise BudgetError(f"planner 'full' runs all {n_layers} layers but the budget asks for {k}: "
                              "choose a planner such as static-greedy")

    def plan(self, h0, cache, k):
        B, T = h0.shape[:2]
        return torch.ones(B, T, self.n_layers, dtype=torch.bool, device=h0.device)


class GivenPlanner(Planner):
    """Plans decided outside the engine: one layer set for every token (a list of layer indices with
    n_layers, or an [L] bool mask), or per-position plans [B, S, L], sliced to the slots in flight. It
    serves the k its plans hold (greedy removal, training forwards, tests)."""

    name = "given"

    def __init__(self, plans, n_layers: int | None = None):
        if not isinstance(plans, torch.Tensor):
            mask = torch.zeros(n_layers, dtype=torch.bool)
            mask[list(plans)] = True
            plans = mask
        self.plans = plans

    def plan(self, h0, cache, k):
        if self.plans.dim() == 1:
            B, T = h0.shape[:2]
            return self.plans.to(h0.device).expand(B, T, -1)
        s, e = cache.slot
        return self.plans[:, s:e]


class StaticPlanner(Planner):
    """The same layers for every token: a fixed importance order (ShortGPT Block Influence, SLEB greedy)."""

    def __init__(self, name: str, order: list[int], n_layers: int):
        self.name = name
        self.order = list(order)
        self.table = plan_table(self.order, n_layers)

    def plan(self, h0, cache, k):
        B, T = h0.shape[:2]
        rows = self.table.to(h0.device)[as_row_budgets(k, B, h0.device)]  # [B, L], or [B, T, L] per token
        return rows if rows.dim() == 3 else rows[:, None, :].expand(B, T, rows.shape[-1])
