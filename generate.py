"""Rewrite prompts with Phi-2: `python generate.py --lora runs/sft/best --head mistral.safetensors "a poem"`.

The prompter is the base (--model, or the base the stage-1 adapter names), the stage-1 LoRA adapter
(--lora, merged) and, per target LLM, a stage-2 head (--head, repeatable: one rewrite per head for each
prompt). Prompts come as arguments, from --file (.txt one per line, or .jsonl/.json/.csv with --field), or
on stdin. Each is put in the training template and the model's answer, trimmed, is the rewrite (--raw
sends the text as it is and prints the continuation). A single prompt streams to the terminal; files get
a progress bar; --json prints one object per line. --out FILE writes the results atomically, keeping them
in FILE.partial as they come so that a stopped run resumes where it was.
"""

import support.threads  # noqa: F401  (first: OpenMP reads its settings when torch loads)

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from head_adapter import content_id, stage1_id
from phi2.errors import UsageError
from phi2.files import write_atomic
from phi2.generation import compiled
from prompts import read_prompts
from support import cli, hardware
from support.prompter import Prompter, add_args, base_config

WINDOW = 8  # batches per window: prompts are sorted by length within a window, results leave in order


@dataclass
class GenerateConfig:
    prompts: list[str] = dataclasses.field(default_factory=list)
    file: str | None = None
    field: str = "prompt"
    model: str | None = None  # default: the stage-1 adapter's base, else checkpoints/phi-2
    lora: str | None = None
    heads: list[str] = dataclasses.field(default_factory=list)
    raw: bool = False
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"
    stop: list[str] = dataclasses.field(default_factory=list)
    json: bool = False
    out: str | None = None
    overwrite: bool = False  # replace an existing --out
    compile: bool = False  # compile the decode step (torch.compile, static cache)


def parse_args(argv=None) -> GenerateConfig:
    d = GenerateConfig()
    p = cli.parser(__doc__)
    p.add_argument("prompts", nargs="*", help="prompts to rewrite (else --file, else stdin)")
    p.add_argument("--file", help=".txt (one prompt per line), or .jsonl/.json/.csv records")
    p.add_argument("--field", default=d.field, help="the prompt's field in --file records")
    add_args(p, heads="many")
    p.add_argument("--raw", action="store_true", help="no template: continue the text as it is")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=d.max_new_tokens,
                   help="tokens to generate at most")
    p.add_argument("--temperature", type=cli.nonnegative_float, default=d.temperature, help="0 is greedy")
    p.add_argument("--top-k", type=cli.positive_int, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=cli.probability,
                   help="sample among the likeliest tokens holding this mass (0: the likeliest alone)")
    p.add_argument("--seed", type=int, help="for reproducible sampling")
    p.add_argument("--batch-size", type=cli.positive_int, default=d.batch_size, help="prompts decoded together")
    cli.add_hardware_args(p, d)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--out", help="write results to this file (resumes from FILE.partial)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile over a static cache: faster steps after a "
                        "compile of tens of seconds per batch size, worth it for many prompts")
    cfg = GenerateConfig(**vars(p.parse_args(argv)))
    if any(not s for s in cfg.stop):
        raise UsageError("--stop '' would stop before the first token; give a non-empty stop string")
    return cfg


def collect_prompts(cfg: GenerateConfig) -> list[tuple[str, str]]:
    """(where it came from, prompt) for every prompt to rewrite."""
    if cfg.prompts:
        for i, prompt in enumerate(cfg.prompts, 1):
            if not prompt.strip():
                raise UsageError(f"argument {i} is an empty prompt; give some text to rewrite")
        return [(f"argument {i}", p) for i, p in enumerate(cfg.prompts, 1)]
    if cfg.file:
        prompts = read_prompts(cfg.file, cfg.field)
    elif not sys.stdin.isatty():
        prompts = [(f"stdin:{n}", line.rstrip("\n")) for n, line in enumerate(sys.stdin, 1) if line.strip()]
    else:
        raise UsageError("no prompt given: pass prompts as arguments, use --file, or pipe them on stdin")
    if not prompts:
        raise UsageError(f"{cfg.file or 'stdin'} holds no prompt")
    return prompts


def main(cfg: GenerateConfig) -> list[dict]:
    prompts = collect_prompts(cfg)
    if cfg.out:
        _check_out(cfg.out, cfg.overwrite)  # before the model loads
    hw = hardware.resolve(cfg.device, cfg.precision, base_config(cfg.model, cfg.lora), work="decode")
    prompter = Prompter.load(cfg.model, cfg.lora, cfg.heads, dtype=hw.dtype, device=hw.device)
    print(hw.describe(), file=sys.stderr)
    context = prompter.model.config.block_size
    decode = compiled() if cfg.compile else None  # compiled once: every batch reuses its graphs

    # tokenize, and set aside what cannot fit
    todo = []  # (index, prompt ids)
    for i, (source, prompt) in enumerate(prompts):
        ids = prompter.encode(prompt, cfg.raw)
        if len(ids) >= context:
            _warn(f"{source}: {len(ids)} tokens fill the context of {context}; skipped (shorten the prompt)")
            continue
        if len(ids) + cfg.max_new_tokens > context:
            _warn(f"{source}: {len(ids)} tokens leave room for only {context - len(ids)} new tokens")
        todo.append((i, ids))

    partial = Path(cfg.out + ".partial") if cfg.out else None
    targets = prompter.targets or [None]
    records = _resume(partial, prompts, targets, settings(cfg)) if partial else {}  # (index, target) -> record
    todo = [(i, ids) for i, ids in todo if any((i, t) not in records for t in targets)]
    stream = len(prompts) == 1 and len(targets) == 1 and not cfg.json and not cfg.out
    bar = tqdm(total=len(todo), unit="prompt", disable=stream or len(prompts) == 1, file=sys.stderr)
    sink = open(partial, "a", encoding="utf-8") if partial else None

    window = cfg.batch_size * WINDOW
    try:
        for start in range(0, len(todo), window):
            chunk = sorted(todo[start:start + window], key=lambda item: len(item[1]))  # less padding
            for b in range(0, len(chunk), cfg.batch_size):
                batch = chunk[b:b + cfg.batch_size]
                for target in targets:  # the same prompts, once per target's head
                    t = time.perf_counter()
                    out = prompter.complete([ids for _, ids in batch], target, cfg.max_new_tokens,
                                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                            seed=seeds(cfg.seed, batch), stop_strings=cfg.stop, decode=decode,
                                            callback=_printer(cfg.raw) if stream else None)
                    seconds = time.perf_counter() - t
                    new_tokens = sum(len(c.ids) for c in out)
                    for (i, ids), c in zip(batch, out):
                        record = {
                            "index": i, "source": prompts[i][0], "input": prompts[i][1], "target": target,
                            "output": c.text if cfg.raw else c.text.strip(),
                            "prompt_tokens": len(ids), "new_tokens": len(c.ids), "finish": c.finish,
                            "seconds": round(seconds, 4), "tokens_per_s": round(new_tokens / seconds, 2),
                        }
                        records[i, target] = record
                        if sink:
                            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                            sink.flush()
                bar.update(len(batch))
            if not cfg.out and not stream:  # print the window's results, in input order
                for i, _ in sorted(todo[start:start + window]):
                    print(_render([records[i, t] for t in targets], cfg.json, several=len(prompts) > 1), flush=True)
    finally:
        bar.close()
        if sink:
            sink.close()

    if decode:
        print(f"compiling the decode step took {decode.stats['seconds']:.1f} s ({decode.stats['graphs']} "
              "graphs: one per batch size and cache length bucket)", file=sys.stderr)
    indices = sorted({i for i, _ in records})
    if cfg.out:
        text = "".join(_render([records[i, t] for t in targets], cfg.json, several=True) + "\n" for i in indices)
        write_atomic(cfg.out, text)
        partial.unlink()
        heads = f" ({len(indices)} prompts x {len(targets)} heads)" if len(targets) > 1 else ""
        print(f"wrote {len(indices) * len(targets)} rewrites{heads} to {cfg.out}", file=sys.stderr)
    elif stream:
        print()
    return [records[i, t] for i in indices for t in targets]


def seeds(seed, batch) -> list[int] | None:
    """Each prompt's sampling seed, from its place in the input: the same whatever batch it falls in."""
    return None if seed is None else [seed + i for i, _ in batch]


def settings(cfg: GenerateConfig) -> dict:
    """What decides the results, with the adapter's and heads' contents: a resume under others is refused."""
    keys = ("model", "raw", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "precision")
    return {**{k: getattr(cfg, k) for k in keys}, "lora": stage1_id(cfg.lora),
            "heads": sorted(content_id(h) for h in cfg.heads)}


def _check_out(out: str, overwrite: bool = False):
    """One line if --out exists (without --overwrite), or it or its FILE.partial is a folder, or it cannot be made
    because a file stands where a folder of its path belongs, or that place is not writable."""
    if Path(out).is_dir():
        raise UsageError(f"--out {out} is a folder; --out names the file to write the results to: choose a file name")
    if Path(out).exists() and not overwrite:
        raise UsageError(f"--out {out} exists (an earlier run's results); pass --overwrite to replace it, or choose "
                         "another --out")
    if Path(out + ".partial").is_dir():
        raise UsageError(f"--out {out}: {out}.partial, where the results go as they come, is a folder; choose "
                         "another --out")
    above = next(p for p in Path(out).absolute().parents if p.exists())  # where the folders to make begin
    if not above.is_dir():
        raise UsageError(f"--out {out}: {above} is a file, so no folder can go there; choose another --out")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {above} is not writable; choose another --out")


def _resume(partial: Path, prompts, targets, made_with: dict) -> dict:
    """Results already in FILE.partial from a stopped run, keyed by (prompt index, target); the file's first
    line holds the settings they were made with."""
    if not partial.exists() or not partial.stat().st_size:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"settings": made_with}) + "\n")
        return {}
    try:
        text = partial.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"cannot be read ({e.strerror})"
        raise UsageError(f"{partial}: {reason}, so not results generate.py wrote; delete it or choose another --out") \
            from None
    done, targets = {}, list(targets)  # a list: a record's target may be any JSON value, hashable or not
    for n, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line cut short by the stop (or damaged): that prompt runs again
        if n == 1 and isinstance(record, dict) and "settings" in record:
            was = record["settings"] if isinstance(record["settings"], dict) else {"settings": record["settings"]}
            was = json.loads(json.dumps(was))
            now = json.loads(json.dumps(made_with))
            # a key of a damaged file is shown as Python writes it: never a line break in the message
            changed = sorted(k if k in now else repr(k) for k in set(was) | set(now) if was.get(k) != now.get(k))
            if changed:
                raise UsageError(f"{partial}: results made with other settings ({', '.join(changed)} changed); "
                                 "rerun with those, or delete it or choose another --out")
            continue
        i = record.get("index") if isinstance(record, dict) else None
        if (type(i) is not int or not 0 <= i < len(prompts) or record.get("input") != prompts[i][1]
                or record.get("target") not in targets):
            raise UsageError(f"{partial}:{n}: results for other prompts or heads; delete it or choose another --out")
        done[i, record["target"]] = record
    if done:
        print(f"resuming: {len(done)} rewrites already in {partial}", file=sys.stderr)
    return done


def _render(records: list[dict], as_json: bool, several: bool) -> str:
    """One prompt's results (one per target) as JSON lines or as text."""
    if as_json:
        return "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    if not several and len(records) == 1:
        return records[0]["output"]
    lines = [f"> {records[0]['input']}"]
    lines += [r["output"] if r["target"] is None else f"[{r['target']}] {r['output']}" for r in records]
    return "\n".join(lines) + "\n"


def _printer(raw: bool):
    """A streaming callback writing text to stdout; the template's leading space is dropped."""
    started = [raw]

    def callback(row, text):
        if not started[0]:
            text = text.lstrip()
            started[0] = bool(text)
        sys.stdout.write(text)
        sys.stdout.flush()

    return callback


def _warn(message):
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    cli.run("generate.py", main, parse_args,
            on_interrupt="; rerun the same command to resume" if "--out" in sys.argv else "")
