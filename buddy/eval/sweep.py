"""Run one evaluation cell, or a resumable grid of them (methods x layer counts x tasks) into JSONL.

    buddy sweep --model smollm2 --methods dense,static-greedy,router --layers 15:27:4 \
        --tasks arc_easy,hellaswag,ppl-sotu --limit 100 --out results.jsonl

Each line of the output is one finished cell: model, method, kv_policy, k (layers), the task's metrics,
the measured mean executed layers per token, and wall time. Cells already in the file are skipped, so an
interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from ..api import PLANNERS, PREDICTORS, ROUTER_PLANNERS, depth_dir, make_depth, make_planner, router_dir
from ..budget import AUTO
from ..calibration import calibration_label, calibration_path
from ..config import ALLOCATIONS, SWEEP_FRACTIONS, LoadConfig, SweepConfig
from ..corpus import DOMAINS, domain_windows
from ..data import sotu_texts, token_windows
from ..engine import Engine
from ..predictor import load_predictor
from .code import evaluate_code, load_humaneval
from .generation import evaluate_gen
from .ppl import evaluate_windows
from .tasks import GEN_TASKS, MC_TASKS, TaskError, load_gen, load_mc, load_mc_file
from .zeroshot import evaluate_mc

PPL_TASKS = {"ppl-sotu": "test", "ppl-sotu-val": "validation"}  # task name -> SOTU split
PPL_WINDOWS, PPL_WINDOW, PPL_PREFILL = 16, 512, 128  # as in docs/results-history.md's perplexity table
# per-domain perplexity on the test split of a corpus domain (buddy/corpus.py): `ppl:<domain>`; `kl:<domain>`
# adds the mean KL from the dense model's next-token distribution on the same windows
DOMAIN_WINDOWS, DOMAIN_WINDOW, DOMAIN_PREFILL = 32, 256, 64
CODE_TASKS = ("humaneval",)  # pass@1, tests run in buddy.eval.sandbox
ALL_TASKS = (*MC_TASKS, *GEN_TASKS, *CODE_TASKS, *PPL_TASKS, "ppl:<domain>", "kl:<domain>")


def _domain_task(task: str) -> str | None:
    """The corpus domain of a `ppl:<domain>` or `kl:<domain>` task, else None."""
    head, _, domain = task.partition(":")
    return domain if head in ("ppl", "kl") and domain else None


def parse_layers_spec(text: str | None, n_layers: int) -> list:
    """'15:30:3' (start:stop:step, stop included when hit) or '15,21,27' -> sorted layer counts; an `auto`
    item (e.g. '15:27:4,auto') adds budget="auto" (the budget predictor chooses per document). None: round(f x
    n_layers) for f in SWEEP_FRACTIONS, so the default fits every model."""
    if text is None:
        return sorted({max(2, round(f * n_layers)) for f in SWEEP_FRACTIONS})
    items = [p for p in text.split(",") if p.strip()]
    auto = [AUTO] if AUTO in items else []
    text = ",".join(p for p in items if p != AUTO)
    if auto and not text:
        return auto
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            start, stop, step = (*parts, 1)[:3]
            ks = list(range(start, stop + 1, step))
        else:
            ks = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise TaskError(f"invalid --layers {text!r}: use start:stop:step (e.g. 15:30:3) or a list (15,21,27)") from None
    bad = [k for k in ks if not 2 <= k <= n_layers]
    if not ks or bad:
        raise TaskError(f"invalid --layers {text!r}: every count must be in [2, {n_layers}]")
    return sorted(set(ks)) + auto


def check_task(task: str, allocation: str = SweepConfig.allocation) -> None:
    """TaskError for an unknown task, or one that cannot take the allocation."""
    if (domain := _domain_task(task)) is not None:
        if domain not in DOMAINS:
            raise TaskError(f"unknown domain {domain!r} in {task!r}: use ppl:<domain> or kl:<domain> with one of "
                            f"{', '.join(DOMAINS)}")
    elif task not in ALL_TASKS and not task.startswith("mc:"):
        raise TaskError(f"unknown task {task!r}: use {', '.join(ALL_TASKS)}, or mc:FILE.jsonl for your own data")
    if allocation != ALLOCATIONS[0] and (task in MC_TASKS or task.startswith("mc:")):
        raise TaskError(f"allocation {allocation!r} spends the budget over generated tokens; {task!r} scores given "
                        f"answers: use allocation request for multiple-choice tasks")


def run_task(engine, task: str, k, limit: int | None = None, progress: bool = False,
             allocation: str = SweepConfig.allocation) -> dict:
    """Evaluate one task at k layers (or "auto"): a dict of metrics, docs, layers_per_token and wall_s.
    allocation="token": per-token depth (perplexity and generation tasks; multiple choice scores given answers)."""
    check_task(task, allocation)
    kw = {"budget": AUTO} if k == AUTO else {"layers": k}
    if task in PPL_TASKS or _domain_task(task):
        t0 = time.perf_counter()
        if domain := _domain_task(task):
            n = min(limit, DOMAIN_WINDOWS) if limit else DOMAIN_WINDOWS
            windows, prefill = domain_windows(engine.tokenizer, domain, "test", DOMAIN_WINDOW, n), DOMAIN_PREFILL
        else:
            n = min(limit, PPL_WINDOWS) if limit else PPL_WINDOWS
            windows, prefill = token_windows(engine.tokenizer, sotu_texts(PPL_TASKS[task]), PPL_WINDOW, n), PPL_PREFILL
        if not len(windows):
            raise TaskError(f"task {task!r} has no text for model {engine.bb.name!r}")
        kl = task.startswith("kl:")
        r = evaluate_windows(engine, windows, prefill=prefill, progress=progress, per_window=True,
                             allocation=allocation, kl=kl, **kw)
        out = {"ppl": r.ppl, "docs": windows.shape[0], "tokens": r.tokens, "layers_per_token": r.layers_per_token,
               "wall_s": time.perf_counter() - t0, "per_doc": {"nll": [round(x, 5) for x in r.window_nll]}}
        if kl:
            out = {"kl": r.kl, **out}
            out["per_doc"]["kl"] = [round(x, 6) for x in r.window_kl]
        if r.chosen_k:
            out["chosen_k"] = r.chosen_k
        return out
    if task in CODE_TASKS:
        r, _ = evaluate_code(engine, load_humaneval(limit), progress=progress, allocation=allocation, **kw)
        out = r.as_dict()
    elif task in GEN_TASKS:
        r, _ = evaluate_gen(engine, task, load_gen(task, limit), progress=progress, allocation=allocation, **kw)
        out = r.as_dict()
    else:
        docs = load_mc_file(task[3:], limit) if task.startswith("mc:") else load_mc(task, limit)
        out = evaluate_mc(engine, task, docs, progress=progress, **kw).as_dict()
    out.pop("task")
    return out


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise TaskError(f"{path}:{n} is not a JSON line (a results file from `buddy sweep`?)") from None
    return rows


STATIC_METHODS = ("static-bi", "static-greedy")  # the methods whose layers come from a calibration


def _drop_partial_line(path: Path) -> None:
    """A results file whose last line lacks its newline was cut by an interrupted write: that row never
    finished, so drop it; later appends then keep the file valid JSONL."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)


def content_hash(f: Path | None) -> str | None:
    """The first 12 hex of a file's sha256 (None if there is no such file): what a row measured, by content."""
    if f is None or not Path(f).is_file():
        return None
    return hashlib.sha256(Path(f).read_bytes()).hexdigest()[:12]


def artifact_label(d: Path | None, weights: str) -> str | None:
    """'<directory name>@<first 12 hex of sha256(d/weights)>': which artifact a row measured, the same whatever
    path it was loaded from (another clone, a relative path), and different when a shipped one is refitted."""
    h = content_hash(Path(d) / weights) if d else None
    return f"{Path(d).name}@{h}" if h else None


def router_label(rdir: Path | None) -> str | None:
    """The router a row measured: `artifact_label` of its router.safetensors."""
    return artifact_label(rdir, "router.safetensors")


def cell_key(row: dict) -> tuple:
    """What makes two rows the same cell. Router rows written before rows named their router have none, so a
    sweep measures them again rather than mistake them for the router it is given; static rows name their
    calibration and its file's content (`calibration_sha256`), so a replaced calibration is measured again."""
    static = row["method"] in STATIC_METHODS
    return (row["model"], row["method"], row["kv_policy"], row["k"], row["task"], row.get("limit"), row.get("predictor"),
            row.get("calibration", "sotu") if static else None, row.get("calibration_sha256") if static else None,
            row.get("allocation", ALLOCATIONS[0]), row.get("depth"),
            row.get("router") if row["method"] in ROUTER_PLANNERS else None)


def sweep(bb, cfg: SweepConfig, load: LoadConfig | None = None, progress: bool = True) -> list[dict]:
    """Run every missing (method, k, task) cell of `cfg` and append it to `cfg.out`; returns the new rows.

    `load` gives the KV policy, router, predictor, calibration and depth head (its model, device and dtype
    are `bb`'s).
    `dense` runs once per task at k = L; other methods skip k = L (it is the dense model for every method)."""
    load = load or LoadConfig(model=bb.name)
    methods, tasks, out, limit = list(cfg.methods), list(cfg.tasks), cfg.out, cfg.limit
    kv_policy, router, predictor, calibration = load.kv_policy, load.router, load.predictor, load.calibration
    ks = parse_layers_spec(cfg.layers, bb.n_layers)
    allocation, depth, depth_name = cfg.allocation, None, None
    if allocation != ALLOCATIONS[0]:
        depth = make_depth(bb, kv_policy, load.depth)
        depth_name = artifact_label(depth_dir(bb, kv_policy, load.depth), "depth.safetensors")
        if depth is None:
            raise TaskError(f"allocation {allocation!r} needs a depth head for model {bb.name!r} and kv policy "
                            f"{kv_policy!r}: fit one with `buddy train depth`, then pass --depth DIR")
    for m in methods:
        if m != "dense" and m not in PLANNERS:
            raise TaskError(f"unknown method {m!r}: use dense or one of {', '.join(PLANNERS)}")
    for t in tasks:
        check_task(t, cfg.allocation)
    L = bb.n_layers
    cells = [(m, k, t) for m in methods for k in ([L] if m == "dense" else [k for k in ks if k == AUTO or k < L])
             for t in tasks]
    pred_name = pred_tradeoff = pred_module = None
    if AUTO in ks:
        pdir = Path(predictor) if predictor else PREDICTORS / bb.name
        pred_module, meta = load_predictor(pdir, checksum=bb.checksum)
        pred_module, pred_name, pred_tradeoff = pred_module.to(bb.device), str(pdir), meta.tradeoff
    cal_sha = None
    if any(m in STATIC_METHODS for m in methods):
        cal_sha = content_hash(calibration_path(bb, calibration))
        calibration = calibration_label(bb, calibration)
    rlabel = router_label(Path(router) if router else router_dir(bb, kv_policy)) \
        if any(m in ROUTER_PLANNERS for m in methods) else None
    _drop_partial_line(Path(out))
    done = {cell_key(r) for r in read_results(out)}
    def key(m, k, t):  # the cell_key of the row this cell would write
        return cell_key({"model": bb.name, "method": m, "kv_policy": kv_policy, "k": k, "task": t, "limit": limit,
                         "predictor": pred_name if k == AUTO else None, "calibration": calibration,
                         "calibration_sha256": cal_sha,
                         "allocation": allocation, "depth": depth_name, "router": rlabel})

    todo = [c for c in cells if key(*c) not in done]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    # every planner is built now, next to the calibration hash above, so that rows name the content they ran
    # even if `buddy calibrate` rewrites the file during a long sweep
    engines = {m: Engine(bb, make_planner("full" if m == "dense" else m, bb, kv_policy, router,
                                          calibration=calibration), kv_policy, pred_module, depth)
               for m in dict.fromkeys(m for m, _, _ in todo)}
    new = []
    bar = tqdm(todo, desc="sweep", unit="cell", disable=not progress)
    for method, k, task in bar:
        bar.set_postfix_str(f"{method} k={k} {task}")
        metrics = run_task(engines[method], task, k, limit, progress=progress, allocation=allocation)  # a bar within the cell
        measured = k == AUTO or allocation != ALLOCATIONS[0]  # the fraction a row is plotted at
        row = {"model": bb.name, "method": method, "kv_policy": kv_policy, "k": k, "n_layers": L,
               "layer_fraction": metrics["layers_per_token"] / L if measured else k / L, "task": task, "limit": limit,
               "allocation": allocation, **({"depth": depth_name} if depth_name else {}),
               **({"predictor": pred_name, "tradeoff": pred_tradeoff} if k == AUTO else {}),
               **({"calibration": calibration, "calibration_sha256": cal_sha} if method in STATIC_METHODS else {}),
               **({"router": rlabel} if method in ROUTER_PLANNERS else {}), **metrics,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(out, "a", encoding="utf-8") as f:  # one whole line per cell, flushed before the next
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        new.append(row)
    return new
