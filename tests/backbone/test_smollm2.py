"""Integration on the embedded default model SmolLM2-135M (installed by `make`; CI runs these)."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    import buddy

    try:
        return buddy.load("smollm2", planner="full", dtype="float32", device="cpu")
    except Exception as e:  # noqa: BLE001 - report what is missing, do not hide it
        pytest.fail(f"SmolLM2 could not be loaded ({e}); run `make setup`")


def test_full_budget_greedy_equals_transformers_generate(smol):
    ids = smol.encode("The three most important inventions of the last century are", chat=False)
    ours = [s.token for s in smol.generate(ids, budget=1.0, max_new_tokens=32)]
    with torch.no_grad():
        ref = smol.bb.model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref
    assert len(ours) == 32 or ours[-1] in smol.stop_ids()


def test_shipped_calibration_loads_and_static_plans_are_exact(smol):
    from buddy.api import make_planner

    for name in ("static-bi", "static-greedy"):
        p = make_planner(name, smol.bb)
        plan = p.plan(torch.zeros(1, 3, 8), None, 15)
        assert (plan.sum(-1) == 15).all() and plan[..., 0].all() and plan[..., 29].all()


def test_cli_budget_half_traces_15_layers(tmp_path):
    trace = tmp_path / "trace.jsonl"
    r = subprocess.run([sys.executable, "-m", "buddy", "generate", "--model", "smollm2", "--budget", "0.5",
                        "--max-new-tokens", "12", "--trace", str(trace), "Once upon a time"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert lines and all(len(x["executed_layers"]) == 15 and 0 in x["executed_layers"] and 29 in x["executed_layers"]
                         for x in lines)
    assert "layers/token=15.00" in r.stdout


def test_shipped_router_is_the_default_and_reroutes_per_token(smol):
    import buddy
    from buddy.api import make_planner

    planner = make_planner(None, smol.bb)
    assert planner.name == "router"
    eng = buddy.Engine(smol.bb, planner, "fill")
    steps = list(eng.generate("The history of the United States", budget=0.7, max_new_tokens=16, ignore_eos=True))
    assert all(len(s.layers) == 21 and 0 in s.layers and 29 in s.layers for s in steps)
    assert len({s.layers for s in steps}) > 1  # the path changes between tokens


def test_a_fill_router_is_not_the_default_under_zero_or_mask(smol):
    """No router trained for `zero` or `mask` ships, and the `fill` router is worse than static-greedy under them
    (docs/results.md, "KV policy zero"): the default planner there is static-greedy; by name it still loads."""
    from buddy.api import make_planner, router_dir

    for policy in ("zero", "mask"):
        if router_dir(smol.bb, policy, fallback=False) is not None:
            pytest.skip(f"a {policy} router ships: this case is gone")
        assert make_planner(None, smol.bb, policy).name == "static-greedy"
        with pytest.warns(UserWarning, match="trained for kv policy 'fill'"):
            assert make_planner("router", smol.bb, policy).name == "router"
    assert make_planner(None, smol.bb, "fill").name == "router"
    own = str(__import__("buddy.api", fromlist=["ROUTERS"]).ROUTERS / "smollm2-fill")  # given, trained for fill
    with pytest.warns(UserWarning, match="the default planner is static-greedy"):
        assert make_planner(None, smol.bb, "zero", router=own).name == "static-greedy"
    assert make_planner(None, smol.bb, "fill", router=own).name == "router"


def test_vllm_export_under_zero_needs_a_router_trained_for_it(tmp_path, capsys):
    from buddy.cli import main

    out = tmp_path / "v"
    assert main(["export", "--format", "vllm", "--model", "smollm2", "--kv-policy", "zero", "--out", str(out)]) == 2
    assert "no router trained for kv policy 'zero'" in capsys.readouterr().err and not out.exists()


def test_router_for_another_model_is_refused(tmp_path):
    import shutil

    from buddy.router import RouterFileError, load_router

    src = __import__("buddy.api", fromlist=["ROUTERS"]).ROUTERS / "smollm2-fill"
    shutil.copytree(src, tmp_path / "r")
    with pytest.raises(RouterFileError, match="other weights"):
        load_router(tmp_path / "r", checksum="0" * 64, n_layers=30)


def test_shipped_predictor_spends_more_layers_on_math_than_on_prose():
    """The shipped predictor (trained on the prompt mix) picks budgets by the kind of prompt, on test-split items
    it never saw: GSM8K questions get more depth than SOTU prose and HellaSwag contexts."""
    import buddy
    from buddy.prompt_mix import mix_items

    m = buddy.load("smollm2", dtype="bfloat16")
    items = mix_items(m.bb.tokenizer, "test", 8, domains=("gsm8k", "sotu", "hellaswag"))
    ks = m.choose_k([it.prompt for it in items])
    math_k, prose_k = sum(ks[:8]) / 8, sum(ks[8:]) / 16
    assert math_k > prose_k, (ks[:8], ks[8:])


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="measured: moby_dick at k=25 is 1.008x the best static plan (interval "
                   "[0.969, 1.051]), docs/results.md, 'Every k on the held-out domains'; remove this mark once a "
                   "router meets the property")
def test_shipped_router_is_not_worse_than_the_best_static_plan_on_held_out_domains(smol):
    """On the domains kept out of training and validation, at every k from 0.5L to 0.9L, the shipped router's
    perplexity does not exceed the better static plan's (the 16 test windows `buddy sweep --limit 16` reads; about
    10 minutes on 2 cores: `pytest -m slow`). docs/results.md, "Every k on the held-out domains", has the table."""
    from conftest import worse_than_static_on_held_out

    worse = worse_than_static_on_held_out(smol.bb)
    assert not worse, f"router worse than the best static plan at (domain, k, ratio): {worse}"
