"""Next-token sampling and incremental detokenizing, shared by the engine and the server's scheduler.

    tokens = sample(logits, temperature=0.7, top_p=0.9, gen=torch.Generator().manual_seed(0))

Sampling works in float64 on logits shifted by their maximum, so no accepted temperature (any value > 0,
however small) can overflow to NaN: a tiny temperature acts as greedy decoding. Rows whose logits are not
finite raise NonFiniteLogitsError naming the rows, so a caller can end those rows alone.
"""

from __future__ import annotations

import torch

from .errors import BuddyError


class NonFiniteLogitsError(BuddyError, ValueError):
    """Some rows' logits hold NaN or +inf (the model's numerics failed for them)."""

    def __init__(self, rows: list[int]):
        super().__init__(f"the model produced non-finite logits for row(s) {rows}")
        self.rows = rows


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token per row [B] from logits [B, V]: greedy at temperature 0, else nucleus sampling."""
    peak, best = logits.max(dim=-1)  # one pass: max propagates NaN, and +inf or an all -inf row is not finite
    bad = ~torch.isfinite(peak)
    if bad.any():
        raise NonFiniteLogitsError(bad.nonzero().flatten().tolist())
    if temperature == 0:
        return best
    x = logits.double()
    x = (x - x.max(dim=-1, keepdim=True).values) / temperature  # <= 0 everywhere, 0 at the maximum: no overflow
    probs = torch.softmax(x, dim=-1)
    if top_p < 1:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(cut, 0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).view(-1)


class Detokenizer:
    """Incremental text of a growing token list (holds back incomplete UTF-8 sequences)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.text = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return ""
        piece, self.text = full[len(self.text):], full
        return piece
