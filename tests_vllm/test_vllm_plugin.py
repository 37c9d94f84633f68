"""Buddy's vLLM plugin on vLLM's CPU build (runs in the second environment: `make test-vllm`).

Buddy's main environment makes a tiny Llama checkpoint and a random router, exports them with
`export --format vllm` (policies fill and zero) and records its own engine's greedy tokens
(tests_vllm/make_reference.py). vLLM loads each directory with only its CPU settings; its greedy tokens at
per-request budgets must equal Buddy's, alone and in one mixed batch."""

import json
import os
import subprocess
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")
# the engine in this process: errors reach the test, and apply_model and monkeypatch reach the model
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
ROOT = Path(__file__).resolve().parents[1]
MAIN_PY = os.environ.get("BUDDY_MAIN_PYTHON", str(ROOT / ".venv" / "bin" / "python"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = subprocess.run([MAIN_PY, str(ROOT / "tests_vllm" / "make_reference.py"), str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "reference.json").read_text())


def llm_for(path):
    from vllm import LLM

    return LLM(model=str(path), dtype="float32", enforce_eager=True, enable_prefix_caching=False, max_model_len=128,
               max_num_seqs=8, seed=0)


def _fill_kv_caches_with_leftovers(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.attn.kv_cache.fill_(50.0)


@pytest.mark.parametrize("family,policy", [("llama", "fill"), ("llama", "zero"), ("qwen2", "fill")])
def test_vllm_tokens_equal_buddy_at_per_request_budgets(reference, family, policy, monkeypatch):
    from vllm import SamplingParams

    from buddy.vllm_plugin.model import _Buddy

    out, ref = reference
    asks = [a for a in ref[family] if a["kv_policy"] == policy and a["layers"] != "auto" and "allocation" not in a]
    if policy == "fill":  # the same prompt at 4 and 8 layers: routing changes the tokens (the test can fail)
        assert asks[0]["prompt_ids"] == asks[3]["prompt_ids"] and asks[0]["tokens"] != asks[3]["tokens"]
    llm = llm_for(out / f"model-{family}-{policy}")
    L, n = ref["n_layers"], ref["new_tokens"]
    extra = [{"layers": a["layers"]} if i % 2 else {"budget": a["layers"] / L} for i, a in enumerate(asks)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args=x) for x in extra]
    batch = llm.generate([{"prompt_token_ids": a["prompt_ids"]} for a in asks], params)
    assert [list(o.outputs[0].token_ids) for o in batch] == [a["tokens"] for a in asks]  # one mixed batch
    # alone at 6 of 8 layers, each step has layers that no token runs, and later tokens run some of them:
    # only their K/V are written (fill: from the unchanged stream; zero: zeros). Every cache slot first
    # holds large values (another request's leftovers), so a slot read but not written changes the tokens
    # (checked: with the write left out, this ask's tokens differ for both policies)
    six = next(i for i, a in enumerate(asks) if a["layers"] == 6)
    llm.apply_model(_fill_kv_caches_with_leftovers)
    written, write = [], _Buddy._write_kv_only
    monkeypatch.setattr(_Buddy, "_write_kv_only", lambda self, *a: (written.append(1), write(self, *a))[1])
    alone = llm.generate([{"prompt_token_ids": asks[six]["prompt_ids"]}], params[six])
    assert list(alone[0].outputs[0].token_ids) == asks[six]["tokens"]
    assert len(written) >= (L - 6) * (n - 1)  # at least the decode steps' skipped layers
    monkeypatch.undo()
    alone = llm.generate([{"prompt_token_ids": asks[0]["prompt_ids"]}], params[0])
    assert list(alone[0].outputs[0].token_ids) == asks[0]["tokens"]
    with pytest.raises(Exception, match="budget"):
        llm.generate([{"prompt_token_ids": [5, 6]}], SamplingParams(max_tokens=2, extra_args={"budget": 1.5}))
    ok = llm.generate([{"prompt_token_ids": asks[0]["prompt_ids"]}], params[0])  # and it keeps serving
    assert list(ok[0].outputs[0].token_ids) == asks[0]["tokens"]


@pytest.mark.parametrize("family,policy", [("llama", "zero"), ("qwen2", "fill")])
def test_two_tensor_parallel_ranks_give_buddys_tokens(reference, family, policy):
    """Each rank holds part of the KV heads (qwen2: one of two; llama: a copy of the only one), so the router's
    layer-0 K/V are gathered from the ranks and every rank runs rank 0's plan: the tokens are Buddy's engine's,
    in one batch and alone."""
    import signal
    import sys

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("two tensor-parallel ranks need two CPUs")
    out, ref = reference
    asks = [a for a in ref[family] if a["kv_policy"] == policy and a["layers"] != "auto" and "allocation" not in a]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"{cpus[0]}|{cpus[1]}"  # a core per rank
    p = subprocess.Popen([sys.executable, str(ROOT / "tests_vllm" / "tp_generate.py"),
                          str(out / f"model-{family}-{policy}"), json.dumps(asks)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the engine and the rank processes too
        raise
    assert p.returncode == 0, stderr[-3000:]
    lines = [x for x in stdout.splitlines() if x.startswith("TOKENS ")]
    assert lines, stdout[-3000:]
    assert json.loads(lines[-1].split(" ", 1)[1]) == [a["tokens"] for a in asks] * 2


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_budget_auto_picks_buddys_depth_and_tokens(reference, family):
    """budget "auto": the exported budget predictor picks each prompt's k from its prompt, as Buddy's engine
    does, and the tokens are Buddy's (the prompts get different ks); the same rows in one batch with fixed ones."""
    from vllm import SamplingParams

    out, ref = reference
    autos = [a for a in ref[family] if a["layers"] == "auto"]
    fixed = [a for a in ref[family] if a["kv_policy"] == "fill" and a["layers"] != "auto" and "allocation" not in a]
    assert len({a["k"] for a in autos}) > 1
    llm = llm_for(out / f"model-{family}-fill")
    n = ref["new_tokens"]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args={"budget": "auto"})] * len(autos)
    params += [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args={"layers": a["layers"]})
               for a in fixed]
    batch = llm.generate([{"prompt_token_ids": a["prompt_ids"]} for a in autos + fixed], params)
    assert [list(o.outputs[0].token_ids) for o in batch] == [a["tokens"] for a in autos + fixed]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_allocation_token_runs_buddys_per_token_depths(reference, family):
    """allocation "token": each generated token's depth comes from the exported depth head and Buddy's layer
    account, so the tokens equal Buddy's engine (whose depths vary by token), in one batch with a fixed row."""
    from vllm import SamplingParams

    out, ref = reference
    per_token = [a for a in ref[family] if a.get("allocation") == "token"]
    fixed = [a for a in ref[family] if a["kv_policy"] == "fill" and a["layers"] != "auto" and "allocation" not in a]
    assert any(len(set(a["depths"][1:])) > 1 for a in per_token)  # depths differ by token: the test can fail
    llm = llm_for(out / f"model-{family}-fill")
    n = ref["new_tokens"]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                             extra_args={"layers": a["layers"], "allocation": "token"}) for a in per_token]
    params.append(SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args={"layers": fixed[0]["layers"]}))
    batch = llm.generate([{"prompt_token_ids": a["prompt_ids"]} for a in per_token + fixed[:1]], params)
    assert [list(o.outputs[0].token_ids) for o in batch] == [a["tokens"] for a in per_token + fixed[:1]]
    with pytest.raises(Exception, match="allocation"):
        llm.generate([{"prompt_token_ids": [5, 6]}], SamplingParams(max_tokens=2, extra_args={"allocation": "tokens"}))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_budget_equals_vllm_dense(reference, family):
    """The export at all layers gives vLLM's own model's greedy tokens (same weights, fp32)."""
    from vllm import SamplingParams

    out, ref = reference
    asks = [a for a in ref[family] if a["kv_policy"] == "fill"]
    params = SamplingParams(max_tokens=ref["new_tokens"], temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": a["prompt_ids"]} for a in asks]
    dense = [list(o.outputs[0].token_ids) for o in llm_for(out / f"tiny-{family}").generate(prompts, params)]
    buddy = [list(o.outputs[0].token_ids) for o in llm_for(out / f"model-{family}-fill").generate(prompts, params)]
    assert buddy == dense


def test_smollm2_with_its_shipped_router_equals_buddy_and_dense(reference):
    """The embedded model exported with its shipped router: vLLM's greedy tokens at 15, 23 and 30 layers equal
    Buddy's engine (fp32), and at 30 layers also vLLM's own dense SmolLM2."""
    from vllm import SamplingParams

    out, ref = reference
    s = ref.get("smollm2")
    if s is None:
        pytest.skip("SmolLM2 is not installed in the main environment (run `make`)")
    n, L = ref["new_tokens"], s["n_layers"]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                             extra_args={"layers": a["layers"]} if a["layers"] < L else None) for a in s["asks"]]
    prompts = [{"prompt_token_ids": a["prompt_ids"]} for a in s["asks"]]
    got = [list(o.outputs[0].token_ids) for o in llm_for(out / "model-smollm2").generate(prompts, params)]
    assert got == [a["tokens"] for a in s["asks"]]
    full = [i for i, a in enumerate(s["asks"]) if a["layers"] == L]
    dense = llm_for(s["dense"]).generate([prompts[i] for i in full], SamplingParams(max_tokens=n, temperature=0,
                                                                                    ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in dense] == [got[i] for i in full]


def test_vllm_serve_takes_the_budget_from_vllm_xargs(reference):
    """vLLM's OpenAI server on the export: the official openai client sends the budget in extra_body's vllm_xargs.
    (vllm-cpu 0.32.0's `vllm` command fails before parsing: it looks up the version of a distribution named
    `vllm`, and this one is `vllm-cpu`; the server module it would run is started directly.)"""
    import socket
    import sys
    import time

    import httpx
    from openai import BadRequestError, OpenAI
    from transformers import AutoTokenizer

    out, ref = reference
    model = str(out / "model-llama-fill")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                             "--port", str(port),
                             "--dtype", "float32", "--enforce-eager", "--no-enable-prefix-caching",
                             "--max-model-len", "128", "--max-num-seqs", "8"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        tok = AutoTokenizer.from_pretrained(model)
        for a in [a for a in ref["llama"] if a["kv_policy"] == "fill"][:2]:
            r = client.completions.create(model=model, prompt=a["prompt_ids"], max_tokens=ref["new_tokens"],
                                          temperature=0, extra_body={"vllm_xargs": {"layers": a["layers"]},
                                                                     "ignore_eos": True})
            assert r.choices[0].text.split() == tok.decode(a["tokens"]).split()  # one word per token
            chunks = client.completions.create(model=model, prompt=a["prompt_ids"], max_tokens=ref["new_tokens"],
                                               temperature=0, stream=True,
                                               extra_body={"vllm_xargs": {"budget": a["layers"] / ref["n_layers"]},
                                                           "ignore_eos": True})
            assert "".join(c.choices[0].text for c in chunks if c.choices).split() == tok.decode(a["tokens"]).split()
        with pytest.raises(BadRequestError):
            client.completions.create(model=model, prompt=[5, 6], max_tokens=2,
                                      extra_body={"vllm_xargs": {"budget": 1.5}})
        with pytest.raises(BadRequestError, match="allocation"):
            client.completions.create(model=model, prompt=[5, 6], max_tokens=2,
                                      extra_body={"vllm_xargs": {"allocation": "tokens"}})
        # budget "auto" and allocation "token" through the server: Buddy's tokens
        auto = next(a for a in ref["llama"] if a["layers"] == "auto")
        per_token = next(a for a in ref["llama"] if a.get("allocation") == "token")
        for a, extra in ((auto, {"budget": "auto"}), (per_token, {"layers": per_token["layers"], "allocation": "token"})):
            r = client.completions.create(model=model, prompt=a["prompt_ids"], max_tokens=ref["new_tokens"],
                                          temperature=0, extra_body={"vllm_xargs": extra, "ignore_eos": True})
            assert r.choices[0].text.split() == tok.decode(a["tokens"]).split()
        a = ref["llama"][0]  # the server keeps serving after the refusals (a layer count above the depth too)
        for extra in ({"layers": a["layers"]}, {"layers": 99}):
            r = client.completions.create(model=model, prompt=a["prompt_ids"], max_tokens=ref["new_tokens"],
                                          temperature=0, extra_body={"vllm_xargs": extra, "ignore_eos": True})
            assert r.choices[0].text.strip()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_batch_state_never_drops_the_state_of_a_request_still_in_the_batch(monkeypatch):
    from collections import OrderedDict

    import torch

    from buddy.vllm_plugin import batch_state

    monkeypatch.setattr(batch_state, "MAX_STATES", 3)
    st = object.__new__(batch_state.BuddyBatchState)
    st.key, st.auto = [101, None], OrderedDict()
    st.k = torch.zeros(2, dtype=torch.long)
    st.choose(0, 7)  # the running "auto" request chose first: the oldest entry
    for key in range(5):  # newer requests come and go
        st.key[1] = key
        st.choose(1, 5)
    assert len(st.auto) == 3 and st.auto[101] == 7  # the oldest out-of-batch ones went, not the running one
    assert list(st.auto) == [101, 3, 4]
