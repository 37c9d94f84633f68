"""The command line on a tiny local checkpoint: bad input gives one line and exit code 2; traces are JSONL."""

import json
import subprocess
import sys

import pytest


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "buddy", *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.parametrize("flag,value,needle", [
    ("--budget", "0", "(0, 1]"), ("--budget", "-0.5", "(0, 1]"), ("--budget", "1.5", "(0, 1]"),
    ("--budget", "nan", "(0, 1]"), ("--budget", "abc", "(0, 1]"), ("--layers", "1", ">= 2"),
    ("--layers", "many", ">= 2"), ("--layers", "7", "[2, 6]"),
])
def test_bad_budget_one_line_exit_2(tiny_ckpt, flag, value, needle):
    r = run("generate", "--model", str(tiny_ckpt), flag, value, "w1 w2")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert value in lines[0] and needle in lines[0]


def test_unknown_model_and_bad_policy(tmp_path):
    r = run("generate", "--model", "no-such-model", "hi")
    assert r.returncode == 2 and "unknown model 'no-such-model'" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "--model", str(tmp_path), "hi")
    assert r.returncode == 2 and "config.json" in r.stderr


def test_partial_budget_without_calibration_is_explained(tiny_ckpt):
    r = run("generate", "--model", str(tiny_ckpt), "--budget", "0.5", "w1 w2")
    assert r.returncode == 2 and "static-greedy" in r.stderr


def test_generate_trace_jsonl(tiny_ckpt, tmp_path):
    trace = tmp_path / "t.jsonl"
    r = run("generate", "--model", str(tiny_ckpt), "--planner", "full", "--max-new-tokens", "5",
            "--trace", str(trace), "w1 w2 w3")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert 1 <= len(lines) <= 5
    for x in lines:
        assert set(x) == {"token", "text", "executed_layers", "budget", "layers", "k", "n_layers", "ms"}
        assert x["executed_layers"] == list(range(6)) and x["k"] == x["n_layers"] == 6 and x["ms"] > 0
        assert x["budget"] == 1.0 and x["layers"] is None
    assert f"tokens={len(lines)}" in r.stdout and "layers/token=6.00" in r.stdout


def test_overlong_prompt_is_rejected(tiny_ckpt):
    r = run("generate", "--model", str(tiny_ckpt), "--planner", "full", "--max-new-tokens", "10", " ".join(["w1"] * 250))
    assert r.returncode == 2 and "context of 256" in r.stderr


def test_eval_ppl_json(tiny_ckpt, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(" ".join(f"w{i % 90}" for i in range(400)))
    r = run("eval", "ppl", "--model", str(tiny_ckpt), "--planner", "full", "--text-file", str(f), "--window", "64",
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["planner"] == "full" and out["layers_per_token"] == 6 and out["tokens"] == 6 * 63 and out["ppl"] > 1
    r = run("eval", "ppl", "--model", str(tiny_ckpt), "--planner", "full", "--text-file", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_bench_latency_smoke(tiny_ckpt):
    r = run("bench", "latency", "--model", str(tiny_ckpt), "--planners", "static-greedy", "--budgets", "1",
            "--new-tokens", "12", "--repeats", "1", "--prompt-len", "8", "--batch", "1,2")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    impls = {(x["impl"], x["batch"]) for x in res["rows"]}
    assert impls == {("transformers", 1), ("buddy", 1), ("transformers", 2), ("buddy", 2)}
    assert res["matvec_gb_s"] > 0 and all(x["ms_per_token"] > 0 for x in res["rows"])
    assert "skipping planner static-greedy" in r.stderr  # no calibration for the tiny model
    r = run("bench", "latency", "--model", str(tiny_ckpt), "--budgets", "0")
    assert r.returncode == 2 and "(0, 1]" in r.stderr


def test_train_and_eval_settings_are_validated(tiny_ckpt, tmp_path):
    r = run("train", "router", "--model", str(tiny_ckpt), "--prior", "nonsense", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "invalid prior 'nonsense'" in r.stderr and "Traceback" not in r.stderr
    r = run("train", "router", "--model", str(tiny_ckpt), "--budgets", "0.9:0.2", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "0.9:0.2" in r.stderr
    r = run("train", "predictor", "--model", str(tiny_ckpt), "--data", "wiki", "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "invalid data 'wiki'" in r.stderr and "Traceback" not in r.stderr
    f = tmp_path / "t.txt"
    f.write_text("w1 w2")
    r = run("eval", "ppl", "--model", str(tiny_ckpt), "--planner", "full", "--text-file", str(f), "--window", "0")
    assert r.returncode == 2 and "invalid window 0" in r.stderr
    r = run("generate", "--model", str(tiny_ckpt), "--planner", "router", "--router", str(tmp_path / "none"), "w1")
    assert r.returncode == 2 and "not a router directory" in r.stderr


def test_every_subcommand_help_formats():
    """`--help` of every (sub)command renders: a stray % in a dataclass docstring once broke `train router`."""
    import argparse

    from buddy.cli import build_parser

    seen, todo = {}, [("buddy", build_parser())]
    while todo:
        name, p = todo.pop()
        seen[name] = p.format_help()
        assert "usage:" in seen[name], name
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [(f"{name} {n}", sub) for n, sub in a.choices.items()]
    assert {"buddy train router", "buddy train predictor", "buddy sweep", "buddy serve"} <= set(seen)
    assert "90% trains" in seen["buddy train router"] and "--teacher-topk" in seen["buddy train router"]
