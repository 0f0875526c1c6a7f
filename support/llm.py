"""The one way this project calls an LLM: an OpenAI-compatible chat-completions endpoint, through the
`openai` client (`pip install -e ".[api]"`), with an on-disk cache, retries and bounded concurrency.

    target = LLM("https://api.mistral.ai/v1", "mistral-small-latest", key_env="MISTRAL_API_KEY", cache=Cache(path))
    for item, answer, error in concurrently(lambda m: target.chat(m, temperature=0), messages, workers=16): ...

- **Cache.** Every answer is kept in one JSONL file, keyed by a hash of the endpoint, the model, the messages
  and the parameters (never the key): a rerun, or a second run that shares some requests, asks nothing twice.
  Lines are appended as answers arrive (a crash loses only what was in flight) and a line cut short is
  skipped on reading.
- **Retries.** 429, 5xx, timeouts, dropped connections and malformed replies are retried with exponential
  backoff and jitter (each wait at most MAX_BACKOFF), honouring Retry-After up to MAX_RETRY_AFTER (a reply
  with no text is asked EMPTY_TRIES times in all, and does not count as the endpoint's failure); after
  max_retries a RequestFailed names the endpoint and why, and the run goes on without that answer, unless
  FAILED_IN_A_ROW requests to the endpoint have failed so in a row (or with a 404/405): then it is down or
  the URL or model is wrong, and the run stops (LLMError) rather than retry every request for hours. A
  refused key stops the run.
- **Before the work.** A URL that is not http(s) with a host is refused when the LLM is made, and `probe()`
  (one GET, no key) tells a server that is not there from one that is, so that a command says so in one
  line before it spends minutes on a prompter or on retries. A command whose answers may all be in the cache
  can go on without the server (`offline`): a request the cache lacks then fails at once.
- **Keys.** Read from the environment only, sent only to the endpoint's own origin (a redirect elsewhere is
  refused), and replaced by *** in every answer, message and file this module writes.
- **Concurrency.** `Pool` (and `concurrently`, for a fixed list) runs calls on daemon threads, taking new work
  while it runs: Ctrl-C returns at once, keeping every answer already cached, and drops only the requests in
  flight.
"""

import hashlib
import json
import os
import queue
import random
import re
import threading
import time
import urllib.parse
from pathlib import Path

from phi2.errors import UsageError

MAX_RETRY_AFTER = 120.0  # seconds: a server's Retry-After is obeyed up to this, so none can hang a run
MAX_BACKOFF = 60.0  # seconds: the longest wait of our own between retries (2**20 of them would be 12 days)
PROBE_TIMEOUT = 10.0  # seconds the probe waits for a connection
MIN_SECRET = 8  # characters: a shorter key is no secret to redact (real ones are 32 or more)
EMPTY_TRIES = 2  # an empty reply is asked again once: a model that answers nothing tends to do so every time
FAILED_IN_A_ROW = 8  # requests to one endpoint that fail for good with none answered between: the run stops
_SURROGATE = re.compile("[\ud800-\udfff]")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi2-prompter" / "llm.jsonl"


class LLMError(UsageError):
    """A call that cannot work at all (a bad URL, no server there, no key, key refused, redirect refused, no
    `openai`): stops the run."""


class RequestFailed(Exception):
    """One request that failed for good (after its retries, or a 4xx); the run goes on without it. endpoint:
    the failure says the endpoint does not work (its retries used up, or a 404/405: a wrong URL or model), not
    that this one request is refused (a 400 for a prompt too long, a content filter)."""

    def __init__(self, message, endpoint=False):
        super().__init__(message)
        self.endpoint = endpoint


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # an environment variable's name; a key may not be one


def shown_key_env(name: str) -> str:
    """A key variable's name as messages show it: only a conventional one (upper case, digits, _; short). Other
    names may be the key itself, given by mistake (gsk_..., hf_... are valid names too), and are not repeated."""
    return name if re.fullmatch(r"[A-Z_][A-Z0-9_]{0,39}", name) else "(its name not repeated: it may be the key)"


class _Retryable(Exception):
    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class _Empty(_Retryable):
    """A reply with no text: the endpoint works, and this request may get none however often it is asked."""


def has_lone_surrogate(text: str) -> bool:
    """Whether text holds half a surrogate pair (JSON's "\\ud800" escape alone): such a string is not Unicode
    text, cannot be encoded as UTF-8, and so can be neither sent to an endpoint nor written to a file."""
    return _SURROGATE.search(text) is not None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def checked_url(url, flag: str = "the URL") -> str:
    """url without its trailing slash, or an LLMError naming flag: a URL without a scheme (127.0.0.1:8000/v1)
    would otherwise be tried for minutes as a connection error, or taken for a redirect to another origin."""
    example = "e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1"
    if not isinstance(url, str) or any(c.isspace() or not c.isprintable() for c in url):
        raise LLMError(f"{flag} {ascii(url)}: not a URL; give an http:// or https:// URL, {example}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise LLMError(f"{flag} {url}: give an http:// or https:// URL with a host, {example}")
    try:
        parts.port  # noqa: B018 (parsing it is the check)
    except ValueError as e:
        raise LLMError(f"{flag} {url}: {e}; give an http:// or https:// URL, {example}") from None
    return url.rstrip("/")


def _origin(url) -> tuple:
    parts = urllib.parse.urlsplit(str(url))
    return parts.scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)


class Cache:
    """Answers by request, in one append-only JSONL file shared by every run that points at it."""

    def __init__(self, path):
        self.path = Path(path)
        self.answers, self.lock = {}, threading.Lock()
        self.cut_short = False  # the file ends inside a line (a crash while writing): end it before appending
        if self.path.exists():
            data = self.path.read_bytes()
            self.cut_short = bool(data) and not data.endswith(b"\n")
            for line in data.splitlines():
                try:
                    record = json.loads(line)
                    answer = record["answer"]
                    if isinstance(answer, str) and not has_lone_surrogate(answer):  # else not ours: asked again
                        self.answers[record["key"]] = answer
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash, or not ours: asked again if needed
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(request: dict) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key):
        return self.answers.get(key)

    def put(self, key, request: dict, answer: str):
        line = json.dumps({"key": key, "request": request, "answer": answer}, ensure_ascii=False) + "\n"
        with self.lock:
            self.answers[key] = answer
            with open(self.path, "ab") as f:
                f.write(b"\n" * self.cut_short + line.encode())
            self.cut_short = False


def add_request_args(p, defaults):
    """The flags of every command that calls an LLM: concurrency, timeout, retries, backoff, cache (the
    defaults from the command's config: it has fields of these names)."""
    from support import cli
    d = defaults
    p.add_argument("--concurrency", type=cli.positive_int, default=d.concurrency, help="requests in flight at most")
    p.add_argument("--timeout", type=cli.positive_float, default=d.timeout, help="seconds per request")
    p.add_argument("--max-retries", type=cli.count, default=d.max_retries, help="retries of a failed request")
    p.add_argument("--retry-base", type=cli.nonnegative_float, default=d.retry_base, help="first backoff, seconds")
    p.add_argument("--cache", default=d.cache, help="JSONL cache of every answer, shared by runs ('' for none)")


def request_settings(cfg, sleep=time.sleep) -> dict:
    """LLM(...)'s keyword arguments from a config holding add_request_args' fields."""
    return dict(cache=Cache(cfg.cache) if cfg.cache else None, timeout=cfg.timeout, max_retries=cfg.max_retries,
                retry_base=cfg.retry_base, sleep=sleep)


class LLM:
    """One model at one OpenAI-compatible endpoint; chat(messages, **params) -> the reply's text."""

    def __init__(self, base_url: str, model: str, key_env: str = "OPENAI_API_KEY", *, cache: Cache | None = None,
                 timeout: float = 60.0, max_retries: int = 6, retry_base: float = 1.0, sleep=time.sleep,
                 flag: str = "the URL", key_flag: str = "the command's --...-key-env flag"):
        """flag, key_flag: how the user gave base_url (--target-url) and key_env (--target-key-env), for the
        messages."""
        self.base_url, self.model, self.key_env = checked_url(base_url, flag), model, key_env
        if not ENV_NAME.fullmatch(key_env):  # perhaps the key itself: not repeated
            raise LLMError(f"{key_flag} takes the name of an environment variable holding the key, not the key itself")
        self.key = os.environ.get(key_env, "")
        if not self.key:
            if shown_key_env(key_env) != key_env:
                raise LLMError(f"the API key for {self.base_url} is not in the environment variable given to "
                               f"{key_flag} (its name is not repeated: it may be the key itself); set it, or name "
                               "another variable (a server that needs no key takes any value)")
            raise LLMError(f"the API key for {self.base_url} goes in the environment variable {key_env} (name "
                           f"another one with {key_flag}; a server that needs no key takes any value, e.g. "
                           f"{key_env}=unused); it is not set")
        self.cache, self.max_retries, self.retry_base, self.sleep = cache, max_retries, retry_base, sleep
        self.timeout = timeout
        self.requests = 0  # sent to the endpoint (cache misses and retries), for the tests and the summary
        self.offline = None  # why the endpoint is not asked ("cannot reach ..."; set by the command): the cache
        # alone answers
        self.failed_in_a_row, self.count_lock = 0, threading.Lock()
        try:
            import openai
        except ImportError:
            raise LLMError("calling an LLM needs the openai client: pip install -e \".[api]\"") from None
        self.openai = openai
        origin = _origin(self.base_url + "/")

        def same_origin(request):  # every request, redirects included: the key goes to no other host
            if _origin(request.url) != origin:
                raise LLMError(f"{self.base_url} redirected to another origin, {request.url.netloc.decode()}; "
                               "refused, so that the API key goes nowhere else: give the final URL")

        # plain http (a local server) needs no TLS context: building one loads the CA store, 90 ms
        tls = {} if origin[0] == "https" else {"verify": False}
        self.http = openai.DefaultHttpxClient(event_hooks={"request": [same_origin]}, timeout=timeout, **tls)
        self.client = openai.OpenAI(api_key=self.key, base_url=self.base_url, max_retries=0, timeout=timeout,
                                    http_client=self.http)

    def probe(self):
        """One GET of {base_url}/models, without the key and through the client's own proxies: any HTTP answer,
        an error status included, means a server is there (the first request checks the rest); a refused
        connection, an unknown host or no connection within PROBE_TIMEOUT is an LLMError naming the URL, where
        every request would otherwise be retried for minutes after the expensive work is done."""
        try:
            self.http.get(self.base_url + "/models", follow_redirects=False, timeout=min(self.timeout, PROBE_TIMEOUT))
        except Exception as e:  # by name: the client's transport is httpx, or httpx2 in newer openai releases
            kinds = {kind.__name__ for kind in type(e).__mro__}
            if kinds & {"ConnectError", "ConnectTimeout", "ProxyError", "UnsupportedProtocol"}:
                raise LLMError(f"cannot reach {self.base_url} ({self.redact(_one_line(e))}): is the server "
                               "running there, and is the URL right?") from None
            if "HTTPError" not in kinds:
                raise
            # connected, but the answer was slow or not quite HTTP: the requests' retries deal with that

    def redact(self, text: str) -> str:
        """text with the key replaced by ***; a key too short to be a secret (a local server's "unused") is
        left, or every word that spells it would be damaged."""
        return text.replace(self.key, "***") if len(self.key) >= MIN_SECRET else text

    def cached(self, messages: list[dict], **params) -> bool:
        """Whether chat(messages, **params) would be answered from the cache."""
        return bool(self.cache) and self.cache.get(Cache.key(self._request(messages, params))) is not None

    def _request(self, messages, params) -> dict:
        return {"endpoint": self.base_url, "model": self.model, "messages": messages, "params": params}

    def chat(self, messages: list[dict], keep=None, **params) -> str:
        """The reply to messages, from the cache or the endpoint (with retries). With keep, a cached reply for
        which keep(reply) is false (a judge's reply without a verdict) is asked again, unless offline."""
        request = self._request(messages, params)
        try:  # the key's encoding also proves the request is Unicode text, as UTF-8 JSON needs
            key = Cache.key(request)
        except UnicodeEncodeError:
            raise RequestFailed(f"{self.base_url}: the request holds a lone surrogate (half a UTF-16 pair), "
                                "which is not text and cannot be sent") from None
        cached = self.cache.get(key) if self.cache else None
        if cached is not None and (keep is None or self.offline or keep(cached)):
            return cached
        if self.offline:  # (not counted below: the endpoint was never asked)
            raise RequestFailed(f"{self.offline}, and this request is not in the cache")
        try:
            answer = self._ask(messages, params)
        except RequestFailed as e:
            with self.count_lock:
                self.failed_in_a_row = self.failed_in_a_row + 1 if e.endpoint else 0
                if self.failed_in_a_row >= FAILED_IN_A_ROW:
                    raise LLMError(f"{e}; stopping: {self.failed_in_a_row} requests in a row to {self.base_url} "
                                   "failed so; rerun once it answers") from None
            if cached is not None:
                return cached  # asked again, in vain: the reply it had stands
            raise
        with self.count_lock:
            self.failed_in_a_row = 0
        if self.cache:
            self.cache.put(key, request, answer)
        return answer

    def _ask(self, messages, params) -> str:
        """The endpoint's reply, after up to max_retries retries, or a RequestFailed."""
        last, empty = None, 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.sleep(max(self.backoff(attempt), min(last.retry_after or 0.0, MAX_RETRY_AFTER)))
            try:
                return self._call(messages, params)
            except _Retryable as e:
                last, empty = e, empty + isinstance(e, _Empty)
                if empty >= EMPTY_TRIES:  # not the endpoint's failure: no count towards stopping the run
                    raise RequestFailed(f"{self.base_url}: the reply was empty {empty} times") from None
        raise RequestFailed(f"{self.base_url}: gave up after {self.max_retries} retries: {last}",
                            endpoint=not isinstance(last, _Empty))

    def backoff(self, attempt: int) -> float:
        """The wait before retry number attempt (1, 2, ...): retry_base doubling each time up to MAX_BACKOFF,
        times a jitter of 0.5 to 1, so that clients that failed together do not retry together. The exponent
        stops growing long before a float would overflow."""
        return min(self.retry_base * 2.0 ** min(attempt - 1, 64), MAX_BACKOFF) * random.uniform(0.5, 1.0)

    def _call(self, messages, params) -> str:
        openai = self.openai
        self.requests += 1
        try:  # the client's plain post: its auth, errors and connection pool, without its typed request and
            # reply models, which cost 6 ms of CPU a request against 3 (the GIL's ceiling on concurrency)
            reply = self.client.post("/chat/completions", body={"model": self.model, "messages": messages, **params},
                                     cast_to=object)
        except (json.JSONDecodeError, UnicodeDecodeError):  # a JSON content type on a body that is not JSON text
            raise _Retryable("the reply was not valid JSON") from None
        except openai.APIStatusError as e:
            status = e.status_code
            # the server's message without the client's "Error code: NNN - " (else the body it sent)
            detail = re.sub(r"^Error code: \d+( - )?", "", str(e)) or " ".join(e.response.text.split())
            detail = self.redact(detail)[:200]
            if status in (401, 403):
                raise LLMError(f"{self.base_url} refused the API key (HTTP {status}); check ${self.key_env}") \
                    from None
            if status == 429 or status >= 500:
                raise _Retryable(f"HTTP {status} {detail[:120]}", _retry_after(e.response.headers)) from None
            hint = (f" (is {self.base_url} the API's base URL, which usually ends in /v1, and {self.model!r} a model "
                    "it serves?)" if status in (404, 405) else "")
            raise RequestFailed(f"{self.base_url}: HTTP {status} {detail}{hint}", endpoint=bool(hint)) \
                from None
        except openai.APIConnectionError as e:  # refused, dropped, timed out, malformed reply
            cause = e.__cause__
            while cause is not None and not isinstance(cause, LLMError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from None  # the redirect refusal, as it was raised
            why = f" ({_one_line(e.__cause__)})" if e.__cause__ is not None else ""
            raise _Retryable(self.redact(f"{type(e).__name__}: {e}{why}")) from None
        except openai.APIError as e:  # a 200 whose body is not a completion
            raise _Retryable(self.redact(f"{type(e).__name__}: {e}")) from None
        if isinstance(reply, (str, bytes)):  # a JSON body sent without a JSON content type
            try:
                reply = json.loads(reply)
            except ValueError:
                raise _Retryable("the reply was not JSON") from None
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _Retryable("the reply had no choices[0].message.content") from None
        if not isinstance(text, str) or not text.strip():
            raise _Empty("the reply was empty")
        # a server that echoes the key gets it written as *** and nowhere else; half a surrogate pair (a "\\ud800"
        # escape alone) is no text, and would stop the cache and every file from being written
        return _SURROGATE.sub("\ufffd", self.redact(text.strip()))


def _retry_after(headers) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the backoff decides


class Pool:
    """call(item) on at most `workers` daemon threads; results() yields (item, result, error) as each call
    finishes, including those of items submitted while it runs (evaluate.py asks an item's judgments as soon
    as its answers are in). The waiting wakes twice a second, so Ctrl-C stops at once; the threads end when
    results() does, after the calls they are in."""

    def __init__(self, call, workers: int):
        self.call, self.workers, self.threads = call, workers, 0
        self.todo, self.done = queue.SimpleQueue(), queue.SimpleQueue()
        self.pending = 0  # submitted and not yet yielded

    def submit(self, item):
        self.pending += 1
        self.todo.put(item)
        if self.threads < min(self.workers, self.pending):  # a thread per call in flight, up to `workers`
            self.threads += 1
            threading.Thread(target=self._work, daemon=True).start()

    def _work(self):
        while (item := self.todo.get()) is not _STOP:
            try:
                self.done.put((item, self.call(item), None))
            except Exception as e:  # LLMError included: the caller decides
                self.done.put((item, None, e))

    def results(self):
        try:
            while self.pending:
                try:
                    result = self.done.get(timeout=0.5)
                except queue.Empty:
                    continue
                self.pending -= 1
                yield result
        finally:  # work not started is dropped (after Ctrl-C, or when the caller stops early)
            while True:
                try:
                    self.todo.get_nowait()
                except queue.Empty:
                    break
            for _ in range(self.threads):
                self.todo.put(_STOP)
            self.threads = 0


_STOP = object()


def concurrently(call, items, workers: int):
    """(item, result, error) for each item as its call(item) finishes, with at most `workers` calls at once."""
    pool = Pool(call, workers)
    for item in items:
        pool.submit(item)
    yield from pool.results()
