"""The maintained benchmark scripts start and document their flags; research probes stay importable."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAINTAINED = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", MAINTAINED)
def test_maintained_benchmark_prints_help(script):
    r = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout


def test_research_probes_parse_and_are_documented():
    probes = sorted((ROOT / "research").glob("*.py"))
    readme = (ROOT / "research" / "README.md").read_text()
    assert probes
    for p in probes:
        ast.parse(p.read_text(), filename=str(p))
        assert p.name in readme, f"{p.name} is not listed in research/README.md"
    assert not set(MAINTAINED) & {p.name for p in probes}


def test_vllm_throughput_table_compares_each_budget_with_dense_and_buddys_server(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from vllm_throughput import print_table
    finally:
        sys.path.pop(0)
    rows = [{"impl": "vllm dense", "setting": "dense", "concurrency": 32, "tok_s": 200.0},
            {"impl": "buddy in vllm", "setting": "0.5", "concurrency": 32, "tok_s": 300.0},
            {"impl": "buddy in vllm", "setting": "1.0", "concurrency": 32, "tok_s": 190.0},
            {"impl": "buddy in vllm", "setting": "mixed", "concurrency": 32, "tok_s": 250.0},
            {"impl": "buddy serve", "setting": "0.5", "concurrency": 32, "tok_s": 100.0}]
    print_table(rows)
    assert rows[1]["x_dense"] == 1.5 and rows[1]["x_buddy_serve"] == 3.0  # the same budget only
    assert rows[2]["x_dense"] == 0.95 and rows[2]["x_buddy_serve"] is None and rows[3]["x_buddy_serve"] is None
    assert rows[4]["x_dense"] == 0.5 and rows[4]["x_buddy_serve"] is None
    assert "| buddy in vllm | 0.5 | 32 | 300.0 | 1.50 |  | 3.00 |" in capsys.readouterr().out


def test_vllm_throughput_pairs_the_ratio_to_dense_by_round(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from vllm_throughput import print_table
    finally:
        sys.path.pop(0)
    # a slow second round hits both sides: the per-round ratios are 1.0, 1.0, 1.2; the medians' ratio is not 1.0
    rows = [{"impl": "vllm dense", "setting": "dense", "concurrency": 8, "tok_s": 100.0,
             "tok_s_runs": [100.0, 50.0, 110.0]},
            {"impl": "buddy in vllm", "setting": "1.0", "concurrency": 8, "tok_s": 100.0,
             "tok_s_runs": [100.0, 50.0, 132.0]},
            {"impl": "buddy in vllm", "setting": "0.5", "concurrency": 8, "tok_s": 150.0, "tok_s_runs": [150.0]}]
    print_table(rows)
    assert rows[1]["x_dense"] == 1.0 and rows[1]["x_dense_paired"] == 1.0
    assert rows[2]["x_dense_paired"] is None  # not from the same rounds
    assert "| buddy in vllm | 1.0 | 8 | 100.0 | 1.00 | 1.00 |  |" in capsys.readouterr().out


def test_vllm_throughput_rounds_merge_into_one_row_per_cell_with_the_median():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from vllm_throughput import merge_rounds
    finally:
        sys.path.pop(0)
    cell = {"impl": "buddy in vllm", "setting": "0.5", "concurrency": 8}
    rounds = [[{**cell, "tok_s": 10.0, "tok_s_runs": [10.0]}, {**cell, "concurrency": 1, "tok_s_runs": [3.0]}],
              [{**cell, "tok_s": 30.0, "tok_s_runs": [30.0]}], [{**cell, "tok_s": 12.0, "tok_s_runs": [12.0]}]]
    rows = merge_rounds(rounds)
    assert len(rows) == 2 and rows[0]["tok_s_runs"] == [10.0, 30.0, 12.0] and rows[0]["tok_s"] == 12.0
    assert rows[1]["concurrency"] == 1 and rows[1]["tok_s"] == 3.0 and rounds[0][0]["tok_s_runs"] == [10.0]


def test_vllm_throughput_table_names_a_file_that_is_not_a_saved_run(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not json\n")
    for path in (bad, tmp_path / "missing.txt"):
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vllm_throughput.py"), "--table", str(path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"--table {path}: not a saved output" in r.stderr and "Traceback" not in r.stderr


def test_vllm_throughput_grouped_cell_submits_one_call_per_budget_in_request_order():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from vllm_throughput import SETTINGS, batches
    finally:
        sys.path.pop(0)

    class Params:  # the only attribute `batches` reads from vLLM's SamplingParams
        def __init__(self, extra_args):
            self.extra_args = extra_args

    extra = SETTINGS["mixed-grouped"]
    params = [Params(extra[i % len(extra)]) for i in range(7)]
    prompts = [f"p{i}" for i in range(7)]
    assert batches(prompts, params, grouped=False) == [(prompts, params)]
    calls = batches(prompts, params, grouped=True)
    assert [ps for ps, _ in calls] == [["p0", "p3", "p6"], ["p1", "p4"], ["p2", "p5"]]
    assert [{sp.extra_args["budget"] for sp in sps} for _, sps in calls] == [{0.5}, {0.75}, {1.0}]
    assert SETTINGS["mixed-grouped"] == SETTINGS["mixed"]  # the same requests; only the submission differs


def test_router_vs_static_counts_a_router_that_plans_as_static_as_level(tmp_path):
    """`never_worse` compares perplexities: equal perplexity with per-window NLLs that differ in the last rounded
    digit is level, a higher perplexity is not."""
    import json

    def row(method, ppl, nll):
        return {"model": "m", "method": method, "kv_policy": "fill", "k": 4, "task": "ppl:sotu", "limit": 2,
                "ppl": ppl, "per_doc": {"nll": nll}}

    def never_worse(router_ppl, router_nll):
        f = tmp_path / "rows.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in (
            row("static-greedy", 10.0, [2.30258, 2.30260]), row("static-bi", 11.0, [2.4, 2.4]),
            row("router", router_ppl, router_nll))))
        r = subprocess.run([sys.executable, "benchmarks/router_vs_static.py", str(f)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])["never_worse"]

    assert never_worse(10.0, [2.30259, 2.30260])
    assert never_worse(10.000001, [2.30259, 2.30260])  # the same plan through another planner: float32 rounding
    assert not never_worse(10.01, [2.30358, 2.30360])
