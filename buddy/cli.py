"""The `buddy` command line: thin parsing that dispatches to the library.

    buddy generate --model smollm2 --budget 0.5 "The capital of France is"
    buddy calibrate --model smollm2
    buddy eval ppl --model smollm2 --planner static-greedy --layers 21 --text-file FILE --json
    buddy eval zeroshot --model smollm2 --planner router --budget 0.75 --tasks arc_easy,piqa --limit 100
    buddy sweep --model smollm2 --methods dense,static-greedy,router --layers 15:27:4 --tasks arc_easy --out r.jsonl
    buddy plot pareto r.jsonl --out pareto.png

Bad input (budgets, models, files) gives a one-line error and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path

from .budget import AUTO, Budget, budget_echo, request_budget
from .config import (
    ALLOCATIONS,
    CALIBRATION_DATA,
    DTYPES,
    EXPORT_FORMATS,
    EXPORT_PLANNERS,
    KV_POLICIES,
    QUANT_MODES,
    VLLM_KV_POLICIES,
    CalibrateConfig,
    CodeEvalConfig,
    ExportConfig,
    GenerateConfig,
    LoadConfig,
    PplConfig,
    ServeConfig,
    SweepConfig,
    ZeroshotConfig,
)
from .errors import BuddyError, require_extra


class UsageError(BuddyError):
    """A bad command-line value; reported as `buddy: error: ...` with exit code 2."""


def _out_file(path: str, flag: str, suffixes: tuple[str, ...] = ()) -> Path:
    """A file path the command will write: its directory exists and it is not a directory (checked before work)."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"invalid {flag} {path!r}: it is a directory; give a file path")
    if not p.parent.is_dir():
        raise UsageError(f"invalid {flag} {path!r}: directory {str(p.parent)!r} does not exist")
    if suffixes and p.suffix.lower() not in suffixes:
        raise UsageError(f"invalid {flag} {path!r}: use one of {', '.join(suffixes)}")
    return p


def _out_dir(path: str, flag: str, empty: bool = False) -> Path:
    """A directory the command will write into: not a file; with `empty`, absent or empty."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"invalid {flag} {path!r}: it is a file; give a directory")
    if empty and p.is_dir() and any(p.iterdir()):
        raise UsageError(f"invalid {flag} {path!r}: the directory is not empty")
    return p


def _in_text_file(path: str, flag: str) -> None:
    """A UTF-8 text file the command will read (checked before loading the model)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"invalid {flag} {path!r}: file not found")
    try:
        p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"invalid {flag} {path!r}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _doc_of(cls, name: str) -> str:
    """The help text of a dataclass field, taken from the class docstring (`name: text`, with its
    more-indented continuation lines)."""
    lines = (cls.__doc__ or "").splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"{name}:"):
            indent = len(line) - len(line.lstrip())
            text = [line.strip().split(":", 1)[1].strip()]
            for nxt in lines[i + 1:]:
                if not nxt.strip() or len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                text.append(nxt.strip())
            return " ".join(text)
    return ""


def _add_load_args(p: argparse.ArgumentParser, planner: bool = True, skip: tuple[str, ...] = (),
                   quant: bool = True) -> None:
    """LoadConfig's fields as flags (planner=False: model, device and dtype only); `skip` leaves out fields a
    command would not use, so that no flag is accepted and then ignored."""
    d = LoadConfig()
    p.add_argument("--model", default=d.model, help=_doc_of(LoadConfig, "model") + f" (default {d.model})")
    if planner:
        p.add_argument("--planner", default=d.planner, help=_doc_of(LoadConfig, "planner"))
        p.add_argument("--kv-policy", default=d.kv_policy, choices=KV_POLICIES, help=_doc_of(LoadConfig, "kv_policy"))
        p.add_argument("--router", default=d.router, help=_doc_of(LoadConfig, "router"))
        for name, kind in (("reroute_every", int), ("predictor", str), ("calibration", str), ("depth", str)):
            if name not in skip:
                p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                               help=_doc_of(LoadConfig, name))
    p.add_argument("--device", default=d.device, help=_doc_of(LoadConfig, "device"))
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help=_doc_of(LoadConfig, "dtype"))
    if quant:
        p.add_argument("--quant", default=d.quant, choices=QUANT_MODES, help=_doc_of(LoadConfig, "quant"))


def _add_budget_args(p: argparse.ArgumentParser, export: bool = False) -> None:
    g = p.add_mutually_exclusive_group()
    if export:  # hf: the one fixed depth; vllm: the default of requests that name no budget
        g.add_argument("--budget", "--default-budget", help="fraction of layers, in (0, 1] (default 1); for "
                                                            "--format vllm the budget of requests that give none")
        g.add_argument("--layers", help="exact number of layers (2..L)")
        return
    g.add_argument("--budget", help="fraction of layers each token executes, in (0, 1] (default 1), or `auto` "
                                    "(the budget predictor chooses per prompt)")
    g.add_argument("--layers", help="exact number of layers each token executes (2..L)")


def _budget(args) -> Budget | str:
    return request_budget(args.budget, args.layers)


def _load(args):
    from .api import load

    return load(args.model, planner=args.planner, kv_policy=args.kv_policy, device=args.device, dtype=args.dtype,
                quant=args.quant, router=args.router, reroute_every=args.reroute_every,
                predictor=getattr(args, "predictor", None), calibration=args.calibration, depth=getattr(args, "depth", None))


def cmd_generate(args) -> int:
    budget = _budget(args)
    if not args.prompt:
        raise UsageError("the prompt is empty: give some text to continue")
    if args.trace:
        _out_file(args.trace, "--trace")
    gen = {f.name: getattr(args, f.name) for f in fields(GenerateConfig) if hasattr(args, f.name)}
    GenerateConfig(**gen)  # validate before loading anything
    m = _load(args)
    k = m.resolve_k(budget)
    trace = open(args.trace, "w", encoding="utf-8") if args.trace else None
    n, layer_sum, t0 = 0, 0, time.perf_counter()
    try:
        for step in m.generate(args.prompt, budget=budget, **gen):
            sys.stdout.write(step.text)
            sys.stdout.flush()
            n += 1
            layer_sum += len(step.layers)
            k = len(step.layers) if budget == AUTO else k
            if trace:
                trace.write(json.dumps({"token": step.token, "text": step.text, "executed_layers": list(step.layers),
                                        **budget_echo(budget, len(step.layers)), "n_layers": m.n_layers,
                                        "ms": round(step.ms, 3)}) + "\n")
    finally:
        if trace:
            trace.close()
    dt = time.perf_counter() - t0
    print()
    label = "auto" if budget == AUTO else budget.label
    print(f"[buddy] model={m.bb.name} planner={m.planner.name} kv={m.kv_policy} budget={label} "
          f"k={k}/{m.n_layers} tokens={n} layers/token={layer_sum / max(n, 1):.2f} tokens/s={n / dt:.1f}",
          file=sys.stderr if args.quiet_summary else sys.stdout)
    return 0


def cmd_calibrate(args) -> int:
    from pathlib import Path

    import torch

    from .artifacts import git_commit
    from .backbone import load_backbone
    from .calibration import calibrate, save_calibration, user_calibration_path

    cfg = _config(CalibrateConfig, args)
    out = Path(cfg.out) if cfg.out else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise UsageError(f"invalid --out {cfg.out!r}: give a file path in an existing directory")
    bb = load_backbone(args.model, args.device, args.dtype, getattr(args, "quant", "none"))
    if cfg.data == "sotu":
        from .data import sotu_texts, token_windows

        windows = token_windows(bb.tokenizer, sotu_texts("train"), cfg.window, cfg.windows)
        data = f"SOTU train years (<= 2000), {windows.shape[0]} windows x {windows.shape[1]} tokens, evenly spaced"
    else:
        from .corpus import VERSION, describe, mix_windows

        per = mix_windows(bb.tokenizer, "train", cfg.window, cfg.windows)
        windows = torch.cat(list(per.values()))
        data = (f"training mix v{VERSION}, train split, {cfg.windows} evenly spaced windows x {cfg.window} tokens "
                f"per domain ({describe(per)})")
    command = "buddy calibrate " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    commit = git_commit()
    result = calibrate(bb, windows, command=command, data=data)
    result["calibration_data"], result["git_commit"] = cfg.data, commit
    out = out or user_calibration_path(bb, cfg.data)
    save_calibration(result, out)
    print(f"wrote {out}")
    print(f"static-bi order:     {result['orders']['static-bi']}")
    print(f"static-greedy order: {result['orders']['static-greedy']}")
    print(f"use it with --calibration {out}")
    return 0


def cmd_eval_ppl(args) -> int:
    from pathlib import Path

    from .data import token_windows
    from .eval.ppl import evaluate_windows

    budget = _budget(args)
    cfg = _config(PplConfig, args)
    path = Path(cfg.text_file)
    if not path.is_file():
        raise UsageError(f"text file {cfg.text_file!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"text file {cfg.text_file!r} is not UTF-8 ({e.reason} at byte {e.start})") from None
    m = _load(args)
    k = m.resolve_k(budget)
    try:
        windows = token_windows(m.tokenizer, [text], cfg.window, cfg.max_windows)
    except ValueError as e:
        raise UsageError(str(e)) from None
    r = evaluate_windows(m, windows, **({"budget": AUTO} if k == AUTO else {"layers": k}),
                         batch_size=cfg.batch_size, progress=not args.json, prefill=cfg.prefill,
                         allocation=cfg.allocation)
    out = {"ppl": round(r.ppl, 4), "tokens": r.tokens, "layers_per_token": round(r.layers_per_token, 3),
           "planner": m.planner.name, "kv_policy": m.kv_policy, **budget_echo(budget, k), "model": m.bb.name,
           "allocation": cfg.allocation}
    if r.chosen_k:
        out["chosen_k"] = r.chosen_k
    if args.json:
        print(json.dumps(out))
    else:
        print(f"ppl={r.ppl:.3f} over {r.tokens} tokens, {r.layers_per_token:.2f} layers/token "
              f"(planner {m.planner.name}, kv {m.kv_policy}, k={k}/{m.n_layers})")
        if r.chosen_k:
            print(f"budget auto chose k per window: {r.chosen_k}")
    return 0


def cmd_eval_zeroshot(args) -> int:
    from .eval.sweep import check_task, run_task

    budget = _budget(args)
    cfg = _config(ZeroshotConfig, args)
    tasks = list(cfg.tasks)
    if cfg.mc_file:
        _in_text_file(cfg.mc_file, "--mc-file")
        tasks.append(f"mc:{cfg.mc_file}")
    for t in tasks:
        check_task(t, cfg.allocation)
    m = _load(args)
    k = m.resolve_k(budget)
    rows = []
    for t in tasks:
        r = {"task": t, "model": m.bb.name, "planner": m.planner.name, "kv_policy": m.kv_policy,
             "allocation": cfg.allocation, **budget_echo(budget, k),
             **run_task(m, t, k, cfg.limit, progress=not args.json, allocation=cfg.allocation)}
        rows.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
    accs = [r for r in rows if "acc_norm" in r]  # the multiple-choice tasks
    if len(accs) > 1:
        avg = {"task": "mc-average", "acc": sum(r["acc"] for r in accs) / len(accs),
               "acc_norm": sum(r["acc_norm"] for r in accs) / len(accs), "tasks": len(accs)}
        rows.append(avg)
        if args.json:
            print(json.dumps(avg))
    if not args.json:
        print(f"model={m.bb.name} planner={m.planner.name} kv={m.kv_policy} k={k}/{m.n_layers}")
        print(f"{'task':<16} {'docs':>5} {'acc':>7} {'acc_norm':>8} {'ppl':>8} {'layers/tok':>10} {'wall s':>7}")
        for r in rows:
            def f(key, spec):
                return format(r[key], spec) if key in r else "-"
            print(f"{r['task'][:16]:<16} {f('docs', 'd'):>5} {f('acc', '.3f'):>7} {f('acc_norm', '.3f'):>8} "
                  f"{f('ppl', '.2f'):>8} {f('layers_per_token', '.2f'):>10} {f('wall_s', '.1f'):>7}")
    return 0


def cmd_eval_code(args) -> int:
    from .eval.code import evaluate_code, load_humaneval
    from .eval.sandbox import Limits, require_sandbox

    budget = _budget(args)
    cfg = _config(CodeEvalConfig, args)
    if cfg.samples_out:
        _out_file(cfg.samples_out, "--samples-out", (".jsonl",))
    require_sandbox(cfg.weak_sandbox)
    problems = load_humaneval(cfg.limit)
    m = _load(args)
    k = m.resolve_k(budget)
    if k == AUTO:
        raise UsageError("eval code needs a fixed budget or --layers (budget `auto` chooses per prompt; use the sweep)")
    r, completions = evaluate_code(m, problems, layers=k, batch_size=cfg.batch_size,
                                   max_new_tokens=cfg.max_new_tokens, weak_sandbox=cfg.weak_sandbox,
                                   progress=not args.json, limits=Limits(timeout_s=cfg.timeout, cpu_s=cfg.timeout),
                                   allocation=cfg.allocation)
    if cfg.samples_out:
        from .artifacts import atomic_write_text

        atomic_write_text(Path(cfg.samples_out), "".join(
            json.dumps({"task_id": p.task_id, "completion": c, "passed": bool(ok)}) + "\n"
            for p, c, ok in zip(problems, completions, r.per_doc["passed"])))
    out = {"task": "humaneval", "pass_at_1": round(r.pass_at_1, 4), "docs": r.docs, "statuses": r.statuses,
           "layers_per_token": round(r.layers_per_token, 3), "tokens_per_problem": round(r.tokens_per_problem, 1),
           "wall_s": round(r.wall_s, 1), "planner": m.planner.name,
           "kv_policy": m.kv_policy, "allocation": cfg.allocation, **budget_echo(budget, k), "model": m.bb.name}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"humaneval pass@1={r.pass_at_1:.3f} ({sum(r.per_doc['passed'])}/{r.docs}; {r.statuses}), "
              f"{r.layers_per_token:.2f} layers/token (planner {m.planner.name}, kv {m.kv_policy}, k={k}/{m.n_layers})")
    return 0


def cmd_sweep(args) -> int:
    cfg = _config(SweepConfig, args)
    _out_file(cfg.out, "--out")
    from .backbone import load_backbone
    from .eval.sweep import sweep

    load = _config(LoadConfig, args)
    bb = load_backbone(load.model, load.device, load.dtype, load.quant)
    new = sweep(bb, cfg, load)
    print(f"wrote {len(new)} new cells to {cfg.out}")
    return 0


def cmd_plot(args) -> int:
    _out_file(args.out, "--out", (".png", ".pdf", ".svg"))
    require_extra("matplotlib", "plot", "buddy plot")
    from .eval.plots import plot_pareto, plot_trace

    out = plot_pareto(args.file, args.out) if args.plot_command == "pareto" else plot_trace(args.file, args.out)
    print(f"wrote {out}")
    return 0


def cmd_serve(args) -> int:
    require_extra("fastapi", "serve", "buddy serve")
    require_extra("uvicorn", "serve", "buddy serve")
    import uvicorn

    from .api import make_depth, make_planner, make_predictor
    from .backbone import load_backbone
    from .config import ServeConfig
    from .engine import Engine
    from .serve.app import Server, create_app

    cfg = ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)})
    bb = load_backbone(args.model, args.device, args.dtype, getattr(args, "quant", "none"))
    predictor = make_predictor(bb, args.predictor)
    engines = {p: Engine(bb, make_planner(args.planner, bb, p, args.router, calibration=args.calibration), p, predictor,
                         make_depth(bb, p, args.depth))
               for p in cfg.policies}
    server = Server(engines, bb.name, cfg)
    planners = ", ".join(f"{p}: {e.planner.name}" for p, e in engines.items())
    print(f"buddy: serving {bb.name} (planner per kv policy: {planners}) on "
          f"http://{cfg.host}:{cfg.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0


def _choices_of(cls, name: str) -> tuple[str, ...] | None:
    """The values a field accepts, for its help text (the dataclass itself validates them)."""
    return {"allocation": ALLOCATIONS}.get(name) or {
        (CalibrateConfig, "data"): CALIBRATION_DATA, (ExportConfig, "format"): EXPORT_FORMATS,
        (ExportConfig, "planner"): EXPORT_PLANNERS}.get((cls, name))


def _add_dataclass_args(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --flag per dataclass field, with its default and the help from the class docstring; a field
    without a default is a required flag."""
    from dataclasses import MISSING

    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default
        flag = "--" + f.name.replace("_", "-")
        doc = _doc_of(cls, f.name).rstrip(".").replace("%", "%%")  # argparse formats help with %
        if choices := _choices_of(cls, f.name):
            doc += f"; one of {', '.join(choices)}"
        kind = next((t for name, t in (("int", int), ("float", float), ("bool", bool)) if str(f.type).startswith(name)),
                    str)
        if default is MISSING:
            if str(f.type).startswith("tuple"):
                p.add_argument(flag, type=_csv(str), required=True, help=doc)
            else:
                p.add_argument(flag, type=kind, required=True, help=doc)
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                           help=f"{doc} (default {default!r})")
        elif isinstance(default, tuple):  # comma-separated values of the elements' type
            p.add_argument(flag, type=_csv(type(default[0]) if default else str), default=default,
                           help=f"{doc} (default {','.join(map(str, default)) or 'none'})")
        else:  # a None default that its help explains (e.g. sweep's --layers) is not printed as "None"
            said = default is None and "default" in doc
            p.add_argument(flag, type=kind, default=default, help=doc if said else f"{doc} (default {default!r})")


def _config(cls, args):
    """The dataclass `cls` from the parsed flags of the same names (ConfigError for an invalid value)."""
    return cls(**{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                  for f in fields(cls) if hasattr(args, f.name)})


def cmd_train_router(args) -> int:
    """One process, or several under torchrun (DDP: each process takes its share of every global batch)."""
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from .backbone import load_backbone
    from .calibration import load_calibration
    from .data import sotu_texts, token_windows
    from .train.router import RouterTrainer, TrainConfig, init_distributed

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if cfg.data not in ("mix", "sotu"):
        _in_text_file(cfg.data, "--data")
    out = _out_dir(args.out or f"runs/router-{Path(args.model).name}-{cfg.kv_policy}", "--out")
    if (out / "state.pt").is_file() and not args.resume:
        raise UsageError(f"{out} already holds a training run: pass --resume to continue it, or another --out")
    distributed = init_distributed()
    main = not distributed or dist.get_rank() == 0
    try:
        if distributed and cfg.data in ("sotu", "mix"):  # the first process fetches SOTU once; the others wait
            if main:
                sotu_texts("train")
            dist.barrier()
        bb = load_backbone(args.model, args.device, args.dtype, getattr(args, "quant", "none"))
        order = load_calibration(bb, cfg.calibration)["orders"][cfg.prior]
        if cfg.data == "sotu":
            train = token_windows(bb.tokenizer, sotu_texts("train"), cfg.seq_len)
            def val_windows(n):
                return token_windows(bb.tokenizer, sotu_texts("validation"), cfg.seq_len, n)
            val = val_windows(cfg.val_windows)
            data = (f"SOTU train years <= 2000: {train.shape[0]} windows x {cfg.seq_len} tokens; validation: "
                    f"SOTU 2001-2010, {val.shape[0]} windows x {cfg.seq_len} tokens")
        elif cfg.data != "mix":  # the user's own text file
            from .data import text_file_split

            train_text, val_text = text_file_split(cfg.data)
            def val_windows(n):
                return token_windows(bb.tokenizer, [val_text], cfg.seq_len, n)
            try:
                train = token_windows(bb.tokenizer, [train_text], cfg.seq_len)
                val = val_windows(cfg.val_windows)
            except ValueError as e:
                raise UsageError(f"--data {cfg.data}: {e}") from None
            data = (f"{cfg.data}: first 90% {train.shape[0]} windows x {cfg.seq_len} tokens; last 10% validation, "
                    f"{val.shape[0]} windows")
        else:
            from .corpus import VERSION, describe, mix_windows

            per = mix_windows(bb.tokenizer, "train", cfg.seq_len, cfg.train_per_domain)
            train = torch.cat(list(per.values()))
            def val_windows(n):
                return mix_windows(bb.tokenizer, "validation", cfg.seq_len, n)
            val = val_windows(cfg.val_windows)
            data = (f"training mix v{VERSION} (buddy/corpus.py), windows of {cfg.seq_len} tokens; train: "
                    f"{describe(per)}; validation: {describe(val)}")
        command = "buddy train router " + " ".join(shlex.quote(a) for a in sys.argv[3:])
        if distributed:
            command = f"torchrun --nproc_per_node {dist.get_world_size()} -m {command}"
        trainer = RouterTrainer(bb, cfg, order, train, val, out, command=command, data=data)
        if cfg.scales and cfg.scale_windows and main:  # only the first process fits scales
            trainer.scale_windows = val_windows(cfg.scale_windows)
        if args.resume and trainer.load_state() and main:
            print(f"resuming {out} at step {trainer.step}", file=sys.stderr)
        best = trainer.run()
        if main:
            print(f"wrote {out}/router.safetensors and router.json (best step {best['step']}, "
                  f"{trainer.train_seconds / 60:.1f} min)")
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def cmd_train_predictor(args) -> int:
    from pathlib import Path

    from .api import load
    from .train.predictor import PredictorTrainConfig, PredictorTrainer

    cfg = PredictorTrainConfig(**{f.name: getattr(args, f.name) for f in fields(PredictorTrainConfig)})
    out = _out_dir(args.out or f"runs/predictor-{Path(args.model).name}", "--out")
    if (out / "state.pt").is_file() and not args.resume:
        raise UsageError(f"{out} already holds a training run: pass --resume to continue it, or another --out")
    m = load(args.model, planner=args.planner, kv_policy=args.kv_policy, device=args.device, dtype=args.dtype,
             router=args.router, calibration=args.calibration)
    command = "buddy train predictor " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    trainer = PredictorTrainer(m, cfg, out, command=command)
    if args.resume and trainer.load_state():
        print(f"resuming {out} at step {trainer.step}", file=sys.stderr)
    trainer.tables()
    v = trainer.run()
    share = ", ".join(f"{lv:g}: {s:.0%}" for lv, s in zip(cfg.level_list, v["level_share"]))
    print(f"wrote {out}/predictor.safetensors and predictor.json; validation: mean level {v['mean_level']:.3f} "
          f"({share})")
    return 0


def cmd_train_depth(args) -> int:
    from pathlib import Path

    import torch

    from .allocation import save_depth
    from .corpus import VERSION, describe, mix_windows
    from .train.depth import DepthTrainConfig, fit_depth

    cfg = _config(DepthTrainConfig, args)
    out = _out_dir(args.out or f"runs/depth-{Path(args.model).name}-{args.kv_policy}", "--out")
    m = _load(args)
    train = mix_windows(m.tokenizer, "train", cfg.window, cfg.windows)
    val = mix_windows(m.tokenizer, "validation", cfg.window, cfg.val_windows)
    data = (f"training mix v{VERSION} (buddy/corpus.py), windows of {cfg.window} tokens, first {cfg.prefill} as the "
            f"prompt; train: {describe(train)}; validation: {describe(val)}")
    command = "buddy train depth " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    head, meta = fit_depth(m, torch.cat(list(train.values())), torch.cat(list(val.values())), cfg, data, command)
    save_depth(head, meta, out)
    print(f"wrote {out}/depth.safetensors and depth.json (levels {list(head.cfg.levels)})")
    for k, r in meta.validation["table"].items():
        print(f"validation, mean {k} layers: per-token {r['ppl']:.3f} at {r['layers']:.2f} layers, fixed "
              f"{r['fixed_ppl']:.3f} ({100 * r['change']:+.1f}%; table estimate)")
    return 0


def cmd_export(args) -> int:
    cfg = _config(ExportConfig, args)
    _out_dir(cfg.out, "--out", empty=True)
    from .backbone import load_backbone
    from .export import export

    budget = _budget(args)
    if budget == AUTO:
        raise UsageError("an export has one fixed depth (or, for vllm, one default): give --budget B or --layers K")
    command = "buddy export " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    if cfg.format == "vllm":
        return _export_vllm(args, budget, command)
    bb = load_backbone(args.model, args.device, args.dtype, getattr(args, "quant", "none"))
    k = budget.k(bb.n_layers)
    out, keep = export(bb, k, cfg.planner, cfg.out, command=command, calibration=args.calibration)
    print(f"wrote {out}: {k} of {bb.n_layers} layers {keep} (planner {cfg.planner}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _export_vllm(args, budget, command: str) -> int:
    from .api import make_depth, make_predictor, router_dir
    from .backbone import load_backbone
    from .export import export_vllm
    from .router import load_router

    bb = load_backbone(args.model, args.device, args.dtype, getattr(args, "quant", "none"))
    rdir = args.router or router_dir(bb, args.kv_policy, fallback=False)
    if rdir is None:  # a router trained for another policy is worse than static there (docs/results.md)
        raise UsageError(f"no router trained for kv policy {args.kv_policy!r} ships for model {bb.name!r} (the "
                         f"`fill` one is worse than static-greedy under other policies): pass --router DIR")
    module, meta = load_router(rdir, checksum=bb.checksum, n_layers=bb.n_layers)
    if meta.kv_policy != args.kv_policy:
        warnings.warn(f"router {rdir} was trained for kv policy {meta.kv_policy!r}, not {args.kv_policy!r}: expect "
                      "lower quality than static-greedy (docs/results.md, \"KV policy zero\")", stacklevel=2)
    k = bb.n_layers if args.budget is None and args.layers is None else budget.k(bb.n_layers)
    predictor = make_predictor(bb, args.predictor)
    depth = make_depth(bb, args.kv_policy, args.depth)
    out = export_vllm(bb, module, meta, args.out, k, command, kv_policy=args.kv_policy, predictor=predictor,
                      depth=depth)
    extras = [name for name, x in (("budget predictor", predictor), ("depth head", depth)) if x is not None]
    print(f"wrote {out}: {bb.name} with its router{''.join(', ' + x for x in extras)}, KV policy "
          f"{args.kv_policy} (default {k} of {bb.n_layers} layers); serve it with Buddy installed in vLLM's "
          f"environment: vllm serve {out} --no-enable-prefix-caching --enforce-eager")
    return 0


def _csv(kind):
    def parse(text):
        try:
            return tuple(kind(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid list {text!r}") from None
    return parse


def cmd_bench_latency(args) -> int:
    from .config import LatencyConfig
    from .eval.latency import format_table, run_latency, to_json_line

    cfg = LatencyConfig(**{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                           for f in fields(LatencyConfig)})
    for b in cfg.budgets:
        Budget(fraction=b)  # validate before loading anything
    res = run_latency(args.model, args.dtype, args.device, cfg, progress=lambda m: print(m, file=sys.stderr),
                      quant=args.quant)
    print(format_table(res))
    print(to_json_line(res))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="buddy", description="Budget-driven dynamic depth routing for LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text at a compute budget")
    _add_load_args(g)
    _add_budget_args(g)
    _add_dataclass_args(g, GenerateConfig)  # --max-new-tokens ... --allocation, --chat and --ignore-eos
    g.add_argument("--trace", help="write one JSON line per generated token: token, text, executed_layers, "
                                   "budget, layers, k, n_layers, ms")
    g.add_argument("--quiet-summary", action="store_true", help="print the summary line to stderr")
    g.add_argument("prompt")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("calibrate", help="measure layer importance (Block Influence, greedy removal)")
    _add_load_args(c, planner=False, quant=False)
    _add_dataclass_args(c, CalibrateConfig)
    c.set_defaults(func=cmd_calibrate)

    t = sub.add_parser("train", help="train the router, the budget predictor or the depth head")
    tsub = t.add_subparsers(dest="train_command", required=True)
    tr = tsub.add_parser("router", help="train a Decision Module on a frozen backbone")
    from .train.router import TrainConfig

    _add_load_args(tr, planner=False, quant=False)
    _add_dataclass_args(tr, TrainConfig)
    tr.add_argument("--out", help="output directory (default runs/router-<model>-<kv policy>)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    tr.set_defaults(func=cmd_train_router)

    tp = tsub.add_parser("predictor", help="train the Budget Predictor (GRPO) for budget=auto")
    from .train.predictor import PredictorTrainConfig

    _add_load_args(tp, skip=("reroute_every", "predictor", "depth"), quant=False)  # it trains the predictor, on every-token routing
    _add_dataclass_args(tp, PredictorTrainConfig)
    tp.add_argument("--out", help="output directory (default runs/predictor-<model>)")
    tp.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    tp.set_defaults(func=cmd_train_predictor)

    td = tsub.add_parser("depth", help="fit the depth head for allocation=token (ridge regression, minutes)")
    from .train.depth import DepthTrainConfig

    _add_load_args(td, skip=("predictor", "depth"))
    _add_dataclass_args(td, DepthTrainConfig)
    td.add_argument("--out", help="output directory (default runs/depth-<model>-<kv policy>)")
    td.set_defaults(func=cmd_train_depth)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bl = bsub.add_parser("latency", help="decode latency: transformers vs the Buddy engine at several budgets")
    _add_load_args(bl, planner=False)
    from .config import LatencyConfig

    _add_dataclass_args(bl, LatencyConfig)
    bl.set_defaults(func=cmd_bench_latency)

    e = sub.add_parser("eval", help="evaluate quality at a budget")
    esub = e.add_subparsers(dest="eval_command", required=True)
    pp = esub.add_parser("ppl", help="perplexity of a UTF-8 text file in fixed windows")
    _add_load_args(pp)
    _add_budget_args(pp)
    _add_dataclass_args(pp, PplConfig)
    pp.add_argument("--json", action="store_true", help="print one JSON line")
    pp.set_defaults(func=cmd_eval_ppl)
    from .eval.sweep import ALL_TASKS

    zs = esub.add_parser("zeroshot", help="benchmark tasks: multiple-choice log-likelihood, LAMBADA, GSM8K",
                         description=f"tasks: {', '.join(ALL_TASKS)}")
    _add_load_args(zs)
    _add_budget_args(zs)
    _add_dataclass_args(zs, ZeroshotConfig)
    zs.add_argument("--json", action="store_true", help="print one JSON line per task")
    zs.set_defaults(func=cmd_eval_zeroshot)

    co = esub.add_parser("code", help="HumanEval pass@1: greedy completions, tests run in a sandbox")
    _add_load_args(co)
    _add_budget_args(co)
    _add_dataclass_args(co, CodeEvalConfig)
    co.add_argument("--json", action="store_true", help="print one JSON line")
    co.set_defaults(func=cmd_eval_code)

    sw = sub.add_parser("sweep", help="a resumable grid of methods x layer counts x tasks into JSONL")
    _add_load_args(sw, planner=False)
    sw.add_argument("--kv-policy", default=LoadConfig.kv_policy, choices=KV_POLICIES)
    sw.add_argument("--router", default=None, help=_doc_of(LoadConfig, "router"))
    sw.add_argument("--predictor", default=None, help=_doc_of(LoadConfig, "predictor"))
    sw.add_argument("--calibration", default=LoadConfig.calibration, help=_doc_of(LoadConfig, "calibration"))
    sw.add_argument("--depth", default=LoadConfig.depth, help=_doc_of(LoadConfig, "depth"))
    _add_dataclass_args(sw, SweepConfig)
    sw.set_defaults(func=cmd_sweep)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a per-request budget")
    _add_load_args(sv, planner=False)
    sv.add_argument("--planner", default=LoadConfig.planner, help=_doc_of(LoadConfig, "planner"))
    sv.add_argument("--router", default=None, help=_doc_of(LoadConfig, "router"))
    sv.add_argument("--predictor", default=None, help=_doc_of(LoadConfig, "predictor"))
    sv.add_argument("--calibration", default=LoadConfig.calibration, help=_doc_of(LoadConfig, "calibration"))
    sv.add_argument("--depth", default=None, help=_doc_of(LoadConfig, "depth"))
    _add_dataclass_args(sv, ServeConfig)
    sv.set_defaults(func=cmd_serve)


    ex = sub.add_parser("export", help="a plain Hugging Face checkpoint with a fixed k-layer static plan")
    _add_load_args(ex, planner=False, quant=False)
    _add_budget_args(ex, export=True)
    _add_dataclass_args(ex, ExportConfig)
    ex.add_argument("--calibration", default=LoadConfig.calibration, help=_doc_of(LoadConfig, "calibration"))
    ex.add_argument("--router", default=None, help="vllm: the router directory (default: the one shipped for "
                    "--kv-policy; only `fill` ships)")
    ex.add_argument("--predictor", default=None, help="vllm: the budget predictor for budget 'auto' (default: the "
                    "shipped one, when the model has one)")
    ex.add_argument("--depth", default=None, help="vllm: the depth head for allocation 'token' (default: the "
                    "shipped one, when the model has one)")
    ex.add_argument("--kv-policy", default=LoadConfig.kv_policy, choices=VLLM_KV_POLICIES,
                    help=f"vllm: the KV policy the export runs (default {LoadConfig.kv_policy}); give a --router "
                    "trained for it")
    ex.set_defaults(func=cmd_export)

    pl = sub.add_parser("plot", help="plots from sweep results and generation traces")
    plsub = pl.add_subparsers(dest="plot_command", required=True)
    for name, what in (("pareto", "quality vs executed-layer fraction from `buddy sweep` JSONL"),
                       ("trace", "token-by-layer heat map of a `buddy generate --trace` file")):
        q = plsub.add_parser(name, help=what)
        q.add_argument("file")
        q.add_argument("--out", required=True, help="image file (.png, .pdf, .svg)")
        q.set_defaults(func=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BuddyError as e:  # every bad value, file or model: one line, exit code 2
        print(f"buddy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbuddy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
