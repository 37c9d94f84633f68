"""A cross-domain prompt mix for training and evaluating the Budget Predictor (`budget="auto"`).

Each item is (domain, prompt ids, continuation ids). The predictor sees the prompt; its reward is measured
on the continuation. The domains and their documents are those of the router's training mix
(`buddy.corpus`, mix v2), so the predictor and the router train on the same text and leave out the same text:

- prose and code: `sotu` (State of the Union), `lambada` (fiction passages), `squad` (Wikipedia paragraphs),
  `drop` (news and history passages), `coqa` (stories and articles), `code` (standard-library Python
  files). A document of n tokens gives a prompt of its first min(prompt_len, n - c) tokens and a
  continuation of the next c = min(cont_len, n // 4); SOTU gives windows of prompt_len + cont_len tokens.
- question answering: `gsm8k` ("Question: ...\nAnswer:" then the worked solution) and the seven
  multiple-choice tasks of `buddy eval zeroshot` (the context, then the gold continuation, split as lm-eval
  splits them).
- conversations: `chat` and `code_chat`, the user's turn in the model's chat template up to the assistant's
  header (what `generate --chat` and the server send), then the assistant's answer (none for a model
  without a chat template).
- held out (test split only, never in training or validation): `moby_dick` (chapters of the novel) and
  `qasper` (full texts of NLP papers), as prose.

Splits are disjoint by document, as in `buddy.corpus`: for the task-file domains `test` is drawn from the
documents that `buddy sweep --limit 100` evaluates (the first 100 of every task), `validation` from the next
50, `train` from the rest; SOTU splits by year, `code` and `code_chat` by a hash of the file's path, and the
held-out domains are all test. Usage:

    items = mix_items(tokenizer, "train", per_domain=96)

Version 1 (the first shipped predictor) had the six prose domains, with `qasper`'s abstracts as a training
domain, and no chat or code; its predictor names the commit that reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .corpus import HELDOUT_DOMAINS, PROSE, RANGES, TRAIN_DOMAINS, ZEROSHOT7

DOMAINS = TRAIN_DOMAINS  # trained and validated on
ALL_DOMAINS = (*DOMAINS, *HELDOUT_DOMAINS)  # the test split also has the held-out domains
MC_DOMAINS = ZEROSHOT7
PROSE_DOMAINS = (*PROSE, "code", *HELDOUT_DOMAINS)
VERSION = 2  # bump when items change: cached quality tables are keyed by it


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


def _prose_item(domain, ids: list[int], prompt_len: int, cont_len: int) -> MixItem | None:
    c = min(cont_len, len(ids) // 4)
    if c < 4:
        return None
    p = min(prompt_len, len(ids) - c)
    return MixItem(domain, ids[:p], ids[p:p + c])


def _chat_item(tokenizer, domain: str, user: str, answer: str, prompt_len: int, cont_len: int) -> MixItem:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                           tokenize=False)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return MixItem(domain, p[-4 * prompt_len:], c[:cont_len])


def split_domains(split: str) -> tuple[str, ...]:
    """The domains a split has: the training domains, plus the held-out ones in `test`."""
    if split not in RANGES:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(RANGES)}")
    return ALL_DOMAINS if split == "test" else DOMAINS


def mix_items(tokenizer, split: str, per_domain: int, prompt_len: int = 128, cont_len: int = 32,
              domains=None) -> list[MixItem]:
    """Up to `per_domain` items of every domain for one split, evenly spread over that split's documents
    (default domains: `split_domains(split)`)."""
    from .corpus import chat_pairs, code_chat_pairs, documents
    from .data import sotu_texts, token_windows
    from .eval.tasks import load_mc, task_requests
    from .eval.zeroshot import tokenize_pair

    allowed = split_domains(split)
    lo, hi = RANGES[split]
    items: list[MixItem] = []
    for dom in allowed if domains is None else domains:
        if dom not in ALL_DOMAINS:
            raise ValueError(f"unknown domain {dom!r}: use some of {', '.join(ALL_DOMAINS)}")
        if dom not in allowed:
            raise ValueError(f"domain {dom!r} is held out: it has only a test split")
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
        elif dom in ("chat", "code_chat"):
            if not getattr(tokenizer, "chat_template", None):
                continue  # a model without a chat template has no chat domains
            pairs = chat_pairs(split) if dom == "chat" else code_chat_pairs(split)
            items += [_chat_item(tokenizer, dom, u, a, prompt_len, cont_len) for u, a in _spread(pairs, per_domain)]
        else:
            for t in _spread(documents(dom, split), per_domain):
                it = _prose_item(dom, tokenizer(t)["input_ids"], prompt_len, cont_len)
                if it is not None:
                    items.append(it)
    return items
