"""Stage-2 data from a target LLM: each prompt goes to the target's OpenAI-compatible chat-completions
endpoint with an instruction to improve it, and (prompt, improved) pairs are written as JSONL.

    MISTRAL_API_KEY=... python target_data.py --base-url https://api.mistral.ai/v1 \\
        --model mistral-small-latest --api-key-env MISTRAL_API_KEY --out data/mistral.jsonl

Made for thousands of prompts: at most --concurrency requests in flight; 429, 5xx, timeouts and dropped
connections are retried with exponential backoff (honouring Retry-After, up to 120 s); each result is appended and
flushed as it arrives, so a crash loses nothing, and a rerun skips the prompts already done (and retries
the ones that failed). The API key is read from an environment variable and never printed or written.
Standard library HTTP only.
"""

import http.client
import json
import os
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import cli
from phi2.errors import UsageError
from prompts import DEFAULT_DATA, read_prompts

INSTRUCTION = ("You improve prompts for large language models. Rewrite the user's prompt so that a model will "
               "answer it well: make the task, the context, the constraints and the expected output explicit, "
               "keep the user's intent and language, and do not answer the prompt. Reply with the improved "
               "prompt only.")


@dataclass
class TargetDataConfig:
    base_url: str = ""  # e.g. https://api.openai.com/v1
    model: str = ""  # the target LLM's model name at that endpoint
    out: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    data: str = str(DEFAULT_DATA)
    field: str = "prompt"
    instruction: str = INSTRUCTION
    concurrency: int = 4
    max_retries: int = 6
    retry_base: float = 1.0  # seconds before the first retry; doubles each time
    timeout: float = 60.0
    temperature: float = 0.7
    max_tokens: int = 512
    limit: int | None = None  # only the first N prompts


MAX_RETRY_AFTER = 120.0  # seconds: a server's Retry-After is obeyed up to this, so none can hang a run


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the endpoint's origin: the API key goes to no other host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            raise TargetDataError(f"{req.full_url} redirected (HTTP {code}) to another origin, "
                                  f"{urllib.parse.urlsplit(newurl).netloc}; refused, so that the API key goes "
                                  "nowhere else: give the final URL as --base-url")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_opener = urllib.request.build_opener(_SameOriginRedirects)


class TargetDataError(UsageError):
    """A run that cannot go on (no key, key refused, bad arguments); printed as one line."""


class RequestFailed(Exception):
    """One prompt that could not be improved; the run goes on and a rerun tries it again."""


def parse_args(argv=None) -> TargetDataConfig:
    d = TargetDataConfig()
    p = cli.parser(__doc__)
    p.add_argument("--base-url", required=True, help="OpenAI-compatible API root, e.g. https://api.openai.com/v1")
    p.add_argument("--model", required=True, help="the target model's name at that endpoint")
    p.add_argument("--out", required=True, help="JSONL to append (prompt, improved) pairs to")
    p.add_argument("--api-key-env", default=d.api_key_env, help="environment variable holding the API key")
    p.add_argument("--data", default=d.data, help="prompts: .txt (one per line) or .jsonl/.json/.csv records")
    p.add_argument("--field", default=d.field, help="the prompt's field in --data records")
    p.add_argument("--instruction", default=d.instruction, help="the system message")
    p.add_argument("--concurrency", type=cli.positive_int, default=d.concurrency, help="requests in flight at most")
    p.add_argument("--max-retries", type=cli.count, default=d.max_retries, help="retries of a failed request")
    p.add_argument("--retry-base", type=cli.nonnegative_float, default=d.retry_base, help="first backoff in seconds")
    p.add_argument("--timeout", type=cli.positive_float, default=d.timeout, help="seconds per request")
    p.add_argument("--temperature", type=cli.nonnegative_float, default=d.temperature, help="the target's sampling")
    p.add_argument("--max-tokens", type=cli.positive_int, default=d.max_tokens, help="longest improved prompt")
    p.add_argument("--limit", type=cli.positive_int, help="only the first N prompts")
    return TargetDataConfig(**vars(p.parse_args(argv)))


class Client:
    """One chat-completions call, with retries; never lets the key into a message."""

    def __init__(self, cfg: TargetDataConfig, key: str, sleep=time.sleep):
        self.cfg, self.key, self.sleep = cfg, key, sleep
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"

    def redact(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    def improve(self, prompt: str) -> str:
        last = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                delay = self.cfg.retry_base * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)  # jitter
                self.sleep(max(delay, min(last.retry_after or 0.0, MAX_RETRY_AFTER)))
            try:
                return self._call(prompt)
            except _Retryable as e:
                last = e
        raise RequestFailed(f"gave up after {self.cfg.max_retries} retries: {last}")

    def _call(self, prompt: str) -> str:
        body = json.dumps({
            "model": self.cfg.model,
            "messages": [{"role": "system", "content": self.cfg.instruction}, {"role": "user", "content": prompt}],
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.key}"})
        try:
            with _opener.open(request, timeout=self.cfg.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = self.redact(e.read(300).decode("utf-8", "replace").strip())
            if e.code in (401, 403):
                raise TargetDataError(f"{self.url} refused the API key (HTTP {e.code}); "
                                      f"check ${self.cfg.api_key_env}") from None
            if e.code == 429 or e.code >= 500:
                retry_after = e.headers.get("Retry-After")
                raise _Retryable(f"HTTP {e.code} {detail[:120]}",
                                 float(retry_after) if retry_after and retry_after.isdigit() else None) from None
            raise RequestFailed(f"HTTP {e.code} {detail[:200]}") from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, OSError) as e:
            # HTTPException: a malformed status line or a body cut short; a failed request, retried
            raise _Retryable(self.redact(f"{type(e).__name__}: {e}")) from None
        except json.JSONDecodeError:
            raise _Retryable("the response was not JSON") from None
        try:
            text = payload["choices"][0]["message"]["content"].strip()
        except (KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable("the response had no choices[0].message.content") from None
        if not text:
            raise _Retryable("the response was empty")
        return self.redact(text)  # a server that echoes the key gets it written as *** and nowhere else


class _Retryable(Exception):
    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


def load_done(out: Path) -> set:
    """Prompts already in the output. Every complete line is checked first; only then is a last line cut
    short by a crash removed, so that a file of something else is refused untouched."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    done = set()
    try:
        lines = complete.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise TargetDataError(f"{out}: not a file of this script (not UTF-8); choose another --out") from None
    for n, line in enumerate(lines, 1):
        try:
            done.add(json.loads(line)["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TargetDataError(f"{out}:{n}: not a record of this script; choose another --out") from None
    if len(complete) != len(data):
        if not lines:  # nothing of ours in it: a file of something else, left as it is
            raise TargetDataError(f"{out}: not a file of this script; choose another --out")
        with open(out, "r+b") as f:  # drop the partial line so that appended records start on a new one
            f.truncate(len(complete))
    return done


def main(cfg: TargetDataConfig, sleep=time.sleep) -> dict:
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise TargetDataError(f"the API key goes in the environment variable {cfg.api_key_env} (or name another "
                              "one with --api-key-env); it is not set")
    if cfg.concurrency < 1:
        raise TargetDataError("--concurrency must be at least 1")
    prompts = read_prompts(cfg.data, cfg.field)[: cfg.limit]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = load_done(out)
    todo, seen = [], set(done)
    for source, prompt in prompts:
        if prompt not in seen:  # duplicates in the input are asked once
            todo.append((source, prompt))
            seen.add(prompt)
    print(f"{len(prompts)} prompts: {len(prompts) - len(todo)} already in {out}, {len(todo)} to ask {cfg.model}",
          file=sys.stderr)

    client = Client(cfg, key, sleep)
    failures = []
    with open(out, "a", encoding="utf-8") as sink, ThreadPoolExecutor(cfg.concurrency) as pool, \
            tqdm(total=len(todo), unit="prompt", file=sys.stderr) as bar:
        futures = {pool.submit(client.improve, prompt): (source, prompt) for source, prompt in todo}
        try:
            for future in as_completed(futures):
                source, prompt = futures[future]
                try:
                    improved = future.result()
                except RequestFailed as e:
                    failures.append(f"{source}: {client.redact(str(e))}")
                else:
                    record = {"prompt": prompt, "improved": improved, "target": cfg.model, "source": source}
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    sink.flush()  # on disk as it arrives: a crash loses at most the requests in flight
                bar.update()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    for line in failures[:5]:
        print(f"failed: {line}", file=sys.stderr)
    summary = {"asked": len(todo), "written": len(todo) - len(failures), "failed": len(failures)}
    print(f"wrote {summary['written']} pairs to {out}"
          + (f"; {len(failures)} failed, rerun the same command to retry them" if failures else ""), file=sys.stderr)
    return summary


if __name__ == "__main__":
    result = cli.run("target_data.py", main, parse_args,
                     on_interrupt="; what arrived is saved, rerun the same command to go on")
    sys.exit(1 if result["failed"] else 0)
