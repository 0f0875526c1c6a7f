"""Property tests of every reader of user files: whatever the bytes, the result is a correct value or one
UsageError (whose message the CLIs print as one line), never another exception or a hang."""

import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
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
