"""Continuous batching: one thread owns the engines; requests join between decode steps and leave when done.

Every step the scheduler
  1. admits queued requests (up to max_batch rows): each prompt is prefilled alone, its first token sampled;
  2. rebuilds a group's batch cache when rows joined or left (KVCache.from_rows packs the rows' K/V);
  3. runs one decode step per group (one group per KV policy), every row with its own budget and path;
  4. hands each row's token to its request, and drops rows that finished or whose client went away.

Requests are plain objects; `events` is a thread-safe callback, so the web layer decides how to wake readers.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch

from ..allocation import TokenAccount
from ..kv_cache import KVCache
from ..sampling import Detokenizer, sample


@dataclass
class Request:
    """One generation: prompt token ids, exact layer count k (the mean, with allocation "token"), KV policy and
    sampling settings.

    `on_event(kind, payload)` is called from the scheduler thread with ("token", (text, layers)) per token and
    ("done", finish_reason) once (finish_reason: "stop", "length", "cancelled" or "error: ...")."""

    prompt: list[int]
    k: int
    kv_policy: str
    max_tokens: int
    on_event: object
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    allocation: str = "request"  # or "token": per-token depth, mean exact (buddy/allocation.py)
    cancelled: bool = False
    error: Exception | None = None  # what failed the request (its "done" payload is "error: ...")
    tokens: list[int] = field(default_factory=list)
    layer_sum: int = 0

    def fail(self, error: Exception) -> None:
        """End the request with an error: `error` keeps the exception, the "done" event its message."""
        self.error = error
        self.on_event("done", f"error: {error}")

    def cancel(self) -> None:
        """Free the row at the next step (a client disconnected)."""
        self.cancelled = True


@dataclass
class _Row:
    req: Request
    detok: Detokenizer
    gen: torch.Generator
    last: int = 0
    index: int = 0  # this row's index in its group's batch cache


@dataclass
class _Group:
    """The rows decoding together under one KV policy, and their batch cache."""

    rows: list[_Row] = field(default_factory=list)
    cache: KVCache | None = None
    pending: list[tuple[_Row, KVCache]] = field(default_factory=list)  # prefilled, joining at the next rebuild
    dirty: bool = False


class Scheduler:
    def __init__(self, engines: dict, max_batch: int, stop_ids: set[int] | None = None):
        """engines: {kv_policy: Engine} sharing one backbone; max_batch: rows decoding together (ServeConfig)."""
        self.engines = engines
        self.max_batch = max_batch
        self.stop_ids = stop_ids if stop_ids is not None else next(iter(engines.values())).stop_ids()
        self.queue: queue.Queue[Request] = queue.Queue()
        self.groups = {p: _Group() for p in engines}
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="buddy-scheduler", daemon=True)

    # --- public, any thread ---------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self.queue.put(None)  # wake the thread
        self._thread.join(timeout=10)

    def submit(self, req: Request) -> None:
        self.queue.put(req)

    @property
    def alive(self) -> bool:
        """The scheduler thread is running."""
        return self._thread.is_alive()

    @property
    def active(self) -> int:
        return sum(len(g.rows) + len(g.pending) for g in self.groups.values())

    @property
    def queued(self) -> int:
        return self.queue.qsize()

    # --- the loop, scheduler thread ---------------------------------------------------------------
    def _run(self) -> None:
        waiting: list[Request] = []
        while not self._stop.is_set():
            idle = self.active == 0 and not waiting
            try:
                item = self.queue.get(timeout=0.5) if idle else self.queue.get_nowait()
                while item is not None:
                    waiting.append(item)
                    item = self.queue.get_nowait()
            except queue.Empty:
                pass
            waiting = [r for r in waiting if not self._drop_if_cancelled(r)]
            while waiting and self.active < self.max_batch:
                self._admit(waiting.pop(0))
            for policy, g in self.groups.items():
                try:
                    self._step(policy, g)
                except Exception as e:  # noqa: BLE001 - fail the group's requests, keep serving
                    for row in g.rows + [r for r, _ in g.pending]:
                        row.req.fail(e)
                    self.groups[policy] = _Group()

    def _drop_if_cancelled(self, req: Request) -> bool:
        if req.cancelled:
            req.on_event("done", "cancelled")
        return req.cancelled

    @torch.inference_mode()
    def _admit(self, req: Request) -> None:
        engine = self.engines[req.kv_policy]
        try:
            cache = engine.new_cache(1, len(req.prompt) + req.max_tokens)
            if req.allocation == "token":
                cache.account = engine.token_account([req.k])
            h, plan = engine.forward(torch.tensor([req.prompt], device=engine.bb.device), cache, req.k)
            row = _Row(req, Detokenizer(engine.tokenizer), torch.Generator(device=engine.bb.device).manual_seed(req.seed))
            if self._emit(row, engine.bb.head(h[:, -1]), plan[0, -1]):
                self.groups[req.kv_policy].pending.append((row, cache))
                self.groups[req.kv_policy].dirty = True
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
            req.fail(e)

    def _emit(self, row: _Row, logits: torch.Tensor, path: torch.Tensor) -> bool:
        """Sample the row's next token, hand it over; True while the row goes on."""
        req = row.req
        tok = int(sample(logits.view(1, -1), req.temperature, req.top_p, row.gen)[0])
        req.tokens.append(tok)
        req.layer_sum += int(path.sum())
        row.last = tok
        if tok in self.stop_ids:
            req.on_event("done", "stop")
            return False
        req.on_event("token", (row.detok.add(tok), tuple(path.nonzero().flatten().tolist())))
        if req.cancelled:
            req.on_event("done", "cancelled")
            return False
        if len(req.tokens) >= req.max_tokens:
            req.on_event("done", "length")
            return False
        return True

    def _emit_alone(self, row: _Row, logits: torch.Tensor, path: torch.Tensor) -> bool:
        """`_emit` for one row of a batch: a row that fails ends alone; its neighbours go on."""
        try:
            return self._emit(row, logits, path)
        except Exception as e:  # noqa: BLE001 - fault isolation per row
            row.req.fail(e)
            return False

    @torch.inference_mode()
    def _step(self, policy: str, g: _Group) -> None:
        gone = [r for r in g.rows if r.req.cancelled]
        for r in gone:
            r.req.on_event("done", "cancelled")
        if gone:
            g.rows = [r for r in g.rows if not r.req.cancelled]
            g.dirty = True
        engine = self.engines[policy]
        if g.dirty:
            self._rebuild(g, engine)
        if not g.rows:
            return
        x = torch.tensor([[r.last] for r in g.rows], device=engine.bb.device)
        h, plan = engine.forward(x, g.cache, [r.req.k for r in g.rows])
        logits = engine.bb.head(h[:, -1])
        keep = [self._emit_alone(r, logits[i], plan[i, -1]) for i, r in enumerate(g.rows)]
        self.steps += 1
        if not all(keep):
            g.rows = [r for r, kp in zip(g.rows, keep) if kp]
            g.dirty = True

    def _rebuild(self, g: _Group, engine) -> None:
        """One batch cache for the group's current rows plus the newly prefilled ones."""
        parts = [(g.cache, r.index) for r in g.rows] + [(c, 0) for _, c in g.pending]
        accounts = [(c.account, i, r.req.k) for (c, i), r in zip(parts, g.rows + [r for r, _ in g.pending])]
        g.rows = g.rows + [r for r, _ in g.pending]
        for i, r in enumerate(g.rows):
            r.index = i
        g.pending, g.dirty = [], False
        if not g.rows:
            g.cache = None
            return
        reserve = max(r.req.max_tokens - len(r.req.tokens) for r in g.rows)
        g.cache = KVCache.from_rows(parts, reserve)
        g.cache.account = TokenAccount.join(accounts, engine.depth, engine.n_layers)

