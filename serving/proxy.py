"""The prompt-optimising proxy: a chat request for model NAME goes to NAME's upstream (any OpenAI-compatible
endpoint) with its last user message rewritten by NAME's head and every other field unchanged. The upstream's
reply comes back as it came, its status and headers included (hop-by-hop ones aside), the rewrite in the
X-Optimized-Prompt header (URL-encoded), and the upstream's API key replaced by *** wherever it shows: in
headers, in bodies, and inside JSON strings however they escape it, SSE lines included.

Kept apart from the rest of the server so that what touches the key can be read alone: the key is read from
the environment at start-up, sent only to its upstream (no redirects followed), and never logged.
"""

import json
import re
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
from fastapi.responses import Response, StreamingResponse

from phi2.errors import UsageError

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "te",
              "trailer", "upgrade", "proxy-authenticate", "proxy-authorization",  # httpx decodes the body
              "date", "server"}  # uvicorn sets its own
SSE_FIELD = re.compile(rb"^(data|event|id|retry):\x20?")  # an SSE line's field; the space is optional


def redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


def redact_body(data: bytes, key: str | None) -> bytes:
    """data with the key replaced by ***: as bytes, and inside JSON strings however they escape it (a whole
    JSON body, or the JSON of one SSE line); what holds no key, even escaped, passes as it came."""
    if not key:
        return data
    field = SSE_FIELD.match(data)
    prefix, rest = (data[:field.end()], data[field.end():]) if field else (b"", data)
    try:  # parsed before anything is replaced: a replacement could break an escape that spells the key
        text = json.dumps(json.loads(rest), ensure_ascii=False)
    except (ValueError, RecursionError):
        return data.replace(key.encode(), b"***")
    escaped = json.dumps(key, ensure_ascii=False)[1:-1]  # the key as it shows inside a JSON string
    if key in text or escaped in text:
        data = prefix + text.replace(escaped, "***").replace(key, "***").encode()
    return data.replace(key.encode(), b"***")


class ProxyLog:
    """One JSON line per proxied request (original, rewrite, timing, status), appended to --log. Its folder is
    checked at start-up; a write that fails later is said on stderr and never costs the client its answer."""

    def __init__(self, path):
        self.path, self.lock = Path(path), threading.Lock()
        try:
            with open(self.path, "a", encoding="utf-8"):
                pass
        except OSError as e:
            raise UsageError(f"--log {self.path}: cannot write there ({e.strerror}); create its folder or choose "
                             "another file") from None

    def write(self, record: dict):
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}, ensure_ascii=False)
        try:
            with self.lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:
            print(f"serve.py: --log {self.path}: {e.strerror}; the request was answered, not logged", file=sys.stderr)


class Proxy:
    """upstreams: {name: (url, upstream model, key or None)}."""

    def __init__(self, upstreams: dict, timeout: float = 600.0, log: ProxyLog | None = None):
        self.upstreams, self.timeout, self.log = upstreams, timeout, log

    async def forward(self, request, body: dict, name: str, rewrite):
        """Forward a chat request to NAME's upstream with its last user message rewritten by
        rewrite(request, text, name); what the upstream answers comes back as it came, key redacted."""
        from serving.api import APIError, last_user_message

        url, upstream_model, key = self.upstreams[name]
        t0 = time.perf_counter()
        try:
            i, original = last_user_message(body)
            new = await rewrite(request, original, name)
        except APIError as e:
            if e.status not in (400, 413):
                raise  # 503 (busy): the client retries
            i, original, new = None, None, None  # nothing we can rewrite (no text, too long): sent as it came
        rewrite_ms = (time.perf_counter() - t0) * 1000
        if await request.is_disconnected():  # the client left during the rewrite: spend no upstream call
            return None
        forwarded = {**body, "model": upstream_model}
        if new:
            forwarded["messages"] = [dict(m) for m in body["messages"]]
            forwarded["messages"][i]["content"] = new
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        t1 = time.perf_counter()

        def log(status):
            if self.log:
                self.log.write({"model": name, "original": original, "rewrite": new, "rewrite_ms": round(rewrite_ms, 1),
                                "upstream_ms": round((time.perf_counter() - t1) * 1000, 1), "status": status})

        try:
            upstream = await client.send(client.build_request("POST", url + "/chat/completions", json=forwarded,
                                                              headers=headers), stream=True)
            passed = {k: redact(v, key) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            if new:
                passed["X-Optimized-Prompt"] = urllib.parse.quote(new)
            if not body.get("stream") or upstream.status_code != 200:
                content = redact_body(await upstream.aread(), key)
                await upstream.aclose()
                await client.aclose()
                log(upstream.status_code)
                return Response(content, status_code=upstream.status_code, headers=passed)
        except httpx.HTTPError as e:
            await client.aclose()
            log(502)
            raise APIError(502, f"the upstream for '{name}' failed ({type(e).__name__})", type_="upstream_error") \
                from None

        async def passthrough():  # line by line, so that a key split across chunks is still caught
            status = 200
            try:
                async for line in upstream.aiter_lines():
                    yield redact_body(line.encode(), key) + b"\n"
            except httpx.HTTPError:
                status = 502  # cut short upstream: the client sees the stream end without [DONE]
            finally:
                await upstream.aclose()
                await client.aclose()
                log(status)

        return StreamingResponse(passthrough(), status_code=200, headers=passed)
