"""Sampling numerics (no accepted temperature gives NaN) and the scheduler's per-row fault isolation."""

import threading

import pytest
import torch

from buddy.sampling import NonFiniteLogitsError, sample


@pytest.mark.parametrize("temperature", [8e-38, 1e-300, 5e-324, 1e-6, 0.5, 2.0])
def test_tiny_temperatures_act_as_greedy_and_never_nan(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50) * 30
    tok = sample(logits, temperature, 1.0, g)
    assert tok.shape == (3,)
    if temperature < 1e-5:
        assert torch.equal(tok, logits.argmax(-1))
    tok = sample(logits.bfloat16(), temperature, 0.9, g)  # low-precision logits too
    assert tok.shape == (3,)


def test_non_finite_rows_are_named():
    logits = torch.randn(4, 10)
    logits[1, 3] = float("nan")
    logits[3] = float("-inf")
    with pytest.raises(NonFiniteLogitsError) as e:
        sample(logits, 1.0, 1.0, torch.Generator())
    assert e.value.rows == [1, 3]
    logits = torch.randn(2, 10)
    logits[0, :5] = float("-inf")  # a masked vocabulary is fine
    assert sample(logits, 1.0, 1.0, torch.Generator()).shape == (2,)


class _FailsLater(float):
    """A top_p that works for the first sampling steps, then raises (a row failing mid-batch)."""

    calls = 0

    def __lt__(self, other):
        _FailsLater.calls += 1
        if _FailsLater.calls > 2:
            raise RuntimeError("this row's sampling failed")
        return float(self) < other


def test_a_failing_row_ends_alone(tiny_ckpt):
    """A row whose sampling fails mid-batch ends with an error; the rows decoding beside it finish normally."""
    from buddy.api import load
    from buddy.serve.scheduler import Request, Scheduler

    m = load(str(tiny_ckpt), planner="full", device="cpu", dtype="float32")
    sched = Scheduler({"fill": m}, max_batch=8, stop_ids=set())
    done, lock = {}, threading.Lock()

    def events(i):
        def on_event(kind, payload):
            if kind == "done":
                with lock:
                    done[i] = payload
        return on_event

    reqs = [Request(prompt=[5, 6, 7 + i], k=6, kv_policy="fill", max_tokens=8, on_event=events(i)) for i in range(3)]
    reqs.insert(1, Request(prompt=[5, 6, 7], k=6, kv_policy="fill", max_tokens=8, on_event=events("bad"),
                           temperature=1.0, top_p=_FailsLater(0.9)))
    for r in reqs:  # all queued before the loop starts: they decode in one batch
        sched.submit(r)
    sched.start()
    try:
        for _ in range(3000):
            if len(done) == 4:
                break
            threading.Event().wait(0.01)
    finally:
        sched.shutdown()
    assert done["bad"].startswith("error") and "sampling failed" in done["bad"]
    assert [done[i] for i in range(3)] == ["length"] * 3
    assert all(len(r.tokens) == 8 for r in reqs if r.on_event is not None and r.top_p == 1.0)
