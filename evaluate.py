"""Do the target LLM's answers get better with optimised prompts? Pairwise or reference-based LLM judging:

    python evaluate.py --lora runs/sft/best --head mistral.safetensors \\
        --target-url https://api.mistral.ai/v1 --target-model mistral-small-latest --target-key-env MISTRAL_API_KEY \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-4o --judge-key-env OPENAI_API_KEY \\
        --instructions alpaca_eval.json --out runs/eval-mistral

Each instruction is rewritten by the prompter (greedy, with the head for this target), or taken from
--rewrites FILE (any other optimiser's rewrites, or the instructions themselves as a control; of a file with
several targets' rewrites, generate.py --json with several heads, those of --rewrites-target NAME). The
target answers the original and the rewrite. Pairwise (the default): the judge sees the original instruction and
both answers, in both orders; a verdict that changes with the order is a tie, and the optimised side's win
rate is (W + T/2) / N with a seeded bootstrap 95% interval, overall and per category. With --reference
(AlpacaEval's model_outputs.json) each answer is judged against the reference output instead, both
orders, and the table gives each side's win rate and their difference (paired bootstrap): the papers'
table. A reply without exactly one verdict is counted as unparsed, never guessed.

Every request goes through llm.py: cached on disk (--cache; a rerun, or a run adding a second target,
repeats none), --concurrency at once, retried with backoff, keys from the environment only; each endpoint is
probed once before the prompter loads, so that one that is not there is said at once. --out gets
results.json, judgments.jsonl and report.html, a page that gives the answer first (the win rates and their
intervals as a chart, then the table) and then every item side by side, filtered to wins, ties or losses.
"""

import support.threads  # noqa: F401  (first: OpenMP reads its settings when torch loads)

import hashlib
import html
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from head_adapter import content_id, stage1_id
from phi2.errors import UsageError
from phi2.files import write_atomic
from prompts import read_prompts, read_records
from support import cli, hardware
from support.llm import (
    DEFAULT_CACHE,
    LLM,
    LLMError,
    Pool,
    RequestFailed,
    add_request_args,
    has_lone_surrogate,
    request_settings,
)
from support.plots import interval_chart
from support.prompter import Prompter, add_args, base_config

JUDGE_SYSTEM = "You are a careful and impartial judge of the answers AI assistants give to users."
JUDGE_PROMPT = """\
Compare two answers to the user's instruction below. Decide which answer better follows the instruction and \
serves the user: helpfulness, correctness, relevance, depth and clarity. The order of the answers and their \
length must not sway you.

[Instruction]
{instruction}

[The Start of Answer A]
{a}
[The End of Answer A]

[The Start of Answer B]
{b}
[The End of Answer B]

Explain your judgment briefly, then end with your verdict in exactly this form: [[A]] if answer A is better, \
[[B]] if answer B is better, [[C]] if they are equally good."""
VERDICTS = {"[[A]]": "A", "[[B]]": "B", "[[C]]": "C"}


@dataclass
class EvalConfig:
    instructions: str = ""
    out: str = ""
    target_url: str = ""
    target_model: str = ""
    target_key_env: str = "OPENAI_API_KEY"
    judge_url: str = ""
    judge_model: str = ""
    judge_key_env: str = "OPENAI_API_KEY"
    field: str | None = None  # the instruction's field; default: instruction (+ context), text or prompt
    limit: int | None = None  # a seeded sample of N instructions
    seed: int = 0  # the sample and the bootstrap
    rewrites: str | None = None  # rewrites from a file instead of the prompter
    rewrites_target: str | None = None  # of a rewrites file with several targets' rewrites, this one's
    reference: str | None = None  # AlpacaEval model_outputs.json: reference mode
    lora: str | None = None
    head: str | None = None
    model: str | None = None
    max_new_tokens: int = 256  # the prompter's longest rewrite
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"
    max_tokens: int = 1024  # the target's longest answer
    temperature: float = 0.0  # the target's sampling
    judge_max_tokens: int = 512
    concurrency: int = 8
    timeout: float = 120.0
    max_retries: int = 6
    retry_base: float = 1.0
    bootstrap: int = 2000
    cache: str = str(DEFAULT_CACHE)


class EvalError(UsageError):
    """Bad instructions, rewrites or references; the message names the file and the line."""


def parse_args(argv=None) -> EvalConfig:
    d = EvalConfig()
    p = cli.parser(__doc__)
    p.add_argument("--instructions", required=True, help="AlpacaEval .json, Vicuna .jsonl, Dolly, or .jsonl/.json/"
                   ".csv/.txt of instructions")
    p.add_argument("--out", required=True, help="folder for results.json, judgments.jsonl and report.html")
    p.add_argument("--target-url", required=True, help="the target LLM's OpenAI-compatible API root")
    p.add_argument("--target-model", required=True, help="the target's model name at that endpoint")
    p.add_argument("--target-key-env", type=cli.env_name, default=d.target_key_env,
                   help="environment variable with the target's key")
    p.add_argument("--judge-url", required=True, help="the judge LLM's OpenAI-compatible API root")
    p.add_argument("--judge-model", required=True, help="the judge's model name, e.g. gpt-4o")
    p.add_argument("--judge-key-env", type=cli.env_name, default=d.judge_key_env,
                   help="environment variable with the judge's key")
    p.add_argument("--field", help="the instruction's field (default: instruction + context, text, or prompt)")
    p.add_argument("--limit", type=cli.positive_int, help="evaluate a seeded sample of N instructions")
    p.add_argument("--seed", type=int, default=d.seed, help="for --limit's sample and the bootstrap")
    p.add_argument("--rewrites", help="rewrites from this file (fields instruction/input/prompt and "
                   "rewrite/output/improved) instead of the prompter")
    p.add_argument("--rewrites-target", metavar="NAME", help="of a --rewrites file with rewrites for several "
                   "targets (generate.py --json with several heads), those whose target is NAME")
    p.add_argument("--reference", help="AlpacaEval model_outputs.json: judge each answer against its reference")
    add_args(p, heads="one")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=d.max_new_tokens, help="longest rewrite")
    p.add_argument("--batch-size", type=cli.positive_int, default=d.batch_size, help="rewrites decoded together")
    cli.add_hardware_args(p, d)
    p.add_argument("--max-tokens", type=cli.positive_int, default=d.max_tokens, help="the target's longest answer")
    p.add_argument("--temperature", type=cli.nonnegative_float, default=d.temperature, help="the target's sampling")
    p.add_argument("--judge-max-tokens", type=cli.positive_int, default=d.judge_max_tokens,
                   help="the judge's longest reply")
    add_request_args(p, d)
    p.add_argument("--bootstrap", type=cli.positive_int, default=d.bootstrap, help="bootstrap resamples")
    cfg = EvalConfig(**vars(p.parse_args(argv)))
    if not cfg.rewrites and not (cfg.lora or cfg.head):
        raise EvalError("nothing makes the rewrites: give the prompter (--lora, --head) or --rewrites FILE")
    return cfg


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class Item:
    source: str  # its place in its file: file:line, or file #index in a JSON list; and its id if it has one
    instruction: str
    category: str | None = None
    reference: str | None = None  # reference mode: the output its answers are judged against


ID_FIELDS = ("id", "question_id")  # Vicuna's and MT-Bench's; shown with the item's place in the file


def _records(path) -> list[tuple[str, dict]]:
    """(where, record) for each record of a .jsonl, .json or .csv file: where is file:line, or file #n (the
    n-th record, from 1) for a JSON list (AlpacaEval's is one line: every item would be file:1)."""
    path = Path(path)
    records = read_records(path)
    if path.suffix.lower() == ".json":
        return [(f"{path} #{i}", record) for i, (_, record) in enumerate(records, 1)]
    return [(f"{path}:{line}", record) for line, record in records]


def _one_line(text, limit=200) -> str:
    """text on one line and printable, for a message that quotes what a file holds."""
    text = " ".join(str(text).split())
    return (text if text.isprintable() else ascii(text)[1:-1])[:limit]


def _fields(record: dict) -> str:
    return _one_line(", ".join(map(str, record))) or "none"


def _text(value: str, where: str, what: str) -> str:
    """value stripped, or an EvalError when it holds half a surrogate pair (a JSON "\\ud800" escape alone):
    no endpoint can be sent it and no file written with it, so the run would stop later with a traceback."""
    if has_lone_surrogate(value):
        raise EvalError(f"{where}: the {what} holds a lone surrogate (an escape such as \\ud800 without its "
                        "pair), which is not text; fix or remove it")
    return value.strip()


def _named(where: str, record: dict) -> str:
    """where, with the record's id when it has a short one."""
    for name in ID_FIELDS:
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            continue
        shown = _one_line(value, 40)
        if shown and shown == str(value).strip():
            return f"{where} (id {shown})"
    return where


def read_instructions(path, field=None) -> list[Item]:
    """Instructions from AlpacaEval's JSON (instruction, dataset), Vicuna's JSONL (text, category),
    Dolly/self-instruct (instruction + context or input, joined by a blank line), records with --field,
    or a .txt file (one per line)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":  # one per line, as target_data.py reads its prompts
        items = [Item(source, line.strip()) for source, line in read_prompts(path)]
    else:
        items = [_item(where, record, field) for where, record in _records(path)]
    if not items:
        raise EvalError(f"{path}: no instructions")
    return items


def _item(where: str, record: dict, field: str | None) -> Item:
    if field:
        text = record.get(field)
    elif "instruction" in record:
        text, extra = record["instruction"], record.get("context") or record.get("input") or ""
        if isinstance(text, str) and isinstance(extra, str) and extra.strip():
            text = f"{text.strip()}\n\n{extra.strip()}"
    else:
        text = record.get("text", record.get("prompt"))
    if not isinstance(text, str):
        raise EvalError(f"{where}: no instruction (fields: {_fields(record)}); name its field with --field")
    if not text.strip():
        raise EvalError(f"{where}: the instruction is empty; fill it in or remove the record")
    category = record.get("category") or record.get("dataset")
    category = _text(str(category), where, "category") if category else None
    return Item(_named(where, record), _text(text, where, "instruction"), category or None)


REWRITE_KEYS, REWRITE_VALUES = ("instruction", "input", "prompt"), ("rewrite", "output", "improved")


def _pairs(path, keys: tuple[str, ...], values: tuple[str, ...], what: str) -> list[tuple[str, str, str, dict]]:
    """(where, key, value, record) for each record of path, holding one of keys and one of values."""
    found = []
    for where, record in _records(path):
        key = next((record[k] for k in keys if isinstance(record.get(k), str)), None)
        value = next((record[v] for v in values if isinstance(record.get(v), str)), None)
        if key is None or value is None:
            raise EvalError(f"{where}: a {what} record needs one of {'/'.join(keys)} and one of "
                            f"{'/'.join(values)} (fields: {_fields(record)})")
        found.append((where, _text(key, where, "instruction"), _text(value, where, what), record))
    return found


def read_rewrites(path, target: str | None = None) -> dict[str, str]:
    """{instruction: rewrite} from any optimiser's records (generate.py --json: input, output, target). Of a
    file with rewrites for several targets (generate.py with several heads), those whose "target" is
    `target`; without one such a file is refused, as is a second, different rewrite of an instruction:
    keeping the last would evaluate a rewrite made for another target, and say nothing."""
    if Path(path).suffix.lower() == ".txt":
        raise EvalError(f"--rewrites {path}: a .txt has no instruction beside each rewrite; write the rewrites with "
                        "generate.py --json --out FILE.jsonl (an input and an output per line)")
    rows = []
    for where, key, value, record in _pairs(path, REWRITE_KEYS, REWRITE_VALUES, "rewrite"):
        name = record.get("target")
        if name is not None and not isinstance(name, str):
            raise EvalError(f"{where}: its target is {type(name).__name__}, not a name")
        rows.append((where, key, value, name))
    names = sorted({name for *_, name in rows}, key=lambda n: (n is not None, n or ""))
    shown = ", ".join("(none named)" if n is None else _one_line(n, 60) for n in names[:10])
    if target is not None:
        rows = [row for row in rows if row[3] == target]
        if not rows:
            raise EvalError(f"{path}: no rewrites for the target {_one_line(target)} (--rewrites-target); its "
                            f"records' targets are: {shown or 'none'}")
    elif len(names) > 1:
        raise EvalError(f"{path}: rewrites for {len(names)} targets ({shown}); pick one with "
                        "--rewrites-target NAME")
    rewrites, first = {}, {}
    for where, key, value, _ in rows:
        if rewrites.setdefault(key, value) != value:
            raise EvalError(f"{where}: another rewrite of the instruction of {first[key]}, not the same; keep one")
        first.setdefault(key, where)
    return rewrites


def read_references(path) -> dict[str, list[str]]:
    """{instruction: its reference outputs, in file order} from AlpacaEval's model_outputs.json: an
    instruction asked twice may have two outputs, matched to the instruction's places in order."""
    references = {}
    for _, key, value, _ in _pairs(path, ("instruction",), ("output",), "reference"):
        references.setdefault(key, []).append(value)
    return references


def attach_references(items: list[Item], references: dict[str, list[str]], path) -> None:
    """Each item's reference: the k-th output for its instruction goes to its k-th place in the instructions
    (or the last, when the reference file has fewer)."""
    seen = {}
    for item in items:
        outputs = references.get(item.instruction)
        k = seen[item.instruction] = seen.get(item.instruction, -1) + 1
        item.reference = outputs[min(k, len(outputs) - 1)] if outputs else None
    missing = [item for item in items if item.reference is None]
    if missing:
        raise EvalError(f"{path}: no reference output for {len(missing)} of {len(items)} instructions, e.g. "
                        f"{missing[0].source}; give the model_outputs.json of the same instruction set")


def sample(items: list[Item], limit, seed) -> list[Item]:
    if limit and limit > len(items):
        print(f"--limit {limit}: the file has {len(items)} instructions; all are used", file=sys.stderr)
    if not limit or limit >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), limit))
    return [item for i, item in enumerate(items) if i in keep]


def rewrites_file(cfg: EvalConfig, hw: hardware.Hardware, out: Path) -> tuple[Path, dict[str, str]]:
    """out/rewrites-<id>.jsonl, named by what makes the rewrites (so that another adapter or head never reuses
    them: the base's folder, the adapter's and the head's contents, --max-new-tokens, the device kind and the
    precision --precision resolves to there: hw), and the rewrites it holds {instruction: rewrite}. Another
    --limit or instruction set reuses those it has."""
    made_by = [os.path.realpath(cfg.model) if cfg.model else None, cfg.max_new_tokens, hw.device.type, hw.precision]
    for path, identity in ((Path(cfg.lora or "") / "adapter_model.safetensors", lambda p: stage1_id(p.parent)),
                           (Path(cfg.lora or "") / "adapter_config.json", lambda p: p.read_text()),  # its scale
                           (Path(cfg.head or ""), content_id)):
        try:  # their contents, not their bytes; loading them below names what is wrong with a bad file
            made_by.append(identity(path) if path.is_file() else None)
        except Exception:  # noqa: BLE001
            made_by.append(None)
    name = hashlib.sha256(json.dumps(made_by, default=str).encode()).hexdigest()[:12]
    path = out / f"rewrites-{name}.jsonl"
    done = {}
    for line in path.read_bytes().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
            if isinstance(record["output"], str):
                done[record["input"]] = record["output"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a stop: rewritten again
    return path, done


def prompter_rewrites(cfg: EvalConfig, hw: hardware.Hardware, items: list[Item], path: Path,
                      done: dict[str, str]) -> dict[str, str]:
    """Greedy rewrites by the prompter (the head for this target), appended to rewrites_file's path as they
    come, after those it already holds (done), so that a rerun makes only those missing. An instruction too
    long for the prompter's context gets none: the original is used, and counted as an empty rewrite."""
    todo = sorted({item.instruction for item in items} - set(done))
    if not todo:
        return done
    print(hw.describe(), file=sys.stderr)  # (a rerun whose rewrites are all made loads no prompter)
    prompter = Prompter.load(cfg.model, cfg.lora, [cfg.head] if cfg.head else [], dtype=hw.dtype, device=hw.device)
    target = prompter.targets[0] if prompter.targets else None
    context = prompter.model.config.block_size
    lengths = {t: len(prompter.encode(t)) for t in todo}
    fits = [t for t in todo if lengths[t] < context]
    if len(fits) < len(todo):
        print(f"{len(todo) - len(fits)} instructions are longer than the prompter's context of {context} tokens: "
              "their originals are used (counted as empty rewrites)", file=sys.stderr)
    fits.sort(key=lengths.get)  # less padding
    with open(path, "a", encoding="utf-8") as sink, tqdm(total=len(fits), unit="rewrite", file=sys.stderr) as bar:
        for text in sorted(set(todo) - set(fits)):  # written too: a rerun loads no prompter for them
            sink.write(json.dumps({"input": text, "output": ""}, ensure_ascii=False) + "\n")
            done[text] = ""
        for start in range(0, len(fits), cfg.batch_size):
            batch = fits[start:start + cfg.batch_size]
            for text, rewrite in zip(batch, prompter.rewrite(batch, target, cfg.max_new_tokens)):
                sink.write(json.dumps({"input": text, "output": rewrite}, ensure_ascii=False) + "\n")
                done[text] = rewrite
            sink.flush()
            bar.update(len(batch))
    return done


# ---------------------------------------------------------------------------------------------- judging


def parse_verdict(reply: str) -> str | None:
    """"A", "B" or "C" when the reply holds exactly one kind of verdict, else None (unparsed)."""
    found = {v for marker, v in VERDICTS.items() if marker in reply}
    return found.pop() if len(found) == 1 else None


def judge_messages(instruction: str, a: str, b: str) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_PROMPT.format(instruction=instruction, a=a, b=b)}]


def side_verdict(first: str | None, second: str | None) -> str | None:
    """The verdict for side X from two judgments, X as A then X as B: "win", "loss" or "tie" for X (a
    verdict that changes with the order is a tie); None if either is unparsed."""
    if first is None or second is None:
        return None
    as_a = {"A": "win", "B": "loss", "C": "tie"}[first]
    as_b = {"B": "win", "A": "loss", "C": "tie"}[second]
    return as_a if as_a == as_b else "tie"


SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def bootstrap_interval(scores, n_resamples: int, seed: int) -> tuple[float, float] | tuple[None, None]:
    """95% percentile interval of the mean of scores, by resampling items with replacement; (None, None) for
    no scores (null in results.json: NaN is not JSON)."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return None, None
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(n_resamples, len(scores)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarise(rows: list[dict], reference: bool, n_resamples: int, seed: int) -> dict:
    """The table for rows (judged items): wins, ties, losses and win rate with its interval (pairwise), or
    each side's win rate against the reference and their difference (reference mode)."""
    mean = lambda x: float(np.mean(x)) if len(x) else None  # noqa: E731 (None with no items: NaN is not JSON)
    if not reference:
        verdicts = [r["verdict"] for r in rows]
        scores = [SCORE[v] for v in verdicts]
        return {"n": len(rows), "wins": verdicts.count("win"), "ties": verdicts.count("tie"),
                "losses": verdicts.count("loss"), "win_rate": mean(scores),
                "ci95": list(bootstrap_interval(scores, n_resamples, seed))}
    original = [SCORE[r["verdict_original"]] for r in rows]
    optimised = [SCORE[r["verdict_optimised"]] for r in rows]
    difference = np.subtract(optimised, original)
    return {"n": len(rows), "win_rate_original": mean(original), "win_rate_optimised": mean(optimised),
            "ci95_original": list(bootstrap_interval(original, n_resamples, seed)),
            "ci95_optimised": list(bootstrap_interval(optimised, n_resamples, seed)),
            "difference": mean(difference), "ci95_difference": list(bootstrap_interval(difference, n_resamples, seed))}


# ------------------------------------------------------------------------------------------------- main


def main(cfg: EvalConfig, sleep=time.sleep) -> dict:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file; --out is a folder for the results")
    if cfg.rewrites_target is not None and not cfg.rewrites:
        raise EvalError("--rewrites-target picks among the targets of a --rewrites file; give --rewrites FILE")
    items = read_instructions(cfg.instructions, cfg.field)
    reference_mode = cfg.reference is not None
    if reference_mode:  # before the sample: an instruction's k-th place gets its k-th reference
        attach_references(items, read_references(cfg.reference), cfg.reference)
    items = sample(items, cfg.limit, cfg.seed)
    rewrites = read_rewrites(cfg.rewrites, cfg.rewrites_target) if cfg.rewrites else None
    if rewrites is not None:
        missing = [item for item in items if item.instruction not in rewrites]
        if missing:
            raise EvalError(f"{cfg.rewrites}: no rewrite for {len(missing)} of {len(items)} instructions, e.g. "
                            f"{missing[0].source}")
    call = request_settings(cfg, sleep)  # one cache, shared by the target and the judge
    target = LLM(cfg.target_url, cfg.target_model, cfg.target_key_env, flag="--target-url",
                 key_flag="--target-key-env", **call)
    judge = LLM(cfg.judge_url, cfg.judge_model, cfg.judge_key_env, flag="--judge-url", key_flag="--judge-key-env",
                **call)
    # a server that is not there is said before the prompter loads, not after minutes of retries; unless this
    # is a rerun: every rewrite made, and the target's answers to both prompts of every item in the cache. Then
    # the run goes on from the cache: a request it lacks fails, and the table is made of the rest
    if rewrites is None:  # the prompter's, on the hardware it would run on (which names its rewrites file)
        hw = hardware.resolve(cfg.device, cfg.precision, base_config(cfg.model, cfg.lora), work="decode")
        rewrites_path, made = rewrites_file(cfg, hw, out)
    else:
        made = rewrites
    rerun = all(item.instruction in made for item in items) and all(
        target.cached([{"role": "user", "content": prompt}], **answer_params(cfg))
        for item in items for prompt in (item.instruction, made[item.instruction].strip() or item.instruction))
    for llm in {target.base_url: target, judge.base_url: judge}.values():
        try:
            llm.probe()
        except LLMError as e:
            if not rerun:
                raise
            llm.offline = f"cannot reach {llm.base_url}"
            print(f"warning: {e}; going on with the answers in the cache {cfg.cache}", file=sys.stderr)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"--out {out}: cannot be made ({e.strerror or e}); give a folder that can be written") \
            from None

    # 1. the rewrites
    if rewrites is None:
        rewrites = prompter_rewrites(cfg, hw, items, rewrites_path, made)
    empty = sum(1 for item in items if not rewrites[item.instruction].strip())
    optimised = {item.instruction: rewrites[item.instruction].strip() or item.instruction for item in items}

    # 2. the target's answers to both prompts (temperature 0 by default: each prompt asked once), and 3. the
    # judgments in both orders, each item's asked as soon as its answers are in
    if not reference_mode:  # optimised against original
        pairs = lambda item, answers: [(answers.get(item.instruction),  # noqa: E731
                                        answers.get(optimised[item.instruction]))]
    else:  # each side against the reference
        pairs = lambda item, answers: [(answers.get(prompt), item.reference)  # noqa: E731
                                       for prompt in (item.instruction, optimised[item.instruction])]
    answers, replies, failed = ask(target, judge, items, optimised, pairs, cfg)

    # 4. the table
    rows, unparsed, incomplete = [], [], 0
    for item in items:
        row = {"source": item.source, "category": item.category, "instruction": item.instruction,
               "rewrite": optimised[item.instruction], "answer_original": answers.get(item.instruction),
               "answer_optimised": answers.get(optimised[item.instruction])}
        if reference_mode:
            row["reference"] = item.reference
        raw = [(replies.get((item.instruction, x, y)), replies.get((item.instruction, y, x))) if x and y else
               (None, None) for x, y in pairs(item, answers)]
        if any(a is None or b is None for a, b in raw):
            incomplete += 1
            row["status"] = "incomplete"
        else:
            parsed = [(parse_verdict(a), parse_verdict(b)) for a, b in raw]
            names = ["verdict_original", "verdict_optimised"] if reference_mode else ["verdict"]
            for name, (a, b), (pa, pb) in zip(names, raw, parsed):
                # the side judged is A in the first order, except pairwise, where the original comes first
                row[name] = side_verdict(pa, pb) if reference_mode else side_verdict(pb, pa)
                row[f"{name}_judgments"] = [{"reply": a, "parsed": pa}, {"reply": b, "parsed": pb}]
            row["status"] = "unparsed" if any(row[n] is None for n in names) else "judged"
            if row["status"] == "unparsed":
                unparsed.append(item.source)
        rows.append(row)

    judged = [r for r in rows if r["status"] == "judged"]
    rewritten_by = ({"rewrites": cfg.rewrites, "rewrites_target": cfg.rewrites_target} if cfg.rewrites else
                    {"model": cfg.model, "lora": cfg.lora, "head": cfg.head})
    results = {"mode": "reference" if reference_mode else "pairwise", "rewritten_by": rewritten_by,
               "target": cfg.target_model,
               "judge": cfg.judge_model, "instructions": cfg.instructions, "items": len(items),
               "judged": len(judged), "unparsed": len(unparsed), "incomplete": incomplete,
               "empty_rewrites": empty, "failed_requests": failed,
               "overall": summarise(judged, reference_mode, cfg.bootstrap, cfg.seed), "categories": {}}
    for category in sorted({r["category"] for r in judged if r["category"]}):
        subset = [r for r in judged if r["category"] == category]
        results["categories"][category] = summarise(subset, reference_mode, cfg.bootstrap, cfg.seed)
    results["requests_sent"] = {"target": target.requests, "judge": judge.requests}

    write_atomic(out / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_atomic(out / "judgments.jsonl", "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n"
                                                  for r in rows))
    write_atomic(out / "report.html", render_html(results, rows))
    print(table(results))
    if unparsed:
        print(f"{len(unparsed)} items had a judge reply without a verdict (e.g. {unparsed[0]}; a rerun asks again); "
              "they are left out "
              "of the table and listed in judgments.jsonl", file=sys.stderr)
    if incomplete:
        print(f"{incomplete} items are incomplete ({failed} requests failed); rerun the same "
              "command to complete them (answered requests come from the cache)", file=sys.stderr)
    print(f"wrote {out / 'results.json'}, {out / 'judgments.jsonl'} and {out / 'report.html'}", file=sys.stderr)
    return results


def answer_params(cfg: EvalConfig) -> dict:
    """The target's request parameters (part of the cache's key)."""
    return dict(temperature=cfg.temperature, max_tokens=cfg.max_tokens)


def ask(target: LLM, judge: LLM, items: list[Item], optimised: dict, pairs, cfg: EvalConfig) -> tuple:
    """(answers {prompt: text}, replies {(instruction, x, y): judge's text}, number of failed requests).
    Every prompt is asked once; an item's judgments (each (x, y) of pairs(item, answers), in both orders) are
    asked as soon as both its answers are in, so that the judge works while the target still answers. At
    most --concurrency requests in flight, with a progress bar."""
    prompts = sorted({item.instruction for item in items} | set(optimised.values()))
    waiting = {}  # prompt -> the items whose judgments wait for its answer
    for item in items:
        for prompt in {item.instruction, optimised[item.instruction]}:
            waiting.setdefault(prompt, []).append(item)
    judge_params = dict(temperature=0.0, max_tokens=cfg.judge_max_tokens)
    has_verdict = lambda reply: parse_verdict(reply) is not None  # noqa: E731 (else not cached: asked again)

    def call(request):
        kind, key = request
        if kind == "answer":
            return target.chat([{"role": "user", "content": key}], **answer_params(cfg))
        return judge.chat(judge_messages(*key), keep=has_verdict, **judge_params)

    pool = Pool(call, cfg.concurrency)
    for prompt in prompts:
        pool.submit(("answer", prompt))
    answers, replies, failed, asked = {}, {}, [], set()
    judgments = 2 * len(pairs(items[0], {})) * len(items) if items else 0  # at most; fewer when some are shared
    with tqdm(total=len(prompts) + judgments, unit="request", desc="answers and judgments", file=sys.stderr) as bar:
        for (kind, key), reply, error in pool.results():
            bar.update()
            if isinstance(error, RequestFailed):
                failed.append(f"({'answer' if kind == 'answer' else 'judgment'}) {error}")
                continue
            if error is not None:
                raise error  # a refused key or redirect: nothing else would work either
            if kind == "judgment":
                replies[key] = reply
                continue
            answers[key] = reply
            for item in waiting[key]:
                if item.instruction in answers and optimised[item.instruction] in answers:
                    for x, y in pairs(item, answers):
                        for request in ((item.instruction, x, y), (item.instruction, y, x)):
                            if request not in asked:
                                asked.add(request)
                                pool.submit(("judgment", request))
        bar.total = bar.n  # the judgments of items with a failed answer, and shared ones, were never asked
        bar.refresh()
    for line in failed[:3]:
        print(f"failed {line}", file=sys.stderr)
    return answers, replies, len(failed)


# ---------------------------------------------------------------------------------------------- reports


def _rate(summary: dict, key="win_rate", ci="ci95") -> str:
    if summary[key] is None:
        return "n/a (none judged)"
    return f"{summary[key]:.3f} [{summary[ci][0]:.3f}, {summary[ci][1]:.3f}]"


def table(results: dict) -> str:
    """The results as a text table, overall first, then per category."""
    groups = [("overall", results["overall"]), *results["categories"].items()]
    if results["mode"] == "pairwise":
        lines = [f"{'':24} {'n':>5} {'wins':>5} {'ties':>5} {'losses':>6}  win rate of optimised [95% CI]"]
        lines += [f"{name[:24]:24} {s['n']:5} {s['wins']:5} {s['ties']:5} {s['losses']:6}  {_rate(s)}"
                  for name, s in groups]
    else:
        lines = [f"{'':24} {'n':>5}  {'original vs reference':>24}  {'optimised vs reference':>24}  difference"]
        lines += [f"{name[:24]:24} {s['n']:5}  {_rate(s, 'win_rate_original', 'ci95_original'):>24}  "
                  f"{_rate(s, 'win_rate_optimised', 'ci95_optimised'):>24}  "
                  f"{_rate(s, 'difference', 'ci95_difference')}" for name, s in groups]
    head = (f"{results['mode']} evaluation of {results['target']}, judged by {results['judge']}: "
            f"{results['judged']} of {results['items']} items judged")
    return "\n".join([head, *lines])


OUTCOMES = {  # the optimised prompt's result on an item, as the report's filters name it in each mode
    "pairwise": {"win": "optimised wins", "tie": "ties", "loss": "optimised loses", "none": "not judged"},
    "reference": {"win": "optimised better", "tie": "as good", "loss": "optimised worse", "none": "not judged"},
}


def outcome(row: dict) -> str:
    """"win", "tie" or "loss" for the optimised prompt on a judged item (reference mode: its verdict against
    the reference beside the original's, the item's share of the paired difference), else "none"."""
    if row["status"] != "judged":
        return "none"
    if "verdict" in row:
        return row["verdict"]
    difference = SCORE[row["verdict_optimised"]] - SCORE[row["verdict_original"]]
    return "win" if difference > 0 else "loss" if difference < 0 else "tie"


def charts(results: dict) -> list[tuple[str, str]]:
    """The answer as (caption, SVG): the optimised side's win rate with its 95% interval, overall and per
    category (pairwise), or both sides' win rates against the reference and their difference (reference
    mode)."""
    groups = [("overall", results["overall"]), *results["categories"].items()]
    label = lambda name, s: f"{name if len(name) <= 22 else name[:21] + '…'} (n={s['n']})"  # noqa: E731
    nan = lambda x: float("nan") if x is None else x  # noqa: E731 (drawn as "not judged")

    def row(text, s, key, ci):
        return text, nan(s[key]), nan(s[ci][0]), nan(s[ci][1])

    if results["mode"] == "pairwise":
        title = "Win rate of the optimised prompts' answers over the originals' (a tie counts half), 95% intervals"
        return [(title, interval_chart([row(label(name, s), s, "win_rate", "ci95") for name, s in groups], title,
                                       "win rate of the optimised prompt (0.5: as good as the original)"))]
    sides = [row(f"{label(name, s)} {side}", s, f"win_rate_{side}", f"ci95_{side}")
             for name, s in groups for side in ("original", "optimised")]
    title = "Win rate of each side's answers against the reference (a tie counts half), 95% intervals"
    chart = interval_chart(sides, title, "win rate against the reference (0.5: as good as the reference)")
    # the originals' rows in grey, so that the two sides of a category tell apart at a glance
    chart = re.sub(r'<g class="row" data-label="[^"]* original".*?</g>', lambda m: m[0].replace("#1f77b4", "#999"),
                   chart, flags=re.S)
    difference = "Optimised minus original, win rate against the reference, paired 95% intervals"
    return [(f"{title}: grey the original prompts, blue the optimised", chart),
            (difference, interval_chart([row(label(name, s), s, "difference", "ci95_difference")
                                         for name, s in groups], difference,
                                        "difference of the win rates (0: no difference)", mark=0.0, low=-1.0,
                                        high=1.0))]


def _headline(results: dict) -> str:
    """The answer in one sentence."""
    s = results["overall"]
    if not s["n"]:
        return "No item was judged: there is no result yet."
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    span = lambda ci: f"95% interval {pct(ci[0])} to {pct(ci[1])}"  # noqa: E731
    if results["mode"] == "pairwise":
        low, high = s["ci95"]
        verdict = ("better than the originals" if low > 0.5 else "worse than the originals" if high < 0.5
                   else "no clear difference from the originals")
        return (f"Over {s['n']} judged items, the answers to the optimised prompts win {pct(s['win_rate'])} "
                f"({span(s['ci95'])}; a tie counts half): {verdict}.")
    low, high = s["ci95_difference"]
    verdict = ("the optimised prompts do better" if low > 0 else "the optimised prompts do worse" if high < 0
               else "no clear difference")
    return (f"Over {s['n']} judged items, against the reference answers the optimised prompts' answers win "
            f"{pct(s['win_rate_optimised'])} ({span(s['ci95_optimised'])}) and the originals' "
            f"{pct(s['win_rate_original'])} ({span(s['ci95_original'])}): a difference of "
            f"{100 * s['difference']:+.1f} points ({span(s['ci95_difference'])}): {verdict}.")


def _html_table(results: dict) -> str:
    e = html.escape
    number = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    interval = lambda ci: "–" if ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"  # noqa: E731
    groups = [("overall", results["overall"]), *results["categories"].items()]
    if results["mode"] == "pairwise":
        head = ["", "n", "wins", "ties", "losses", "win rate of optimised", "95% interval"]
        body = [[name, s["n"], s["wins"], s["ties"], s["losses"], number(s["win_rate"]), interval(s["ci95"])]
                for name, s in groups]
    else:
        head = ["", "n", "original vs reference", "95% interval", "optimised vs reference", "95% interval",
                "difference", "95% interval"]
        body = [[name, s["n"], number(s["win_rate_original"]), interval(s["ci95_original"]),
                 number(s["win_rate_optimised"]), interval(s["ci95_optimised"]), number(s["difference"]),
                 interval(s["ci95_difference"])] for name, s in groups]
    rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>\n" for r in body)
    return (f"<table><thead><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr></thead>\n<tbody>{rows}</tbody>"
            "</table>")


def _item_html(index: int, r: dict, mode: str, instructions: str) -> str:
    e = lambda text, missing="(none)": html.escape(missing if text is None else str(text))  # noqa: E731
    no_answer = "(no answer: the request failed; rerun to complete it)"
    kind = outcome(r)
    badge = OUTCOMES[mode][kind] if kind != "none" else r["status"]
    shown = str(Path(instructions))  # the page names the file once; items by their place in it
    name = Path(shown).name + r["source"][len(shown):] if r["source"].startswith(shown) else r["source"]
    verdicts = ""
    if mode == "reference" and r["status"] == "judged":
        verdicts = (f'<p class="verdicts">against the reference: original <b>{e(r["verdict_original"])}</b>, '
                    f'optimised <b>{e(r["verdict_optimised"])}</b></p>')
    same = r["rewrite"] == r["instruction"]
    # row by row, the two sides in two columns, so that the answers start level whatever the prompts' lengths
    sides = (f'<h4>original prompt</h4><h4>optimised prompt{" (no rewrite: the original was used)" if same else ""}'
             f'</h4><pre class="prompt">{e(r["instruction"])}</pre><pre class="prompt">{e(r["rewrite"])}</pre>'
             f'<h4>its answer</h4><h4>its answer</h4><pre>{e(r["answer_original"], no_answer)}</pre>'
             f'<pre>{e(r["answer_optimised"], no_answer)}</pre>')
    reference = (f'<div class="reference"><h4>reference answer (both answers were judged against it)</h4>'
                 f'<pre>{e(r["reference"])}</pre></div>' if mode == "reference" else "")
    titles = {"verdict_judgments": "the judge's replies (original first, then optimised first)",
              "verdict_original_judgments": "the judge's replies on the original's answer vs the reference",
              "verdict_optimised_judgments": "the judge's replies on the optimised answer vs the reference"}
    raw = "".join(f"<details><summary>{e(titles[k])}</summary>"
                  + "".join(f"<pre>{e(j['reply'])}</pre><p>parsed: {e(j['parsed'], 'no verdict')}</p>" for j in r[k])
                  + "</details>" for k in titles if k in r)
    category = f' <span class="category">{e(r["category"])}</span>' if r["category"] else ""
    return (f'<section class="item {kind}" id="item-{index}"><h3><a href="#item-{index}">{e(name)}</a>{category} '
            f'<span class="badge {kind}">{e(badge)}</span></h3>{verdicts}<div class="grid">{sides}</div>'
            f"{reference}{raw}</section>\n")


def render_html(results: dict, rows: list[dict]) -> str:
    """One self-contained page, the answer first: the chart of the win rates, the table, then every item (both
    prompts, both answers, the reference in reference mode, the judge's replies), which radio buttons filter
    to wins, ties or losses with CSS alone."""
    e = html.escape
    mode = results["mode"]
    kinds = [outcome(r) for r in rows]
    filters, hide = [f'<input type="radio" name="show" id="show-all" checked><label for="show-all">all '
                     f"({len(rows)})</label>"], []
    for kind, label in OUTCOMES[mode].items():
        filters.append(f'<input type="radio" name="show" id="show-{kind}"><label for="show-{kind}">{e(label)} '
                       f"({kinds.count(kind)})</label>")
        hide.append(f"#show-{kind}:checked ~ .items .item:not(.{kind})")
    items = "".join(_item_html(i, r, mode, results["instructions"]) for i, r in enumerate(rows))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>phi2-prompter evaluation: {e(results['target'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
h1 {{ margin-bottom: .2em; }} .meta {{ color: #555; margin-top: 0; }} .headline {{ font-size: 1.15em; }}
figure {{ margin: 1.2em 0; }} figcaption {{ font-weight: bold; margin-bottom: .3em; }}
svg {{ display: block; max-width: 100%; height: auto; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }}
th:first-child, td:first-child {{ text-align: left; }} tbody tr:first-child {{ font-weight: bold; }}
pre {{ white-space: pre-wrap; background: #f6f6f6; padding: .6em; border-radius: 4px; max-height: 28em;
      overflow: auto; margin: .3em 0; }}
pre.prompt {{ background: #eef3fa; }}
.grid {{ display: grid; grid-template-columns: 1fr 1fr; column-gap: 1em; align-items: start; }}
h4 {{ margin: .6em 0 .2em; color: #444; }}
section.item {{ border-top: 1px solid #ccc; margin-top: 1.2em; }}
.item h3 a {{ color: inherit; text-decoration: none; }}
.category {{ font-size: .8em; font-weight: normal; color: #555; border: 1px solid #bbb; border-radius: 3px;
            padding: 0 .4em; margin-left: .4em; }}
.badge {{ font-size: .8em; border-radius: 3px; padding: .1em .5em; margin-left: .4em; }}
.badge.win {{ background: #d9f0d9; color: #1a6b1a; }} .badge.loss {{ background: #f8dcdc; color: #9b1c1c; }}
.badge.tie {{ background: #e8e8e8; color: #444; }} .badge.none {{ background: #fbeed5; color: #7a5300; }}
input[name=show] {{ position: absolute; opacity: 0; }}
input[name=show] + label {{ display: inline-block; border: 1px solid #999; border-radius: 4px; padding: .2em .7em;
                           margin: 0 .3em .3em 0; cursor: pointer; }}
input[name=show]:checked + label {{ background: #333; color: white; border-color: #333; }}
input[name=show]:focus-visible + label {{ outline: 2px solid #1f77b4; }}
{", ".join(hide)} {{ display: none; }}
</style></head><body>
<h1>Evaluation of {e(results['target'])}</h1>
<p class="meta">{e(mode)} judging by {e(results['judge'])} · {e(results['instructions'])} · {results['judged']} of \
{results['items']} items judged</p>
<p class="headline">{e(_headline(results))}</p>
{"".join(f'<figure><figcaption>{e(caption)}</figcaption>{svg}</figure>' for caption, svg in charts(results))}
{_html_table(results)}
<p>{results['unparsed']} unparsed (a judge's reply without one verdict), {results['incomplete']} incomplete (a \
request failed: rerun to complete them), {results['empty_rewrites']} empty rewrites (the original was used).</p>
<h2 id="items">The items</h2>
<div class="filters">{"".join(filters)}
<div class="items">
{items}</div></div>
</body></html>
"""


if __name__ == "__main__":
    summary = cli.run("evaluate.py", main, parse_args, on_interrupt="; answers so far are cached: rerun to go on")
    sys.exit(1 if summary["incomplete"] else 0)
