"""Loading HF checkpoints: layouts, dtypes, and a one-line error for each way a checkpoint can be wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import phi2
from phi2.weights import CheckpointError, hf_to_ours
from tests.conftest import save_hf_reference


@pytest.fixture
def sharded(tiny_cfg, tmp_path):
    """A tiny checkpoint saved by transformers in several shards; returns (folder, hf model)."""
    hf = save_hf_reference(tiny_cfg, tmp_path / "ckpt", max_shard_size="100KB")
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) > 2
    return tmp_path / "ckpt", hf


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _edit_shard(folder, tensor_name, edit):
    """Apply edit(dict of tensors) to the shard holding tensor_name, and keep the index in step."""
    index = _index(folder)
    shard = folder / index["weight_map"][tensor_name]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k != tensor_name or k in tensors}
    index["weight_map"].update({k: shard.name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _load_error(folder):
    with pytest.raises(CheckpointError) as e:
        phi2.load_model(folder)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_phi2_has_453_tensors():
    assert len(hf_to_ours(32)) == 453 == 1 + 32 * 14 + 4


@torch.no_grad()
def test_single_file_checkpoint(tiny_cfg, tmp_path):
    hf = save_hf_reference(tiny_cfg, tmp_path, max_shard_size="1GB")
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.safetensors.index.json").exists()
    x = torch.randint(0, tiny_cfg.vocab_size, (1, 9))
    assert (phi2.load_model(tmp_path)(x) - hf(x).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_is_chosen_at_load(sharded, dtype):
    folder, hf = sharded
    model = phi2.load_model(folder, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    ref = hf.model.layers[1].mlp.fc1.weight.to(dtype)
    assert torch.equal(model.layers[1].mlp.fc1.weight, ref)


@torch.no_grad()
def test_fp16_checkpoint_loads_into_fp32(tiny_cfg, tmp_path):
    """The real Phi-2 release is stored in float16; loading it in fp32 widens exactly."""
    hf = save_hf_reference(tiny_cfg, tmp_path, max_shard_size="100KB").half()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    model = phi2.load_model(tmp_path, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight.float())


def test_missing_tensor(sharded):
    folder, _ = sharded
    _edit_shard(folder, "model.layers.1.mlp.fc2.bias", lambda t: t.pop("model.layers.1.mlp.fc2.bias"))
    assert "tensor 'model.layers.1.mlp.fc2.bias' is missing (1 in all)" in _load_error(folder)


def test_unexpected_tensor(sharded):
    folder, _ = sharded
    _edit_shard(folder, "lm_head.bias", lambda t: t.update({"model.extra.weight": torch.zeros(3)}))
    assert "unexpected tensor 'model.extra.weight' (1 in all)" in _load_error(folder)


def test_misshaped_tensor(sharded):
    folder, _ = sharded
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_shard(folder, name, lambda t: t.update({name: torch.zeros(32, 64)}))
    message = _load_error(folder)
    assert f"tensor '{name}' has shape (32, 64), but config.json implies (64, 64)" in message


def test_truncated_file(sharded):
    folder, _ = sharded
    shard = folder / _index(folder)["weight_map"]["lm_head.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    message = _load_error(folder)
    assert message.startswith(str(shard)) and "truncated" in message and "download it again" in message


def test_corrupt_header(sharded):
    folder, _ = sharded
    shard = folder / _index(folder)["weight_map"]["model.embed_tokens.weight"]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\xff" * 12
    shard.write_bytes(bytes(data))
    assert _load_error(folder) == f"{shard}: not a safetensors file (unreadable header); download it again"
    shard.write_bytes(b"\x00" * 4)
    assert _load_error(folder) == f"{shard}: not a safetensors file (bad header length); download it again"


def test_shard_named_by_index_is_missing(sharded):
    folder, _ = sharded
    shard = folder / _index(folder)["weight_map"]["lm_head.weight"]
    shard.unlink()
    assert _load_error(folder).startswith(f"{shard}: missing, but model.safetensors.index.json lists tensor")


def test_index_and_shard_disagree(sharded):
    folder, _ = sharded
    index = _index(folder)
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert f"has no tensor '{name}', though the index puts it there" in _load_error(folder)


def test_old_mixformer_layout_is_refused(tiny_cfg, tmp_path):
    save_hf_reference(tiny_cfg, tmp_path, max_shard_size="1GB")
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["transformer.h.0.mixer.Wqkv.weight"] = tensors.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(tensors, tmp_path / "model.safetensors")
    assert "is from the old MixFormer layout, which is not remapped" in _load_error(tmp_path)


def test_pickled_weights_are_never_loaded(tiny_cfg, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_cfg.to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    assert "only pickled weights (*.bin/*.pt) found" in _load_error(tmp_path)


def test_missing_folder_and_config(tmp_path):
    assert "no such model folder" in _load_error(tmp_path / "nope")
    with pytest.raises(phi2.ConfigError, match="config.json: no such file"):
        phi2.load_model(tmp_path)


@torch.no_grad()
def test_saved_checkpoint_loads_in_transformers(tiny_cfg, tmp_path):
    """save_hf_checkpoint writes microsoft/phi-2's layout: transformers reads it and gives our logits."""
    transformers = pytest.importorskip("transformers")
    model = phi2.build_model(tiny_cfg).eval()
    phi2.save_hf_checkpoint(model, tmp_path, max_shard_bytes=50_000)
    assert len(_index(tmp_path)["weight_map"]) == len(hf_to_ours(tiny_cfg.n_layer))
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 11))
    assert (hf(x).logits - model(x)).abs().max() <= 1e-5
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_atomic_path_keeps_the_old_file_when_a_write_fails(tmp_path):
    from phi2.files import atomic_path
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
