"""Per-request state for Buddy models inside vLLM, kept by a logits processor that never changes logits.

vLLM's model forward sees flattened tokens and attention metadata, not requests. vLLM's V1 logits
processors do see requests: before every forward, `update_state` reports the requests added to the
persistent batch (with their SamplingParams), removed and moved. `BuddyBatchState` keeps, per batch slot,
the request's layer count k (from `extra_args`) and the running sums of its layer-0 K/V (the router's
context feature; not kept for a request at full depth, whose plan is every layer), so the model can expand
them to its tokens through `query_start_loc` (batch slot i owns tokens query_start_loc[i]:query_start_loc[i+1]
in vLLM 0.32's V1 runner).

A request that is not scheduled in a step is removed and later re-added as the same request: its router
state is keyed by the identity of its output-token list, which vLLM keeps, and reset whenever the request's
first scheduled position is 0 (a new request, or one preempted and recomputed).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

from ..budget import AUTO, BudgetError, request_budget
from ..config import ALLOCATIONS

MAX_STATES = 4096  # router states kept for requests out of the batch (unscheduled ones come back)
AUTO_K = -1  # a slot whose request asked for budget "auto": the model's budget predictor sets k at its prompt


def request_k(extra_args: dict | None, n_layers: int | None, default_k: int | None):
    """The layer count a request asks for: `budget` (a fraction, or "auto": AUTO_K) or `layers` (a count) in
    extra_args, by Buddy's one budget rule; neither: the exported default. With n_layers None (vLLM's API
    process, which validates requests before any model is built) only the form is checked and the Budget is
    returned."""
    extra = extra_args or {}
    budget, layers = extra.get("budget"), extra.get("layers")
    if budget is None and layers is None:
        return default_k
    b = request_budget(budget, layers)
    if n_layers is None:
        return b
    return AUTO_K if b == AUTO else b.k(n_layers)


class BuddyBatchState(LogitsProcessor):
    """The batch's per-slot k and router state for the Buddy model in the same worker process."""

    instance: BuddyBatchState | None = None
    n_layers: int | None = None  # set by the model class when it is built
    default_k: int | None = None
    has_predictor: bool = False
    has_depth: bool = False

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        hf = vllm_config.model_config.hf_config
        buddy = getattr(hf, "buddy", None) or {}
        self.active = bool(buddy)  # a model that is not Buddy's: this processor does nothing
        self.n_layers = hf.num_hidden_layers
        self.default_k = int(buddy.get("default_layers", self.n_layers))
        slots = vllm_config.scheduler_config.max_num_seqs
        self.k = torch.full((slots,), self.default_k, dtype=torch.long)
        self.key: list[int | None] = [None] * slots  # id(output token list) of the request in each slot
        self.states: OrderedDict[int, tuple[torch.Tensor, float]] = OrderedDict()  # key -> (kv0 sum, count)
        self.auto: OrderedDict[int, int] = OrderedDict()  # key -> k the predictor chose for an "auto" request
        self.per_token = [False] * slots  # allocation "token" (with a depth head in the export)
        self.prompt_len = [0] * slots
        self.accounts: OrderedDict[int, list[int]] = OrderedDict()  # key -> [count, total, last counted position]
        BuddyBatchState.instance = self
        BuddyBatchState.n_layers, BuddyBatchState.default_k = self.n_layers, self.default_k

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """A bad budget or allocation fails the request before it is scheduled (HTTP 400 from the server). The
        server's API process has not built the model, so there a layer count is checked for its form only; one
        above the model's depth is served at full depth (update_state), never an engine error."""
        try:
            request_k(sampling_params.extra_args, cls.n_layers, cls.default_k)
        except BudgetError as e:
            raise ValueError(str(e)) from None
        allocation = (sampling_params.extra_args or {}).get("allocation", ALLOCATIONS[0])
        if allocation not in ALLOCATIONS:
            raise ValueError(f"invalid allocation {allocation!r}: must be one of {', '.join(ALLOCATIONS)}")

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None or not self.active:
            return
        for i in batch_update.removed:
            self.k[i], self.key[i] = self.default_k, None
        for i, params, prompt, output_ids in batch_update.added:
            extra = (params.extra_args if params else None) or {}
            self.k[i] = self.slot_k(extra)
            self.key[i] = id(output_ids)
            self.per_token[i] = self.has_depth and extra.get("allocation") == "token"
            self.prompt_len[i] = len(prompt) if prompt is not None else 0
            if not output_ids:  # a new request (a resumed one has output): nothing of an earlier one with its id
                for d in (self.states, self.auto, self.accounts):
                    d.pop(self.key[i], None)
        for a, b, how in batch_update.moved:
            if how == MoveDirectionality.SWAP:
                self.k[[a, b]] = self.k[[b, a]]
                for lst in (self.key, self.per_token, self.prompt_len):
                    lst[a], lst[b] = lst[b], lst[a]
            else:
                self.k[b], self.k[a] = self.k[a], self.default_k
                for lst, empty in ((self.key, None), (self.per_token, False), (self.prompt_len, 0)):
                    lst[b], lst[a] = lst[a], empty

    def slot_k(self, extra_args) -> int:
        """A validated request's k; raising here would stop the whole engine, so a layer count above the
        model's depth (which the API process could not check) runs at full depth, and "auto" on an export
        without a budget predictor runs the export's default."""
        extra = extra_args or {}
        layers = extra.get("layers")
        if extra.get("budget") is None and isinstance(layers, int) and not isinstance(layers, bool):
            return max(2, min(layers, self.n_layers))
        try:
            k = request_k(extra, self.n_layers, self.default_k)
        except BudgetError:
            return self.default_k
        return self.default_k if k == AUTO_K and not self.has_predictor else k

    # --- used by the model's forward ---
    def history(self, slot: int, dim: int) -> tuple[torch.Tensor, float]:
        st = self.states.get(self.key[slot])
        return st if st is not None else (torch.zeros(dim), 0.0)

    def account(self, slot: int) -> list[int]:
        """allocation "token": the request's [generated tokens counted, layers they ran, last counted position]."""
        key = self.key[slot]
        acc = self.accounts.get(key)
        if acc is None:
            acc = self.accounts[key] = [0, 0, -1]
            self._bound(self.accounts)
        return acc

    def chosen_k(self, slot: int) -> int | None:
        """The k the predictor chose for this slot's "auto" request earlier (a recomputed request keeps it)."""
        return self.auto.get(self.key[slot])

    def choose(self, slot: int, k: int) -> None:
        self.k[slot] = k
        key = self.key[slot]
        if key is not None:
            self.auto[key] = k
            self.auto.move_to_end(key)
            self._bound(self.auto)

    def remember(self, slot: int, kv_sum: torch.Tensor, count: float) -> None:
        key = self.key[slot]
        if key is None:
            return
        self.states[key] = (kv_sum, count)
        self.states.move_to_end(key)
        self._bound(self.states)

    def _bound(self, d: OrderedDict) -> None:
        """Keep at most MAX_STATES entries, dropping the oldest of requests out of the batch: a request still in a
        slot keeps its state however many newer requests come (an "auto" request's choice, above all)."""
        if len(d) <= MAX_STATES:
            return
        active = set(self.key)
        for key in [key for key in d if key not in active][: len(d) - MAX_STATES]:
            del d[key]
