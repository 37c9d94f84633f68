"""OpenAI-compatible HTTP API over the continuous-batching scheduler (FastAPI).

    buddy serve --model smollm2 --port 8000

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the model's chat
template); streaming (server-sent events) and not. Buddy's own request fields, which the `openai` client sends
with `extra_body=`: `budget` (a fraction in (0, 1] or "auto") or `layers` (an exact layer count), and
`kv_policy`, and `allocation` ("request", the default, or "token": each token its own depth, the mean exact).
`usage` adds `layers_per_token` (measured), `budget`, `layers`, `k`, `allocation`, `kv_policy` and `planner`. Errors use OpenAI's
format with a 4xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import time
import uuid

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..budget import AUTO, Budget, BudgetError, budget_echo, request_budget
from ..config import ALLOCATIONS, KV_POLICIES, ServeConfig
from .scheduler import Request, Scheduler


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def parse_budget(body: dict, n_layers: int, auto_ok: bool = False) -> Budget | str:
    """A request's `budget` / `layers` fields -> Budget or AUTO, by the rule of `buddy.budget.request_budget`."""
    budget, layers = body.get("budget"), body.get("layers")
    try:
        b = request_budget(budget, layers)
        if b != AUTO:
            b.k(n_layers)
    except BudgetError as e:
        raise APIError(400, str(e), "layers" if layers is not None and budget is None else "budget") from None
    if b == AUTO and not auto_ok:
        raise APIError(400, "budget 'auto' needs a trained budget predictor for this model", "budget")
    return b


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def _check_text(text: str, param: str) -> None:
    """Text a tokenizer can take: valid Unicode (JSON may carry lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} is not valid Unicode ({e.reason} at character {e.start})", param) from None


class Server:
    """Validation, tokenization and response shaping; the Scheduler does the compute."""

    def __init__(self, engines: dict, model_name: str, cfg: ServeConfig | None = None):
        """engines: {kv_policy: Engine} sharing one backbone; cfg: ServeConfig (its defaults when None).
        Bound to a loopback host, requests must name this machine in `Host` (a DNS-rebinding page cannot)."""
        cfg = cfg or ServeConfig()
        self.cfg = cfg
        self.api_key, self.max_tokens_limit, self.max_body_bytes = cfg.api_key, cfg.max_tokens_limit, cfg.max_body_bytes
        self.loopback_only = cfg.host in LOOPBACK_NAMES
        self.engines = engines
        self.default_policy = next(iter(engines))  # the first policy served is the default
        self.engine = engines[self.default_policy]
        self.model_name = model_name
        self.scheduler = Scheduler(engines, max_batch=cfg.max_batch)
        self.created = int(time.time())

    # --- request parsing ----------------------------------------------------------------------------
    @functools.cached_property
    def _max_chars(self) -> int:
        """No text longer than this fits the context: every token covers at most the longest vocabulary entry."""
        longest = max((len(t) for t in self.engine.tokenizer.get_vocab()), default=1)
        return self.engine.bb.shapes.max_context * max(longest, 1)

    def _check_chars(self, n: int, param: str) -> None:
        """Refuse text that cannot fit the context before tokenizing it (cheap, on length alone)."""
        if n > self._max_chars:
            raise APIError(400, f"the {param} ({n} characters) cannot fit the model's context of "
                                f"{self.engine.bb.shapes.max_context} tokens", param, code="context_length_exceeded")

    def parse(self, body: dict, chat: bool) -> tuple[list[int], dict]:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}", "model",
                           code="model_not_found")
        tok = self.engine.tokenizer
        if chat:
            msgs = body.get("messages")
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
            if not ok:
                raise APIError(400, "messages must be a non-empty list of {\"role\": str, \"content\": str}", "messages")
            if not tok.chat_template:
                raise APIError(400, f"model {self.model_name!r} has no chat template; use /v1/completions", "messages")
            for m in msgs:
                _check_text(m["content"], "messages")
            self._check_chars(sum(len(m["content"]) for m in msgs), "messages")
            ids = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs],
                                          add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise APIError(400, "prompt must be a non-empty string", "prompt")
            _check_text(prompt, "prompt")
            self._check_chars(len(prompt), "prompt")
            ids = self.engine.encode(prompt)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16 if not chat else 256))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.max_tokens_limit:
            raise APIError(400, f"invalid max_tokens {max_tokens!r}: must be an integer in [1, {self.max_tokens_limit}]",
                           "max_tokens")
        ctx = self.engine.bb.shapes.max_context
        if len(ids) + max_tokens > ctx:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {ctx} tokens", "prompt", code="context_length_exceeded")
        policy = body.get("kv_policy") or self.default_policy
        if not isinstance(policy, str) or policy not in self.engines:
            raise APIError(400, f"invalid kv_policy {policy!r}: this server serves {', '.join(self.engines)} "
                                f"(of {', '.join(KV_POLICIES)})", "kv_policy")
        engine = self.engines[policy]
        budget = parse_budget(body, self.engine.n_layers, engine.predictor is not None)
        k = engine.choose_k([ids])[0] if budget == AUTO else budget.k(self.engine.n_layers)
        try:
            engine.planner.check(k, self.engine.n_layers)
        except BudgetError as e:
            raise APIError(400, str(e), "budget") from None
        allocation = body.get("allocation") or ALLOCATIONS[0]
        if not isinstance(allocation, str) or allocation not in ALLOCATIONS:
            raise APIError(400, f"invalid allocation {allocation!r}: must be one of {', '.join(ALLOCATIONS)}",
                           "allocation")
        if allocation == "token" and engine.depth is None:
            raise APIError(400, "allocation 'token' needs a depth head, and this server has none for kv_policy "
                                f"{policy!r} (start it with --depth DIR)", "allocation")
        temperature = body.get("temperature")
        temperature = 1.0 if temperature is None else temperature  # OpenAI's default; 0 is greedy
        top_p = 1.0 if body.get("top_p") is None else body["top_p"]
        seed = 0 if body.get("seed") is None else body["seed"]
        for name, v, lo, hi in (("temperature", temperature, 0, 2), ("top_p", top_p, 1e-9, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise APIError(400, f"invalid {name} {v!r}: must be a number in [{lo:g}, {hi:g}]", name)
        if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64:
            raise APIError(400, f"invalid seed {seed!r}: must be an integer in [-2**63, 2**64)", "seed")
        if body.get("n", 1) != 1:
            raise APIError(400, "only n=1 is supported", "n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise APIError(400, "stop must be a string or a list of at most 4 non-empty strings", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "stream must be true or false", "stream")
        opts = body.get("stream_options") or {}
        return ids, {"k": k, "kv_policy": policy, "max_tokens": max_tokens, "temperature": float(temperature),
                     "top_p": float(top_p), "seed": seed, "stop": stop, "stream": stream, "budget": budget,
                     "allocation": allocation, "include_usage": bool(isinstance(opts, dict) and opts.get("include_usage"))}

    # --- running a request --------------------------------------------------------------------------
    def submit(self, ids: list[int], o: dict) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(kind, payload):
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        req = Request(prompt=ids, k=o["k"], kv_policy=o["kv_policy"], max_tokens=o["max_tokens"], on_event=on_event,
                      temperature=o["temperature"], top_p=o["top_p"], seed=o["seed"], allocation=o["allocation"])
        self.scheduler.submit(req)
        return req, events

    async def pieces(self, req: Request, events: asyncio.Queue, stop: list[str]):
        """Yield text pieces; ends with the finish reason. Applies stop strings (held back until decided)."""
        text, sent = "", 0
        while True:
            kind, payload = await events.get()
            if kind == "token":
                text += payload[0]
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    req.cancel()
                    if cut > sent:
                        yield text[sent:cut]
                    yield ("finish", "stop")
                    return
                hold = max((len(s) - 1 for s in stop), default=0)  # a stop string may still be forming
                safe = len(text) - hold
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            else:
                if payload.startswith("error"):
                    raise APIError(500, f"generation failed ({payload})", kind="server_error")
                if len(text) > sent:
                    yield text[sent:]
                yield ("finish", "length" if payload == "length" else "stop")
                return

    def usage(self, req: Request, ids: list[int], o: dict) -> dict:
        n = len(req.tokens)
        return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n,
                "layers_per_token": round(req.layer_sum / max(n, 1), 3), **budget_echo(o["budget"], o["k"]),
                "allocation": o["allocation"], "kv_policy": o["kv_policy"],
                "planner": self.engines[o["kv_policy"]].planner.name, "n_layers": self.engine.n_layers}


class _Guard:
    """Checks made on the headers before a request reaches a route: Host (loopback servers), API key, content
    type and declared size. A plain ASGI middleware, so a client's disconnect still reaches the route."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    def refusal(self, request: HTTPRequest) -> APIError | None:
        server = self.server
        if server.loopback_only:
            host = request.headers.get("host", "").rsplit(":", 1)[0].strip("[]").lower()
            if host not in LOOPBACK_NAMES:
                return APIError(421, f"this server answers only to this machine (Host {host!r} refused)",
                                code="misdirected_request")
        if server.api_key and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(got, f"Bearer {server.api_key}".encode()):
                return APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")
        if request.method == "POST":
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return APIError(415, f"send the request body as application/json (got {ctype or 'no content type'!r})",
                                code="unsupported_media_type")
            size = request.headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > server.max_body_bytes):
                return APIError(413, f"the request body is larger than {server.max_body_bytes} bytes",
                                code="request_too_large")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (e := self.refusal(HTTPRequest(scope))) is not None:
            return await e.response()(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_):
        server.scheduler.start()
        yield
        server.scheduler.shutdown()

    app = FastAPI(title="Buddy", docs_url=None, redoc_url=None, lifespan=lifespan)

    app.add_middleware(_Guard, server=server)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(404)
    async def _not_found(request, _):
        return APIError(404, f"no route {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request, _):
        return APIError(405, f"method {request.method} not allowed on {request.url.path}").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "active": server.scheduler.active,
                "queued": server.scheduler.queued, "steps": server.scheduler.steps}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "buddy", "n_layers": server.engine.n_layers}]}

    async def body_of(request: HTTPRequest) -> dict:
        raw = bytearray()
        async for part in request.stream():  # also bounds bodies sent without a Content-Length
            raw += part
            if len(raw) > server.max_body_bytes:
                raise APIError(413, f"the request body is larger than {server.max_body_bytes} bytes",
                               code="request_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON ({type(e).__name__})") from None

    async def watch(request: HTTPRequest, req) -> None:
        """Cancel a non-streaming request as soon as its client goes away."""
        while not req.cancelled:
            if await request.is_disconnected():
                req.cancel()
                return
            await asyncio.sleep(0.25)

    async def complete(request: HTTPRequest, chat: bool):
        body = await body_of(request)
        ids, o = await asyncio.to_thread(server.parse, body, chat)  # tokenizing stays off the event loop
        req, events = server.submit(ids, o)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not o["stream"]:
            text, finish = [], "stop"
            watcher = asyncio.create_task(watch(request, req))
            try:
                async for p in server.pieces(req, events, o["stop"]):
                    if isinstance(p, tuple):
                        finish = p[1]
                    else:
                        text.append(p)
            finally:
                req.cancel()
                watcher.cancel()
            out = "".join(text)
            choice = ({"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": finish}
                      if chat else {"index": 0, "text": out, "logprobs": None, "finish_reason": finish})
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": server.model_name, "choices": [choice], "usage": server.usage(req, ids, o)}

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece=None, finish=None, first=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                c = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                c = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": server.model_name,
                                          "choices": [c]}) + "\n\n"

        async def sse():
            try:
                if chat:
                    yield chunk(first=True)
                async for p in server.pieces(req, events, o["stop"]):
                    yield chunk(finish=p[1]) if isinstance(p, tuple) else chunk(p)
                if o["include_usage"]:
                    yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": server.model_name,
                                                 "choices": [], "usage": server.usage(req, ids, o)}) + "\n\n"
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind}}) + "\n\n"
            finally:  # also when the client disconnects: the row is freed at the next step
                req.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await complete(request, chat=True)

    return app
