"""The Decision Module: a two-layer MLP scoring the intermediate layers, and the router planner.

Inputs per token t: the running mean of layer 0's keys and values over positions <= t (kept
incrementally by the KV cache), the token's hidden state after layer 0, and the budget k/L.
Final score = MLP score + prior (from `buddy calibrate`); exactly k-2 intermediate layers by top-k.
This module knows nothing of transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .budget import ALWAYS_ON
from .config import LoadConfig
from .errors import BuddyError
from .planner import Planner, as_row_budgets, topk_plan


class RouterFileError(BuddyError):
    """A router file is missing, corrupt, or made for another model."""


@dataclass
class RouterConfig:
    """Shape of a Decision Module.

    n_layers: layers of the base model (the router scores the L-2 intermediate ones).
    kv_dim: size of the pooled layer-0 K/V feature (2 * kv heads * head dim).
    hidden_dim: the base model's hidden size (the newest token's state after layer 0).
    width: the MLP's hidden width.
    budget_features: number of Fourier features encoding the budget fraction.
    budget_onehot: also encode the exact layer count k one-hot (lets each budget learn its own layer set).
    gate: a second head on the same hidden layer: per token and budget, whether the router's plan is
        expected to beat the prior's plan; where it is not, the token runs the prior's plan (trained after
        the scores, with `buddy train router --estimator gate --init DIR`).
    standardize: subtract each input feature's mean and divide by its standard deviation, both measured over
        training tokens (`fit_standardization`), before the LayerNorms. Without it a feature that is nearly
        constant across tokens hides the part that varies: Qwen2.5's pooled layer-0 K/V (large key biases) vary
        across tokens by 0.07% of their energy, SmolLM2's by 4% (`research/router_inputs.py`).
    """

    n_layers: int
    kv_dim: int
    hidden_dim: int
    width: int = 256
    budget_features: int = 8
    budget_onehot: bool = False
    gate: bool = False
    standardize: bool = False


class DecisionModule(nn.Module):
    def __init__(self, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        n_in = cfg.kv_dim + cfg.hidden_dim + 2 * cfg.budget_features + 1 + (cfg.n_layers + 1) * cfg.budget_onehot
        self.norm_kv = nn.LayerNorm(cfg.kv_dim, elementwise_affine=False)
        self.norm_h = nn.LayerNorm(cfg.hidden_dim, elementwise_affine=False)
        self.fc1 = nn.Linear(n_in, cfg.width)
        self.fc2 = nn.Linear(cfg.width, cfg.n_layers - ALWAYS_ON)
        nn.init.zeros_(self.fc2.weight)  # starts as the prior: training moves away from it only if it helps
        nn.init.zeros_(self.fc2.bias)
        if cfg.gate:
            self.fc_gate = nn.Linear(cfg.width, 1)
        if cfg.standardize:  # identity until fit_standardization (or loading) sets them
            for name, dim in (("kv", cfg.kv_dim), ("h", cfg.hidden_dim)):
                self.register_buffer(f"mu_{name}", torch.zeros(dim))
                self.register_buffer(f"sd_{name}", torch.ones(dim))
        self.register_buffer("freqs", math.pi * torch.arange(1, cfg.budget_features + 1, dtype=torch.float32))
        # per layer count k: the weight of the router's scores against the prior's at inference (`heads`); 1 as
        # trained, fitted on validation by `buddy train router --scales` (0 = the prior's plan)
        self.register_buffer("scale", torch.ones(cfg.n_layers + 1))
        self._register_load_state_dict_pre_hook(self._scale_default)

    def _scale_default(self, state_dict, prefix, *args, **kwargs):
        """Routers (and training states) written before the scale existed load with scale 1."""
        state_dict.setdefault(prefix + "scale", torch.ones_like(self.scale))

    @torch.no_grad()
    def fit_standardization(self, kv0_mean: torch.Tensor, h0: torch.Tensor) -> None:
        """Set the per-feature means and standard deviations from [..., kv_dim] and [..., hidden] samples."""
        if not self.cfg.standardize:
            raise ValueError("this Decision Module was built without standardize")
        for name, x in (("kv", kv0_mean), ("h", h0)):
            x = x.reshape(-1, x.shape[-1]).double()
            getattr(self, f"mu_{name}").copy_(x.mean(0))
            sd = x.std(0)
            # floored relative to the feature's typical deviation, so a dimension constant in training cannot
            # turn a small drift at inference into a huge input
            getattr(self, f"sd_{name}").copy_(sd.clamp_min(1e-3 * float(sd.mean()) + 1e-12))

    def budget_encoding(self, frac: torch.Tensor) -> torch.Tensor:
        """[B] fractions k/L in (0, 1] -> [B, 2F+1 (+ L+1 one-hot of k)]."""
        frac = frac.float()
        x = frac[:, None] * self.freqs
        parts = [frac[:, None], torch.sin(x), torch.cos(x)]
        if self.cfg.budget_onehot:
            k = (frac * self.cfg.n_layers).round().long().clamp(0, self.cfg.n_layers)
            parts.append(nn.functional.one_hot(k, self.cfg.n_layers + 1).float())
        return torch.cat(parts, dim=-1)

    def hidden(self, kv0_mean: torch.Tensor, h0: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
        """kv0_mean [B, T, kv_dim], h0 [B, T, hidden], frac [B] -> the MLP's hidden layer [B, T, width]."""
        B, T = h0.shape[:2]
        dtype = self.fc1.weight.dtype
        b = self.budget_encoding(frac)[:, None].expand(B, T, -1)
        if self.cfg.standardize:
            kv0_mean = (kv0_mean.to(self.mu_kv.dtype) - self.mu_kv) / self.sd_kv
            h0 = (h0.to(self.mu_h.dtype) - self.mu_h) / self.sd_h
        x = torch.cat([self.norm_kv(kv0_mean.to(dtype)), self.norm_h(h0.to(dtype)), b.to(dtype)], dim=-1)
        return nn.functional.gelu(self.fc1(x))

    def forward(self, kv0_mean: torch.Tensor, h0: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
        """kv0_mean [B, T, kv_dim], h0 [B, T, hidden], frac [B] -> scores [B, T, L-2]."""
        return self.fc2(self.hidden(kv0_mean, h0, frac)).float()

    def heads(self, kv0_mean, h0, frac) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores [B, T, L-2] times the scale of each row's k, gate logits [B, T] or None): a gate logit > 0
        means "use the router's plan". Inference calls this; training calls `forward` (unscaled)."""
        x = self.hidden(kv0_mean, h0, frac)
        k = (frac.float() * self.cfg.n_layers).round().long().clamp(0, self.cfg.n_layers)
        scale = self.scale.to(x.device)[k].view(-1, *([1] * (x.dim() - 1)))
        return scale * self.fc2(x).float(), (self.fc_gate(x)[..., 0].float() if self.cfg.gate else None)


def prior_scores(order: list[int], n_layers: int) -> torch.Tensor:
    """[L-2] scores for intermediate layers 1..L-2: L-3 for the most important, down to 0 (one per rank).

    Unit spacing means the router must learn a consistent score of about 1 to swap two neighbouring
    layers of the prior, so optimizer noise does not override the prior in the first steps."""
    m = n_layers - ALWAYS_ON
    s = torch.empty(m)
    for rank, layer in enumerate(order):
        s[layer - 1] = float(m - 1 - rank)
    return s


class RouterPlanner(Planner):
    """Per-token top-k of router + prior scores, rerouted every `reroute_every` decode steps.

    reroute_every: 1 = every token; N = every N-th decode token; 0 = frozen after prefill.
    use_router / use_prior / use_gate: ablations (prior only, router without prior, router without its gate).
    """

    needs_kv0 = True

    def __init__(self, module: DecisionModule, prior: torch.Tensor, reroute_every: int = LoadConfig.reroute_every,
                 use_router: bool = True, use_prior: bool = True, use_gate: bool = True, name: str = "router"):
        if reroute_every < 0:
            raise ValueError(f"invalid reroute_every {reroute_every}: must be >= 0 (0 = frozen after prefill)")
        self.module = module.eval()
        self.prior = prior
        self.reroute_every = reroute_every
        self.use_router = use_router
        self.use_prior = use_prior
        self.use_gate = use_gate and use_prior and module.cfg.gate
        self.name = name
        self.n_layers = module.cfg.n_layers

    def scores(self, h0: torch.Tensor, cache, k):
        """(router + prior scores [B, T, L-2], gate logits [B, T] or None)."""
        B, T = h0.shape[:2]
        s, gate = torch.zeros(B, T, self.n_layers - ALWAYS_ON, device=h0.device), None
        if self.use_router:
            frac = as_row_budgets(k, B, h0.device).float() / self.n_layers
            r, gate = self.module.heads(cache.kv0_mean, h0, frac)
            s = s + r
        if self.use_prior:
            s = s + self.prior.to(h0.device)
        return s, (gate if self.use_gate else None)

    def routed(self, h0, cache, ks: torch.Tensor) -> torch.Tensor:
        """Plans [B, T, L] for per-row layer counts ks [B]."""
        s, gate = self.scores(h0, cache, ks)
        plan = topk_plan(s, ks)
        if gate is not None:  # tokens whose gate is closed run the prior's plan
            prior_plan = topk_plan(self.prior.to(h0.device).expand_as(s), ks)
            plan = torch.where(gate[..., None] > 0, plan, prior_plan)
        return plan

    def plan(self, h0, cache, k):
        B = h0.shape[0]
        ks = as_row_budgets(k, B, h0.device)
        if ks.dim() == 1:
            plan = self.routed(h0, cache, ks)
        else:  # per-token counts: each token takes the router's plan at its own count
            plan = None
            for v in ks.unique().tolist():
                p = self.routed(h0, cache, torch.full((B,), v, dtype=torch.long, device=h0.device))
                plan = p if plan is None else torch.where((ks == v)[..., None], p, plan)
        start, end = cache.slot
        if start == 0:  # prefill: every prompt token routed; remember where each row's decoding starts
            cache.planner_state = {"prefill_end": torch.full((B,), end, device=h0.device), "last": plan[:, -1]}
            return plan
        if self.reroute_every != 1:  # reuse the plan of the last routing position
            st = cache.planner_state
            # each row's decode step index [B, T] (rows of a continuous batch joined at different steps)
            d = torch.arange(start, end, device=h0.device)[None] - st["prefill_end"][:, None]
            routed = d % self.reroute_every == 0 if self.reroute_every else torch.zeros_like(d, dtype=torch.bool)
            plans = torch.cat([st["last"][:, None], plan], dim=1)  # index 0 = carried-over plan
            pos = torch.arange(1, end - start + 1, device=h0.device) * routed
            src = torch.cummax(pos, dim=1).values
            plan = plans.gather(1, src[..., None].expand(-1, -1, plans.shape[-1]))
        cache.planner_state["last"] = plan[:, -1]
        return plan


# --- router files: safetensors weights + JSON metadata ------------------------------------------
@dataclass
class RouterMeta:
    model: str
    checksum: str
    n_layers: int
    kv_policy: str
    budgets: tuple[float, float]
    prior: str
    prior_order: list[int]
    config: dict
    steps: int = 0
    data: str = ""
    command: str = ""
    git_commit: str = ""
    train_seconds: float = 0.0
    validation: dict = field(default_factory=dict)
    best_step: int = 0
    calibration: str = "sotu"  # the calibration whose order is the prior (routers made before `mix` name none)
    init: dict = field(default_factory=dict)  # the router it started from (`--init`): path, sha256, its commit and steps


def save_router(module: DecisionModule, meta: RouterMeta, out_dir: Path) -> None:
    """Write router.safetensors and router.json atomically into out_dir."""
    from .artifacts import write_artifact

    write_artifact(module, meta, out_dir, "router", skip=("freqs",))


def load_router(path: Path, checksum: str | None = None, n_layers: int | None = None):
    """(DecisionModule, RouterMeta) from a router directory; checks it was made for this model."""
    from .artifacts import read_artifact

    def meta(**raw):
        return RouterMeta(**{**raw, "budgets": tuple(raw["budgets"])})

    def build(m: RouterMeta) -> DecisionModule:
        if sorted(m.prior_order) != list(range(1, m.n_layers - 1)):
            raise ValueError(f"prior_order must list each intermediate layer 1..{m.n_layers - ALWAYS_ON} exactly once")
        try:
            module = DecisionModule(RouterConfig(**m.config))
        except TypeError as e:
            raise ValueError(f"config: {e}") from None
        if module.cfg.n_layers != m.n_layers:
            raise ValueError(f"config: n_layers {module.cfg.n_layers} != {m.n_layers}")
        return module

    return read_artifact(path, "router", meta, build, RouterFileError, "router", checksum, n_layers, skip=("freqs",))
