"""Plots: quality versus executed-layer fraction (one line per method), and a generation trace heat map.

    buddy plot pareto results.jsonl --out pareto.png
    buddy plot trace trace.jsonl --out trace.png
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .sweep import read_results
from .tasks import TaskError


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_of(row: dict) -> tuple[str, float]:
    """The headline metric of a result row: acc for tasks, ppl for perplexity, KL to the dense model for
    `kl:<domain>`, pass@1 for code."""
    if "kl" in row:
        return "KL to dense", row["kl"]
    if "ppl" in row:
        return "ppl", row["ppl"]
    if "pass_at_1" in row:
        return "pass@1", row["pass_at_1"]
    return "acc", row["acc"]


def pareto_series(rows: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{panel: {method: [(executed fraction, value), ...]}}, plus an average panel over the multiple-choice
    tasks (only at the layer counts where a method has all of them)."""
    panels: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    acc_tasks = sorted({r["task"] for r in rows if "acc_norm" in r})  # multiple-choice tasks
    avg: dict[tuple[str, int], dict[str, tuple[float, float]]] = defaultdict(dict)
    for r in rows:
        name, value = metric_of(r)
        x = r["layers_per_token"] / r["n_layers"]
        method = f"{r['method']} (auto, λ={r.get('tradeoff')})" if r["k"] == "auto" else r["method"]
        if r.get("allocation", "request") != "request":  # per-token depth: its own series
            method += f" ({r['allocation']} allocation)"
        panels[f"{r['task']} ({name})"][method].append((x, value))
        if r["task"] in acc_tasks:
            avg[(method, r["k"], r.get("predictor"))][r["task"]] = (x, value)
    if len(acc_tasks) > 1:
        for (method, _, _), per_task in avg.items():
            if set(per_task) == set(acc_tasks):
                xs, vs = zip(*per_task.values())
                panels[f"average of {len(acc_tasks)} multiple-choice tasks (acc)"][method].append((sum(xs) / len(xs), sum(vs) / len(vs)))
    return {p: {m: sorted(pts) for m, pts in series.items()} for p, series in panels.items()}


def plot_pareto(results: str | Path, out: str | Path) -> Path:
    rows = read_results(results)
    if not rows:
        raise TaskError(f"{results} holds no results: run `buddy sweep ... --out {results}` first")
    panels = pareto_series(rows)
    names = sorted(panels, key=lambda p: (not p.startswith("average"), p))
    plt = _plt()
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    methods = sorted({m for series in panels.values() for m in series})
    fixed = {"dense": "black", "router": "tab:red", "static-greedy": "tab:blue", "static-bi": "tab:cyan",
             "random": "tab:gray", "prior": "tab:olive", "router-frozen": "tab:orange", "router-noprior": "tab:pink"}
    others = [m for m in methods if m not in fixed]
    colors = {**fixed, **{m: plt.cm.Dark2(i % 8) for i, m in enumerate(others)}}
    for ax, name in zip(axes.flat, names):
        for method, pts in sorted(panels[name].items()):
            xs, ys = zip(*pts)
            style = dict(marker="o", linestyle="--" if method in ("prior", "router-frozen", "router-noprior") else "-")
            if method == "dense" or "(auto" in method:
                style = dict(marker="*" if method == "dense" else "D", markersize=11, linestyle="none")
            ax.plot(xs, ys, label=method, color=colors[method], **style)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("executed layers per token / L")
        if "(ppl)" in name:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    by_label = dict(zip(labels, handles))
    for ax in list(axes.flat)[1:len(names)]:
        h, lab = ax.get_legend_handles_labels()
        by_label.update(zip(lab, h))
    fig.legend(by_label.values(), by_label.keys(), loc="lower center", ncol=min(len(by_label), 6), frameon=False)
    model = ", ".join(sorted({r["model"] for r in rows}))
    fig.suptitle(f"{model}: quality vs executed layers", fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def read_trace(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"trace file {path} not found (write one with `buddy generate --trace FILE ...`)")
    steps = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            executed = d.get("executed_layers", d.get("layers"))  # traces before the budget echo named it `layers`
            if isinstance(executed, list):
                steps.append({**d, "layers": executed})
                continue
        except (json.JSONDecodeError, AttributeError):
            pass
        raise TaskError(f"{path}:{n}: not a trace line (expected JSON with an 'executed_layers' list)")
    if not steps:
        raise TaskError(f"trace file {path} holds no generated tokens")
    return steps


def plot_trace(trace: str | Path, out: str | Path, n_layers: int | None = None) -> Path:
    """Token-by-layer heat map: a filled cell where the generated token executed the layer."""
    import numpy as np

    steps = read_trace(trace)
    L = n_layers or steps[0].get("n_layers") or max(max(s["layers"]) for s in steps) + 1
    grid = np.zeros((L, len(steps)))
    for t, s in enumerate(steps):
        grid[s["layers"], t] = 1
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(2 + 0.18 * len(steps), 24), 1.2 + 0.16 * L))
    ax.imshow(grid, aspect="auto", origin="lower", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    labels = [repr(s.get("text", ""))[1:-1][:8] for s in steps]
    step = max(1, len(steps) // 60)
    ax.set_xticks(range(0, len(steps), step))
    ax.set_xticklabels(labels[::step], rotation=90, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_xlabel("generated token")
    per_token = sum(len(s["layers"]) for s in steps) / len(steps)
    ax.set_title(f"layers each generated token executed (black; mean {per_token:.2f} of {L})", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
