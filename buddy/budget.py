"""Budgets: parse and validate what a user asks for, and turn it into an exact layer count k.

A budget is either a fraction b of the L layers (0 < b <= 1, k = round(b * L)) or an exact layer count
k. Either way k is clamped to [always-on layers, L]; layer 0 and layer L-1 always run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BuddyError

ALWAYS_ON = 2  # layer 0 and layer L-1: every plan runs them (the one place this is stated)
AUTO = "auto"  # budget="auto": the budget predictor chooses a level per prompt (buddy/predictor.py)


class BudgetError(BuddyError):
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
            if isinstance(k, bool) or not isinstance(k, int) or k < ALWAYS_ON:
                raise BudgetError(f"invalid layer count {k!r}: must be an integer >= {ALWAYS_ON}")

    def k(self, n_layers: int, always_on: int = ALWAYS_ON) -> int:
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


BUDGET_RULE = ('`budget` is a fraction of the layers in (0, 1] or "auto"; `layers` is an exact layer count '
               '(>= 2); give at most one of them')


def request_budget(budget=None, layers=None) -> Budget | str:
    """THE budget rule, used by every surface (CLI, Python API, server, lm-eval, vLLM plugin).

    `budget`: None, a fraction in (0, 1] (a number or its text), or "auto". `layers`: None or an exact
    layer count (an integer or its text). Giving both is an error; neither is the full model. An integer
    budget >= 2 is an error that names `layers`, so a layer count is never taken for a fraction or the
    reverse. Returns a Budget, or AUTO."""
    if budget is not None and layers is not None:
        raise BudgetError(f"give either budget or layers, not both (budget={budget!r}, layers={layers!r})")
    if layers is not None:
        if isinstance(layers, str):
            try:
                layers = int(layers.strip())
            except ValueError:
                raise BudgetError(f"invalid layers {layers!r}: must be an integer >= {ALWAYS_ON}") from None
        if isinstance(layers, bool) or not isinstance(layers, int):
            if isinstance(layers, float) and layers.is_integer():
                layers = int(layers)
            else:
                raise BudgetError(f"invalid layers {layers!r}: must be an integer >= {ALWAYS_ON}")
        return Budget(layers=layers)
    if budget is None:
        return Budget(fraction=1.0)
    if isinstance(budget, Budget):
        return budget
    given = budget  # error messages name the value as given
    if isinstance(budget, str):
        text = budget.strip()
        if text.lower() == AUTO:
            return AUTO
        try:
            budget = float(text)
        except ValueError:
            raise BudgetError(f"invalid budget {given!r}: {BUDGET_RULE}") from None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget):
        raise BudgetError(f"invalid budget {given!r}: {BUDGET_RULE}")
    if budget > 1 and float(budget).is_integer():
        raise BudgetError(f"invalid budget {budget!r}: budget is a fraction in (0, 1]; for an exact count of "
                          f"{int(budget)} layers use layers={int(budget)} (--layers {int(budget)})")
    if not 0 < budget <= 1:
        raise BudgetError(f"invalid budget {given!r}: must be a fraction of layers in (0, 1] (or \"auto\")")
    return Budget(fraction=float(budget))


def parse_fraction(text: str) -> Budget:
    """Parse a command-line budget fraction such as '0.5'."""
    b = request_budget(budget=text)
    if b == AUTO:
        raise BudgetError(f"invalid budget {text!r}: must be a fraction of layers in (0, 1]")
    return b


def parse_layers(text: str) -> Budget:
    """Parse a command-line layer count such as '15'."""
    return request_budget(layers=text)


def as_budget(budget: float | int | Budget | None = None, layers: int | None = None) -> Budget:
    """A fixed Budget from `budget=0.5`, `layers=15`, or a Budget (the rule of `request_budget`, without auto)."""
    b = request_budget(budget, layers)
    if b == AUTO:
        raise BudgetError('budget "auto" is chosen per prompt by the budget predictor, not a fixed budget')
    return b


def budget_echo(b: Budget | str, k: int | None = None) -> dict:
    """What responses, traces and eval JSON report about a request's budget, under the same names everywhere:
    `budget` (the fraction or "auto"; None when a layer count was asked for), `layers` (the count asked for,
    else None) and `k` (the layers each token executed, when known)."""
    out = {"budget": AUTO if b == AUTO else b.fraction, "layers": None if b == AUTO else b.layers}
    if k is not None:
        out["k"] = k
    return out


# --- analytic cost model (pure functions) -----------------------------------------------------------
def head_dim_of(cfg) -> int:
    """Attention head width of a transformers config (explicit `head_dim`, else hidden / heads)."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


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
        head_dim = head_dim_of(cfg)
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


def decode_cost(s: CostShapes, k: int, context: int = 0, kv_policy: str = "mask", dtype_bytes: float = 2,
                weight_bytes: float | None = None, head_bytes: float | None = None) -> dict:
    """Weight bytes read and FLOPs for one decode token at batch 1 running k of L layers.

    Counts: the embedding row, k layers, the K/V-only path for the L-k skipped layers under `fill`, the
    final norm, the LM head and the router. FLOPs: 2 per matrix weight plus attention over `context`
    cached positions (QK^T and AV); norms, biases and activations are left out. KV-cache reads are
    reported apart (`kv_bytes`). `dtype_bytes` is bytes per value of the model's dtype (weights and KV
    cache); quantized modes give the weights' own: `weight_bytes` per layer weight (0.625 for 4-bit codes
    with bf16 scales and zeros per 32) and `head_bytes` per LM-head weight (8 bits)."""
    if not 2 <= k <= s.n_layers:
        raise BudgetError(f"invalid layer count {k}: must be in [2, {s.n_layers}]")
    filled = s.n_layers - k if kv_policy == "fill" else 0
    layer_mm, kv_mm = _matmul_params(s)
    body = s.hidden + k * layer_params(s) + filled * kv_only_params(s) + s.hidden + s.router_params
    per_weight = dtype_bytes if weight_bytes is None else weight_bytes
    head = s.vocab * s.hidden * (per_weight if head_bytes is None else head_bytes)
    flops = 2 * (k * layer_mm + filled * kv_mm + s.vocab * s.hidden + s.router_params) \
        + k * 4 * s.n_heads * s.head_dim * context
    kv_bytes = k * 2 * s.n_kv_heads * s.head_dim * context * dtype_bytes
    return {"weight_bytes": body * per_weight + head, "flops": flops, "kv_bytes": kv_bytes, "layers": k}


def ideal_speedup(s: CostShapes, k: int, kv_policy: str = "mask", context: int = 0, dtype_bytes: float = 2,
                  weight_bytes: float | None = None, head_bytes: float | None = None) -> float:
    """Memory-bound decode bound: bytes read at full depth / bytes read at k layers (router included)."""
    dense = decode_cost(CostShapes(**{**s.__dict__, "router_params": 0}), s.n_layers, context, "mask", dtype_bytes,
                        weight_bytes, head_bytes)
    routed = decode_cost(s, k, context, kv_policy, dtype_bytes, weight_bytes, head_bytes)
    return (dense["weight_bytes"] + dense["kv_bytes"]) / (routed["weight_bytes"] + routed["kv_bytes"])
