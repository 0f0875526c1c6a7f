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

Continuous batching (serving/engine.py): one thread decodes up to --max-batch rows together, sharing the
body's forward pass, each row with its own head, sampling, stop strings and length; a request that arrives
while rows decode joins them at the next step, and a row that finishes leaves. A reply is exactly what the
request gets alone. The OpenAI side is serving/api.py, the proxy serving/proxy.py. Needs the [serve] extra
(FastAPI, uvicorn, httpx). Binds 127.0.0.1 unless --host says otherwise; one access-log line per request on
stderr. Ctrl-C (or SIGTERM) stops taking connections and lets the requests running or waiting finish, for
at most DRAIN seconds; a second Ctrl-C stops at once.
"""

import support.threads  # noqa: F401  (first: OpenMP reads its settings when torch loads)

import asyncio
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass, field

from head_adapter import read_metadata
from phi2.errors import UsageError
from support import cli, hardware
from support.llm import ENV_NAME, shown_key_env
from support.prompter import Prompter, add_args, base_config

DRAIN = 30.0  # seconds a stop waits for the requests in flight


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
    max_kv_gb: float | None = None  # None: a quarter of the device's memory
    device: str = "auto"
    precision: str = "auto"
    upstream: list[str] = field(default_factory=list)  # NAME=URL
    upstream_model: list[str] = field(default_factory=list)  # NAME=MODEL
    upstream_key_env: list[str] = field(default_factory=list)  # NAME=VAR
    upstream_timeout: float = 600.0
    log: str | None = None
    log_prompts: bool = False
    allowed_host: list[str] = field(default_factory=list)
    cors_origin: list[str] = field(default_factory=list)


def parse_args(argv=None) -> ServeConfig:
    d = ServeConfig()
    p = cli.parser(__doc__)
    add_args(p, heads="many")
    p.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=cli.count, default=d.port, help="0: any free port")
    p.add_argument("--api-key-env", type=cli.env_name,
                   help="require `Authorization: Bearer <the value of this variable>`")
    p.add_argument("--max-batch", type=cli.positive_int, default=d.max_batch, help="rows decoded together at most")
    p.add_argument("--max-queue", type=cli.positive_int, default=d.max_queue,
                   help="requests waiting at most; more get 503 with Retry-After")
    p.add_argument("--max-tokens", type=cli.positive_int, default=d.max_tokens, help="for requests that give none")
    p.add_argument("--max-kv-gb", type=cli.positive_float,
                   help="KV cache memory for the running rows, in GB (default: a quarter of the device's memory); "
                        "requests wait for it, and one that could never fit gets 400")
    cli.add_hardware_args(p, d)
    p.add_argument("--upstream", action="append", default=[], metavar="NAME=URL",
                   help="proxy: forward chat requests for model NAME to this OpenAI-compatible endpoint")
    p.add_argument("--upstream-model", action="append", default=[], metavar="NAME=MODEL",
                   help="the model name the upstream knows (default: NAME)")
    p.add_argument("--upstream-key-env", action="append", default=[], metavar="NAME=VAR",
                   help="the environment variable holding the upstream's API key")
    p.add_argument("--upstream-timeout", type=cli.positive_float, default=d.upstream_timeout,
                   help="seconds per upstream call")
    p.add_argument("--log", help="proxy: append one JSON line per proxied request (original, rewrite, timing)")
    p.add_argument("--log-prompts", action="store_true", help="put each request's prompt in the access log")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name clients may reach this server by, besides its address and localhost")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (https://app.example) whose pages may call this server")
    cfg = ServeConfig(**vars(p.parse_args(argv)))
    if cfg.port > 65535:
        raise UsageError(f"--port {cfg.port}: ports go up to 65535")
    return cfg


def pairs_of(values: list[str], flag: str) -> dict:
    out = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            shown = "(not repeated: it may be a key)" if "key" in flag else repr(value)
            raise UsageError(f"{flag} {shown}: give NAME=VALUE, e.g. {flag} mistral=...")
        out[name] = rest
    return out


def upstreams_of(cfg: ServeConfig, heads) -> dict:
    """{name: (url, upstream model, key)} from the --upstream flags, each checked."""
    urls = pairs_of(cfg.upstream, "--upstream")
    names = pairs_of(cfg.upstream_model, "--upstream-model")
    keys = pairs_of(cfg.upstream_key_env, "--upstream-key-env")
    for name in set(urls) | set(names) | set(keys):
        if name not in heads:
            raise UsageError(f"upstream '{name}' has no head: pass --head with a head trained for '{name}' (these "
                             f"are loaded: {', '.join(heads)})")
        if name not in urls:
            raise UsageError(f"--upstream-model/--upstream-key-env for '{name}' without --upstream {name}=URL")
        if not re.match(r"https?://[^/\s]", urls[name]):
            raise UsageError(f"--upstream {name}={urls[name]}: give an http:// or https:// URL")
        if name in keys and not ENV_NAME.fullmatch(keys[name]):
            raise UsageError(f"--upstream-key-env {name}=VAR: VAR must name an environment variable holding the key "
                             "(letters, digits and _), not be the key itself")
        if name in keys and not os.environ.get(keys[name]):
            raise UsageError(f"--upstream-key-env {name}={shown_key_env(keys[name])}: the variable is not set")
    return {n: (urls[n].rstrip("/"), names.get(n, n), os.environ.get(keys[n]) if n in keys else None) for n in urls}


def load(cfg: ServeConfig):
    """The API over its engine for cfg: the prompter loaded, the heads checked, the upstreams resolved."""
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("serve.py needs FastAPI, uvicorn and httpx: pip install -e \".[serve]\"") from None
    from prompts import format_prompt
    from serving.api import API, allowed_hosts, build_app
    from serving.engine import Engine, kv_bytes_per_slot
    from serving.proxy import Proxy, ProxyLog

    api_key = None
    if cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise UsageError(f"--api-key-env {shown_key_env(cfg.api_key_env)}: the variable is not set; set it to "
                             "the key clients must send")
    for path in cfg.heads:  # before the model loads
        if read_metadata(path)["target"] == "base":
            raise UsageError(f"--head {path}: its target is named 'base', the model name of stage 1 alone here; "
                             "train that head again with train_head.py --target <its target LLM>")
    log = ProxyLog(cfg.log) if cfg.log else None  # checked now, not after an upstream call is paid for
    hw = hardware.resolve(cfg.device, cfg.precision, base_config(cfg.model, cfg.lora), work="decode")
    prompter = Prompter.load(cfg.model, cfg.lora, cfg.heads, dtype=hw.dtype, device=hw.device)
    heads = {"base": None, **{t: prompter.heads[t] for t in prompter.targets}}
    upstreams = upstreams_of(cfg, heads)
    kv_gb = cfg.max_kv_gb or hardware.memory_gb(hw.device) / 4
    kv_slots = max(1, int(kv_gb * 1e9 // kv_bytes_per_slot(prompter.model)))
    print(f"{hw.describe()}; KV cache up to {kv_gb:.1f} GB ({kv_slots:,} token slots)", file=sys.stderr)
    engine = Engine(prompter.model, prompter.tokenizer, heads, max_batch=cfg.max_batch, kv_slots=kv_slots)
    template = len(prompter.tokenizer.encode(format_prompt("")))
    if kv_slots < template + min(cfg.max_tokens, engine.context - template):
        print(f"warning: {kv_slots:,} KV slots hold less than one request with the default --max-tokens "
              f"({cfg.max_tokens}, plus the prompt's {template}+ tokens): such requests get a 400; raise --max-kv-gb",
              file=sys.stderr)
    proxy = Proxy(upstreams, cfg.upstream_timeout, log) if upstreams else None
    api = API(engine, cfg.max_queue, cfg.max_tokens, api_key, proxy, allowed_hosts(cfg.host, cfg.allowed_host),
              cfg.cors_origin, cfg.log_prompts)
    return build_app(api)


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
        app = load(cfg)  # after the bind: a busy port is said before minutes of loading
    except BaseException:
        sock.close()
        raise
    api = app.state.api
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    proxied = f" (proxy for {', '.join(api.proxy.upstreams)})" if api.proxy else ""
    sock.listen(2048)  # before it is said, not when uvicorn starts: a client that connects at once waits
    print(f"serving {', '.join(api.models)} on http://{host}:{port}/v1{proxied}", file=sys.stderr, flush=True)
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's, saying what a stop waits for."""

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                busy = len(api.engine.rows) + api.engine.waiting()
                if busy:
                    say(f"serve.py: stopping: {busy} choices running or waiting finish first (at most {DRAIN:.0f} s; "
                        "Ctrl-C again stops now)")
            elif sig == signal.SIGINT:  # uvicorn's force exit
                say("serve.py: stopping now; the requests in flight are cut")
            super().handle_exit(sig, frame)

    logging.getLogger("uvicorn.error").addFilter(lambda record: not cancelled(record))
    try:  # uvicorn raises the signal that stopped it again at the end: Ctrl-C exits 130, SIGTERM 143
        Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",  # no start-up hooks
                              timeout_graceful_shutdown=DRAIN)).run(sockets=[sock])
    finally:  # (after a Ctrl-C; a SIGTERM ends the process first, once the drain has left the decoder idle)
        api.engine.close()


def say(line: str):
    """A line on stderr in one write, between the access log's lines (a signal handler runs between any two)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def cancelled(record: logging.LogRecord) -> bool:
    """Whether a log record is about a task cancelled by a stop (uvicorn logs each such request, and its own
    startup task, as an error with a traceback): somewhere in its exception's chain is a CancelledError."""
    seen, todo = set(), [record.exc_info[1]] if record.exc_info else []
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        if isinstance(error, asyncio.CancelledError):
            return True
        seen.add(id(error))
        todo += [error.__cause__, error.__context__, *getattr(error, "exceptions", ())]
    return False


if __name__ == "__main__":
    cli.run("serve.py", main, parse_args)
