"""Generation tasks, where decode-time routing matters: greedy decoding, then exact match.

    buddy eval gen --model smollm2 --planner router --budget 0.75 --tasks lambada,gsm8k --limit 50

LAMBADA: the passage's last word, generated greedily (first word of the output, punctuation stripped).
GSM8K: 5-shot chain of thought; the final number ("So the answer is N", else the last number) must equal
the reference answer.
"""

from __future__ import annotations

import queue
import re
import time
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from ..budget import AUTO
from ..config import ConfigError, GenerateConfig
from ..serve.scheduler import Request, Scheduler
from .tasks import GenDoc

MAX_NEW = {"lambada": 8, "gsm8k": 192}
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class GenResult:
    task: str
    acc: float
    docs: int
    layers_per_token: float
    wall_s: float
    per_doc: dict = field(default_factory=dict)  # {"acc": [1 if a document is right]}, for paired intervals

    def as_dict(self) -> dict:
        return asdict(self)


def lambada_word(text: str) -> str:
    words = text.strip().split()
    return re.sub(r"^\W+|\W+$", "", words[0]) if words else ""


def gsm8k_number(text: str) -> str | None:
    m = re.search(r"answer is\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", text)
    nums = [m.group(1)] if m else _NUM.findall(text)
    if not nums:
        return None
    n = nums[-1].replace(",", "").rstrip(".")
    return n[:-2] if n.endswith(".0") else n


def is_correct(task: str, output: str, answer: str) -> bool:
    if task == "lambada":
        return lambada_word(output) == answer.strip()
    return gsm8k_number(output) == answer.replace(",", "").strip()


def _lambada_done(text: str) -> bool:
    """One word has been generated, then something that is not part of it."""
    s = text.lstrip()
    return bool(re.search(r"\w\W", s)) or (bool(s) and not s[0].isalnum() and len(s) > 1)


def _cut(text: str, stop: list[str]) -> str:
    for x in stop:
        text = text.split(x)[0]
    return text


def generate_until(engine, prompts: list[str], k, max_new_tokens: int, stops: list[list[str]],
                   batch_size: int = 8, finished=None, progress: bool = False, desc: str = "generate",
                   allocation: str = GenerateConfig.allocation):
    """Greedy texts for prompts; a row stops at a stop string (cut off), when finished(text), at EOS or after
    max_new_tokens. Continuous batching (the server's scheduler, buddy/serve/scheduler.py): up to batch_size rows
    decode together, each prompt prefilled alone, and a finished row's place goes to the next prompt at once, so
    one long completion does not hold up a batch of short ones. `allocation="token"`: each generated token its
    own depth, each row's mean exact (buddy/allocation.py).
    Returns (texts, executed layer-token count, generated token count)."""
    GenerateConfig(max_new_tokens=max_new_tokens, allocation=allocation)  # ConfigError for bad values
    if batch_size < 1:
        raise ConfigError(f"invalid batch size {batch_size!r}: must be >= 1")
    ids = [engine.encode(p) for p in prompts]
    ks = engine.choose_k(ids) if k == AUTO and ids else [k] * len(ids)
    texts = [""] * len(ids)
    done: queue.Queue = queue.Queue()
    reqs = []

    def listener(i: int):
        def on_event(kind, payload):
            if kind == "token":
                texts[i] += payload[0]
                if any(x in texts[i] for x in stops[i]) or (finished and finished(texts[i])):
                    reqs[i].cancel()  # the scheduler frees the row after this token
            else:
                done.put(i)
        return on_event

    for i, (row, ki) in enumerate(zip(ids, ks)):
        reqs.append(Request(row, ki, engine.kv_policy, max_new_tokens, listener(i), allocation=allocation))
    sched = Scheduler({engine.kv_policy: engine}, batch_size)
    for r in reqs:
        sched.submit(r)
    sched.start()
    try:
        for _ in tqdm(range(len(reqs)), desc=desc, unit="prompt", disable=not progress, leave=False):
            while True:
                try:
                    i = done.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not sched.alive:
                        raise RuntimeError("the decoding thread stopped before every prompt finished") from None
            if reqs[i].error is not None:  # the original error (a BuddyError stays one: a clear CLI message)
                raise reqs[i].error
    finally:
        sched.shutdown()
    return ([_cut(t, s) for t, s in zip(texts, stops)], sum(r.layer_sum for r in reqs),
            sum(len(r.tokens) for r in reqs))


def evaluate_gen(engine, task: str, docs: list[GenDoc], budget=None, layers=None, batch_size: int = 8,
                 max_new_tokens: int | None = None, progress: bool = False,
                 allocation: str = GenerateConfig.allocation) -> tuple[GenResult, list[str]]:
    """Greedy generation for each document (batched, each row stopping on its own); (result, outputs)."""
    k = engine.resolve_k(budget, layers)
    t0 = time.perf_counter()
    finished = _lambada_done if task == "lambada" else None
    outputs, layer_sum, n_tok = generate_until(engine, [d.prompt for d in docs], k, max_new_tokens or MAX_NEW[task],
                                               [d.stop for d in docs], batch_size, finished, progress, task,
                                               allocation)
    right = [int(is_correct(task, out, d.answer)) for d, out in zip(docs, outputs)]
    n = max(len(docs), 1)
    return GenResult(task, sum(right) / n, len(docs), layer_sum / max(n_tok, 1), time.perf_counter() - t0,
                     {"acc": right}), outputs
