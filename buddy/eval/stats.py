"""Paired bootstrap intervals over documents (or perplexity windows), for comparing two methods.

    mean, lo, hi = paired_bootstrap(a - b)           # 95% interval of the mean paired difference
    mean, lo, hi = stratified_bootstrap([d1, d2], stat)  # a statistic of several groups (tasks, domains),
                                                         # documents resampled within each group
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


def stratified_bootstrap(groups, stat, n: int = 4000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float, float]:
    """(stat(groups), low, high): `groups` is a list of per-document arrays (one per task or domain), resampled with
    replacement within each group; `stat` maps such a list to a number (e.g. the mean over groups of each mean)."""
    groups = [np.asarray(g, dtype=float) for g in groups]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("no paired documents")
    rng = np.random.default_rng(seed)
    reps = [stat([g[rng.integers(0, g.size, g.size)] for g in groups]) for _ in range(n)]
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(reps, [tail, 100 - tail])
    return float(stat(groups)), float(lo), float(hi)


def no_worse(ppl: float, best: float, rtol: float = 1e-6) -> bool:
    """Whether perplexity `ppl` is at most `best` up to float32 rounding: the same plan run through two planners
    (the router with its scores weighted 0, and static-greedy) gives perplexities about 1e-7 apart."""
    return ppl <= best * (1 + rtol)
