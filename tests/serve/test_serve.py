"""The OpenAI-compatible server on the embedded model, driven by the official `openai` client.

One server (float32, an API key, conftest's `server` fixture) is shared by the test session."""

import concurrent.futures as cf
import json
import subprocess
import sys
import time

import httpx2 as httpx
import pytest
from conftest import KEY

pytestmark = pytest.mark.integration
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is",
           "In 1969, astronauts", "My favourite food is", "Water boils at", "The stock market"]
BUDGETS = [0.5, 0.75, 1.0, 20]


def complete(client, prompt, budget, n=12, stream=False):
    extra = {"layers": budget} if isinstance(budget, int) and budget > 1 else {"budget": budget}
    kw = dict(model="smollm2", prompt=prompt, max_tokens=n, temperature=0, extra_body=extra)
    if not stream:
        return client.completions.create(**kw).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)


def buddy_generate(prompt, budget, n, chat=False):
    flag = ["--layers", str(budget)] if isinstance(budget, int) and budget > 1 else ["--budget", str(budget)]
    r = subprocess.run([sys.executable, "-m", "buddy", "generate", "--dtype", "float32", "--device", "cpu", *flag,
                        "--max-new-tokens", str(n), "--quiet-summary", *(["--chat"] if chat else []), prompt],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout[:-1]  # the trailing newline after the streamed text


def test_token_allocation_keeps_the_mean_and_says_so(client):
    """allocation="token" with the shipped depth head: each token its own depth, the mean within half a layer."""
    from buddy.api import DEPTHS

    if not (DEPTHS / "smollm2-fill" / "depth.json").is_file():
        pytest.skip("no depth head ships for smollm2")
    r = client.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                  extra_body={"budget": 0.5, "allocation": "token"})
    u = r.usage.model_dump()
    assert u["allocation"] == "token" and u["k"] == 15
    assert abs(u["layers_per_token"] - 15) <= 0.5
    plain = client.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                      extra_body={"budget": 0.5})
    assert plain.usage.model_dump()["allocation"] == "request"


def test_completion_and_chat_equal_buddy_generate(client):
    r = client.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                  extra_body={"budget": 0.5})
    assert r.choices[0].text == buddy_generate(PROMPTS[0], 0.5, 12)
    u = r.usage.model_dump()
    assert u["completion_tokens"] == 12 and u["layers_per_token"] == 15 and u["budget"] == 0.5
    assert u["layers"] is None and u["k"] == 15
    assert u["kv_policy"] == "fill" and u["planner"] == "router"


def test_usage_names_the_planner_of_each_kv_policy(client):
    """No router trained for `zero` ships (the `fill` one is worse than static there): `zero` runs static-greedy."""
    r = client.completions.create(model="smollm2", prompt=PROMPTS[1], max_tokens=4, temperature=0,
                                  extra_body={"budget": 0.5, "kv_policy": "zero"})
    u = r.usage.model_dump()
    assert u["kv_policy"] == "zero" and u["planner"] == "static-greedy" and u["layers_per_token"] == 15
    msgs = [{"role": "user", "content": "Name a color."}]
    c = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=10, temperature=0,
                                       extra_body={"budget": 0.75})
    assert c.choices[0].message.content == buddy_generate("Name a color.", 0.75, 10, chat=True)
    assert c.usage.model_dump()["layers_per_token"] == 23
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="smollm2", messages=msgs, max_tokens=10, temperature=0, stream=True, extra_body={"budget": 0.75}))
    assert streamed == c.choices[0].message.content
    assert complete(client, PROMPTS[1], 20, stream=True) == complete(client, PROMPTS[1], 20)


def test_models_health_and_stop(server, client):
    assert [m.id for m in client.models.list()] == ["smollm2"]
    assert httpx.get(server + "/health").json()["status"] == "ok"
    full = complete(client, PROMPTS[0], 1.0, n=16)
    stop = full.strip().split()[2]
    r = client.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:full.index(stop)]


def test_load_32_concurrent_streams_equal_single_requests(server, client):
    jobs = [(p, b) for p in PROMPTS for b in BUDGETS]
    single = {j: complete(client, *j) for j in jobs}
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(lambda j: complete(client, *j, stream=True), jobs))
    assert time.perf_counter() - t0 < 300
    for j, out in zip(jobs, outs):
        assert out == single[j], j
    h = httpx.get(server + "/health").json()
    assert h["active"] == 0 and h["queued"] == 0


def test_disconnect_frees_the_row(server):
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 500, "stream": True, "temperature": 0}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        lines = r.iter_lines()
        got = [x for _, x in zip(range(4), (x for x in lines if x.startswith("data: ")))]
        assert len(got) == 4 and "[DONE]" not in got[-1]
        assert httpx.get(server + "/health").json()["active"] == 1
    for _ in range(50):  # the row leaves at the next decode step
        if httpx.get(server + "/health").json()["active"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(server + "/health").json()["active"] == 0


@pytest.mark.parametrize("payload,status,param", [
    ({"prompt": "hi", "budget": 1.5}, 400, "budget"), ({"prompt": "hi", "budget": 0}, 400, "budget"),
    ({"prompt": "hi", "budget": 31}, 400, "budget"), ({"prompt": "hi", "budget": 20}, 400, "budget"),
    ({"prompt": "hi", "layers": 31}, 400, "layers"), ({"prompt": "hi", "budget": 0.5, "layers": 20}, 400, "budget"),
    ({"prompt": "hi", "budget": "half"}, 400, "budget"),
    ({"prompt": "hi", "budget": True}, 400, "budget"), ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 513}, 400, "max_tokens"), ({"prompt": "hi", "model": "gpt-9"}, 404, "model"),
    ({"prompt": "hi", "kv_policy": "keep"}, 400, "kv_policy"), ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "hi " * 9000}, 400, "prompt"), ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
])
def test_bad_requests_get_openai_errors(server, payload, status, param):
    r = httpx.post(server + "/v1/completions", json=payload, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_malformed_json_auth_and_still_serving(server, client):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/chat/completions", json={"messages": "hello"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server + "/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert complete(client, "Hello", 0.5, n=4)  # the server kept serving


@pytest.mark.parametrize("payload,param", [
    ({"prompt": "hi", "kv_policy": ["fill"]}, "kv_policy"), ({"prompt": "hi", "kv_policy": {"a": 1}}, "kv_policy"),
    ({"prompt": "\ud800 hi"}, "prompt"), ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ({"prompt": "hi", "seed": 2**70}, "seed"), ({"prompt": "x" * 1_000_000}, "prompt"),
])
def test_hardening_bad_values_get_400(server, payload, param):
    path = "/v1/chat/completions" if "messages" in payload else "/v1/completions"
    body = json.dumps(payload).encode()  # json.dumps keeps a lone surrogate as "\ud800"
    r = httpx.post(server + path, content=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_hardening_transport_limits(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server + "/v1/completions", content=b'{"prompt": "hi"}', headers={**auth, "Content-Type": "text/plain"})
    assert r.status_code == 415  # a cross-site form post cannot start a generation
    big = json.dumps({"prompt": "x" * (3 * 2**20)}).encode()
    r = httpx.post(server + "/v1/completions", content=big, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = httpx.get(server + "/health", headers={"Host": "evil.example"})
    assert r.status_code == 421  # DNS rebinding: this server answers only to its own name
    r = httpx.post(server + "/v1/completions", json={"prompt": "Count: 1, 2, 3,", "max_tokens": 8,
                                                     "temperature": 8e-38}, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server + "/health").status_code == 200
    assert complete(client, "Hello", 0.5, n=4)  # the server kept serving
