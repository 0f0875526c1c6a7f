"""Stage-2 data from a target LLM: each prompt goes to the target's OpenAI-compatible chat-completions
endpoint with an instruction to improve it, and (prompt, improved) pairs are written as JSONL.

    MISTRAL_API_KEY=... python target_data.py --base-url https://api.mistral.ai/v1 \\
        --model mistral-small-latest --api-key-env MISTRAL_API_KEY --out data/mistral.jsonl

Made for thousands of prompts: at most --concurrency requests in flight; 429, 5xx, timeouts and dropped
connections are retried with exponential backoff (honouring Retry-After, up to 120 s; an empty answer is asked
again once), but an endpoint that is not there at all is said in one line before any prompt is asked; each
result is appended and flushed as it arrives, so a crash loses nothing, and a rerun skips the prompts already
done (and retries the ones that failed); Ctrl-C stops at once. Calls go through llm.py (the `openai` client,
`pip install -e ".[api]"`) and its cache (--cache), shared with evaluate.py. The API key is read from an
environment variable and never printed or written.
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from phi2.errors import UsageError
from prompts import DEFAULT_DATA, read_prompts
from support import cli
from support.llm import (  # noqa: F401
    DEFAULT_CACHE,
    LLM,
    MAX_RETRY_AFTER,
    Cache,
    LLMError,
    RequestFailed,
    add_request_args,
    concurrently,
    has_lone_surrogate,
    request_settings,
)

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
    cache: str = str(DEFAULT_CACHE)  # answers kept by request; "" for none


class TargetDataError(UsageError):
    """A run that cannot go on (bad arguments, an output file of something else); printed as one line."""


def parse_args(argv=None) -> TargetDataConfig:
    d = TargetDataConfig()
    p = cli.parser(__doc__)
    p.add_argument("--base-url", required=True, help="OpenAI-compatible API root, e.g. https://api.openai.com/v1")
    p.add_argument("--model", required=True, help="the target model's name at that endpoint")
    p.add_argument("--out", required=True, help="JSONL to append (prompt, improved) pairs to")
    p.add_argument("--api-key-env", type=cli.env_name, default=d.api_key_env,
                   help="environment variable holding the API key")
    p.add_argument("--data", default=d.data, help="prompts: .txt (one per line) or .jsonl/.json/.csv records")
    p.add_argument("--field", default=d.field, help="the prompt's field in --data records")
    p.add_argument("--instruction", default=d.instruction, help="the system message")
    p.add_argument("--temperature", type=cli.nonnegative_float, default=d.temperature, help="the target's sampling")
    p.add_argument("--max-tokens", type=cli.positive_int, default=d.max_tokens, help="longest improved prompt")
    p.add_argument("--limit", type=cli.positive_int, help="only the first N prompts")
    add_request_args(p, d)
    return TargetDataConfig(**vars(p.parse_args(argv)))


def load_done(out: Path, target: str) -> set:
    """Prompts already in the output. Every complete line is checked first (a record of this script, for this
    target); only then is a last line cut short by a crash removed, so that a file of something else is
    refused untouched."""
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
            record = json.loads(line)
            done.add(record["prompt"])
            made_for = record["target"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TargetDataError(f"{out}:{n}: not a record of this script; choose another --out") from None
        if made_for != target:
            raise TargetDataError(f"{out}:{n}: improved by {made_for!r}, not --model {target!r}: one file per "
                                  "target; choose another --out")
    if len(complete) != len(data):
        if not lines:  # nothing of ours in it: a file of something else, left as it is
            raise TargetDataError(f"{out}: not a file of this script; choose another --out")
        with open(out, "r+b") as f:  # drop the partial line so that appended records start on a new one
            f.truncate(len(complete))
    return done


def main(cfg: TargetDataConfig, sleep=time.sleep) -> dict:
    target = LLM(cfg.base_url, cfg.model, cfg.api_key_env, flag="--base-url", key_flag="--api-key-env",
                 **request_settings(cfg, sleep))
    prompts = read_prompts(cfg.data, cfg.field)[: cfg.limit]
    for source, prompt in prompts:  # else the request cannot be encoded, and a rerun would fail on it again
        if has_lone_surrogate(prompt):
            raise TargetDataError(f"{source}: the prompt holds a lone surrogate (an escape such as \\ud800 without "
                                  "its pair), which is not text; fix or remove it")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = load_done(out, cfg.model)
    todo, seen = [], set(done)
    for source, prompt in prompts:
        if prompt not in seen:  # duplicates in the input are asked once
            todo.append((source, prompt))
            seen.add(prompt)
    distinct = {prompt for _, prompt in prompts}
    repeated = f" ({len(prompts) - len(distinct)} repeated)" if len(distinct) < len(prompts) else ""
    plural = "" if len(prompts) == 1 else "s"
    print(f"{len(prompts)} prompt{plural}{repeated}: {len(distinct & done)} already in {out}, {len(todo)} to ask "
          f"{cfg.model}", file=sys.stderr)
    if todo:
        target.probe()  # one line if nothing is there, rather than every prompt retried for minutes

    def improve(item):
        messages = [{"role": "system", "content": cfg.instruction}, {"role": "user", "content": item[1]}]
        return target.chat(messages, temperature=cfg.temperature, max_tokens=cfg.max_tokens)

    failures = []
    with open(out, "a", encoding="utf-8") as sink, tqdm(total=len(todo), unit="prompt", file=sys.stderr) as bar:
        for (source, prompt), improved, error in concurrently(improve, todo, cfg.concurrency):
            if isinstance(error, RequestFailed):
                failures.append(f"{source}: {target.redact(str(error))}")
            elif error is not None:
                raise error  # a refused key, a refused redirect: nothing else would work either
            else:
                record = {"prompt": prompt, "improved": improved, "target": cfg.model, "source": source}
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()  # on disk as it arrives: a crash loses at most the requests in flight
            bar.update()
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
