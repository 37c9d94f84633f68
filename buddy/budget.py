"""Budgets: parse and validate what a user asks for, and turn it into an exact layer count k.

A budget is either a fraction b of the L layers (0 < b <= 1, k = round(b * L)) or an exact layer count
k. Either way k is clamped to [always-on layers, L]; layer 0 and layer L-1 always run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALWAYS_ON_MIN = 2  # layer 0 and layer L-1


class BudgetError(ValueError):
    """A budget the user gave is not valid; the message names the value and the valid range."""


@dataclass(frozen=True)
class Budget:
    """A compute budget: exactly one of `fraction` (0 < b <= 1) or `layers` (an exact count k)."""

    fraction: float | None = None
    layers: int | None = None

    def __post_init__(self):
        if (self.fraction is None) == (self.layers is None):
            raise BudgetError("give exactly one of a budget fraction or a layer count")
        if self.fraction is not None:
            f = self.fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or math.isnan(f) or not 0 < f <= 1:
                raise BudgetError(f"invalid budget {f!r}: must be a fraction of layers in (0, 1]")
        if self.layers is not None:
            k = self.layers
            if isinstance(k, bool) or not isinstance(k, int) or k < ALWAYS_ON_MIN:
                raise BudgetError(f"invalid layer count {k!r}: must be an integer >= {ALWAYS_ON_MIN}")

    def k(self, n_layers: int, always_on: int = ALWAYS_ON_MIN) -> int:
        """Exact number of layers each token executes for a model with `n_layers` layers."""
        if self.layers is not None:
            if self.layers > n_layers:
                raise BudgetError(
                    f"invalid layer count {self.layers}: must be in [{always_on}, {n_layers}] for this model"
                )
            return max(self.layers, always_on)
        return min(n_layers, max(always_on, math.floor(self.fraction * n_layers + 0.5)))

    @property
    def label(self) -> str:
        return f"{self.fraction:g}" if self.fraction is not None else f"{self.layers} layers"


def parse_fraction(text: str) -> Budget:
    """Parse a command-line budget fraction such as '0.5'."""
    try:
        return Budget(fraction=float(text))
    except (TypeError, ValueError):  # BudgetError is a ValueError: one message naming the text as typed
        raise BudgetError(f"invalid budget {text!r}: must be a fraction of layers in (0, 1]") from None


def parse_layers(text: str) -> Budget:
    """Parse a command-line layer count such as '15'."""
    try:
        return Budget(layers=int(text))
    except (TypeError, ValueError):
        raise BudgetError(f"invalid layer count {text!r}: must be an integer >= {ALWAYS_ON_MIN}") from None


def as_budget(budget: float | int | Budget | None = None, layers: int | None = None) -> Budget:
    """Python API helper: accept `budget=0.5`, `layers=15`, or a Budget; None means the full model."""
    if isinstance(budget, Budget):
        if layers is not None:
            raise BudgetError("give either budget= or layers=, not both")
        return budget
    if budget is not None and layers is not None:
        raise BudgetError("give either budget= or layers=, not both")
    if layers is not None:
        return Budget(layers=layers)
    if budget is None:
        return Budget(fraction=1.0)
    if isinstance(budget, str):
        return parse_fraction(budget)
    return Budget(fraction=budget)
