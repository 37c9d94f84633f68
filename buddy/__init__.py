"""Buddy: budget-driven dynamic depth routing for Llama- and Qwen-family language models."""

__version__ = "0.1.0"

from .api import load  # noqa: E402
from .budget import Budget, BudgetError  # noqa: E402
from .engine import Engine, Step  # noqa: E402

__all__ = ["Budget", "BudgetError", "Engine", "Step", "load", "__version__"]
