"""The prompt template and the prompt-pair data, in one place for both trainers and for generation.

The papers' best training text is `System: Fix the following prompt. Prompt: {bad}. Answer: {good}`: the
model reads everything up to "Answer:" and learns to write " {good}" and then EOS; the loss is on those
tokens only (labels are -100 before them). Pairs are read from JSONL, a JSON list, or CSV (quoted
multi-line fields included); a bad record stops the run with its file:line. Batches are padded to their
longest row and grouped by length, in an order that is a pure function of (seed, epoch) so that a resumed
run sees the same batches.
"""

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from phi2.config import parse_json
from phi2.errors import UsageError

TEMPLATE = "System: Fix the following prompt. Prompt: {prompt}. Answer:"
IGNORE_INDEX = -100  # cross_entropy's ignore_index: no loss on these positions
DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_DATA = DATA_DIR / "prompt_pairs.jsonl"


class DataError(UsageError):
    """Bad input data; the message starts with file:line."""


def format_prompt(prompt: str) -> str:
    """The text the model continues: the template up to and including "Answer:"."""
    return TEMPLATE.format(prompt=prompt.strip())


def format_answer(improved: str) -> str:
    """The text the model learns to write after "Answer:" (EOS follows as a token, not as text)."""
    return " " + improved.strip()


# ---------------------------------------------------------------------------------------------- reading


def read_records(path) -> list[tuple[int, dict]]:
    """(line number, record) for each object in a .jsonl, .json (a list of objects) or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json or .csv")
    text = read_text(path)
    if suffix == ".jsonl":
        lines = text_lines(text)
        return [(n, _json_object(line, f"{path}:{n}")) for n, line in enumerate(lines, 1) if line.strip()]
    if suffix == ".json":
        return _json_list(text, path)
    # newline="": quoted fields keep their line breaks; strict: a quote left open is an error, not the rest of
    # the file taken into one field
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    records, start = [], 2  # line 1 is the header
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{start}: more values than the header has columns")
            records.append((start, row))
            start = reader.line_num + 1  # a quoted field may span several lines
    except csv.Error as e:
        raise DataError(f"{path}:{start}: bad CSV ({e}) in the record from this line on; a field holding a comma, "
                        "a quote or a line break goes in double quotes, its own quotes doubled") from None
    return records


def text_lines(text: str) -> list[str]:
    """text's lines as an editor numbers them: ended by \n, \r\n or \r (and no other line separator, which
    may stand inside a JSON string)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_text(path: Path) -> str:
    """A UTF-8 file's text without a leading byte-order mark (Excel's and Notepad's UTF-8 start with one); a
    file that is not UTF-8 stops with the line of its first bad byte."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = len(text_lines(data[:e.start].decode("utf-8")))
        raise DataError(f"{path}:{line}: not UTF-8 text; save it as UTF-8") from None


def _json_object(text, where):
    obj = parse_json(text, where, DataError, "fix or remove the record", line=False)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _json_list(text, path):
    """Parse a JSON list of objects element by element, so that each record keeps its line number."""
    decoder, records = json.JSONDecoder(), []
    line_of = lambda pos: text.count("\n", 0, pos) + 1
    pos = _skip_ws(text, 0)
    if pos == len(text):
        raise DataError(f"{path}: empty; expected a JSON list of objects")
    if text[pos:pos + 1] != "[":
        raise DataError(f"{path}:{line_of(pos)}: expected a JSON list of objects")
    pos = _skip_ws(text, pos + 1)
    while text[pos:pos + 1] != "]":
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{line_of(pos)}: JSON nested too deeply to read; fix or remove the record") \
                from None
        except ValueError as e:  # an integer of more than 4300 digits
            raise DataError(f"{path}:{line_of(pos)}: not readable as JSON ({str(e).split(':')[0]}); fix or remove "
                            "the record") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line_of(pos)}: expected a JSON object, got {type(obj).__name__}")
        records.append((line_of(pos), obj))
        pos = _skip_ws(text, end)
        if text[pos:pos + 1] == ",":
            pos = _skip_ws(text, pos + 1)
        elif text[pos:pos + 1] != "]":
            raise DataError(f"{path}:{line_of(pos)}: expected ',' or ']' in the JSON list")
    return records


def _skip_ws(text, pos):
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


@dataclass
class Pair:
    prompt: str
    improved: str
    source: str  # file:line, for messages


def read_pairs(path, prompt_field="prompt", improved_field="improved") -> list[Pair]:
    """(prompt, improved prompt) pairs; a missing or empty field stops with file:line."""
    pairs = []
    for line, record in read_records(path):
        values = []
        for field, flag in ((prompt_field, "--prompt-field"), (improved_field, "--improved-field")):
            if field not in record:
                raise DataError(f"{path}:{line}: no field {field!r} (fields: {', '.join(record)}); "
                                f"name the right one with {flag}")
            value = record[field]
            if not isinstance(value, str):
                raise DataError(f"{path}:{line}: field {field!r} is {type(value).__name__}, not text; make it a "
                                "string or remove the record")
            if not value.strip():
                raise DataError(f"{path}:{line}: field {field!r} is empty; fill it or remove the record")
            values.append(value)
        pairs.append(Pair(values[0], values[1], f"{path}:{line}"))
    if not pairs:
        raise DataError(f"{path}: no records")
    return pairs


def read_prompts(path, field="prompt") -> list[tuple[str, str]]:
    """(file:line, prompt) from a .txt file (one prompt per line) or records with a prompt field.
    Empty prompts are errors, except blank lines in a .txt file, which are skipped."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        lines = text_lines(read_text(path))
        return [(f"{path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]
    prompts = []
    for line, record in read_records(path):
        value = record.get(field)
        if field not in record:
            raise DataError(f"{path}:{line}: no prompt in field {field!r} (fields: {', '.join(record)}); "
                            "name the right one with --field")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path}:{line}: the prompt in field {field!r} is empty or not text; fill it in or "
                            "remove the record")
        prompts.append((f"{path}:{line}", value))
    return prompts


# ------------------------------------------------------------------------------------ tokens and labels


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt part; the answer tokens and EOS otherwise


def encode_pair(tokenizer, prompt: str, improved: str) -> Example:
    """Template, tokens and labels for one pair: the loss falls on the answer and its EOS only."""
    context = tokenizer.encode(format_prompt(prompt))
    answer = tokenizer.encode(format_answer(improved)) + [tokenizer.eos_id]
    return Example(context + answer, [IGNORE_INDEX] * len(context) + answer)


def encode_pairs(tokenizer, pairs, max_len: int) -> tuple[list[Example], int]:
    """Examples for the pairs that fit in max_len tokens, and how many were dropped."""
    examples = [encode_pair(tokenizer, p.prompt, p.improved) for p in pairs]
    kept = [e for e in examples if len(e.input_ids) <= max_len]
    return kept, len(examples) - len(kept)


def split(items, val_fraction: float, seed: int, key=None):
    """A seeded (train, validation) split; validation gets at least one item when val_fraction > 0. Items
    with the same key(item) fall on the same side (whole groups go to validation until it has its share)."""
    groups = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item) if key else i, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * val_fraction)) if val_fraction > 0 else 0
    val = []
    while len(val) < n_val and order:
        val += order.pop()
    if n_val and not order:
        raise DataError(f"{len(items)} examples ({len(groups)} distinct) are too few for a validation split of "
                        f"{val_fraction}")
    train = [i for group in order for i in group]
    return [items[i] for i in sorted(train)], [items[i] for i in sorted(val)]


def split_pairs(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair], int]:
    """(train, validation, duplicates dropped): exact duplicate pairs are dropped, and every prompt falls on
    one side only, so that validation never scores a prompt the model trained on."""
    unique = list({(p.prompt.strip(), p.improved.strip()): p for p in reversed(pairs)}.values())[::-1]
    train, val = split(unique, val_fraction, seed, key=lambda p: p.prompt.strip())
    return train, val, len(pairs) - len(unique)


def batch_order(lengths, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of indices for one epoch: shuffled, then grouped by length within windows of 50 batches
    (little padding, still random), in shuffled order. A pure function of (seed, epoch)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples, pad_id: int):
    """input_ids and labels (B, T), right-padded to the longest example; padded labels are ignored."""
    import torch

    T = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return input_ids, labels
