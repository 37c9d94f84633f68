"""Budgets: parse and validate what a user asks for, and turn it into an exact layer count k.

A budget is either a fraction b of the L layers (0 < b <= 1, k = round(b * L)) or an exact layer count
k. Either way k is clamped to [always-on layers, L]; layer 0 and layer L-1 always run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALWAYS_ON_MIN = 2  # layer 0 and layer L-1
AUTO = "auto"  # budget="auto": the budget predictor chooses a level per prompt (buddy/predictor.py)


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


# --- analytic cost model (pure functions) -----------------------------------------------------------
@dataclass(frozen=True)
class CostShapes:
    """What the cost of a decode token depends on (from the model config)."""

    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    qkv_bias: bool = False
    router_params: int = 0  # Decision Module parameters (0 without a router)

    @classmethod
    def from_config(cls, cfg, router_params: int = 0) -> "CostShapes":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                   cfg.num_key_value_heads, head_dim, cfg.vocab_size, bias, router_params)


def _matmul_params(s: CostShapes) -> tuple[int, int]:
    """(one layer's matrix weights, the K/V projections' matrix weights)."""
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    return 2 * s.hidden * q + 2 * s.hidden * kv + 3 * s.hidden * s.intermediate, 2 * s.hidden * kv


def kv_only_params(s: CostShapes) -> int:
    """Weights the `fill` policy reads for a skipped layer: input norm, K and V projections (+ biases)."""
    kv = s.n_kv_heads * s.head_dim
    return s.hidden + _matmul_params(s)[1] + (2 * kv if s.qkv_bias else 0)


def layer_params(s: CostShapes) -> int:
    """One decoder layer: attention (q, k, v, o), MLP (gate, up, down), two norms, qkv biases."""
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    return _matmul_params(s)[0] + 2 * s.hidden + ((q + 2 * kv) if s.qkv_bias else 0)


def decode_cost(s: CostShapes, k: int, context: int = 0, kv_policy: str = "mask", dtype_bytes: int = 2) -> dict:
    """Weight bytes read and FLOPs for one decode token at batch 1 running k of L layers.

    Counts: the embedding row, k layers, the K/V-only path for the L-k skipped layers under `fill`, the
    final norm, the LM head and the router. FLOPs: 2 per matrix weight plus attention over `context`
    cached positions (QK^T and AV); norms, biases and activations are left out. KV-cache reads are
    reported apart (`kv_bytes`)."""
    if not 2 <= k <= s.n_layers:
        raise BudgetError(f"invalid layer count {k}: must be in [2, {s.n_layers}]")
    filled = s.n_layers - k if kv_policy == "fill" else 0
    layer_mm, kv_mm = _matmul_params(s)
    weights = s.hidden + k * layer_params(s) + filled * kv_only_params(s) + s.hidden + s.vocab * s.hidden \
        + s.router_params
    flops = 2 * (k * layer_mm + filled * kv_mm + s.vocab * s.hidden + s.router_params) \
        + k * 4 * s.n_heads * s.head_dim * context
    kv_bytes = k * 2 * s.n_kv_heads * s.head_dim * context * dtype_bytes
    return {"weight_bytes": weights * dtype_bytes, "flops": flops, "kv_bytes": kv_bytes, "layers": k}


def ideal_speedup(s: CostShapes, k: int, kv_policy: str = "mask", context: int = 0, dtype_bytes: int = 2) -> float:
    """Memory-bound decode bound: bytes read at full depth / bytes read at k layers (router included)."""
    dense = decode_cost(CostShapes(**{**s.__dict__, "router_params": 0}), s.n_layers, context, "mask", dtype_bytes)
    routed = decode_cost(s, k, context, kv_policy, dtype_bytes)
    return (dense["weight_bytes"] + dense["kv_bytes"]) / (routed["weight_bytes"] + routed["kv_bytes"])
