"""The data pipeline: template, labels, readers for JSONL/JSON/CSV with file:line errors, split, batches."""

import json

import pytest

import phi2
import prompts
from prompts import IGNORE_INDEX, DataError
from tests.conftest import SHARED, needs_shared


@pytest.fixture(scope="module")
def tok():
    texts = [prompts.format_prompt("write a poem") + prompts.format_answer("Write a 12-line poem about rain.")] * 5
    return phi2.train_tokenizer(texts, 400)


def test_template_is_the_papers():
    assert prompts.format_prompt("  write a poem ") == "System: Fix the following prompt. Prompt: write a poem. Answer:"
    assert prompts.format_prompt("x") + prompts.format_answer("y") == \
        "System: Fix the following prompt. Prompt: x. Answer: y"


def test_labels_mask_the_prompt_and_keep_answer_and_eos(tok):
    ex = prompts.encode_pair(tok, "write a poem", "Write a 12-line poem about rain.")
    context = tok.encode(prompts.format_prompt("write a poem"))
    answer = tok.encode(" Write a 12-line poem about rain.")
    assert ex.input_ids == context + answer + [tok.eos_id]
    assert ex.labels == [IGNORE_INDEX] * len(context) + answer + [tok.eos_id]
    assert tok.decode(ex.input_ids[len(context):-1]) == " Write a 12-line poem about rain."


def test_collate_pads_right_and_ignores_padding(tok):
    a = prompts.encode_pair(tok, "a", "b")
    b = prompts.encode_pair(tok, "write a poem", "Write a 12-line poem about rain.")
    ids, labels = prompts.collate([a, b], pad_id=tok.pad_id)
    n = len(a.input_ids)
    assert ids.shape == labels.shape == (2, len(b.input_ids))
    assert ids[0, :n].tolist() == a.input_ids and (labels[0, n:] == IGNORE_INDEX).all()


def test_too_long_examples_are_dropped_and_counted(tok):
    pairs = [prompts.Pair("a", "b", "x:1"), prompts.Pair("a " * 200, "b", "x:2")]
    kept, dropped = prompts.encode_pairs(tok, pairs, max_len=64)
    assert len(kept) == 1 and dropped == 1


def test_jsonl_json_and_csv_readers(tmp_path):
    rows = [{"bad": "fix this", "good": "Rewrite this."}, {"bad": "two\nlines", "good": "Two, \"quoted\"\nlines."}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "d.csv").write_text('bad,good\n"fix this","Rewrite this."\n"two\nlines","Two, ""quoted""\nlines."\n')
    for name in ("d.jsonl", "d.json", "d.csv"):
        pairs = prompts.read_pairs(tmp_path / name, "bad", "good")
        assert [(p.prompt, p.improved) for p in pairs] == [(r["bad"], r["good"]) for r in rows], name
    assert [p.source.rsplit(":", 1)[1] for p in prompts.read_pairs(tmp_path / "d.csv", "bad", "good")] == ["2", "3"]
    assert [p.source.rsplit(":", 1)[1] for p in prompts.read_pairs(tmp_path / "d.json", "bad", "good")] == ["2", "6"]


@pytest.mark.parametrize("name, content, message", [
    ("d.jsonl", '{"prompt": "a", "improved": "b"}\n{"prompt": "c"}\n',
     r"d.jsonl:2: no field 'improved' \(fields: prompt\); name the right one with --improved-field"),
    ("d.jsonl", '{"prompt": "a", "improved": "b"}\n{"prompt": " ", "improved": "b"}\n',
     "d.jsonl:2: field 'prompt' is empty"),
    ("d.jsonl", '{"prompt": "a", "improved": "b"}\n{"prompt": "a", "improved": "b"\n', "d.jsonl:2: not valid JSON"),
    ("d.json", '[\n  {"prompt": "a", "improved": "b"},\n  {"prompt": "a", "improved": ""}\n]',
     "d.json:3: field 'improved' is empty"),
    ("d.json", '[\n  {"prompt": "a", "improved": "b"},\n  ["a", "b"]\n]', "d.json:3: expected a JSON object, got list"),
    ("d.csv", 'prompt,improved\na,b\n"multi\nline",\n', "d.csv:3: field 'improved' is empty"),
    ("d.csv", 'prompt,improved\na,b,c\n', "d.csv:2: more values than the header has columns"),
    ("d.txt", "a\n", "unknown data format '.txt'"),
])
def test_bad_records_stop_with_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        prompts.read_pairs(tmp_path / name)


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    train, val = prompts.split(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items
    assert prompts.split(items, 0.1, seed=3) == (train, val) and prompts.split(items, 0.1, seed=4)[1] != val


def test_batches_cover_each_example_once_and_group_lengths():
    lengths = [(i * 37) % 101 for i in range(200)]
    batches = prompts.batch_order(lengths, 4, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert batches == prompts.batch_order(lengths, 4, seed=1, epoch=0) != prompts.batch_order(lengths, 4, 1, 1)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # grouped by length: little padding


def test_bundled_dataset():
    pairs = prompts.read_pairs(prompts.DEFAULT_DATA)
    assert len(pairs) >= 300
    records = [json.loads(line) for line in prompts.DEFAULT_DATA.read_text().splitlines()]
    categories = {r["category"] for r in records}
    assert categories == {"writing", "code", "analysis", "science", "business", "education", "everyday"}
    assert len({r["prompt"] for r in records}) == len(records)


@needs_shared(SHARED / "prompt_pairs")
def test_real_csv_with_multiline_fields():
    pairs = prompts.read_pairs(SHARED / "prompt_pairs" / "oneprompted_v1.csv", "bad_prompt", "good_prompt")
    assert len(pairs) == 1450
    assert sum("\n" in p.improved for p in pairs) > 100


def test_duplicates_are_dropped_and_a_prompt_stays_on_one_side():
    pairs = [prompts.Pair(f"prompt {i % 30}", f"better {i}", f"f:{i}") for i in range(90)]  # 3 pairs per prompt
    pairs += [prompts.Pair("prompt 1", "better 1", "f:dup"), prompts.Pair(" prompt 1 ", "better 1 ", "f:dup2")]
    train, val, duplicates = prompts.split_pairs(pairs, 0.1, seed=5)
    assert duplicates == 2 and len(train) + len(val) == 90 and len(val) >= 9
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    assert prompts.split_pairs(pairs, 0.1, seed=5) == (train, val, 2)


def test_a_byte_order_mark_is_read_past_and_a_field_that_is_not_text_is_named(tmp_path):
    """Excel and Notepad write UTF-8 with a byte-order mark first: read as the same records."""
    bom = "\ufeff".encode()
    for name, content in (("d.jsonl", b'{"prompt": "a", "improved": "b"}\r\n'), ("d.csv", b"prompt,improved\na,b\n"),
                          ("d.json", b'[{"prompt": "a", "improved": "b"}]')):
        (tmp_path / name).write_bytes(bom + content)
        assert [(p.prompt, p.improved) for p in prompts.read_pairs(tmp_path / name)] == [("a", "b")], name
    (tmp_path / "p.txt").write_bytes(bom + b"first\r\nsecond\n")
    assert prompts.read_prompts(tmp_path / "p.txt") == [(f"{tmp_path / 'p.txt'}:1", "first"),
                                                         (f"{tmp_path / 'p.txt'}:2", "second")]
    (tmp_path / "n.jsonl").write_text('{"prompt": 123, "improved": "b"}\n')
    with pytest.raises(DataError, match=r"n.jsonl:1: field 'prompt' is int, not text"):
        prompts.read_pairs(tmp_path / "n.jsonl")


@pytest.mark.parametrize("name, content, message", [
    ("d.jsonl", b'{"prompt": "a", "improved": "b"}\n' + b"[" * 50_000 + b"\n", "d.jsonl:2: JSON nested too deeply"),
    ("d.json", b'[\n{"prompt": "a", "improved": "b"},\n' + b'{"x": ' * 50_000, "d.json:3: JSON nested too deeply"),
    ("d.jsonl", b'{"prompt": "a", "improved": "b", "n": ' + b"7" * 5000 + b"}\n", "d.jsonl:1: not readable as JSON"),
    ("d.json", b'[{"prompt": "a", "improved": "b", "n": ' + b"7" * 5000 + b"}]", "d.json:1: not readable as JSON"),
    ("d.jsonl", b'{"prompt": "a", "improved": "b"}\n{"prompt": "caf\xe9", "improved": "b"}\n',
     "d.jsonl:2: not UTF-8 text; save it as UTF-8"),
    ("d.json", b" \n", "d.json: empty; expected a JSON list of objects"),
    ("d.csv", b'prompt,improved\na,"b\nc\n', r"d.csv:2: bad CSV \(unexpected end of data\) in the record"),
    ("d.txt", None, "d.txt: no such file"),
    ("d.jsonl", None, "d.jsonl: no such file"),
])
def test_unreadable_data_files_stop_in_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()  # a folder where the file should be
    else:
        path.write_bytes(content)
    for read in (prompts.read_pairs, prompts.read_prompts):
        with pytest.raises(DataError, match=message) as e:
            read(path)
        assert "\n" not in str(e.value)
