"""Property tests of evaluate.py's readers of user files (instructions, rewrites, references): whatever the
bytes or the JSON, the result is a correct value or one UsageError whose message is one line, never another
exception."""

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import evaluate  # noqa: E402
from phi2.errors import UsageError  # noqa: E402
from support.llm import has_lone_surrogate  # noqa: E402

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

FIELDS = ["instruction", "input", "context", "text", "prompt", "category", "dataset", "id", "question_id",
          "rewrite", "output", "improved", "target", "generator"]
# text with newlines, control characters and lone surrogates (what a "\ud800" escape decodes to)
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | st.sampled_from(
    ["", " ", "a", "write a poem", "\ud800", "x\udfffy", "line\nbreak", "mistral", "concise"])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner,
                                                                                                  max_size=3),
                           max_leaves=8)
records = st.dictionaries(st.sampled_from(FIELDS) | texts, json_values, max_size=5) | st.fixed_dictionaries(
    {"instruction": texts, "output": texts},  # records that mostly read, so that what is read gets checked too
    optional={"target": st.sampled_from([None, "mistral", "concise", 3]), "dataset": json_values, "id": json_values,
              "input": json_values})
contents = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8")),
    st.lists(records, max_size=5).map(lambda rs: json.dumps(rs).encode()),
    st.lists(records, max_size=5).map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.lists(st.lists(texts.map(lambda t: t.replace('"', "")), min_size=1, max_size=3), max_size=4).map(
        lambda rows: "\n".join(",".join(f'"{c}"' for c in row) for row in [["instruction", "output"], *rows])
        .encode("utf-8", "surrogatepass")),
)
suffixes = st.sampled_from([".json", ".jsonl", ".csv", ".txt"])


def one_line(error: UsageError):
    assert "\n" not in str(error) and str(error).isprintable(), str(error)


def text_ok(text):
    return isinstance(text, str) and text == text.strip() and not has_lone_surrogate(text)


@FAST
@given(data=contents, suffix=suffixes, field=st.sampled_from([None, "text", "output", "\n"]))
def test_read_instructions(tmp_path, data, suffix, field):
    path = tmp_path / f"instructions{suffix}"
    path.write_bytes(data)
    try:
        items = evaluate.read_instructions(path, field)
    except UsageError as e:
        return one_line(e)
    assert items and all(text_ok(i.instruction) and i.instruction for i in items)
    assert all(i.category is None or (text_ok(i.category) and i.category) for i in items)
    assert all(i.source.startswith(str(path)) and i.source.isprintable() for i in items)


@FAST
@given(data=contents, suffix=st.sampled_from([".json", ".jsonl", ".csv"]), target=st.sampled_from([None, "mistral"]))
def test_read_rewrites_and_references(tmp_path, data, suffix, target):
    path = tmp_path / f"rewrites{suffix}"
    path.write_bytes(data)
    try:
        rewrites = evaluate.read_rewrites(path, target)
    except UsageError as e:
        one_line(e)
    else:
        assert all(text_ok(k) and text_ok(v) for k, v in rewrites.items())
    try:
        references = evaluate.read_references(path)
    except UsageError as e:
        one_line(e)
    else:
        assert all(text_ok(k) and all(map(text_ok, v)) and v for k, v in references.items())
