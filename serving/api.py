"""The OpenAI API over the engine: request checking, the routes (plain functions), replies and SSE streams,
auth, the access log, and the browser-facing guards.

`GET /v1/models` lists one model per head (named by its target) and `base` (stage 1 alone); `GET
/v1/models/{id}` answers as OpenAI does; `GET /health` says the server is up and how busy. `POST
/v1/chat/completions` rewrites the last user message, `POST /v1/completions` the prompt: the reply is the
rewrite. temperature, top_p, max_tokens, stop, seed (choice i of n samples with seed + i), n and stream behave
as OpenAI documents them. A chat request for a model with an upstream goes to the proxy (serving/proxy.py).

A web page the user visits must not be able to use the server: bodies are read only with a JSON content type
(a cross-site form or text/plain POST needs no preflight), the Host header must name the server (DNS
rebinding), a browser's Origin must be allowed, and no CORS header is sent unless --cors-origin asks.
Talks to the engine through submit(), Request.cancel() and waiting() only.
"""

import asyncio
import hmac
import ipaddress
import json
import math
import sys
import time
import urllib.parse
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from prompts import format_prompt
from serving.engine import Request as Job

MAX_BODY = 1 << 20  # bytes of request JSON
BODY_TIMEOUT = 30.0  # seconds for a request body to arrive
MAX_STOP, MAX_N = 4, 16  # as OpenAI
MAX_STOP_CHARS = 1000  # a stop string longer than any reply could hold only slows every step


class APIError(Exception):
    """Sent as OpenAI's error JSON with this HTTP status."""

    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers or {}

    def body(self):
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------ checking requests


def _number(body, name, kind, low, high, default):
    value = body.get(name, default)
    if value is None:
        return default
    ok_type = isinstance(value, int) and not isinstance(value, bool) or (
        isinstance(value, float) and math.isfinite(value) and (kind is float or value.is_integer()))
    if not ok_type or value < low or value > high:
        bound = f"at least {low} and at most {high}"
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'} {bound}; got "
                            f"{json.dumps(value)[:40]}", param=name, code="invalid_value")
    return kind(value)


@dataclass
class Settings:
    model: str
    n: int
    max_tokens: int | None
    temperature: float
    top_p: float | None
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def settings_of(body: dict, models) -> Settings:
    """The request's common fields, checked as OpenAI checks them (400 on a bad one, 404 on an unknown model)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required: one of " + ", ".join(models), param="model")
    if model not in models:
        raise APIError(404, f"The model '{model[:100]}' does not exist; this server has " + ", ".join(models),
                       param="model", code="model_not_found")
    for name in ("tools", "functions", "suffix", "logprobs", "echo"):
        if body.get(name):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"each stop string may be at most {MAX_STOP_CHARS} characters", param="stop")
    stream = body.get("stream")
    stream = False if stream is None else stream  # null as OpenAI takes it: not streamed
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "'stream' must be true or false, 'stream_options' an object", param="stream")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return Settings(
        model=model, n=_number(body, "n", int, 1, MAX_N, 1),
        max_tokens=None if max_tokens is None else _number({"max_tokens": max_tokens}, "max_tokens", int, 1, 1 << 20,
                                                           None),
        temperature=_number(body, "temperature", float, 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", float, 0.0, 1.0, None),  # 0: the most likely token only
        seed=_number(body, "seed", int, -(2**63), 2**63 - 1, None), stop=stop, stream=stream,
        include_usage=bool(options.get("include_usage")))


ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's


def last_user_message(body: dict) -> tuple[int, str]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}; got "
                                f"{json.dumps(message.get('role'))[:40]}", param=f"messages[{i}].role")
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            content = messages[i].get("content")
            if isinstance(content, list):  # text parts
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, "only text parts can be rewritten", param=f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str) or not content.strip():
                raise APIError(400, "the last user message has no text to rewrite", param=f"messages[{i}].content")
            return i, content
    raise APIError(400, "no user message to rewrite", param="messages")


def usage(prompt_tokens, completion_tokens) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse_line(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------ the API's state


class API:
    """What the routes share: the engine, the limits, the key, the allowed hosts and origins, the proxy."""

    def __init__(self, engine, max_queue=64, max_tokens=256, api_key=None, proxy=None, hosts=None, origins=(),
                 log_prompts=False, log=None):
        self.engine, self.max_queue, self.max_tokens, self.api_key = engine, max_queue, max_tokens, api_key
        self.proxy = proxy
        self.hosts = hosts  # allowed Host header values (lower case, without the port); None: any
        self.origins = set(origins)
        self.log_prompts, self.log = log_prompts, log  # the access log's stream; None: stderr
        self.models = list(engine.heads)
        self.started = time.time()

    def check_auth(self, request):
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given:
            raise APIError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    def check_browser(self, request):
        """403 for a Host this server is not (DNS rebinding) and for a web page's Origin it does not allow."""
        host = host_name(request.headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            raise APIError(403, f"Host '{host[:100]}' is not this server's; add it with --allowed-host if it is",
                           code="host_not_allowed")
        origin = request.headers.get("origin")
        if origin and origin not in self.origins and (self.hosts is None or host_name(
                urllib.parse.urlsplit(origin).netloc) not in self.hosts):
            raise APIError(403, f"requests from web pages at {origin[:100]} are not allowed; allow them with "
                                "--cors-origin", code="origin_not_allowed")

    async def read_json(self, request) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):
            raise APIError(415, "send the request body as JSON, with Content-Type: application/json")

        async def read():
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    raise APIError(413, f"the request body is over {MAX_BODY} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            data = await asyncio.wait_for(read(), BODY_TIMEOUT)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT:.0f} s") from None
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def jobs_for(self, text: str, s: Settings, count: int) -> tuple[list[Job], int]:
        """count requests to the engine rewriting text (choice i samples with seed + i), and the prompt's tokens."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the text holds an unpaired surrogate (\\ud800-\\udfff); send valid UTF-16 pairs") \
                from None
        ids = self.engine.tokenizer.encode(format_prompt(text))
        context = self.engine.context
        if len(ids) >= context:
            raise APIError(413, f"the prompt is {len(ids)} tokens with the template; the context is {context}",
                           code="context_length_exceeded")
        max_tokens = s.max_tokens or min(self.max_tokens, context - len(ids))
        if len(ids) + max_tokens > context:
            raise APIError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) exceed the context "
                                f"of {context} tokens; ask for at most {context - len(ids)}",
                           param="max_tokens", code="context_length_exceeded")
        return [Job(ids, s.model, max_tokens, s.temperature, s.top_p, None if s.seed is None else s.seed + i,
                    s.stop) for i in range(count)], len(ids)

    def enqueue(self, jobs: list[Job]) -> asyncio.Queue:
        """Submit the jobs, or refuse them (400: they could never run; 503: the queue is full); the queue their
        events arrive on as (choice index, event), listened to before the engine can see them."""
        if len(jobs) > self.max_queue:  # would never fit: not a matter of waiting
            raise APIError(400, f"{len(jobs)} choices in one request; this server queues at most {self.max_queue}",
                           param="n")
        slots = sum(job.slots for job in jobs)
        if slots > self.engine.kv_slots:
            raise APIError(400, f"the request needs {slots} KV cache slots (prompt and max_tokens, for each of its "
                                f"choices); this server holds at most {self.engine.kv_slots}: ask for fewer "
                                "max_tokens or choices", param="max_tokens")
        waiting = self.engine.waiting()
        if waiting + len(jobs) > self.max_queue:
            raise APIError(503, f"the server is busy ({waiting} of at most {self.max_queue} choices waiting); "
                                "retry shortly",
                           type_="server_error", code="queue_full", headers={"Retry-After": "1"})
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        for i, job in enumerate(jobs):
            job.on_event = lambda *event, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, event))
        self.engine.submit(jobs)
        return queue

    @staticmethod
    async def events(jobs: list[Job], queue: asyncio.Queue, request):
        """(choice index, event) as the jobs produce them, until each is done; cancels them all if the client
        disconnects or the consumer stops."""
        done, checked = 0, time.monotonic()
        try:
            while done < len(jobs):
                try:
                    i, event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    i = event = None
                if time.monotonic() - checked >= 0.5:  # twice a second, tokens flowing or not
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        request.state.record["status"] = 499  # as nginx logs it: not delivered (the client left)
                        return
                if event is None:
                    continue
                if event[0] == "error":
                    raise RuntimeError(event[1])
                done += event[0] == "done"
                yield i, event
        finally:
            for job in jobs:
                job.cancel()  # a no-op for finished rows; frees the batch slot of the others

    async def complete(self, request, prompts: list[str], s: Settings, chat: bool):
        """The reply (or stream) for prompts x n choices."""
        jobs, prompt_tokens = [], 0
        for text in prompts:
            more, count = self.jobs_for(text, s, s.n)
            jobs += more
            prompt_tokens += count
        record = request.state.record
        record.update(model=s.model, prompt_tokens=prompt_tokens, completion_tokens=0)
        if self.log_prompts:
            record["prompt"] = prompts if len(prompts) > 1 else prompts[0]
        queue = self.enqueue(jobs)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": s.model}
        if s.stream:
            return StreamingResponse(self.stream(request, jobs, queue, head, chat, s, prompt_tokens),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, finish = [""] * len(jobs), [None] * len(jobs)
        async for i, event in self.events(jobs, queue, request):
            if event[0] == "text":
                texts[i] += event[1]
            else:
                finish[i] = event[1]
                record["completion_tokens"] += event[2]
        if any(f is None for f in finish):
            return None  # the client left
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": f} if chat else {"index": i, "text": t, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish))]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage(prompt_tokens, record["completion_tokens"])}

    async def stream(self, request, jobs, queue, head, chat, s, prompt_tokens):
        def chunk(i, delta=None, text=None, finish=None):
            choice = {"index": i, "delta": delta} if chat else {"index": i, "text": text or "", "logprobs": None}
            return {**head, "choices": [{**choice, "finish_reason": finish}]}

        record = request.state.record
        if chat:
            for i in range(len(jobs)):
                yield sse_line(chunk(i, {"role": "assistant", "content": ""}))
        try:
            async for i, event in self.events(jobs, queue, request):
                if event[0] == "text":
                    yield sse_line(chunk(i, {"content": event[1]}, text=event[1]))
                else:
                    record["completion_tokens"] += event[2]
                    yield sse_line(chunk(i, {}, finish=event[1]))
        except RuntimeError as e:  # the decoder failed: said in the log, never to the client
            print(f"serve.py: {request.url.path}: {e}", file=sys.stderr)
            record["status"] = 500
            yield sse_line(APIError(500, "internal error", type_="server_error").body())
            return
        except (asyncio.CancelledError, GeneratorExit):  # closed mid-way: the client left, or the server stopped
            record["status"] = 499
            raise
        if s.include_usage:
            yield sse_line({**head, "choices": [], "usage": usage(prompt_tokens, record["completion_tokens"])})
        yield "data: [DONE]\n\n"

    async def rewrite(self, request, text: str, model: str) -> str:
        """The greedy rewrite of text by model's head (the proxy's)."""
        s = Settings(model, 1, None, 0.0, None, None, [], False, False)
        jobs, _ = self.jobs_for(text, s, 1)
        queue = self.enqueue(jobs)
        out = ""
        async for _, event in self.events(jobs, queue, request):
            if event[0] == "text":
                out += event[1]
        return out

    def access_line(self, request, record: dict, status: int, seconds: float) -> str:
        """One line per request: time, method and route, model, status, tokens, latency (and the prompt with
        --log-prompts)."""
        fields = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "method": request.method, "path": request.url.path,
                  "status": record.get("status", status), "ms": round(seconds * 1000, 1),
                  **{k: v for k, v in record.items() if k != "status"}}
        return json.dumps(fields, ensure_ascii=False)


def host_name(host: str) -> str:
    """A Host header (or an origin's netloc) without its port, lower case; IPv6 in brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(bound: str, extra=()) -> set | None:
    """The Host values a server bound to `bound` answers: that address and the names of this machine's
    loopback; None (any) for a wildcard address unless extra names some."""
    try:
        wildcard = ipaddress.ip_address(bound).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard and not extra:
        return None
    names = {"localhost", "127.0.0.1", "[::1]", host_name(f"[{bound}]" if ":" in bound else bound)}
    return names | {host_name(h) for h in extra}


# ------------------------------------------------------------------------------------------- the routes


async def list_models(request: Request):
    api = request.app.state.api
    api.check_auth(request)
    return {"object": "list", "data": [model_card(m) for m in api.models]}


async def get_model(request: Request):
    api = request.app.state.api
    api.check_auth(request)
    model = request.path_params["model"]
    if model not in api.models:
        raise APIError(404, f"The model '{model[:100]}' does not exist", param="model", code="model_not_found")
    return model_card(model)


def model_card(model: str) -> dict:
    return {"id": model, "object": "model", "created": 0, "owned_by": "phi2-prompter"}


async def health(request: Request):
    api = request.app.state.api
    engine = api.engine
    return {"status": "ok", "models": api.models, "running": len(engine.rows), "waiting": engine.waiting(),
            "uptime_s": round(time.time() - api.started, 1)}


async def chat_completions(request: Request):
    api = request.app.state.api
    api.check_auth(request)
    body = await api.read_json(request)
    model = body.get("model")
    if api.proxy and isinstance(model, str) and model in api.proxy.upstreams:  # the upstream checks the rest
        request.state.record["model"] = model
        return await api.proxy.forward(request, body, model, api.rewrite)
    s = settings_of(body, api.models)
    _, text = last_user_message(body)
    return await api.complete(request, [text], s, chat=True)


async def completions(request: Request):
    api = request.app.state.api
    api.check_auth(request)
    body = await api.read_json(request)
    s = settings_of(body, api.models)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if (not isinstance(prompts, list) or not prompts or len(prompts) * s.n > MAX_N
            or not all(isinstance(p, str) and p.strip() for p in prompts)):
        raise APIError(400, f"'prompt' must be a non-empty string or a list of them (at most {MAX_N} choices "
                            "in all)", param="prompt")
    return await api.complete(request, prompts, s, chat=False)


async def api_error(request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def http_error(request, e: HTTPException):  # unknown routes, wrong methods
    return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


async def crash(request, e: Exception):  # never a traceback to the client; the server goes on
    print(f"serve.py: {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr)
    return JSONResponse(APIError(500, "internal error", type_="server_error").body(), status_code=500)


def build_app(api: API) -> FastAPI:
    app = FastAPI(title="phi2-prompter", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])

    @app.middleware("http")
    async def guard_and_log(request: Request, call_next):
        """The browser guards first; then one access-log line per request, once its body has been sent."""
        start, request.state.record = time.perf_counter(), {}
        try:
            api.check_browser(request)
            response = await call_next(request)
        except APIError as e:
            response = await api_error(request, e)

        def log():
            line = api.access_line(request, request.state.record, response.status_code, time.perf_counter() - start)
            stream = api.log or sys.stderr
            stream.write(line + "\n")  # one write: a line printed by a signal handler never lands inside it
            stream.flush()

        body = getattr(response, "body_iterator", None)
        if body is None:
            log()
            return response

        async def logged():
            try:
                async for piece in body:
                    yield piece
            except (asyncio.CancelledError, GeneratorExit):  # cut: the client left, or the server stopped
                request.state.record["status"] = 499
                raise
            finally:
                log()

        response.body_iterator = logged()
        return response

    if api.origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=sorted(api.origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app
