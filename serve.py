"""The prompter behind the OpenAI API, and a prompt-optimising proxy in front of any OpenAI-compatible LLM.

    python serve.py --lora runs/sft/best --head mistral.safetensors --head gpt4o.safetensors --port 8000
    python serve.py --lora runs/sft/best --head mistral.safetensors --upstream mistral=https://api.mistral.ai/v1 \\
        --upstream-model mistral=mistral-small-latest --upstream-key-env mistral=MISTRAL_API_KEY

`GET /v1/models` lists one model per head (named by its target) and `base` (stage 1 alone). `POST
/v1/chat/completions` rewrites the last user message, `POST /v1/completions` the prompt: the reply is the
rewrite. temperature, top_p, max_tokens, stop, seed (choice i of n samples with seed + i), n and stream
behave as OpenAI documents them. With --upstream NAME=URL, a chat request for model NAME is forwarded
to that LLM with its last user message rewritten by NAME's head and every other field unchanged; the
upstream's reply comes back as it came, the rewrite in the X-Optimized-Prompt header (URL-encoded).

Continuous batching: one thread decodes up to --max-batch rows together, sharing the body's forward pass,
each row with its own head, sampling, stop strings and length; a request that arrives while rows decode is
prefilled and joins them at the next step, and a row that finishes leaves. A row is what the request gets
alone.
Needs the [serve] extra (FastAPI, uvicorn, httpx). Binds 127.0.0.1 unless --host says otherwise.
"""

import asyncio
import collections
import hmac
import json
import math
import os
import random
import re
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cli
import hardware
from head_adapter import load_head, load_prompter
from phi2.errors import UsageError
from phi2.generation import left_padding, next_text, sample
from phi2.tokenizer import pad
from prompts import format_prompt

MAX_BODY = 1 << 20  # bytes of request JSON
BODY_TIMEOUT = 30.0  # seconds for a request body to arrive
MAX_STOP, MAX_N = 4, 16  # as OpenAI
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's finish_reason


@dataclass
class ServeConfig:
    model: str | None = None
    lora: str | None = None
    heads: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_tokens: int = 256  # when a request gives none
    device: str = "auto"
    precision: str = "auto"
    upstream: list[str] = field(default_factory=list)  # NAME=URL
    upstream_model: list[str] = field(default_factory=list)  # NAME=MODEL
    upstream_key_env: list[str] = field(default_factory=list)  # NAME=VAR
    upstream_timeout: float = 600.0
    log: str | None = None


def parse_args(argv=None) -> ServeConfig:
    p = cli.parser(__doc__)
    p.add_argument("--model", help="base checkpoint folder (default: the --lora adapter's base)")
    p.add_argument("--lora", help="stage-1 LoRA adapter folder, e.g. runs/sft/best")
    p.add_argument("--head", dest="heads", action="append", default=[], help="a stage-2 head file (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=cli.count, default=8000, help="0: any free port")
    p.add_argument("--api-key-env", help="require `Authorization: Bearer <the value of this variable>`")
    p.add_argument("--max-batch", type=cli.positive_int, default=16, help="rows decoded together at most")
    p.add_argument("--max-queue", type=cli.positive_int, default=64,
                   help="requests waiting at most; more get 503 with Retry-After")
    p.add_argument("--max-tokens", type=cli.positive_int, default=256, help="for requests that give none")
    cli.add_hardware_args(p)
    p.add_argument("--upstream", action="append", default=[], metavar="NAME=URL",
                   help="proxy: forward chat requests for model NAME to this OpenAI-compatible endpoint")
    p.add_argument("--upstream-model", action="append", default=[], metavar="NAME=MODEL",
                   help="the model name the upstream knows (default: NAME)")
    p.add_argument("--upstream-key-env", action="append", default=[], metavar="NAME=VAR",
                   help="the environment variable holding the upstream's API key")
    p.add_argument("--upstream-timeout", type=cli.positive_float, default=600.0, help="seconds per upstream call")
    p.add_argument("--log", help="proxy: append one JSON line per request (original, rewrite, timing)")
    cfg = ServeConfig(**vars(p.parse_args(argv)))
    if cfg.port > 65535:
        raise UsageError(f"--port {cfg.port}: ports go up to 65535")
    return cfg


# ---------------------------------------------------------------------------------------------- the engine


class Job:
    """One row to decode: the template's ids, the model (head) name, its sampling and stop settings; the
    decoding thread sends ("text", piece) and then ("done", finish, new tokens) to `events`."""

    def __init__(self, ids, model, max_tokens, temperature=0.0, top_p=None, seed=None, stop=(), loop=None):
        self.ids, self.model, self.max_tokens = ids, model, max_tokens
        self.temperature, self.top_p, self.stop = temperature, top_p, list(stop)
        self.seed = random.randrange(2**63) if seed is None else seed
        self.loop = loop or asyncio.get_running_loop()
        self.events = asyncio.Queue()
        self.cancelled = threading.Event()  # the client went away: the row stops counting
        self.out, self.sent, self.finish = [], "", None
        self.generator = None  # its sampling's own random stream, made when it joins the rows

    def emit(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def going(self) -> bool:
        return self.finish is None and not self.cancelled.is_set()


class Prefix:
    """The ids every prompt starts with (the template's, up to the prompt itself) and their keys and values
    at each layer: computed once, copied into every prefill."""

    def __init__(self, model, tokenizer):
        a, b = (tokenizer.encode(format_prompt(text)) for text in ("a", "b"))
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        self.ids, self.kv = a[:n], []
        if n:
            device = model.lm_head.weight.device
            with torch.inference_mode():
                model.setup_kv_cache(1, n, device=device)
                model.hidden_states(torch.tensor([self.ids], device=device), torch.arange(n, device=device), kv_len=n)
                self.kv = [(cache.k, cache.v) for cache in model.kv_caches()]  # each (1, H_kv, n, D)
                model.clear_kv_cache()


class Rows:
    """The rows decoding together, each at its own length. Row r's tokens fill the last lengths[r] of the
    cache's slots [0, P), left-padded as phi2.generation.generate pads a prompt set, so that every row writes
    its next token at slot P and one forward pass steps them all. Rows join (their prompts prefilled in a
    cache of their own, then copied in) and leave between steps; the cache is rebuilt then, to the slots
    the rows still need."""

    def __init__(self, model):
        self.model, self.device = model, model.lm_head.weight.device
        self.jobs, self.lengths, self.P = [], [], 0
        self.h = None  # (B, C): each row's last hidden state, which its next token comes from
        self.start = self.positions = None  # (B,) each row's first slot; (B, 1) its next rotary position

    def span(self, joining=()) -> int:
        """The cache slots the rows, and `joining` were they to join, need to finish."""
        return _span(self.lengths + [len(job.ids) for job in joining], self.jobs + list(joining))

    def join(self, jobs: list[Job], prefix=None):
        """Prefill the jobs' prompts together and make them the last rows. With `prefix` (ids every prompt
        may start with, and their keys and values), prompts that all start with it skip those tokens: their
        keys and values are copied in, not computed again (the template's first 9 of about 17 tokens)."""
        model, device = self.model, self.device
        running = model.kv_caches()
        idx, valid = pad([job.ids for job in jobs], pad_id=0, padding_side="left")  # (N, L)
        N, L = idx.shape
        mask = position_ids = None
        if not valid.all():
            mask, position_ids = left_padding(valid.to(device))  # (N, 1, L, L), (N, L)
        try:
            model.setup_kv_cache(N, L, device=device)
            n = 0  # slots [0, n) hold the prefix's tokens (those of row r from slot pads[r]), copied in
            if prefix is not None and all(job.ids[:len(prefix.ids)] == prefix.ids for job in jobs):
                n = min(len(prefix.ids), L - 1)  # the last token is always computed: its hidden state is needed
                pads = (L - valid.sum(dim=1)).tolist()
                for cache, kv in zip(model.kv_caches(), prefix.kv):
                    for name, t in zip(("k", "v"), kv):  # t: (1, H_kv, len(prefix.ids), D)
                        for r, p in enumerate(pads):
                            if p < n:
                                getattr(cache, name)[r, :, p:n] = t[0, :, : n - p]
                idx = idx[:, n:]
                mask = None if mask is None else mask[:, :, n:]  # (N, 1, L - n, L)
                position_ids = None if position_ids is None else position_ids[:, n:]
            h = model.hidden_states(idx.to(device), torch.arange(n, L, device=device), mask, position_ids,
                                    kv_len=L)
            self._rebuild(list(range(len(self.jobs))), running, jobs, model.kv_caches(), h[:, -1])
        except Exception:
            model.set_kv_caches(running)  # the rows go on as they were (a failure here is, say, out of memory)
            raise

    def keep(self, rows: list[int]):
        """Only these rows go on (the others finished, or their clients left)."""
        self._rebuild(rows, self.model.kv_caches())

    def _rebuild(self, rows, running, jobs=(), prefilled=None, h=None):
        """A cache holding the kept rows (the last m slots, which hold all their tokens) and then the joining
        ones (their prefilled L slots), every row ending at the new P; as long as the rows still need. The
        rows change only once it is built: a failure (out of memory) leaves them as they were."""
        kept = [self.jobs[r] for r in rows] + list(jobs)
        lengths = [self.lengths[r] for r in rows] + [len(job.ids) for job in jobs]
        if not kept:
            self.model.clear_kv_cache()
            self.jobs, self.lengths, self.P, self.h = [], [], 0, None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        m, L = max(lengths[: len(rows)], default=0), max(lengths[len(rows):], default=0)
        P = max(m, L)
        self.model.setup_kv_cache(len(kept), _span(lengths, kept), device=self.device)
        for cache, old, new in zip(self.model.kv_caches(), running, prefilled or [None] * len(running)):
            for name in ("k", "v"):
                slots = getattr(cache, name)  # (B, H_kv, S, D)
                if rows:
                    slots[: len(rows), :, P - m: P] = getattr(old, name)[index, :, self.P - m: self.P]
                if jobs:
                    slots[len(rows):, :, P - L: P] = getattr(new, name)  # (N, H_kv, L, D)
        self.h = torch.cat(([self.h.index_select(0, index)] if rows else []) + ([h] if jobs else []))
        self.jobs, self.lengths, self.P = kept, lengths, P
        lengths = torch.tensor(lengths, device=self.device)
        self.start, self.positions = P - lengths, lengths[:, None]

    def step(self, tokens):
        """Feed each row its next token (B,): the rows' new hidden states, one slot further."""
        P, B = self.P, len(self.jobs)
        mask = None  # rows all as long as the cache: plain causal decoding, as a lone request gets
        if any(n != P for n in self.lengths):
            mask = (torch.arange(P + 1, device=self.device) >= self.start[:, None]).view(B, 1, 1, P + 1)
        pos = torch.arange(P, P + 1, device=self.device)
        self.h = self.model.hidden_states(tokens[:, None], pos, mask, self.positions, kv_len=P + 1)[:, -1]
        self.P, self.lengths, self.positions = P + 1, [n + 1 for n in self.lengths], self.positions + 1


def _span(lengths, jobs) -> int:
    """Cache slots for rows of these lengths to finish their jobs: the longest row plus the most tokens any
    job may still make."""
    return max(lengths, default=0) + max((job.max_tokens - len(job.out) for job in jobs), default=0)


class Engine:
    """The model, its heads by name ("base": none) and the thread that decodes the queued jobs: continuous
    batching, each job joining the running rows at the next step where it fits."""

    def __init__(self, model, tokenizer, heads: dict, max_batch=16, window=0.005, step_delay=0.0):
        self.model, self.tokenizer, self.heads = model, tokenizer, heads
        self.max_batch, self.window = max_batch, window
        self.step_delay = step_delay  # seconds added to each decode step: for tests of slow batches only
        self.device = model.lm_head.weight.device
        self.context = model.config.block_size
        self.prefix = Prefix(model, tokenizer)  # the template's start, prefilled once for every request
        self.queue = collections.deque()  # jobs waiting to join, oldest first; only the decoding thread takes
        self.arrived = threading.Condition()
        self.active = 0  # rows decoding now
        self.steps = collections.deque(maxlen=10_000)  # rows in each recent step: for the tests and benchmarks
        self.left = collections.deque(maxlen=10_000)  # (why, tokens made) of each recent row as it left
        threading.Thread(target=self._run, daemon=True, name="decoder").start()

    def submit(self, jobs: list[Job]):
        with self.arrived:
            self.queue.extend(jobs)
            self.arrived.notify()

    def _run(self):
        while True:
            with self.arrived:
                self.arrived.wait_for(lambda: self.queue)
            time.sleep(self.window)  # requests sent together arrive within a few ms: one prefill for them
            try:
                self.decode(self.queue)
            except Exception:  # noqa: BLE001 (its rows were told; a bug or an out-of-memory must not stop the server)
                pass

    def joining(self, jobs, rows: Rows) -> list[Job]:
        """The jobs at the front of `jobs` (taken from it) that join the rows now: in arrival order, while
        there is a free row and the cache's span stays within the context. The first that does not fit
        waits for rows to finish, and those behind it wait too, so that none waits forever."""
        with self.arrived:  # jobs whose clients left stop counting against --max-queue (submit holds this lock)
            if any(job.cancelled.is_set() for job in jobs):
                live = [job for job in jobs if not job.cancelled.is_set()]
                jobs.clear()
                jobs.extend(live)
        taken = []
        while jobs and len(rows.jobs) + len(taken) < self.max_batch:
            job = jobs[0]
            if job.cancelled.is_set():
                jobs.popleft()
            elif rows.span(taken + [job]) <= self.context:
                taken.append(jobs.popleft())
            elif rows.jobs or taken:
                break
            else:  # too long even alone: the server refuses these before they are queued
                jobs.popleft().emit("error", f"the prompt and max_tokens exceed the context of {self.context}")
        return taken

    @torch.inference_mode()
    def decode(self, jobs):
        """Decode jobs (a deque, or a list for the tests), taking them from the front as they fit, until
        none is left; the server's queue is one, still filling while it runs."""
        jobs = jobs if isinstance(jobs, collections.deque) else collections.deque(jobs)
        rows, taken = Rows(self.model), []
        try:
            while True:
                taken = self.joining(jobs, rows)
                if taken:
                    for job in taken:
                        job.generator = torch.Generator(device=self.device).manual_seed(job.seed)
                    try:
                        rows.join(taken, self.prefix)
                    except Exception as e:  # noqa: BLE001 (say, out of memory: only these jobs fail)
                        print(f"serve.py: a prefill failed: {type(e).__name__}: {e}", file=sys.stderr)
                        for job in taken:
                            job.emit("error", f"{type(e).__name__}: {e}")
                    taken = []
                if not rows.jobs:
                    return
                token = self.pick(rows.h, rows.jobs)  # (B,)
                for job, t in zip(rows.jobs, token.tolist()):
                    if job.going():
                        self.advance(job, t)
                going = [r for r, job in enumerate(rows.jobs) if job.going()]
                if len(going) < len(rows.jobs):
                    self.left.extend((job.finish or "cancelled", len(job.out))
                                     for r, job in enumerate(rows.jobs) if r not in going)
                    rows.keep(going)
                    token = token[going]
                self.active = len(going)
                if going:
                    if self.step_delay:
                        time.sleep(self.step_delay)
                    self.steps.append(len(going))
                    rows.step(token)
        except Exception as e:
            for job in dict.fromkeys(rows.jobs + taken):
                if job.finish is None:
                    job.emit("error", f"{type(e).__name__}: {e}")
            raise
        finally:
            self.active = 0
            self.model.clear_kv_cache()

    def pick(self, h, jobs):
        """Each row's next token (B,): its head's logits for h (B, C), then greedy or its own sampling."""
        rows_of = {}
        for r, job in enumerate(jobs):
            rows_of.setdefault(job.model, []).append(r)
        if len(rows_of) == 1:  # one head for all: the common case, no gather
            logits = (self.heads[jobs[0].model] or self.model.lm_head)(h)
        else:  # heads differ only here: the body's pass above was shared
            logits = torch.empty(len(jobs), self.model.config.vocab_size, dtype=h.dtype, device=h.device)
            for name, rows in rows_of.items():
                index = torch.tensor(rows, device=h.device)
                logits[index] = (self.heads[name] or self.model.lm_head)(h[index])
        token = sample(logits)  # greedy for every row; sampled rows are redrawn below
        for r, job in enumerate(jobs):
            if job.temperature > 0:
                token[r] = sample(logits[r:r + 1], job.temperature, None, job.top_p, job.generator)[0]
        return token.to(h.device)

    def advance(self, job: Job, t: int):
        """Take token t as the job's next token: release what of its text is final, or finish it."""
        text, job.finish = next_text(job.out, t, self.tokenizer.eos_id, self.tokenizer, job.stop, job.max_tokens)
        # the reply is the stripped text: leading spaces are never sent, trailing ones wait for what follows
        # (and are dropped at the end), so the pieces sent always join to a prefix of the final reply
        final = text.strip()
        if len(final) > len(job.sent):
            job.emit("text", final[len(job.sent):])
            job.sent = final
        if job.finish:
            job.emit("done", FINISH[job.finish], len(job.out) + (job.finish == "eos"))


# ---------------------------------------------------------------------------------------------- requests


class APIError(Exception):
    """Sent as OpenAI's error JSON with this HTTP status."""

    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers or {}

    def body(self):
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def _number(body, name, kind, low, high, default, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    ok_type = isinstance(value, int) and not isinstance(value, bool) or (
        isinstance(value, float) and math.isfinite(value) and (kind is float or value.is_integer()))
    if not ok_type or value < low or value > high or (low_open and value == low):
        bound = f"{'above' if low_open else 'at least'} {low} and at most {high}"
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
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "'stream' must be true or false, 'stream_options' an object", param="stream")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return Settings(
        model=model, n=_number(body, "n", int, 1, MAX_N, 1),
        max_tokens=None if max_tokens is None else _number({"max_tokens": max_tokens}, "max_tokens", int, 1, 1 << 20,
                                                           None),
        temperature=_number(body, "temperature", float, 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", float, 0.0, 1.0, None, low_open=True),
        seed=_number(body, "seed", int, -(2**63), 2**63 - 1, None), stop=stop, stream=stream,
        include_usage=bool(options.get("include_usage")))


def last_user_message(body: dict) -> tuple[int, str]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
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


# ---------------------------------------------------------------------------------------------- the app


class Server:
    """The FastAPI app around an engine: validation, queueing, replies and streams, auth, the proxy."""

    def __init__(self, engine: Engine, max_queue=64, max_tokens=256, api_key=None, upstreams=None, log=None,
                 upstream_timeout=600.0):
        self.engine, self.max_queue, self.max_tokens, self.api_key = engine, max_queue, max_tokens, api_key
        self.upstreams = upstreams or {}  # name -> (url, model, key)
        self.log, self.log_lock = (Path(log) if log else None), threading.Lock()
        self.upstream_timeout = upstream_timeout
        self.models = list(engine.heads)
        self.app = self._build()

    # the pieces every endpoint shares

    def check_auth(self, request):
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    async def read_json(self, request) -> dict:
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
        """count jobs rewriting text (choice i samples with seed + i), and the prompt's token count."""
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

    def enqueue(self, jobs: list[Job]):
        if len(jobs) > self.max_queue:  # would never fit: not a matter of waiting
            raise APIError(400, f"{len(jobs)} choices in one request; this server queues at most {self.max_queue}",
                           param="n")
        if len(self.engine.queue) + len(jobs) > self.max_queue:
            raise APIError(503, f"the server is busy ({len(self.engine.queue)} requests waiting); retry shortly",
                           type_="server_error", code="queue_full", headers={"Retry-After": "1"})
        self.engine.submit(jobs)

    @staticmethod
    async def events(jobs: list[Job], request):
        """(choice index, event) as the jobs produce them, until each is done; cancels them all if the
        client disconnects or the consumer stops."""
        waiting = {asyncio.ensure_future(job.events.get()): i for i, job in enumerate(jobs)}
        checked = time.monotonic()
        try:
            while waiting:
                done, _ = await asyncio.wait(waiting, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                if time.monotonic() - checked >= 0.5:  # twice a second, tokens flowing or not
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                for task in done:
                    i = waiting.pop(task)
                    event = task.result()
                    if event[0] == "error":
                        raise RuntimeError(event[1])
                    yield i, event
                    if event[0] == "text":
                        waiting[asyncio.ensure_future(jobs[i].events.get())] = i
        finally:
            for task in waiting:
                task.cancel()
            for job in jobs:
                job.cancelled.set()  # a no-op for finished rows; frees the batch slot of the others

    async def complete(self, request, prompts: list[str], s: Settings, chat: bool):
        """The reply (or stream) for prompts x n choices."""
        jobs, prompt_tokens = [], 0
        for text in prompts:
            more, count = self.jobs_for(text, s, s.n)
            jobs += more
            prompt_tokens += count
        self.enqueue(jobs)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": s.model}
        if s.stream:
            return self.stream(request, jobs, head, chat, s, prompt_tokens)
        texts, finish, completion_tokens = [""] * len(jobs), [None] * len(jobs), 0
        async for i, event in self.events(jobs, request):
            if event[0] == "text":
                texts[i] += event[1]
            else:
                finish[i] = event[1]
                completion_tokens += event[2]
        if any(f is None for f in finish):
            return None  # the client left
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": f} if chat else {"index": i, "text": t, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish))]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    def stream(self, request, jobs, head, chat, s, prompt_tokens):
        from fastapi.responses import StreamingResponse

        def chunk(i, delta=None, text=None, finish=None):
            choice = {"index": i, "delta": delta} if chat else {"index": i, "text": text or "", "logprobs": None}
            return {**head, "choices": [{**choice, "finish_reason": finish}]}

        async def sse():
            completion_tokens = 0
            if chat:
                for i in range(len(jobs)):
                    yield sse_line(chunk(i, {"role": "assistant", "content": ""}))
            try:
                async for i, event in self.events(jobs, request):
                    if event[0] == "text":
                        yield sse_line(chunk(i, {"content": event[1]}, text=event[1]))
                    else:
                        completion_tokens += event[2]
                        yield sse_line(chunk(i, {}, finish=event[1]))
            except RuntimeError as e:  # the decoder failed: said here, never to the client
                print(f"serve.py: {request.url.path}: {e}", file=sys.stderr)
                yield sse_line(APIError(500, "internal error", type_="server_error").body())
                return
            if s.include_usage:
                yield sse_line({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def rewrite(self, request, text: str, model: str) -> str:
        """The greedy rewrite of text by model's head (the proxy's)."""
        s = Settings(model, 1, None, 0.0, None, None, [], False, False)
        jobs, _ = self.jobs_for(text, s, 1)
        self.enqueue(jobs)
        out = ""
        async for _, event in self.events(jobs, request):
            if event[0] == "text":
                out += event[1]
        return out

    async def proxy(self, request, body: dict, name: str):
        """Forward a chat request to NAME's upstream with its last user message rewritten; the reply, its
        status and its headers come back as they came, the upstream's key replaced by *** wherever it shows."""
        import httpx
        from fastapi.responses import Response, StreamingResponse

        url, upstream_model, key = self.upstreams[name]
        t0 = time.perf_counter()
        try:
            i, original = last_user_message(body)
            rewrite = await self.rewrite(request, original, name)
        except APIError as e:
            if e.status not in (400, 413):
                raise  # 503 (busy): the client retries
            i, original, rewrite = None, None, None  # nothing we can rewrite (no text, too long): sent as it came
        rewrite_ms = (time.perf_counter() - t0) * 1000
        if await request.is_disconnected():  # the client left during the rewrite: spend no upstream call
            return None
        forwarded = {**body, "model": upstream_model}
        if rewrite:
            forwarded["messages"] = [dict(m) for m in body["messages"]]
            forwarded["messages"][i]["content"] = rewrite
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        client = httpx.AsyncClient(timeout=self.upstream_timeout, follow_redirects=False)
        t1 = time.perf_counter()
        log = lambda status: self.record(name, original, rewrite, rewrite_ms,  # noqa: E731
                                         (time.perf_counter() - t1) * 1000, status)
        try:
            upstream = await client.send(client.build_request("POST", url + "/chat/completions", json=forwarded,
                                                              headers=headers), stream=True)
            passed = {k: redact(v, key) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            if rewrite:
                passed["X-Optimized-Prompt"] = urllib.parse.quote(rewrite)
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

    def record(self, name, original, rewrite, rewrite_ms, upstream_ms, status):
        if not self.log:
            return
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": name, "original": original,
                           "rewrite": rewrite, "rewrite_ms": round(rewrite_ms, 1),
                           "upstream_ms": None if upstream_ms is None else round(upstream_ms, 1),
                           "status": status}, ensure_ascii=False)
        with self.log_lock, open(self.log, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def _build(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException

        app = FastAPI(title="phi2-prompter", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(APIError)
        async def api_error(request, e: APIError):
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

        @app.exception_handler(HTTPException)
        async def http_error(request, e: HTTPException):  # unknown routes, wrong methods
            return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

        @app.exception_handler(Exception)
        async def crash(request, e: Exception):  # never a traceback to the client; the server goes on
            print(f"serve.py: {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr)
            return JSONResponse(APIError(500, "internal error", type_="server_error").body(), status_code=500)

        @app.get("/v1/models")
        async def models(request: Request):
            self.check_auth(request)
            return {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                "owned_by": "phi2-prompter"} for m in self.models]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            self.check_auth(request)
            body = await self.read_json(request)
            model = body.get("model")
            if isinstance(model, str) and model in self.upstreams:  # forwarded as it is: the upstream checks
                return await self.proxy(request, body, model)
            s = settings_of(body, self.models)
            _, text = last_user_message(body)
            return await self.complete(request, [text], s, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            self.check_auth(request)
            body = await self.read_json(request)
            s = settings_of(body, self.models)
            prompt = body.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if (not isinstance(prompts, list) or not prompts or len(prompts) * s.n > MAX_N
                    or not all(isinstance(p, str) and p.strip() for p in prompts)):
                raise APIError(400, f"'prompt' must be a non-empty string or a list of them (at most {MAX_N} "
                                    "choices in all)", param="prompt")
            return await self.complete(request, prompts, s, chat=False)

        return app


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "te",
              "trailer", "upgrade", "proxy-authenticate", "proxy-authorization",  # httpx decodes the body
              "date", "server"}  # uvicorn sets its own


def redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


def redact_body(data: bytes, key: str | None) -> bytes:
    """data with the key replaced by ***: as bytes, and inside JSON strings however they escape it (an SSE
    `data: {...}` line included); a body that holds no key, even escaped, passes as it came."""
    if not key:
        return data
    data = data.replace(key.encode(), b"***")
    prefix, rest = (b"data: ", data[6:]) if data.startswith(b"data: ") else (b"", data)
    try:
        obj = json.loads(rest)
    except (ValueError, RecursionError):
        return data
    text = json.dumps(obj, ensure_ascii=False)
    return prefix + text.replace(key, "***").encode() if key in text else data


def usage(prompt_tokens, completion_tokens) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse_line(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------- main


def pairs_of(values: list[str], flag: str) -> dict:
    out = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise UsageError(f"{flag} {value!r}: give NAME=VALUE, e.g. {flag} mistral=...")
        out[name] = rest
    return out


def load(cfg: ServeConfig, step_delay=0.0):
    """The engine and the server for cfg (the model loaded, the heads checked, the upstreams resolved)."""
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("serve.py needs FastAPI, uvicorn and httpx: pip install -e \".[serve]\"") from None
    api_key = None
    if cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise UsageError(f"--api-key-env {cfg.api_key_env}: the variable is not set; set it to the key clients "
                             "must send")
    hw = hardware.resolve(cfg.device, cfg.precision)
    model, tokenizer, base_fingerprint, stage1 = load_prompter(cfg.model, cfg.lora, hw.dtype, hw.device)
    heads = {"base": None}
    for path in cfg.heads:
        head = load_head(path, model, base_fingerprint, stage1)
        if head.target in heads:
            raise UsageError(f"{path}: a second head for target '{head.target}'; give one head per target")
        heads[head.target] = head
    urls = pairs_of(cfg.upstream, "--upstream")
    names = pairs_of(cfg.upstream_model, "--upstream-model")
    keys = pairs_of(cfg.upstream_key_env, "--upstream-key-env")
    for name in set(urls) | set(names) | set(keys):
        if name not in heads:
            raise UsageError(f"upstream '{name}' has no head: pass --head with a head trained for '{name}' (these "
                             f"are loaded: {', '.join(heads)})")
        if name not in urls:
            raise UsageError(f"--upstream-model/--upstream-key-env for '{name}' without --upstream {name}=URL")
        if not re.match(r"https?://", urls[name]):
            raise UsageError(f"--upstream {name}={urls[name]}: give an http:// or https:// URL")
        if name in keys and not os.environ.get(keys[name]):
            raise UsageError(f"--upstream-key-env {name}={keys[name]}: the variable is not set")
    upstreams = {n: (urls[n].rstrip("/"), names.get(n, n), os.environ.get(keys[n]) if n in keys else None)
                 for n in urls}
    print(hw.describe(), file=sys.stderr)
    engine = Engine(model, tokenizer, heads, max_batch=cfg.max_batch, step_delay=step_delay)
    return Server(engine, cfg.max_queue, cfg.max_tokens, api_key, upstreams, cfg.log, cfg.upstream_timeout)


def main(cfg: ServeConfig):
    import socket

    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # bound here, so that a port in use is one line and --port 0 can say which port it got
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        raise UsageError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); choose another --port "
                         "(0: any free one)") from None
    port = sock.getsockname()[1]
    try:
        server = load(cfg)  # after the bind: a busy port is said before minutes of loading
    except BaseException:
        sock.close()
        raise
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"serving {', '.join(server.models)} on http://{host}:{port}/v1"
          f"{' (proxy for ' + ', '.join(server.upstreams) + ')' if server.upstreams else ''}", file=sys.stderr,
          flush=True)
    import uvicorn
    uvicorn.Server(uvicorn.Config(server.app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    cli.run("serve.py", main, parse_args)
