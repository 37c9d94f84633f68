"""Table-driven regression suite: bad requests get the exact 4xx in OpenAI's error format, and the server keeps
serving normal completions after each; healthy streams finish unharmed while bad requests arrive."""

import concurrent.futures as cf
import json
import time

import httpx2 as httpx
import pytest
from conftest import KEY

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
C, CHAT = "/v1/completions", "/v1/chat/completions"


def hi(**kw):
    return {"prompt": "hi", **kw}


def msgs(messages, **kw):
    return {"messages": messages, **kw}


# (name, path, body: dict | bytes (sent raw), status, param); param None = no param is named
CASES = [
    # budget and layers
    ("budget above 1", C, hi(budget=1.5), 400, "budget"),
    ("budget 0", C, hi(budget=0), 400, "budget"),
    ("budget negative", C, hi(budget=-0.5), 400, "budget"),
    ("budget integer 2", C, hi(budget=2), 400, "budget"),
    ("budget 31", C, hi(budget=31), 400, "budget"),
    ("budget word", C, hi(budget="half"), 400, "budget"),
    ("budget true", C, hi(budget=True), 400, "budget"),
    ("budget list", C, hi(budget=[0.5]), 400, "budget"),
    ("budget object", C, hi(budget={"v": 0.5}), 400, "budget"),
    ("budget NaN", C, b'{"prompt": "hi", "budget": NaN}', 400, "budget"),
    ("budget Infinity", C, b'{"prompt": "hi", "budget": Infinity}', 400, "budget"),
    ("layers 0", C, hi(layers=0), 400, "layers"),
    ("layers 1", C, hi(layers=1), 400, "layers"),
    ("layers 31", C, hi(layers=31), 400, "layers"),
    ("layers negative", C, hi(layers=-3), 400, "layers"),
    ("layers fraction", C, hi(layers=2.5), 400, "layers"),
    ("layers true", C, hi(layers=True), 400, "layers"),
    ("layers word", C, hi(layers="abc"), 400, "layers"),
    ("budget and layers", C, hi(budget=0.5, layers=20), 400, "budget"),
    # max_tokens
    ("max_tokens 0", C, hi(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", C, hi(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens over limit", C, hi(max_tokens=513), 400, "max_tokens"),
    ("max_tokens word", C, hi(max_tokens="ten"), 400, "max_tokens"),
    ("max_tokens fraction", C, hi(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens true", C, hi(max_tokens=True), 400, "max_tokens"),
    ("max_tokens huge", C, hi(max_tokens=10**30), 400, "max_tokens"),
    ("max_completion_tokens 0", C, hi(max_completion_tokens=0), 400, "max_tokens"),
    # sampling
    ("temperature negative", C, hi(temperature=-1), 400, "temperature"),
    ("temperature above 2", C, hi(temperature=2.5), 400, "temperature"),
    ("temperature word", C, hi(temperature="hot"), 400, "temperature"),
    ("temperature true", C, hi(temperature=True), 400, "temperature"),
    ("temperature NaN", C, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("temperature 1e300", C, hi(temperature=1e300), 400, "temperature"),
    ("top_p 0", C, hi(top_p=0), 400, "top_p"),
    ("top_p above 1", C, hi(top_p=1.5), 400, "top_p"),
    ("top_p negative", C, hi(top_p=-0.1), 400, "top_p"),
    ("top_p word", C, hi(top_p="x"), 400, "top_p"),
    ("seed 2**70", C, hi(seed=2**70), 400, "seed"),
    ("seed below -2**63", C, hi(seed=-2**64), 400, "seed"),
    ("seed fraction", C, hi(seed=1.5), 400, "seed"),
    ("seed word", C, hi(seed="abc"), 400, "seed"),
    ("seed true", C, hi(seed=True), 400, "seed"),
    ("n 2", C, hi(n=2), 400, "n"),
    ("n 0", C, hi(n=0), 400, "n"),
    ("stop number", C, hi(stop=5), 400, "stop"),
    ("stop empty string", C, hi(stop=[""]), 400, "stop"),
    ("stop five strings", C, hi(stop=list("abcde")), 400, "stop"),
    ("stop list of numbers", C, hi(stop=[1]), 400, "stop"),
    ("stream word", C, hi(stream="yes"), 400, "stream"),
    ("stream 1", C, hi(stream=1), 400, "stream"),
    ("kv_policy unknown", C, hi(kv_policy="keep"), 400, "kv_policy"),
    ("kv_policy list", C, hi(kv_policy=["fill"]), 400, "kv_policy"),
    ("kv_policy object", C, hi(kv_policy={"a": 1}), 400, "kv_policy"),
    ("kv_policy number", C, hi(kv_policy=5), 400, "kv_policy"),
    ("allocation unknown", C, hi(allocation="layer"), 400, "allocation"),
    ("allocation list", C, hi(allocation=["token"]), 400, "allocation"),
    ("unknown model", C, hi(model="gpt-9"), 404, "model"),
    # prompts
    ("prompt empty", C, {"prompt": ""}, 400, "prompt"),
    ("prompt missing", C, {"max_tokens": 4}, 400, "prompt"),
    ("prompt number", C, {"prompt": 42}, 400, "prompt"),
    ("prompt token ids", C, {"prompt": [1, 2, 3]}, 400, "prompt"),
    ("prompt two strings", C, {"prompt": ["a", "b"]}, 400, "prompt"),
    ("prompt null", C, {"prompt": None}, 400, "prompt"),
    ("prompt object", C, {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("prompt lone surrogate", C, {"prompt": "\ud800 hi"}, 400, "prompt"),
    ("prompt over the context", C, {"prompt": "hi " * 9000}, 400, "prompt"),
    ("prompt of a million characters", C, {"prompt": "x" * 1_000_000}, 400, "prompt"),
    # bodies and transport
    ("body is an array", C, b"[]", 400, None),
    ("body is a string", C, b'"hi"', 400, None),
    ("body is null", C, b"null", 400, None),
    ("body is a number", C, b"42", 400, None),
    ("body is malformed JSON", C, b"{not json", 400, None),
    ("body is empty", C, b"", 400, None),
    ("body is not UTF-8", C, b'{"prompt": "\xff\xfe"}', 400, None),
    ("body nests 10000 arrays", C, b'{"prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}", 400, None),
    # chat
    ("messages a string", CHAT, msgs("hello"), 400, "messages"),
    ("messages empty", CHAT, msgs([]), 400, "messages"),
    ("message without content", CHAT, msgs([{"role": "user"}]), 400, "messages"),
    ("message content a number", CHAT, msgs([{"role": "user", "content": 5}]), 400, "messages"),
    ("message without role", CHAT, msgs([{"content": "hi"}]), 400, "messages"),
    ("message a string", CHAT, msgs(["hi"]), 400, "messages"),
    ("message lone surrogate", CHAT, msgs([{"role": "user", "content": "\ud800"}]), 400, "messages"),
    ("messages missing", CHAT, {"max_tokens": 4}, 400, "messages"),
    ("chat budget above 1", CHAT, msgs([{"role": "user", "content": "hi"}], budget=1.5), 400, "budget"),
    ("chat max_tokens 0", CHAT, msgs([{"role": "user", "content": "hi"}], max_tokens=0), 400, "max_tokens"),
    ("chat of a million characters", CHAT, msgs([{"role": "user", "content": "x" * 1_000_000}]), 400, "messages"),
    ("chat temperature word", CHAT, msgs([{"role": "user", "content": "hi"}], temperature="x"), 400, "temperature"),
    ("chat unknown model", CHAT, msgs([{"role": "user", "content": "hi"}], model="gpt-9"), 404, "model"),
]


def still_serves(server):
    r = httpx.post(server + C, json={"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0},
                   headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


@pytest.mark.parametrize("name,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_its_exact_error_and_the_server_keeps_serving(server, name, path, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + path, content=raw, headers=AUTH, timeout=60)
    assert r.status_code == status, (name, r.text[:300])
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and err.get("param") == param, err
    still_serves(server)


TRANSPORT = [
    ("text/plain content type", "POST", C, {"Content-Type": "text/plain"}, b'{"prompt": "hi"}', 415),
    ("no content type", "POST", C, {"Content-Type": ""}, b'{"prompt": "hi"}', 415),
    ("body over the size limit", "POST", C, {}, json.dumps({"prompt": "x" * (3 << 20)}).encode(), 413),
    ("no API key", "POST", C, {"Authorization": ""}, b'{"prompt": "hi"}', 401),
    ("wrong API key", "POST", C, {"Authorization": "Bearer wrong"}, b'{"prompt": "hi"}', 401),
    ("API key without Bearer", "POST", C, {"Authorization": KEY}, b'{"prompt": "hi"}', 401),
    ("foreign Host header", "GET", "/health", {"Host": "evil.example"}, b"", 421),
    ("GET on a POST route", "GET", C, {}, b"", 405),
    ("unknown route", "POST", "/v1/nothing", {}, b"{}", 404),
    ("unknown chat route", "POST", "/v1/chat/nothing", {}, b"{}", 404),
]


@pytest.mark.parametrize("name,method,path,headers,body,status", TRANSPORT, ids=[t[0] for t in TRANSPORT])
def test_transport_errors_get_their_status_and_the_server_keeps_serving(server, name, method, path, headers, body,
                                                                         status):
    h = {k: v for k, v in {**AUTH, **headers}.items() if v != ""}
    r = httpx.request(method, server + path, content=body or None, headers=h, timeout=60)
    assert r.status_code == status, (name, r.text[:300])
    assert "error" in r.json() and r.json()["error"]["message"]
    still_serves(server)


def test_healthy_streams_finish_unharmed_while_bad_requests_arrive(server):
    """Neighbour isolation: 6 greedy streams run while pathological requests (tiny temperatures, abandoned
    streams, oversized and malformed bodies) arrive; every stream gives exactly its text when run alone."""
    prompts = ["Once upon a time", "The capital of France is", "def add(a, b):", "Water boils at",
               "My favourite food is", "In 1969, astronauts"]

    def stream(prompt, n=40):
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
        text = ""
        with httpx.stream("POST", server + C, json=body, headers=AUTH, timeout=300) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    def abandon():
        body = {"prompt": "Tell me a story", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", server + C, json=body, headers=AUTH, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 2:
                    return "abandoned"

    def bad(i):
        kinds = [{"prompt": "Count: 1, 2, 3,", "max_tokens": 8, "temperature": 8e-38},
                 {"prompt": "Count: 1, 2, 3,", "max_tokens": 8, "temperature": 1e-300, "top_p": 1e-9},
                 {"prompt": "x" * 1_000_000}, {"prompt": "hi", "budget": float("1e-300")}]
        if i % 6 == 4:
            return abandon()
        if i % 6 == 5:
            return httpx.post(server + C, content=b"{not json", headers=AUTH, timeout=60).status_code
        return httpx.post(server + C, json=kinds[i % 4], headers=AUTH, timeout=120).status_code

    alone = [stream(p) for p in prompts]
    with cf.ThreadPoolExecutor(16) as pool:
        healthy = [pool.submit(stream, p) for p in prompts]
        time.sleep(0.5)  # the streams are decoding
        hostile = [pool.submit(bad, i) for i in range(18)]
        got = [f.result() for f in healthy]
        statuses = [f.result() for f in hostile]
    assert got == alone
    assert set(statuses) <= {200, 400, "abandoned"}, statuses
    for _ in range(50):
        if httpx.get(server + "/health").json()["active"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(server + "/health").json()["active"] == 0


def test_a_non_streaming_client_that_leaves_frees_its_row(server):
    body = {"prompt": "Once upon a time", "max_tokens": 500, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server + C, json=body, headers=AUTH, timeout=1.5)
    for _ in range(50):  # the server notices the disconnect and cancels the request
        if httpx.get(server + "/health").json()["active"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(server + "/health").json()["active"] == 0
    still_serves(server)
