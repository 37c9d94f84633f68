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

from .backbone import Backbone
from .budget import Budget, as_budget
from .config import GenerateConfig
from .kv_cache import ContextOverflowError, KVCache
from .planner import Planner


@dataclass(frozen=True)
class Step:
    """One generated token: its id, its text piece, the layers of the forward that produced it, and time."""

    token: int
    text: str
    layers: tuple[int, ...]
    ms: float


class Engine:
    def __init__(self, backbone: Backbone, planner: Planner, kv_policy: str = "fill"):
        self.bb = backbone
        self.planner = planner
        self.kv_policy = kv_policy

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

    # --- the routed loop ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, k, valid: torch.Tensor | None = None):
        """Run T new tokens per row ([B, T]) with k layers each; returns (final hidden [B, T, H], plan [B, T, L])."""
        return self._forward(input_ids, cache, k, valid)

    def _forward(self, input_ids, cache, k, valid=None):
        bb = self.bb
        cache.begin(input_ids.shape[1], valid)
        h = bb.embed(input_ids)
        rope = bb.rope(h, cache.positions)
        h = bb.layer(0, h, cache.mask(0), rope, cache)
        plan = self.planner.plan(h, cache, k)
        cache.route(plan)
        runs_all, runs_any = plan.all(dim=(0, 1)).tolist(), plan.any(dim=(0, 1)).tolist()  # one host sync
        for i in range(1, self.n_layers):
            if runs_all[i]:
                h = bb.layer(i, h, cache.mask(i), rope, cache)
            elif runs_any[i]:  # some tokens run layer i: run it, keep their outputs
                cache.keep = plan[..., i]
                h = torch.where(plan[..., i, None], bb.layer(i, h, cache.mask(i), rope, cache), h)
                cache.keep = None
            elif self.kv_policy == "fill":
                cache.write(i, *bb.kv(i, h, rope))
            elif self.kv_policy == "zero":
                cache.write_zeros(i)
        cache.end()
        return h, plan

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

    def resolve_k(self, budget=None, layers: int | None = None) -> int:
        b = budget if isinstance(budget, Budget) else as_budget(budget, layers)
        k = b.k(self.n_layers)
        self.planner.check(k, self.n_layers)
        return k

    # --- generation ---------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        tok = self.bb.tokenizer
        if chat:
            if not tok.chat_template:
                raise ValueError(f"model {self.bb.name!r} has no chat template; drop --chat")
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return tok(prompt)["input_ids"]

    def stop_ids(self) -> set[int]:
        ids = set()
        for src in (self.bb.tokenizer.eos_token_id, self.bb.model.generation_config.eos_token_id,
                    self.bb.model.config.eos_token_id):
            if src is not None:
                ids.update(src if isinstance(src, (list, tuple)) else [src])
        return ids

    @torch.inference_mode()
    def generate(self, prompt: str | list[int], budget=None, layers: int | None = None, **settings) -> Iterator[Step]:
        """Yield one Step per generated token; stops at max_new_tokens or an end-of-sequence token."""
        cfg = GenerateConfig(**settings)
        ids = self.encode(prompt, cfg.chat) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("empty prompt")
        k = self.resolve_k(budget, layers)
        cache = self.new_cache(1, len(ids) + cfg.max_new_tokens)
        gen = torch.Generator(device=self.bb.device).manual_seed(cfg.seed)
        stops, out, text = self.stop_ids(), [], ""
        x = torch.tensor([ids], device=self.bb.device)
        for _ in range(cfg.max_new_tokens):
            t0 = time.perf_counter()
            h, plan = self._forward(x, cache, k)
            token = _sample(self.bb.head(h[:, -1]), cfg.temperature, cfg.top_p, gen)
            tid = int(token)
            ms = (time.perf_counter() - t0) * 1e3
            out.append(tid)
            full = self.bb.tokenizer.decode(out, skip_special_tokens=True)
            piece, text = (full[len(text):], full) if not full.endswith("\ufffd") else ("", text)
            layers_run = tuple(plan[0, -1].nonzero().flatten().tolist())
            yield Step(token=tid, text=piece, layers=layers_run, ms=ms)
            if tid in stops:
                return
            x = token.view(1, 1)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token [1] from logits [1, V]: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(cut, 0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).view(-1)

