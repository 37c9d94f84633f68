"""Paired bootstrap intervals over documents (or perplexity windows), for comparing two methods.

    mean, lo, hi = paired_bootstrap(a - b)           # 95% interval of the mean paired difference
"""

from __future__ import annotations

import numpy as np


def paired_bootstrap(diffs, n: int = 4000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of per-document differences, resampling documents with replacement."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        raise ValueError("no paired documents")
    rng = np.random.default_rng(seed)
    reps = d[rng.integers(0, d.size, (n, d.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(reps, [tail, 100 - tail])
    return float(d.mean()), float(lo), float(hi)
