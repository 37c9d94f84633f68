"""Buddy's preallocated KV cache with per-(layer, row, position) fill state and the three KV policies.

What a skipped (layer, token) leaves behind:
  fill  - that layer's K/V for the token, computed from its residual stream: the cache stays complete;
  mask  - a hole: later tokens' attention at that layer ignores the position;
  zero  - zeros, as in the paper (the position still takes part in the softmax).

HF's attention modules call `update(k, v, layer_idx)` (the transformers Cache protocol), so layers run
through their own forward while the K/V they produce land here. The running sums of layer 0's K/V over
all positions so far (the router's context feature) are kept incrementally on the same call.
"""

from __future__ import annotations

import contextlib

import torch

from .backbone.adapter import Shapes
from .config import KV_POLICIES
from .errors import BuddyError


class ContextOverflowError(BuddyError):
    """More tokens than the cache (or the model's context) holds."""


class KVCache:
    def __init__(self, shapes: Shapes, batch: int, max_len: int, policy: str, dtype, device, pool_kv0: bool = False,
                 store: bool = True):
        """store=False: one parallel forward from an empty cache whose K/V are not kept (router training:
        autograd must not see K/V written into shared buffers)."""
        if policy not in KV_POLICIES:
            raise ValueError(f"invalid kv policy {policy!r}: must be one of {', '.join(KV_POLICIES)}")
        L, H, D = shapes.n_layers, shapes.n_kv_heads, shapes.head_dim
        self.shapes = shapes
        self.policy = policy
        self.n_layers = L
        self.batch = batch
        self.max_len = max_len
        kv_len = max_len if store else 0
        self.k = torch.zeros(L, batch, H, kv_len, D, dtype=dtype, device=device)
        self.v = torch.zeros(L, batch, H, kv_len, D, dtype=dtype, device=device)
        self.filled = torch.zeros(L, batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots committed so far (shared by all rows; rows may be left-padded)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens per row so far
        self.positions = None  # [B, T] rotary positions of the slot in flight
        self.has_holes = policy == "mask"  # any position a query must not see (holes or padding)
        self.pool_kv0 = pool_kv0
        self.kv0_sum = torch.zeros(batch, 2 * H * D, dtype=torch.float32, device=device)
        self.kv0_count = torch.zeros(batch, 1, dtype=torch.float32, device=device)
        self.kv0_mean = None  # [B, T, 2*H*D]: mean of layer-0 K/V over positions <= t, for the slot in flight
        self.keep = None  # [B, T] bool while a layer runs on tokens of which only some execute it
        self.rows = None  # LongTensor of the batch rows a layer runs on (decode with per-row plans)
        self.planner_state = None  # per-sequence state a planner keeps between forwards
        self.account = None  # allocation="token": the rows' TokenAccount (buddy/allocation.py)
        self.store = store
        self._slot = (0, 0)
        self._valid = None
        self._masks = {}

    @property
    def slot(self) -> tuple[int, int]:
        """(start, end) slots of the forward in flight."""
        return self._slot

    # --- one forward over T new positions -------------------------------------------------------
    def begin(self, T: int, valid: torch.Tensor | None = None) -> None:
        """Reserve T positions; `valid` [B, T] is False at left padding."""
        s, e = self.length, self.length + T
        if e > self.max_len:
            raise ContextOverflowError(f"{e} positions exceed the cache size {self.max_len}")
        self._slot = (s, e)
        if valid is None:
            valid = torch.ones(self.batch, T, dtype=torch.bool, device=self.filled.device)
        else:
            self.has_holes = True
        self._valid = valid
        self.filled[:, :, s:e] = valid
        self.positions = (self.seen[:, None] + torch.cumsum(valid.long(), dim=1) - 1).clamp_min(0)
        self._masks = {}
        self.kv0_mean = None

    def route(self, execute: torch.Tensor) -> None:
        """Record the plan [B, T, L] (True = executes); under `mask` a skipped (layer, token) is a hole."""
        if self.policy == "mask":
            s, e = self._slot
            self.filled[:, :, s:e] = execute.permute(2, 0, 1) & self._valid

    def end(self) -> None:
        self.length = self._slot[1]
        self.seen = self.seen + self._valid.sum(dim=1)
        self.keep = None
        self._masks = {}

    @contextlib.contextmanager
    def only(self, keep: torch.Tensor | None = None, rows: torch.Tensor | None = None):
        """While one layer runs on part of the batch: `keep` [B, T] marks the tokens that execute it (policy
        zero stores zeros for the others), `rows` the batch rows it runs on (its K/V go to those rows).
        transformers' attention calls `update` without extra arguments, so they are set for the call's
        duration and always cleared after it."""
        self.keep, self.rows = keep, rows
        try:
            yield self
        finally:
            self.keep = self.rows = None

    # --- transformers Cache protocol --------------------------------------------------------------
    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store layer `layer_idx`'s K/V ([B, H, T, D]) for the slot in flight; return all K/V so far."""
        s, e = self._slot
        if self.policy == "zero" and self.keep is not None:
            keep = self.keep[:, None, :, None].to(k.dtype)
            k, v = k * keep, v * keep
        if layer_idx == 0 and self.pool_kv0:
            self._pool(k, v)
        if not self.store:
            return k, v
        if self.rows is not None:
            self.write(layer_idx, k, v, self.rows)
            return self.k[layer_idx, self.rows, :, :e], self.v[layer_idx, self.rows, :, :e]
        self.k[layer_idx, :, :, s:e] = k
        self.v[layer_idx, :, :, s:e] = v
        return self.k[layer_idx, :, :, :e], self.v[layer_idx, :, :, :e]

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """K/V of the slot in flight for all rows, or for `rows` only."""
        s, e = self._slot
        if rows is None:
            self.k[layer_idx, :, :, s:e] = k
            self.v[layer_idx, :, :, s:e] = v
        else:
            self.k[layer_idx, rows, :, s:e] = k
            self.v[layer_idx, rows, :, s:e] = v

    def write_zeros(self, layer_idx: int, rows: torch.Tensor | None = None) -> None:
        s, e = self._slot
        sel = slice(None) if rows is None else rows
        self.k[layer_idx, sel, :, s:e] = 0
        self.v[layer_idx, sel, :, s:e] = 0

    def take_rows(self, index: torch.Tensor) -> None:
        """Keep (or repeat) batch rows: row r of the cache becomes old row index[r]. Used to share one prompt's
        prefill across several continuations (multiple-choice scoring)."""
        for name in ("k", "v", "filled"):
            setattr(self, name, getattr(self, name)[:, index])
        self.seen, self.kv0_sum, self.kv0_count = self.seen[index], self.kv0_sum[index], self.kv0_count[index]
        if self.planner_state:
            self.planner_state = {n: t[index] if torch.is_tensor(t) and t.dim() else t
                                  for n, t in self.planner_state.items()}
        if self.account is not None:
            self.account.take_rows(index)
        self.batch = int(index.numel())

    @classmethod
    def from_rows(cls, parts: list[tuple["KVCache", int]], reserve: int) -> "KVCache":
        """A new cache holding row `r` of each (cache, r), with room for `reserve` more positions (continuous
        batching: requests join and leave between decode steps).

        Each row's real positions are packed to the right (its K/V carry their rotary positions already, so a
        slot's index only orders it): the result is as long as the longest row, and shorter rows see the
        empty slots before them as padding."""
        first = parts[0][0]
        n = [int(c.filled[0, r, :c.length].sum()) for c, r in parts]  # layer 0 always runs: its fill = real tokens
        T = max(n)
        new = cls(first.shapes, len(parts), T + reserve, first.policy, first.k.dtype, first.k.device,
                  pool_kv0=first.pool_kv0)
        for i, ((c, r), m) in enumerate(zip(parts, n)):
            src = c.filled[0, r, :c.length].nonzero().flatten()
            dst = torch.arange(T - m, T, device=src.device)
            new.k[:, i, :, dst] = c.k[:, r, :, src]
            new.v[:, i, :, dst] = c.v[:, r, :, src]
            new.filled[:, i, dst] = c.filled[:, r, src]
            new.seen[i], new.kv0_sum[i], new.kv0_count[i] = c.seen[r], c.kv0_sum[r], c.kv0_count[r]
        new.length = T
        new.has_holes = True
        states = [c.planner_state for c, _ in parts]
        if all(isinstance(st, dict) and "last" in st for st in states):
            # each row keeps its decode step count: it decoded c.length - prefill_end tokens in its old cache
            decoded = [c.length - int(st["prefill_end"][r]) for st, (c, r) in zip(states, parts)]
            new.planner_state = {"prefill_end": torch.tensor([T - d for d in decoded], device=first.k.device),
                                 "last": torch.stack([st["last"][r] for st, (_, r) in zip(states, parts)])}
        return new

    # --- attention masks --------------------------------------------------------------------------
    def mask(self, layer_idx: int) -> torch.Tensor | None:
        """Boolean attention mask [B, 1, T, e] (True = attend) for the slot in flight, or None if plain."""
        s, e = self._slot
        T = e - s
        if T == 1 and not self.has_holes:
            return None
        key = layer_idx if self.policy == "mask" else -1  # without holes every layer shares one mask
        if key not in self._masks:
            dev = self.filled.device
            q_pos = torch.arange(s, e, device=dev)[:, None]
            k_pos = torch.arange(e, device=dev)[None, :]
            filled = self.filled[max(key, 0), :, :e]
            m = ((k_pos <= q_pos)[None] & filled[:, None, :]) | (k_pos == q_pos)[None]
            self._masks[key] = m[:, None]
        return self._masks[key] if self.rows is None else self._masks[key][self.rows]

    # --- router context feature ----------------------------------------------------------------------
    def _pool(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Running mean of layer-0 K/V: prefix means for the slot's positions, then advance the sums. O(T)."""
        B, H, T, D = k.shape
        x = torch.cat([k.transpose(1, 2).reshape(B, T, H * D), v.transpose(1, 2).reshape(B, T, H * D)], -1)
        w = self._valid.to(torch.float32)[..., None]
        csum = self.kv0_sum[:, None] + torch.cumsum(x.float() * w, dim=1)
        ccount = self.kv0_count[:, None] + torch.cumsum(w, dim=1)
        self.kv0_mean = csum / ccount.clamp_min(1.0)
        self.kv0_sum = csum[:, -1]
        self.kv0_count = ccount[:, -1]
