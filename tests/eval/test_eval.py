"""Evaluation suite: scoring parity with transformers, routed decode semantics, task files, answer extraction,
the resumable sweep, plots and the lm-eval model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_backbone

from buddy.config import SWEEP_FRACTIONS, SweepConfig
from buddy.engine import Engine
from buddy.eval.generation import gsm8k_number, is_correct, lambada_word
from buddy.eval.sweep import parse_layers_spec
from buddy.eval.tasks import TaskError, load_mc, load_mc_file
from buddy.eval.zeroshot import score_requests
from buddy.planner import FullPlanner, Planner

PAIRS = [  # (context ids, continuation ids): shared contexts, different lengths, one-token continuations
    ([5, 6, 7, 8], [9, 10, 11]), ([5, 6, 7, 8], [12]), ([5, 6, 7, 8], [13, 14, 15, 16, 17]),
    ([20, 21], [22, 23]), ([30, 31, 32, 33, 34, 35, 36], [37, 38]), ([20, 21], [40]),
]


def hf_loglik(model, ctx, cont):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits.float(), -1)[0]
    return sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("per_batch", [1, 2, 8])
def test_full_budget_scores_equal_transformers(model_type, per_batch):
    bb = tiny_backbone(model_type)
    engine = Engine(bb, FullPlanner(bb.n_layers))
    ll, greedy, layers, tokens = score_requests(engine, PAIRS, bb.n_layers, contexts_per_batch=per_batch)
    for (ctx, cont), v in zip(PAIRS, ll):
        assert v == pytest.approx(hf_loglik(bb.model, ctx, cont), abs=1e-4)
    assert layers == tokens * bb.n_layers


class TokenRandomPlanner(Planner):
    """Per-token random plans that depend only on the token's absolute position and layer-0 output,
    so a prompt forward and a decode forward of the same token get the same plan (tests only)."""

    name = "token-random"

    def plan(self, h0, cache, k):
        L = 6
        scores = torch.sin(h0[..., :L - 2] * 37.0 + cache.positions[..., None].float())
        from buddy.planner import as_row_budgets, topk_plan

        return topk_plan(scores, as_row_budgets(k, h0.shape[0], h0.device))


@pytest.mark.parametrize("policy", ["fill", "mask", "zero"])
def test_routed_scores_equal_prompt_then_decode(policy):
    """Shared-prefill scoring equals scoring each pair alone: context as a prompt, continuation as decode."""
    bb = tiny_backbone("llama")
    engine = Engine(bb, TokenRandomPlanner(), policy)
    ll, _, _, _ = score_requests(engine, PAIRS, 4, contexts_per_batch=8)
    for (ctx, cont), v in zip(PAIRS, ll):
        cache = engine.new_cache(1, len(ctx) + len(cont))
        h1, _ = engine.forward(torch.tensor([ctx]), cache, 4)
        hs = [h1[:, -1:]]
        for t in cont[:-1]:  # one decode step at a time
            h, _ = engine.forward(torch.tensor([[t]]), cache, 4)
            hs.append(h)
        lp = torch.log_softmax(bb.head(torch.cat(hs, 1)), -1)[0]
        ref = sum(lp[j, t].item() for j, t in enumerate(cont))
        assert v == pytest.approx(ref, abs=1e-4)


def test_mc_file_parsing(tmp_path):
    good = tmp_path / "mc.jsonl"
    good.write_text('{"question": "Q1?", "choices": ["a", "b"], "gold": 1}\n\n'
                    '{"question": "Q2?", "choices": ["x", "y", "z"], "gold": 0}\n')
    docs = load_mc_file(good)
    assert [d.gold for d in docs] == [1, 0]
    assert docs[0].requests == [("Question: Q1?\nAnswer:", " a"), ("Question: Q1?\nAnswer:", " b")]
    assert len(load_mc_file(good, limit=1)) == 1
    for bad in ('{"question": "Q", "choices": ["a", "b"], "gold": 2}', '{"question": "Q", "choices": "ab", "gold": 0}',
                'not json', '{"question": "Q", "choices": ["a", "b"], "gold": true}'):
        f = tmp_path / "bad.jsonl"
        f.write_text(bad + "\n")
        with pytest.raises(TaskError, match="bad.jsonl:1"):
            load_mc_file(f)
    with pytest.raises(TaskError, match="not found"):
        load_mc_file(tmp_path / "missing.jsonl")


def test_answer_extraction():
    assert lambada_word(" signs. And") == "signs"
    assert lambada_word("\n") == ""
    assert gsm8k_number(" She makes 9 * 2 = 18 dollars. So the answer is 18.") == "18"
    assert gsm8k_number("It costs $1,250.") == "1250"
    assert gsm8k_number("no number") is None
    assert is_correct("gsm8k", "So the answer is 3,000.", "3000")
    assert not is_correct("lambada", " sign", "signs")


def test_layers_spec():
    assert parse_layers_spec("15:30:3", 30) == [15, 18, 21, 24, 27, 30]
    assert parse_layers_spec("27,15,21", 30) == [15, 21, 27]
    for bad in ("15:33:3", "a:b", "1", "15:30:0"):
        with pytest.raises(TaskError):
            parse_layers_spec(bad, 30)


def test_default_layers_fit_every_depth():
    """No --layers: the same budgets as fractions of each model's depth (a fixed default once failed on Qwen2.5)."""
    assert parse_layers_spec(None, 30) == [15, 19, 23, 27]
    assert parse_layers_spec(None, 24) == [12, 15, 18, 22]
    assert parse_layers_spec(None, 4) == [2, 3, 4]
    assert SweepConfig(tasks=("arc_easy",), out="r.jsonl").layers is None
    assert all(str(f) in SweepConfig.__doc__ for f in SWEEP_FRACTIONS)  # the help states the default


# --- on the embedded model and the installed benchmark files ------------------------------------------
@pytest.fixture(scope="module")
def smol32():
    import buddy

    return buddy.load("smollm2", planner="full", dtype="float32", device="cpu")


@pytest.mark.integration
def test_benchmark_documents_load():
    wg = load_mc("winogrande", 3)
    assert len(wg) == 3 and all(len(d.requests) == 2 for d in wg)
    assert wg[0].requests[0][0] != wg[0].requests[1][0]  # winogrande: one context per choice
    arc = load_mc("arc_easy", 5)
    assert len(arc) == 5 and all(0 <= d.gold < len(d.requests) for d in arc)
    mmlu = load_mc("mmlu", 4)
    assert len(mmlu) == 4 and all(len(d.requests) == 4 for d in mmlu)
    with pytest.raises(TaskError, match="unknown task"):
        load_mc("nope")


@pytest.mark.integration
def test_smollm2_task_scores_equal_transformers(smol32):
    from buddy.eval.zeroshot import tokenize_pair

    docs = load_mc("arc_easy", 2) + load_mc("winogrande", 2)
    pairs = [tokenize_pair(smol32.tokenizer, c, x) for d in docs for c, x in d.requests]
    ll, _, _, _ = score_requests(smol32, pairs, 30, contexts_per_batch=3)
    for (ctx, cont), v in zip(pairs, ll):
        assert v == pytest.approx(hf_loglik(smol32.bb.model, ctx, cont), abs=2e-3)


@pytest.mark.integration
def test_per_document_results_match_the_aggregates(smol32):
    """Per-document correctness (sweep rows' `per_doc`) sums to acc, and each entry is that document alone."""
    from buddy.eval.zeroshot import evaluate_mc

    docs = load_mc("boolq", 8)  # right and wrong answers both occur among these
    res = evaluate_mc(smol32, "boolq", docs, layers=30)
    assert len(res.per_doc["acc"]) == 8 and sum(res.per_doc["acc"]) / 8 == res.acc
    assert 0 < res.acc < 1 and sum(res.per_doc["acc_norm"]) / 8 == res.acc_norm
    alone = [evaluate_mc(smol32, "boolq", [d], layers=30) for d in docs]
    assert res.per_doc["acc"] == [r.acc for r in alone] and res.per_doc["acc_norm"] == [r.acc_norm for r in alone]


def test_generate_until_gives_each_prompt_its_own_greedy_text_and_refills_a_finished_rows_place(tiny_ckpt):
    """Continuous batching for generation evals: every text equals the prompt's greedy generation alone, cut at
    its stop string; a long completion does not hold up the short ones (fewer decode steps than fixed batches)."""
    from buddy.api import load
    from buddy.eval.generation import generate_until

    m = load(str(tiny_ckpt), planner="random", device="cpu", dtype="float32")
    prompts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10 w11", "w12"]
    alone = [[s.text for s in m.generate(p, layers=4, max_new_tokens=12)] for p in prompts]
    stops = [["w999"]] + [[a[2]] if len(a) > 3 else ["w999"] for a in alone[1:]]  # short rows stop early

    def expected(pieces, stop):  # the rule: stop once the text holds a stop string, then cut there
        text = ""
        for n, piece in enumerate(pieces, 1):
            text += piece
            if any(x in text for x in stop):
                return text.split(stop[0])[0], n
        return text, len(pieces)

    want = [expected(a, st) for a, st in zip(alone, stops)]
    decode_steps = []
    real = m._forward
    m._forward = lambda x, cache, k, valid=None: (decode_steps.append(x.shape[0]) if x.shape[1] == 1 else None,
                                                  real(x, cache, k, valid))[1]
    texts, layer_sum, n_tok = generate_until(m, prompts, 4, 12, stops, batch_size=2)
    assert texts == [w[0] for w in want]
    assert n_tok == sum(w[1] for w in want) and layer_sum == 4 * n_tok
    fixed = sum(max(w[1] for w in want[i:i + 2]) - 1 for i in range(0, len(want), 2))  # decode steps, fixed batches
    assert max(decode_steps) == 2 and len(decode_steps) < fixed, (decode_steps, want)


def test_generate_until_keeps_the_errors_type_and_checks_its_settings(tiny_ckpt):
    """A failure inside the decoding thread reaches the caller as the same exception (so the CLI prints
    `buddy: error: ...`), and bad settings fail before anything is decoded."""
    from buddy.allocation import AllocationError
    from buddy.api import load
    from buddy.config import ConfigError
    from buddy.eval.generation import generate_until
    from buddy.kv_cache import ContextOverflowError

    m = load(str(tiny_ckpt), planner="random", device="cpu", dtype="float32")
    with pytest.raises(AllocationError, match="depth head"):
        generate_until(m, ["w1 w2"], 4, 4, [[]], allocation="token")
    with pytest.raises(ContextOverflowError):
        generate_until(m, ["w1 w2", "w3"], 4, m.bb.shapes.max_context, [[], []])
    for bad in ({"batch_size": 0}, {"allocation": "tokens"}):
        with pytest.raises(ConfigError):
            generate_until(m, ["w1 w2"], 4, 4, [[]], **bad)
    with pytest.raises(ConfigError):
        generate_until(m, ["w1 w2"], 4, 0, [[]])
    assert generate_until(m, [], 4, 4, []) == ([], 0, 0)


@pytest.mark.integration
def test_lambada_output_is_the_greedy_generation(smol32):
    from buddy.eval.generation import evaluate_gen
    from buddy.eval.tasks import load_gen

    docs = load_gen("lambada", 2)
    res, outs = evaluate_gen(smol32, "lambada", docs, layers=30, batch_size=2)
    for d, out in zip(docs, outs):
        alone = "".join(s.text for s in smol32.generate(d.prompt, max_new_tokens=8))
        assert alone.startswith(out)
    assert res.docs == 2 and res.layers_per_token == 30
    assert res.per_doc["acc"] == [int(is_correct("lambada", o, d.answer)) for d, o in zip(docs, outs)]
    assert res.acc == sum(res.per_doc["acc"]) / 2


def test_router_rows_name_their_router_so_a_retrained_router_is_measured_again(tmp_path):
    from buddy.eval.sweep import cell_key, router_label

    def router(path, data):
        path.mkdir(parents=True)
        (path / "router.safetensors").write_bytes(data)
        return path

    a, b = router(tmp_path / "a" / "smollm2-fill", b"one"), router(tmp_path / "b" / "smollm2-fill", b"two")
    assert router_label(a).startswith("smollm2-fill@") and router_label(a) != router_label(b)
    assert router_label(router(tmp_path / "c" / "smollm2-fill", b"one")) == router_label(a)  # by content, not path
    assert router_label(tmp_path / "missing") is None and router_label(None) is None
    row = {"model": "m", "method": "router", "kv_policy": "fill", "k": 15, "task": "t", "limit": None}
    assert cell_key({**row, "router": router_label(a)}) != cell_key({**row, "router": router_label(b)})
    assert cell_key(row) != cell_key({**row, "router": router_label(a)})  # a row from before rows named routers
    static = {**row, "method": "static-greedy", "calibration": "mix"}
    assert cell_key({**static, "router": "x"}) == cell_key(static)  # static cells do not depend on the router


def test_static_rows_name_their_calibration_by_content_so_a_replaced_calibration_is_measured_again(tmp_path):
    from buddy.eval.sweep import cell_key, content_hash

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text('{"a": 1}'), two.write_text('{"a": 2}')
    assert content_hash(one) != content_hash(two) and len(content_hash(one)) == 12
    assert content_hash(tmp_path / "missing") is None
    row = {"model": "m", "method": "static-greedy", "kv_policy": "fill", "k": 15, "task": "t", "limit": None,
           "calibration": "mix"}
    assert cell_key({**row, "calibration_sha256": content_hash(one)}) != cell_key({**row, "calibration_sha256": content_hash(two)})
    assert cell_key(row) != cell_key({**row, "calibration_sha256": content_hash(one)})  # a row from before the hash
    dense = {**row, "method": "dense", "calibration_sha256": content_hash(one)}
    assert cell_key(dense) == cell_key({**dense, "calibration_sha256": content_hash(two)})  # dense needs none


def test_a_sweep_builds_its_static_plans_when_it_hashes_the_calibration_so_rows_name_what_ran(tmp_path, monkeypatch):
    """A calibration rewritten during a long sweep (`buddy calibrate` in another shell) changes neither the plans
    of the cells still to run nor the hash their rows carry."""
    import buddy.eval.sweep as sw
    from buddy.calibration import save_calibration
    from buddy.config import LoadConfig

    bb = tiny_backbone()
    cal = tmp_path / "cal.json"
    first = {"model": bb.name, "checksum": bb.checksum, "n_layers": 6,
             "orders": {"static-greedy": [3, 1, 4, 2], "static-bi": [1, 2, 3, 4]}}
    save_calibration(first, cal)
    first_hash = sw.content_hash(cal)
    seen = []

    def fake_run_task(engine, task, k, limit=None, progress=False, allocation="request"):
        seen.append((engine.planner.name, engine.planner.order))
        save_calibration({**first, "orders": {"static-greedy": [4, 3, 2, 1], "static-bi": [2, 1, 4, 3]}}, cal)
        return {"ppl": 1.0, "layers_per_token": float(k)}

    monkeypatch.setattr(sw, "run_task", fake_run_task)
    cfg = SweepConfig(methods=("static-greedy", "static-bi"), layers="3", tasks=("ppl:sotu",),
                      out=str(tmp_path / "r.jsonl"))
    rows = sw.sweep(bb, cfg, LoadConfig(model=bb.name, calibration=str(cal)), progress=False)
    assert seen == [("static-greedy", [3, 1, 4, 2]), ("static-bi", [1, 2, 3, 4])]  # the first content, both cells
    assert [r["calibration_sha256"] for r in rows] == [first_hash, first_hash] != [sw.content_hash(cal)] * 2


def test_token_allocation_rows_name_their_depth_head_by_content_not_by_path(tmp_path, monkeypatch):
    """A row measured with allocation="token" names its depth head '<dir>@<sha256 prefix>', so a copy of the same
    head at another path (another clone) resumes the sweep, and a refitted head is measured again."""
    from dataclasses import asdict

    import buddy.eval.sweep as sw
    from buddy.allocation import DepthMeta, save_depth
    from buddy.calibration import save_calibration
    from buddy.config import LoadConfig
    from test_allocation import random_head

    bb = tiny_backbone()
    cal = tmp_path / "cal.json"
    save_calibration({"model": bb.name, "checksum": bb.checksum, "n_layers": 6,
                      "orders": {"static-greedy": [3, 1, 4, 2], "static-bi": [1, 2, 3, 4]}}, cal)

    def write_head(d, seed):
        head = random_head(hidden=bb.shapes.hidden, n_layers=6, seed=seed)
        save_depth(head, DepthMeta(model=bb.name, checksum=bb.checksum, n_layers=6, kv_policy="fill",
                                   router="router", config=asdict(head.cfg)), d)

    a, b, c = tmp_path / "a" / "head", tmp_path / "b" / "head", tmp_path / "c" / "head"
    write_head(a, 0), write_head(b, 0), write_head(c, 1)
    monkeypatch.setattr(sw, "run_task", lambda engine, task, k, limit=None, progress=False, allocation="request":
                        {"ppl": 1.0, "layers_per_token": float(k)})
    cfg = SweepConfig(methods=("static-greedy",), layers="3", tasks=("ppl:sotu",), out=str(tmp_path / "r.jsonl"),
                      allocation="token")

    def run(d):
        return sw.sweep(bb, cfg, LoadConfig(model=bb.name, calibration=str(cal), depth=str(d)), progress=False)

    first = run(a)
    assert first[0]["depth"] == f"head@{sw.content_hash(a / 'depth.safetensors')}"
    assert run(b) == []  # the same head at another path: nothing to measure again
    refit = run(c)
    assert len(refit) == 1 and refit[0]["depth"] != first[0]["depth"]


@pytest.mark.integration
def test_sweep_is_resumable_and_plots(tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": ["blue", "four", "honey"], "gold": g}) + "\n"
                          for q, g in [("What color is the sky?", 0), ("How many legs has a dog?", 1)]))
    out = tmp_path / "r.jsonl"
    cmd = ["sweep", "--methods", "dense,random,static-greedy", "--layers", "15,23", "--tasks", f"mc:{mc}",
           "--out", str(out)]
    r = subprocess.run([sys.executable, "-m", "buddy", *cmd], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "batch/s" in r.stderr or "s/batch" in r.stderr  # a progress bar within each cell, not only per cell
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 5  # dense once + 2 methods x 2 layer counts
    for row in rows:
        assert row["layers_per_token"] == row["k"] and row["wall_s"] > 0 and 0 <= row["acc"] <= 1
        assert (len(row.get("calibration_sha256") or "") == 12) == (row["method"] == "static-greedy")
    r = subprocess.run([sys.executable, "-m", "buddy", *cmd], capture_output=True, text=True, timeout=600)
    assert "wrote 0 new cells" in r.stdout and len(out.read_text().splitlines()) == 5
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][:40])  # an interrupted write left half a row, no newline
    r = subprocess.run([sys.executable, "-m", "buddy", *cmd], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "wrote 1 new cells" in r.stdout, r.stderr
    assert [json.loads(x) for x in out.read_text().splitlines()] and len(out.read_text().splitlines()) == 5
    png = tmp_path / "p.png"
    r = subprocess.run([sys.executable, "-m", "buddy", "plot", "pareto", str(out), "--out", str(png)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from buddy.eval.plots import pareto_series

    series = pareto_series(rows)
    assert set(series[f"mc:{mc} (acc)"]) == {"dense", "random", "static-greedy"}
    assert [x for x, _ in series[f"mc:{mc} (acc)"]["random"]] == [15 / 30, 23 / 30]


@pytest.mark.integration
def test_trace_plot_from_generate(tmp_path):
    trace, png = tmp_path / "t.jsonl", tmp_path / "t.png"
    r = subprocess.run([sys.executable, "-m", "buddy", "generate", "--budget", "0.5", "--max-new-tokens", "6",
                        "--trace", str(trace), "Hello"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "buddy", "plot", "trace", str(trace), "--out", str(png)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"token": 1}\n')
    r = subprocess.run([sys.executable, "-m", "buddy", "plot", "trace", str(bad), "--out", str(png)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not a trace line" in r.stderr


@pytest.mark.integration
def test_eval_cli_errors():
    for args, needle in ((["--tasks", "nope"], "unknown task"), (["--mc-file", "/nonexistent.jsonl"], "not found"),
                         (["--tasks", "arc_easy", "--limit", "0"], "invalid limit 0"), ([], "--tasks")):
        r = subprocess.run([sys.executable, "-m", "buddy", "eval", "zeroshot", *args], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.integration
def test_lm_eval_model_matches_buddy_eval(tmp_path):
    """lm-eval's own evaluator, the `buddy` model, a local task file: same accuracy as `buddy eval zeroshot`."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in [
        {"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "purple"], "gold": 0},
        {"question": "How many legs does a dog have?", "choices": ["three", "four", "ten"], "gold": 1},
        {"question": "What do bees make?", "choices": ["steel", "glass", "honey"], "gold": 2},
        {"question": "Which is a fruit?", "choices": ["apple", "chair", "road"], "gold": 0},
    ]))
    (tmp_path / "task.yaml").write_text(
        "task: buddy_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {data}\nvalidation_split: validation\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n")
    code = (
        "import json, sys, lm_eval, buddy.harness\n"
        "from lm_eval.tasks import TaskManager\n"
        f"r = lm_eval.simple_evaluate(model='buddy', model_args='model=smollm2,planner=random,layers=20,device=cpu', "
        f"tasks=['buddy_local_mc'], task_manager=TaskManager(include_path={str(tmp_path)!r}))\n"
        "print('ACC', json.dumps(r['results']['buddy_local_mc']['acc,none']))\n")
    env = {**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    acc = float(r.stdout.split("ACC")[-1])
    r = subprocess.run([sys.executable, "-m", "buddy", "eval", "zeroshot", "--planner", "random", "--layers", "20",
                        "--mc-file", str(data), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["acc"] == pytest.approx(acc)


def test_paired_bootstrap_interval_covers_the_mean_and_narrows_with_documents():
    import numpy as np

    from buddy.eval.stats import paired_bootstrap

    rng = np.random.default_rng(1)
    m, lo, hi = paired_bootstrap(rng.normal(0.5, 1.0, 400))
    assert lo < m < hi and lo > 0.3 and hi < 0.7
    m2, lo2, hi2 = paired_bootstrap(rng.normal(0.5, 1.0, 25))
    assert hi2 - lo2 > hi - lo
    assert paired_bootstrap([2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_router_vs_static_benchmark_reads_sweep_rows(tmp_path):
    import subprocess
    import sys

    rows = []
    for method, nll in (("router", [1.0, 1.1, 0.9]), ("static-bi", [1.2, 1.3, 1.0]), ("static-greedy", [1.1, 1.2, 1.0])):
        for task in ("ppl:squad", "ppl:moby_dick"):
            rows.append({"model": "m", "method": method, "kv_policy": "fill", "k": 15, "task": task,
                         "ppl": float(np.exp(np.mean(nll))), "per_doc": {"nll": nll}})
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "benchmarks/router_vs_static.py", str(f)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["cells"] == 2 and last["never_worse"] and last["worst"]["static"] == "static-greedy"
    assert "| moby_dick | yes | 15 |" in out.stdout


def test_stratified_bootstrap_resamples_within_groups():
    from buddy.eval.stats import stratified_bootstrap

    def avg(gs):
        return float(np.mean([g.mean() for g in gs]))

    rng = np.random.default_rng(0)
    groups = [rng.normal(0.3, 1.0, 300), rng.normal(-0.1, 1.0, 50)]
    m, lo, hi = stratified_bootstrap(groups, avg)
    assert m == pytest.approx(avg(groups)) and lo < m < hi
    # a constant group adds no spread: the interval is the other group's, halved by the average
    m1, lo1, hi1 = stratified_bootstrap([groups[0], np.zeros(7)], avg)
    assert m1 == pytest.approx(groups[0].mean() / 2) and hi1 - lo1 < hi - lo
    assert stratified_bootstrap([[1.0, 1.0], [3.0]], avg) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError):
        stratified_bootstrap([[1.0], []], avg)


def test_tasks_vs_static_benchmark_pairs_accuracy_by_document(tmp_path):
    import subprocess
    import sys

    acc = {  # 4 documents per task; static-greedy has no lambada row, so only static-bi is compared there
        "router": {"a": [1, 1, 0, 1], "b": [0, 1, 1, 0], "lambada": [1, 0, 0, 0]},
        "static-bi": {"a": [1, 0, 0, 1], "b": [0, 1, 0, 0], "lambada": [1, 1, 0, 0]},
        "static-greedy": {"a": [0, 0, 0, 1], "b": [1, 1, 1, 0]},
    }
    rows = [{"model": "m", "method": m, "kv_policy": "fill", "k": 15, "n_layers": 30, "task": t,
             "acc": float(np.mean(v)), "docs": 4, "per_doc": {"acc": v}} for m, per in acc.items() for t, v in per.items()]
    rows.append({"model": "m", "method": "router", "kv_policy": "fill", "k": 19, "n_layers": 30, "task": "a",
                 "acc": 1.0, "docs": 1})  # no per-document results: not compared
    root = Path(__file__).resolve().parents[2]

    def run(path, *flags):
        return subprocess.run([sys.executable, "benchmarks/tasks_vs_static.py", str(path), *flags],
                              capture_output=True, text=True, cwd=root, timeout=120)

    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run(f, "--tasks", "a,b", "--extra", "lambada")
    assert out.returncode == 0, out.stderr
    (res,) = json.loads(out.stdout.strip().splitlines()[-1])["by_k"]
    assert res["k"] == 15
    # per task, against the better static method on that task
    assert res["tasks"]["a"]["best_static"] == "static-bi" and res["tasks"]["a"]["diff"] == pytest.approx(0.25)
    assert res["tasks"]["b"]["best_static"] == "static-greedy" and res["tasks"]["b"]["diff"] == pytest.approx(-0.25)
    assert res["tasks"]["lambada"]["best_static"] == "static-bi" and res["tasks"]["lambada"]["diff"] == pytest.approx(-0.25)
    # the average, against the one static method with the higher average (static-greedy 0.5, static-bi 0.375);
    # lambada stays outside it
    avg = res["average"]
    assert avg["router"] == pytest.approx(0.625) and avg["best_static"] == "static-greedy"
    assert avg["diff"] == pytest.approx(0.125) and avg["ci"][0] <= 0.125 <= avg["ci"][1] and avg["docs"] == 8
    assert avg["worst_task"] == ["b", pytest.approx(-0.25)]
    assert "| router | 15 | 75.0 | 50.0 | 62.5 | 25.0 |" in out.stdout
    bad = run(f, "--tasks", "zzz")
    assert bad.returncode != 0 and "no router rows" in bad.stderr
    # static-bi on task a measured again after its calibration file changed: the later row counts
    again = {**rows[3], "calibration_sha256": "new", "acc": 0.0, "per_doc": {"acc": [0, 0, 0, 0]}}
    f.write_text("".join(json.dumps(r) + "\n" for r in rows + [again]))
    out = run(f, "--tasks", "a,b")
    assert out.returncode == 0, out.stderr
    (res,) = json.loads(out.stdout.strip().splitlines()[-1])["by_k"]
    assert res["tasks"]["a"]["static-bi"] == 0.0 and res["tasks"]["a"]["best_static"] == "static-greedy"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows + [{**again, "calibration_sha256": None, "limit": 4}]))
    bad = run(f, "--tasks", "a,b")  # a row of another setup (its limit) is not a re-measurement
    assert bad.returncode != 0 and "two rows for" in bad.stderr
    rows[0]["per_doc"]["acc"] = [1, 1, 0]  # router on a: 3 documents against static's 4
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = run(f, "--tasks", "a,b")
    assert bad.returncode != 0 and "not paired" in bad.stderr
    he = [{"model": "m", "method": m, "kv_policy": "fill", "k": 12, "n_layers": 24, "task": "humaneval",
           "pass_at_1": float(np.mean(v)), "docs": 4, "per_doc": {"passed": v}}
          for m, v in (("router", [1, 1, 1, 0]), ("static-bi", [1, 0, 0, 0]), ("static-greedy", [0, 1, 0, 1]))]
    f.write_text("".join(json.dumps(r) + "\n" for r in he))
    out = run(f, "--tasks", "humaneval", "--metric", "pass_at_1")  # HumanEval keeps 0/1 per problem as "passed"
    assert out.returncode == 0, out.stderr
    (res,) = json.loads(out.stdout.strip().splitlines()[-1])["by_k"]
    he_res = res["tasks"]["humaneval"]
    assert he_res["best_static"] == "static-greedy" and he_res["diff"] == pytest.approx(0.25) and he_res["docs"] == 4


def test_kl_to_the_dense_model_is_zero_at_full_depth_and_grows_with_skipping():
    from buddy.eval.ppl import evaluate_windows
    from buddy.eval.sweep import check_task
    from buddy.planner import StaticPlanner

    bb = tiny_backbone("llama", n_layers=8)
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    full = evaluate_windows(Engine(bb, FullPlanner(8)), ids, layers=8, prefill=4, per_window=True, kl=True)
    assert abs(full.kl) < 1e-4 and len(full.window_kl) == 3
    static = Engine(bb, StaticPlanner("static", list(range(1, 7)), 8))
    kl = {k: evaluate_windows(static, ids, layers=k, prefill=4, per_window=True, batch_size=2, kl=True) for k in (3, 6)}
    assert kl[3].kl > kl[6].kl > 1e-3
    assert sum(kl[3].window_kl) / 3 == pytest.approx(kl[3].kl, rel=1e-5)  # equal windows: mean of means
    assert evaluate_windows(static, ids, layers=3, prefill=4).kl is None  # only when asked for
    check_task("kl:code")
    with pytest.raises(TaskError, match="unknown domain 'wiki'"):
        check_task("kl:wiki")


def test_kl_task_rows_carry_kl_and_ppl_per_window(tiny_ckpt):
    from buddy.api import load
    from buddy.eval.sweep import run_task

    m = load(str(tiny_ckpt), planner="random", device="cpu", dtype="float32")
    row = run_task(m, "kl:code", 3, limit=2)
    assert row["kl"] > 0 and row["docs"] == 2 and len(row["per_doc"]["kl"]) == len(row["per_doc"]["nll"]) == 2
    assert run_task(m, "ppl:code", 3, limit=2)["ppl"] == pytest.approx(row["ppl"])


def test_auto_vs_fixed_judges_auto_per_domain_and_pooled(tmp_path):
    """auto at 17 layers per token sits halfway between fixed 15 and 19: its KL is 0.1 below the interpolated
    fixed KL on every window, and its NLL equal, so the table says -0.1000 and a ratio of 1.000."""
    import subprocess
    import sys

    rows = []
    for d in ("sotu", "moby_dick"):
        for k, kl, nll in ((15, [0.6, 0.8, 0.7], [3.0, 3.2, 3.1]), (19, [0.4, 0.6, 0.5], [2.8, 3.0, 2.9]),
                           (30, [0.0, 0.0, 0.0], [2.5, 2.6, 2.7])):
            rows.append({"model": "m", "method": "dense" if k == 30 else "router", "kv_policy": "fill", "k": k,
                         "n_layers": 30, "task": f"kl:{d}", "layers_per_token": float(k), "kl": float(np.mean(kl)),
                         "ppl": float(np.exp(np.mean(nll))), "per_doc": {"kl": kl, "nll": nll}})
        kl, nll = [0.4, 0.6, 0.5], [2.9, 3.1, 3.0]
        rows.append({"model": "m", "method": "router", "kv_policy": "fill", "k": "auto", "n_layers": 30,
                     "task": f"kl:{d}", "layers_per_token": 17.0, "predictor": "p", "tradeoff": 1.0,
                     "kl": float(np.mean(kl)), "ppl": float(np.exp(np.mean(nll))), "per_doc": {"kl": kl, "nll": nll}})
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "benchmarks/auto_vs_fixed.py", str(f)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("| p | 1.0 |")]
    assert [ln.split(" | ")[2] for ln in lines] == [
        "moby_dick", "sotu", "**all 2 domains, pooled**", "**all 2 domains, one fixed budget at auto's overall mean**"]
    for ln in lines:
        assert "-0.1000 [-0.1000, -0.1000]" in ln and "1.000 [1.000, 1.000]" in ln
    assert lines[-1].split(" | ")[4] == "17.00"  # the cross-domain line names auto's overall mean layers


def test_auto_vs_fixed_reports_each_task_at_autos_own_mean_layers(tmp_path):
    """Per-task accuracy table: task a's auto runs 17 layers per token, halfway between fixed 15 (every document
    wrong) and 19 (every one right), and gets every document right: +50 points on each document. Task b's auto
    runs 19 layers and answers as fixed 19 does: +0.0."""
    import subprocess
    import sys

    rows = []
    for t, auto_k in (("arc_easy", 17.0), ("piqa", 19.0)):
        for k, acc in ((15, [0, 0, 0, 0]), (19, [1, 1, 1, 1]), (30, [1, 1, 1, 1])):
            rows.append({"model": "m", "method": "dense" if k == 30 else "router", "kv_policy": "fill", "k": k,
                         "n_layers": 30, "task": t, "layers_per_token": float(k), "acc": float(np.mean(acc)),
                         "per_doc": {"acc": acc}})
        rows.append({"model": "m", "method": "router", "kv_policy": "fill", "k": "auto", "n_layers": 30, "task": t,
                     "layers_per_token": auto_k, "predictor": "p", "tradeoff": 1.0, "acc": 1.0,
                     "per_doc": {"acc": [1, 1, 1, 1]}})
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "benchmarks/auto_vs_fixed.py", str(f), "--tasks", "arc_easy,piqa"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0, out.stderr
    table = out.stdout.split("Per task")[1]
    lines = [ln.split(" | ") for ln in table.splitlines() if ln.startswith("| p | 1.0 |")]
    assert [(ln[2], ln[4], ln[5], ln[6], ln[7]) for ln in lines] == [
        ("arc_easy", "17.00", "100.0", "50.0", "+50.0 [+50.0, +50.0] |"), ("piqa", "19.00", "100.0", "100.0", "+0.0 [+0.0, +0.0] |")]


def test_no_worse_allows_float32_rounding_only():
    from buddy.eval.stats import no_worse

    assert no_worse(9.0, 10.0) and no_worse(10.0, 10.0) and no_worse(10.0 * (1 + 1e-7), 10.0)
    assert not no_worse(10.0 * (1 + 1e-5), 10.0) and not no_worse(10.1, 10.0)
