"""Property tests of every reader of user files: whatever the bytes, the result is a correct value or one
UsageError (whose message the CLIs print as one line), never another exception or a hang."""

import json
import re
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import head_adapter  # noqa: E402
import lora  # noqa: E402
import phi2  # noqa: E402
from phi2.errors import UsageError  # noqa: E402
from prompts import read_pairs, read_prompts  # noqa: E402

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                        max_size=4), max_leaves=10)
texts = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.lists(json_values.map(json.dumps), max_size=5).map(lambda lines: "\n".join(lines).encode()),
    st.tuples(st.sampled_from([b"\xef\xbb\xbf", b""]), st.sampled_from([b"\r\n", b"\n"]),
              st.lists(st.text(max_size=30), max_size=5)).map(
        lambda t: t[0] + t[1].join(line.encode() for line in ["prompt,improved", *t[2]])),
)


@FAST
@given(data=texts, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]))
def test_data_readers(tmp_path, data, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(data)
    for read in (read_pairs, read_prompts):
        try:
            result = read(path)
        except UsageError as e:
            assert "\n" not in str(e).strip() or str(path) in str(e)
        else:
            assert isinstance(result, list)


config_keys = ["model_type", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
               "vocab_size", "max_position_embeddings", "num_key_value_heads", "layer_norm_eps", "rope_theta",
               "partial_rotary_factor", "rope_parameters", "rope_scaling", "hidden_act", "qk_layernorm",
               "tie_word_embeddings", "resid_pdrop", "architectures", "head_dim"]


@FAST
@given(changes=st.dictionaries(st.sampled_from(config_keys), json_values, max_size=4), whole=json_values)
def test_config_reader(tmp_path, changes, whole):
    for content in ({**phi2.PRESETS["tiny"].to_hf_dict(), **changes}, whole):
        (tmp_path / "config.json").write_text(json.dumps(content))
        try:
            config = phi2.Phi2Config.from_hf_json(tmp_path / "config.json")
        except UsageError:
            continue
        assert isinstance(config, phi2.Phi2Config) and config.n_embd % config.n_head == 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-ckpt")
    config = phi2.Phi2Config(n_layer=1, n_head=2, n_kv_head=2, n_embd=8, intermediate_size=16, vocab_size=32,
                             block_size=16, rotary_dim=4)
    phi2.save_hf_checkpoint(phi2.build_model(config), folder)
    return folder, (folder / "model.safetensors").read_bytes()


@FAST
@given(cut=st.integers(0, 4000), header_len=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
       patch=st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=16)))
def test_safetensors_loader(checkpoint, cut, header_len, patch):
    folder, good = checkpoint
    data = bytearray(good[:cut] if cut < len(good) else good)
    if header_len is not None and len(data) >= 8:
        data[:8] = struct.pack("<Q", header_len)
    at, junk = patch
    data[at:at + len(junk)] = junk
    (folder / "model.safetensors").write_bytes(bytes(data))
    try:
        model = phi2.load_model(folder)
    except UsageError:
        pass
    else:
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        (folder / "model.safetensors").write_bytes(good)


@FAST
@given(data=st.binary(max_size=400), tensors=st.dictionaries(st.text(max_size=30), st.integers(1, 4), max_size=3),
       metadata=st.dictionaries(st.sampled_from(["format", "base_fingerprint", "stage1_adapter", "head_rank",
                                                 "target", "phi2_base_fingerprint"]), st.text(max_size=20), max_size=4))
def test_head_and_adapter_files(tmp_path, checkpoint, data, tensors, metadata):
    folder, _ = checkpoint
    model = phi2.load_model(folder)
    head = tmp_path / "h.safetensors"
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "target_modules": ["q_proj"]}))
    for content in ("raw", "tensors"):
        if content == "raw":
            head.write_bytes(data)
        else:
            save_file({k: torch.zeros(n) for k, n in tensors.items()}, head, metadata=metadata)
        (adapter / "adapter_model.safetensors").write_bytes(head.read_bytes())
        with pytest.raises(UsageError):
            head_adapter.load_head(head, model, "fp", "none")
        try:
            lora.load_adapter(phi2.load_model(folder), adapter)
        except UsageError:
            pass


def _head_file(path, model, metadata_changes=(), tensors=None, rank=None):
    """A head saved as train_head.py saves it, then its metadata changed ({key: value, or None to drop it})."""
    head_adapter.save_head(head_adapter.HeadAdapter(model.lm_head, rank), path, "t", model, "fp", "none")
    with safe_open(path, "pt") as f:
        metadata, saved = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for key, value in dict(metadata_changes).items():
        metadata.pop(key) if value is None else metadata.__setitem__(key, value)
    save_file(saved if tensors is None else tensors(saved), path, metadata=metadata)
    return path


@pytest.mark.parametrize("key, value", [
    ("base_fingerprint", None), ("stage1_adapter", None), ("target", None), ("target", ""), ("target", "../x"),
    ("head_rank", None), ("head_rank", "four"), ("head_rank", "0"), ("head_rank", "-2"), ("head_rank", "\u0664"),
    ("head_rank", "99999999999"), ("hidden_size", None), ("hidden_size", "wide"), ("vocab_size", None),
    ("vocab_size", "1e3"),
])
def test_every_head_metadata_field_is_checked_in_one_line(checkpoint, tmp_path, key, value):
    model = phi2.load_model(checkpoint[0])
    path = _head_file(tmp_path / "h.safetensors", model, {key: value})
    with pytest.raises(head_adapter.HeadError, match=f"metadata field '{key}' is .*; the file is damaged") as e:
        head_adapter.load_head(path, model, "fp", "none")
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path))


def test_head_metadata_and_tensors_that_disagree_with_the_base_or_each_other(checkpoint, tmp_path):
    model = phi2.load_model(checkpoint[0])
    path = tmp_path / "h.safetensors"
    for changes, rank, tensors, message in [
            ({"hidden_size": "16"}, None, None, "made for a model of hidden_size 16, this base has 8"),
            ({"vocab_size": "33"}, None, None, "made for a model of vocab_size 33, this base has 32"),
            ({"head_rank": "500000000"}, 2, None, "lora_A' has shape \\(2, 8\\), head_rank 500000000 on this"),
            ({"head_rank": "full"}, 2, None, "expected .* for head_rank full; the file is damaged"),
            ({}, None, lambda t: {**t, "head_adapter.adapter.bias": torch.zeros(8, dtype=torch.int32)},
             "'head_adapter.adapter.bias' has dtype I32"),
            ({}, None, lambda t: {**t, "head_adapter.adapter.bias": torch.zeros(9)}, "has shape \\(9,\\)")]:
        _head_file(path, model, changes, tensors, rank)
        with pytest.raises(head_adapter.HeadError, match=message):
            head_adapter.load_head(path, model, "fp", "none")
    assert head_adapter.load_head(_head_file(path, model, rank=3), model, "fp", "none").head_rank == 3


@pytest.mark.parametrize("out", ["folder", "folder.partial-is-a-folder", "file/under-a-file.txt",
                                 "file/deeper/results.txt"])
def test_generate_out_that_cannot_be_written_stops_before_the_model_loads(tmp_path, monkeypatch, out):
    import generate
    from support.prompter import Prompter
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder.partial-is-a-folder.partial").mkdir()
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(Prompter, "load", lambda *a, **k: pytest.fail("the model loaded before --out was checked"))
    with pytest.raises(UsageError, match=r"^--out .* is a (folder|file)[;,] ") as e:
        generate.main(generate.parse_args(["--out", str(tmp_path / out), "hello"]))
    assert "\n" not in str(e.value)


partial_lines = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries({"index": st.integers(-3, 3) | st.booleans() | json_values,
                           "input": st.sampled_from(["a", "b", "c"]) | json_values,
                           "target": st.sampled_from([None, "t"]) | json_values}).map(json.dumps),
    st.just("[" * 5000), st.just('{"index": ' + "1" * 5000 + "}"),
    st.fixed_dictionaries({"settings": json_values}).map(json.dumps),
    st.text(max_size=30))


@FAST
@given(lines=st.lists(partial_lines, max_size=5), raw=st.binary(max_size=40), use_raw=st.booleans())
def test_generate_resume_reads_any_partial_file(tmp_path, lines, raw, use_raw):
    """generate.py --out's FILE.partial, whatever it holds: the results in it, or one UsageError line."""
    import generate
    partial = tmp_path / "out.txt.partial"
    partial.write_bytes(raw if use_raw else "\n".join(lines).encode())
    prompts = [("argument 1", "a"), ("argument 2", "b"), ("argument 3", "c")]
    try:
        done = generate._resume(partial, prompts, [None, "t"], {"model": None})
    except UsageError as e:
        assert "\n" not in str(e) and str(e).startswith(str(partial))
    else:
        for (i, target), record in done.items():
            assert 0 <= i < 3 and type(i) is int and record["input"] == prompts[i][1] and target in (None, "t")


@pytest.fixture(scope="module")
def export_inputs(tmp_path_factory):
    """A base (with a tokenizer), a stage-1 adapter naming it, and a low-rank head: what export.py reads."""
    from tests.conftest import TEXTS
    root = tmp_path_factory.mktemp("fuzz-export")
    config = phi2.Phi2Config(n_layer=1, n_head=2, n_kv_head=2, n_embd=8, intermediate_size=16, vocab_size=512,
                             block_size=16, rotary_dim=4)
    model = phi2.build_model(config)
    phi2.save_hf_checkpoint(model, root / "base")
    phi2.train_tokenizer(TEXTS, config.vocab_size).save(root / "base")
    base_fp = phi2.weights.fingerprint(model)
    lora.inject(model, rank=2, alpha=4.0)
    lora.save_adapter(model, root / "lora", base_path=(root / "base").resolve(), base_fingerprint=base_fp)
    lora.merge(model)
    head_adapter.save_head(head_adapter.HeadAdapter(model.lm_head, 2), root / "t.safetensors", "t", model, base_fp,
                           head_adapter.stage1_id(root / "lora"))
    return root


EXPORT_FILES = ["base/config.json", "lora/adapter_config.json", "lora/adapter_model.safetensors", "t.safetensors"]
json_damage = st.dictionaries(st.sampled_from(config_keys + ["r", "lora_alpha", "lora_dropout", "target_modules",
                                                             "use_rslora", "base_model_name_or_path", "peft_type"]),
                              json_values, min_size=1, max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=st.sampled_from(EXPORT_FILES), how=st.sampled_from(["bytes", "cut", "patch", "json"]),
       data=st.binary(max_size=200), at=st.integers(0, 3000), changes=json_damage, model_flag=st.booleans())
def test_export_inputs(export_inputs, tmp_path_factory, file, how, data, at, changes, model_flag):
    """export.py on a damaged base config.json, adapter folder or head file: an export, or one UsageError line."""
    import export
    work = tmp_path_factory.mktemp("export-case")
    for name in ("base", "lora"):
        shutil.copytree(export_inputs / name, work / name)
    shutil.copy(export_inputs / "t.safetensors", work / "t.safetensors")
    lora_config = work / "lora" / "adapter_config.json"  # naming this copy of the base
    lora_config.write_text(json.dumps({**json.loads(lora_config.read_text()),
                                       "base_model_name_or_path": str(work / "base")}))
    path = work / file
    good = path.read_bytes()
    if how == "bytes":
        path.write_bytes(data)
    elif how == "cut":
        path.write_bytes(good[:at % max(len(good), 1)])
    elif how == "patch":
        path.write_bytes(good[:at] + data + good[at + len(data):])
    elif file.endswith(".json"):
        path.write_text(json.dumps({**json.loads(good), **changes}))
    else:
        path.write_bytes(json.dumps(changes).encode())
    argv = ["--lora", str(work / "lora"), "--head", str(work / "t.safetensors"), "--out", str(work / "out"),
            *(["--model", str(work / "base")] if model_flag else [])]
    try:
        out = export.main(export.parse_args(argv))
    except UsageError as e:
        assert "\n" not in str(e) and not (work / "out").exists()
    else:
        assert (out / export.MARKER).is_file() and (out / "config.json").is_file()
    assert not list(work.glob(".*partial"))
    shutil.rmtree(work)


# ------------------------------------------------------------------------------ request bodies and SSE lines

MODELS = ["base", "t"]
keys = st.sampled_from(["model", "messages", "stop", "stream", "stream_options", "n", "max_tokens",
                        "max_completion_tokens", "temperature", "top_p", "seed", "tools", "functions", "suffix",
                        "logprobs", "echo", "prompt", "role", "content", "type", "text", "include_usage"])
numbers = st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0, 1, 2, 16, 17, 1 << 20, -(2**63), 2**63 - 1, 2**63, 0.5, 1.0, 2.0, 2.5])
request_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=12) | st.sampled_from(MODELS + ["user", "text", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys | st.text(max_size=6), inner, max_size=5),
    max_leaves=16)
bodies = st.dictionaries(keys, request_values, max_size=8)


@settings(max_examples=300, deadline=None)
@given(body=bodies)
def test_request_bodies(body):
    """settings_of and last_user_message on any JSON object: their result, or an APIError with a 4xx status."""
    from serving import api
    for check in (lambda: api.settings_of(body, MODELS), lambda: api.last_user_message(body)):
        try:
            result = check()
        except api.APIError as e:
            assert 400 <= e.status < 500 and json.dumps(e.body())
        else:
            assert result is not None


class _Body:
    """What API.read_json reads of a starlette Request: its headers and its body, in pieces."""

    def __init__(self, data: bytes, content_type: str):
        self.data, self.headers = data, {"content-type": content_type}

    async def stream(self):
        for i in range(0, len(self.data), 7):
            yield self.data[i:i + 7]


@FAST
@given(data=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                      bodies.map(lambda b: json.dumps(b).encode()), st.just(b"[" * 100_000),
                      st.just(b'{"n": ' + b"1" * 5000 + b"}"),
                      st.just('{"model": "\ud800"}'.encode("utf-8", "surrogatepass"))),
       content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                     "application/x-www-form-urlencoded", "", "application/vnd.api+json"]))
def test_request_body_reader(data, content_type):
    """API.read_json on any bytes: a JSON object, or an APIError with a 4xx status."""
    import asyncio

    from serving import api
    reader = api.API.__new__(api.API)  # read_json needs none of the server's state
    try:
        body = asyncio.run(reader.read_json(_Body(data, content_type)))
    except api.APIError as e:
        assert 400 <= e.status < 500
    else:
        assert isinstance(body, dict)


def _escapes(key: str) -> list[str]:
    """Ways a JSON string may spell key: as it is, JSON-escaped, and with one or every character \\u-escaped."""
    every = ["".join(f"\\u{ord(c):04{x}}" if ord(c) < 0x10000 else json.dumps(c)[1:-1] for c in key) for x in "xX"]
    one = [key[:i] + f"\\u{ord(c):04x}" + key[i + 1:] for i, c in enumerate(key) if ord(c) < 0x10000]
    return [key, json.dumps(key)[1:-1], json.dumps(key, ensure_ascii=False)[1:-1], *every, *one]


def _strings(value):
    """Every string in a JSON value, its object keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)


# Keys without '*' (redaction writes ***, in which a key of stars would show again) and without the characters
# JSON itself escapes (" \\ and controls): a spelling that \u-escapes some of a key's characters and leaves a
# quote bare is not JSON, which no client reads either (the cases below cover keys with a quote that are).
sse_keys = st.text(st.characters(blacklist_characters='*"\\', blacklist_categories=["Cs", "Cc"]), min_size=1,
                   max_size=12) | st.sampled_from(["sk-test-123", "k", "0", "u0", "é", "\u2028", "sk-proj-AbC_12"])


def _sse_line(key, where, value, spellings):
    """A JSON body or an SSE line whose JSON holds the key once per spelling (an index into _escapes(key))."""
    escapes = _escapes(key)
    inner = json.dumps({"choices": [{"delta": {"content": f"<K{i}>"}} for i in range(len(spellings))], "v": value})
    for i, n in enumerate(spellings):
        inner = inner.replace(f"<K{i}>", "error: bad key " + escapes[n % len(escapes)])
    return (where + inner).encode()


def _check_redacted(line, key):
    from serving.proxy import redact_body
    out = redact_body(line, key)
    assert isinstance(out, bytes)
    for spelling in _escapes(key):
        assert spelling.encode() not in out, spelling
    field = re.match(rb"^(data|event|id|retry):\x20?", out)
    try:
        body = json.loads(out[field.end():] if field else out)
    except (ValueError, RecursionError):
        return
    assert not any(key in s for s in _strings(body))


@settings(max_examples=300, deadline=None)
@given(key=sse_keys, where=st.sampled_from(["", "data:", "data: ", "event: ", "data:  "]), value=json_values,
       spelling=st.integers(0, 40), raw=st.binary(max_size=80), as_json=st.booleans())
def test_sse_lines_from_an_upstream(key, where, value, spelling, raw, as_json):
    """redact_body never raises, and the key never comes through: as bytes, nor in a body's or an SSE line's JSON
    however it is escaped (as it is, JSON-escaped, with \\u-escapes of one or all of its characters)."""
    _check_redacted(_sse_line(key, where, value, [spelling]) if as_json else raw, key)


@pytest.mark.parametrize("key, spellings", [("000", [3, 5]), ("0af1c9", [3, 5]), ('"', [3])])
def test_a_key_spelled_twice_or_holding_a_json_escape_is_redacted(key, spellings):
    _check_redacted(_sse_line(key, "data: ", None, spellings), key)


# ------------------------------------------------------------------------------------------- run folders

log_lines = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries({"step": st.integers(-2, 6) | json_values}, optional={"loss": json_values}).map(json.dumps),
    st.just("[" * 5000), st.just('{"step": ' + "1" * 5000 + "}"), st.text(max_size=30))


@FAST
@given(lines=st.lists(log_lines, max_size=6), cut=st.integers(0, 400), raw=st.binary(max_size=60),
       use_raw=st.booleans(), step=st.integers(0, 5))
def test_run_log_readers(tmp_path, lines, cut, raw, use_raw, step):
    """metrics.jsonl, whatever it holds (any bytes, a line cut short): read_log gives its records, trim_log keeps
    those up to the step; neither raises."""
    from support import training
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(raw if use_raw else "\n".join(lines).encode()[:cut])
    records = training.read_log(path)
    assert all(isinstance(r, dict) and type(r["step"]) is int for r in records)
    training.trim_log(path, step)
    assert [r["step"] for r in training.read_log(path)] == [r["step"] for r in records if r["step"] <= step]


@FAST
@given(data=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                      st.just(b"[" * 100_000), st.just(b'{"lr": ' + b"1" * 5000 + b"}")))
def test_saved_config_reader(tmp_path, data):
    """train_config.json, whatever it holds: its settings, or one TrainingError line."""
    from support import training
    (tmp_path / "state.safetensors").write_bytes(b"")
    (tmp_path / "train_config.json").write_bytes(data)
    try:
        training.read_saved_config(tmp_path)
    except training.TrainingError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A tiny stage-1 run stopped after step 1 of 2 (its folder kept pristine beside it) and its settings."""
    import train_sft
    from prompts import DEFAULT_DATA
    root = tmp_path_factory.mktemp("fuzz-run")
    data = root / "pairs.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:12]))
    cfg = dict(model="tiny", data=str(data), run_dir=str(root / "run"), batch_size=4, grad_accum=1, rank=2,
               max_steps=2, device="cpu", precision="fp32")
    train_sft.main(train_sft.TrainConfig(**cfg, stop_after=1))
    shutil.copytree(root / "run", root / "pristine")
    return root, cfg


def _resume(stopped_run, file, damage, cli=False):
    """--resume on the stopped run with file damaged by damage(bytes) -> bytes: 'resumed' or the one-line error."""
    import train_sft
    root, cfg = stopped_run
    run = root / "run"
    shutil.rmtree(run)
    shutil.copytree(root / "pristine", run)
    (run / file).write_bytes(damage((run / file).read_bytes()))
    try:
        train_sft.main(train_sft.parse_args(["--run-dir", str(run), "--resume"]) if cli else
                       train_sft.TrainConfig(**cfg, resume=True))
    except UsageError as e:
        assert "\n" not in str(e)
        return str(e)
    return "resumed"


damaged_lines = st.lists(st.one_of(st.just("[" * 5000), st.just('{"step": ' + "1" * 5000 + "}"), st.text(max_size=30),
                                  json_values.map(json.dumps)), max_size=4)


# few examples: each resumes (or refuses) a run; no shrinking, which would rerun it many times
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(file=st.sampled_from(["metrics.jsonl", "train_config.json", "state.safetensors"]),
       how=st.sampled_from(["cut", "bytes", "lines"]), at=st.integers(0, 10**6), data=st.binary(max_size=80),
       lines=damaged_lines)
@example(file="metrics.jsonl", how="bytes", at=0, data=b"\xff\xfe{", lines=[])
@example(file="state.safetensors", how="cut", at=5000, data=b"", lines=[])
def test_resume_from_a_damaged_run_folder(stopped_run, file, how, at, data, lines):
    """--resume on a run folder whose metrics.jsonl holds any bytes or damaged lines, or whose train_config.json or
    state.safetensors is cut short: the run resumes, or one UsageError line says why not."""
    if file != "metrics.jsonl":  # only cut short: what else they may hold is in the strict xfail below
        how = "cut"
    damage = {"cut": lambda good: good[:at % max(len(good), 1)], "bytes": lambda good: data,
              "lines": lambda good: good + "\n".join(lines).encode()}[how]
    _resume(stopped_run, file, damage)


def _state_step(good: bytes) -> bytes:
    """state.safetensors with its step metadata 'one'."""
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    header["__metadata__"]["step"] = "one"
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + good[8 + n:]


def _config_change(**changes):
    return lambda good: json.dumps({**json.loads(good), **changes}).encode()


@pytest.mark.parametrize("file, damage, cli", [
    ("train_config.json", lambda good: b"[]", False),  # a list, not the settings
    ("train_config.json", _config_change(hardware=[1]), False),  # hardware not an object
    ("train_config.json", _config_change(inputs=[1]), False),  # inputs not an object
    ("train_config.json", _config_change(lr="x"), True),  # a saved setting --resume would take, of the wrong type
    ("state.safetensors", _state_step, False),  # the step not a number
    ("metrics.jsonl", lambda good: good + b'{"step": 0, "loss": null}\n', False),  # a loss that is null
], ids=["config-list", "config-hardware", "config-inputs", "cli-lr", "state-step", "log-loss-null"])
def test_resume_with_run_folder_values_of_the_wrong_type(stopped_run, file, damage, cli):
    _resume(stopped_run, file, damage, cli)
