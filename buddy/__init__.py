"""Buddy: budget-driven dynamic depth routing for Llama- and Qwen-family language models."""

__version__ = "0.1.0"
__all__ = ["Budget", "BudgetError", "Engine", "Step", "load", "__version__"]

_LAZY = {"load": "api", "Budget": "budget", "BudgetError": "budget", "Engine": "engine", "Step": "engine"}


def __getattr__(name: str):
    """`buddy.load`, `buddy.Engine`, ... import their modules on first use, so that a light submodule (the
    budget rule, the vLLM plugin) does not pull in transformers."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'buddy' has no attribute {name!r}")
