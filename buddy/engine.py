"""The routed engine: prefill and cached decode through one loop over the executed layers.

    h = embed(tokens); h = layer 0; plan = planner(h, cache, k)
    for each later layer i: run it where the plan says, else apply the KV policy for the skipped slot
    logits = head(h)

`forward` serves prefill, decode steps and teacher-forced scoring alike (every token may have its own
plan); `generate` yields one Step per generated token, which the CLI, evaluations and benchmarks consume.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .allocation import AllocationError, TokenAccount
from .backbone import Backbone
from .budget import AUTO, BudgetError, request_budget
from .config import DEFAULT_KV_POLICY, GenerateConfig
from .kv_cache import ContextOverflowError, KVCache
from .planner import Planner
from .sampling import Detokenizer, sample


def prologue(bb: Backbone, ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None):
    """embed -> rotary -> layer 0 for the new tokens ids [B, T]: (hidden after layer 0, rope). Layer 0 always
    runs, so its output and K/V are what the planners see."""
    cache.begin(ids.shape[1], valid)
    h = bb.embed(ids)
    rope = bb.rope(h, cache.positions)
    return bb.layer(0, h, cache.mask(0), rope, cache), rope


def layer0(bb: Backbone, ids: torch.Tensor, policy: str):
    """A non-storing cache with layer 0 run for ids [B, T] (no grad): (cache, layer-0 output, rope)."""
    cache = KVCache(bb.shapes, ids.shape[0], ids.shape[1], policy, bb.dtype, bb.device, pool_kv0=True, store=False)
    with torch.no_grad():
        h, rope = prologue(bb, ids, cache)
    return cache, h, rope


def router_features(bb: Backbone, ids: torch.Tensor, policy: str):
    """(pooled layer-0 K/V prefix means [B, T, kv_dim], layer-0 output [B, T, hidden]) for ids [B, T]: the
    inputs of the Decision Module and the budget predictor, no grad."""
    cache, h, _ = layer0(bb, ids, policy)
    return cache.kv0_mean, h


@dataclass(frozen=True)
class Step:
    """One generated token: its id, its text piece, the layers of the forward that produced it, and time."""

    token: int
    text: str
    layers: tuple[int, ...]
    ms: float


class Engine:
    def __init__(self, backbone: Backbone, planner: Planner, kv_policy: str = DEFAULT_KV_POLICY, predictor=None,
                 depth=None):
        self.bb = backbone
        self.planner = planner
        self.kv_policy = kv_policy
        self.predictor = predictor  # BudgetPredictor for budget="auto", or None
        self.depth = depth  # DepthHead for allocation="token", or None

    @property
    def n_layers(self) -> int:
        return self.bb.n_layers

    @property
    def tokenizer(self):
        return self.bb.tokenizer

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.bb.shapes.max_context:
            raise ContextOverflowError(
                f"{max_len} tokens (prompt + new tokens) exceed the model's context of {self.bb.shapes.max_context}"
            )
        return KVCache(self.bb.shapes, batch, max_len, self.kv_policy, self.bb.dtype, self.bb.device,
                       pool_kv0=self.planner.needs_kv0)

    def token_account(self, ks) -> TokenAccount:
        """The layer account of allocation="token" for rows with target counts ks (see buddy/allocation.py)."""
        if self.depth is None:
            raise AllocationError(f"allocation 'token' needs a depth head for model {self.bb.name!r} and kv policy "
                                  f"{self.kv_policy!r}: fit one with `buddy train depth --model {self.bb.name} "
                                  f"--kv-policy {self.kv_policy}` and pass --depth DIR")
        return TokenAccount(self.depth, ks, True, self.n_layers)

    # --- the routed loop ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, k, valid: torch.Tensor | None = None):
        """Run T new tokens per row ([B, T]) with k layers each; returns (final hidden [B, T, H], plan [B, T, L])."""
        return self._forward(input_ids, cache, k, valid)

    def _forward(self, input_ids, cache, k, valid=None):
        bb = self.bb
        h, rope = prologue(bb, input_ids, cache, valid)
        if cache.account is not None:  # allocation="token": each token's own count, the request's mean exact
            k = cache.account.depths(h, prompt=cache.slot[0] == 0)
        plan = self.planner.plan(h, cache, k)
        cache.route(plan)
        runs_all, runs_any = plan.all(dim=(0, 1)).tolist(), plan.any(dim=(0, 1)).tolist()  # one host sync
        decode = input_ids.shape[1] == 1
        for i in range(1, self.n_layers):
            if runs_all[i]:
                h = bb.layer(i, h, cache.mask(i), rope, cache)
            elif runs_any[i] and decode:  # rows differ: run layer i on the rows that execute it
                h = self._some_rows(i, h, rope, cache, plan[:, 0, i])
            elif runs_any[i]:  # tokens differ: run layer i on all, keep the outputs of those that execute it
                with cache.only(keep=plan[..., i]):
                    h = torch.where(plan[..., i, None], bb.layer(i, h, cache.mask(i), rope, cache), h)
            else:
                self._skip(i, h, rope, cache)
        cache.end()
        return h, plan

    def _skip(self, i, h, rope, cache, rows=None):
        """What a skipped layer leaves in the cache for these tokens (or rows), by KV policy."""
        if self.kv_policy == "fill":
            cache.write(i, *self.bb.kv(i, h, rope), rows=rows)
        elif self.kv_policy == "zero":
            cache.write_zeros(i, rows=rows)

    def _some_rows(self, i, h, rope, cache, runs):
        """One decode step of layer i for the rows with runs[row] set (gather / scatter); KV policy for the rest."""
        on, off = runs.nonzero().flatten(), (~runs).nonzero().flatten()
        cos, sin = rope
        with cache.only(rows=on):
            out = self.bb.layer(i, h[on], cache.mask(i), (cos[on], sin[on]), cache)
        self._skip(i, h[off], (cos[off], sin[off]), cache, rows=off)
        return h.index_copy(0, on, out)

    # --- scoring ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, budget=None, layers: int | None = None, valid=None):
        """Teacher-forced logits [B, T, V] (float32) with per-token plans, exactly as cached decode would
        produce them; returns (logits, plan)."""
        input_ids = torch.as_tensor(input_ids, device=self.bb.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        k = self.resolve_k(budget, layers)
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        h, plan = self._forward(input_ids, cache, k, valid)
        return self.bb.head(h), plan

    def resolve_k(self, budget=None, layers: int | None = None) -> int | str:
        """The exact layer count of a budget (the rule of `buddy.budget.request_budget`), or AUTO (chosen per
        prompt by the budget predictor)."""
        b = request_budget(budget, layers)
        if b == AUTO:
            if self.predictor is None:
                raise BudgetError(f"budget 'auto' needs a budget predictor for model {self.bb.name!r}: train one with "
                                  f"`buddy train predictor --model {self.bb.name}` and pass --predictor DIR")
            return AUTO
        k = b.k(self.n_layers)
        self.planner.check(k, self.n_layers)
        return k

    # --- generation ---------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = GenerateConfig.chat) -> list[int]:
        tok = self.bb.tokenizer
        if chat:
            if not tok.chat_template:
                raise ValueError(f"model {self.bb.name!r} has no chat template; drop --chat")
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return tok(prompt)["input_ids"]

    def choose_k(self, prompts: list[list[int]]) -> list[int]:
        """budget="auto": the predictor's layer count for each prompt (token ids)."""
        self.resolve_k(AUTO)
        return [self.resolve_k(b) for b in self.predictor.choose_budgets(self.bb, prompts, self.kv_policy)]

    def stop_ids(self) -> set[int]:
        return self.bb.eos_ids

    @torch.inference_mode()
    def generate(self, prompt: str | list[int], budget=None, layers: int | None = None, **settings) -> Iterator[Step]:
        """Yield one Step per generated token; stops at max_new_tokens or an end-of-sequence token.
        budget="auto" lets the budget predictor choose from the prompt (len(step.layers) is the choice)."""
        for steps in self.generate_batch([prompt], [request_budget(budget, layers)], **settings):
            yield steps[0]

    @torch.inference_mode()
    def generate_batch(self, prompts: list, budgets: list, **settings) -> Iterator[list[Step | None]]:
        """Decode several prompts together, each row with its own budget and per-token path.

        Prompts are left-padded; every step yields one Step per row (None once a row has finished).
        A budget may be "auto" (the budget predictor chooses from that row's prompt)."""
        cfg = GenerateConfig(**settings)
        if len(prompts) != len(budgets) or not prompts:
            raise ValueError("give one budget per prompt")
        rows = [self.encode(p, cfg.chat) if isinstance(p, str) else list(p) for p in prompts]
        if any(not r for r in rows):
            raise ValueError("empty prompt")
        ks = [self.resolve_k(b) for b in budgets]
        if AUTO in ks:
            chosen = iter(self.choose_k([r for r, k in zip(rows, ks) if k == AUTO]))
            ks = [next(chosen) if k == AUTO else k for k in ks]
        B, P = len(rows), max(len(r) for r in rows)
        cache = self.new_cache(B, P + cfg.max_new_tokens)
        if cfg.allocation == "token":
            cache.account = self.token_account(ks)
        dev = self.bb.device
        x = torch.tensor([[0] * (P - len(r)) + r for r in rows], device=dev)
        valid = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows], device=dev)
        valid = None if valid.all() else valid
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        stops = set() if cfg.ignore_eos else self.stop_ids()
        detok = [Detokenizer(self.bb.tokenizer) for _ in rows]
        done = [False] * B
        for _ in range(cfg.max_new_tokens):
            t0 = time.perf_counter()
            h, plan = self._forward(x, cache, ks, valid)
            tokens = sample(self.bb.head(h[:, -1]), cfg.temperature, cfg.top_p, gen)
            ids, paths = tokens.tolist(), plan[:, -1].cpu()
            ms = (time.perf_counter() - t0) * 1e3
            out: list[Step | None] = []
            for r in range(B):
                if done[r]:
                    out.append(None)
                    continue
                out.append(Step(token=ids[r], text=detok[r].add(ids[r]), ms=ms,
                                layers=tuple(paths[r].nonzero().flatten().tolist())))
                done[r] = ids[r] in stops
            yield out
            if all(done):
                return
            x, valid = tokens.view(B, 1), None
