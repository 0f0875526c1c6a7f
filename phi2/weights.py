"""Load a Hugging Face Phi-2 checkpoint folder (config.json + safetensors, single or sharded) into `Phi2`.

The safetensors format (https://github.com/huggingface/safetensors: an 8-byte little-endian header length,
a JSON header, then raw little-endian tensor bytes) is read by hand so that every tensor goes straight
from the file into its parameter: the model is built on the meta device, given uninitialised storage in
the target dtype, and filled one tensor at a time. Peak memory is the model plus one tensor, never two
copies of the weights (a memory map would add each shard's pages to the process's resident set).
Loading is strict: every checkpoint tensor is used once, every parameter filled once, every shape checked.
Left out on purpose: pickled checkpoints (pytorch_model.bin are never unpickled) and name remapping of old
remote-code layouts (transformer.h.*, mixer.Wqkv), which are refused with a message.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from .config import Phi2Config
from .model import Phi2

# microsoft/phi-2 tensor names -> ours; {i} = layer index. No transposes, no q/k permutation.
WEIGHT_MAP = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.input_layernorm.weight",
    "model.layers.{i}.input_layernorm.bias": "layers.{i}.input_layernorm.bias",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.self_attn.q_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.self_attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.self_attn.k_proj.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.self_attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.self_attn.v_proj.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.self_attn.v_proj.bias",
    "model.layers.{i}.self_attn.dense.weight": "layers.{i}.self_attn.dense.weight",
    "model.layers.{i}.self_attn.dense.bias": "layers.{i}.self_attn.dense.bias",
    "model.layers.{i}.mlp.fc1.weight": "layers.{i}.mlp.fc1.weight",
    "model.layers.{i}.mlp.fc1.bias": "layers.{i}.mlp.fc1.bias",
    "model.layers.{i}.mlp.fc2.weight": "layers.{i}.mlp.fc2.weight",
    "model.layers.{i}.mlp.fc2.bias": "layers.{i}.mlp.fc2.bias",
    "model.final_layernorm.weight": "final_layernorm.weight",
    "model.final_layernorm.bias": "final_layernorm.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_OLD_LAYOUT = ("transformer.h.", "transformer.embd.", ".mixer.", "layers.0.wte.")


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file or tensor."""


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path`, renamed onto it when the block succeeds and removed if it fails:
    a reader never sees a half-written file, and a crash leaves the previous version intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def hf_to_ours(n_layer: int) -> dict:
    """The full name table for a model with n_layer blocks (453 entries for Phi-2)."""
    table = {}
    for hf, ours in WEIGHT_MAP.items():
        for i in range(n_layer) if "{i}" in hf else [None]:
            table[hf.format(i=i)] = ours.format(i=i)
    return table


def read_header(path: Path) -> dict:
    """{name: (dtype, shape, begin, end)} with absolute byte offsets, after checking the file is whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise CheckpointError(f"{path}: not a safetensors file (bad header length); download it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header); download it again") from None
    header.pop("__metadata__", None)
    tensors, data_end = {}, 0
    for name, info in header.items():
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info.get('dtype')}; only "
                                  f"{', '.join(DTYPES)} are read")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != dtype.itemsize * _numel(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}; "
                                  "the file is corrupt, download it again")
        tensors[name] = (dtype, shape, 8 + n + begin, 8 + n + end)
        data_end = max(data_end, 8 + n + end)
    if data_end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, its header needs {data_end}); download it again")
    return tensors


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _read_exact(f, buf: memoryview):
    """Fill buf from f; large reads come back in pieces (Linux caps one read at about 2 GiB)."""
    while buf:
        got = f.readinto(buf)
        if not got:
            raise EOFError
        buf = buf[got:]


def checkpoint_files(folder: Path) -> dict:
    """{HF tensor name: file} for a folder with model.safetensors or a sharded index."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map'); download it again") from None
        files = {}
        for name, shard in weight_map.items():
            if not (folder / shard).exists():
                raise CheckpointError(f"{folder / shard}: missing, but {index.name} lists tensor {name!r} in it")
            files[name] = folder / shard
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return {name: single for name in read_header(single)}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only pickled weights (*.bin/*.pt) found; weights are only read from "
                              "safetensors (never unpickled): download the model.safetensors files")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_weights(model: Phi2, folder) -> None:
    """Fill every parameter of model from the checkpoint in folder, strictly, one tensor at a time."""
    folder = Path(folder)
    files = checkpoint_files(folder)
    table = hf_to_ours(model.config.n_layer)
    params = model.state_dict(keep_vars=True)
    assert set(table.values()) == set(params), "WEIGHT_MAP is out of step with Phi2"

    unexpected = sorted(set(files) - set(table))
    if unexpected:
        if any(part in name for name in unexpected for part in _OLD_LAYOUT):
            raise CheckpointError(f"{folder}: tensor {unexpected[0]!r} is from the old MixFormer layout, which is "
                                  "not remapped; download the current microsoft/phi-2 revision")
        raise CheckpointError(f"{folder}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all); "
                              "is config.json from the same checkpoint?")
    missing = [name for name in table if name not in files]
    if missing:
        raise CheckpointError(f"{folder}: tensor {missing[0]!r} is missing ({len(missing)} in all); "
                              "the checkpoint is incomplete or does not match its config.json")

    by_file = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        header = read_header(path)
        with open(path, "rb", buffering=0) as f:
            for name in names:
                if name not in header:
                    raise CheckpointError(f"{path}: has no tensor {name!r}, though the index puts it there")
                dtype, shape, begin, end = header[name]
                param = params[table[name]]
                if shape != tuple(param.shape):
                    raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}, but config.json implies "
                                          f"{tuple(param.shape)}")
                direct = dtype == param.dtype and param.device.type == "cpu"
                dst = param.data if direct else torch.empty(shape, dtype=dtype)
                f.seek(begin)
                try:
                    _read_exact(f, memoryview(dst.view(-1).view(torch.uint8).numpy()))
                except EOFError:
                    raise CheckpointError(f"{path}: ended inside tensor {name!r}; download it again") from None
                if not direct:
                    param.data.copy_(dst)  # dtype conversion (e.g. the fp16 release to bf16)


def fingerprint(model: Phi2) -> str:
    """A short hash identifying the base weights, whatever dtype they were loaded in: the config, and
    each checkpoint tensor sampled at about 1024 evenly spaced elements, rounded to bf16. Adapters and heads
    record it to refuse a base they were not trained on. (LoRA layers are not part of it; a merged LoRA
    changes the weights and so the fingerprint.)"""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode())
    params = model.state_dict()
    for name in sorted(hf_to_ours(model.config.n_layer).values()):
        flat = params[name].detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].to("cpu", torch.bfloat16)
        h.update(name.encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def load_model(path, dtype=torch.float32, device="cpu") -> Phi2:
    """Build Phi-2 from a checkpoint folder (config.json + safetensors) in dtype, in eval mode."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder; it should hold config.json and model*.safetensors")
    config = Phi2Config.from_hf_json(folder / "config.json")
    with torch.device("meta"):
        model = Phi2(config)
    model = model.to(dtype).to_empty(device=device)  # allocated in the final dtype; contents undefined
    load_weights(model, folder)
    model.init_rope()
    return model.eval()


def save_hf_checkpoint(model: Phi2, folder, max_shard_bytes: int | None = None) -> None:
    """Write model in microsoft/phi-2's layout (config.json, safetensors shards, index), atomically per file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ours_to_hf = {ours: hf for hf, ours in hf_to_ours(model.config.n_layer).items()}
    tensors = {ours_to_hf[k]: v.detach().contiguous() for k, v in model.state_dict().items()}
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and max_shard_bytes and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)

    hf_config = model.config.to_hf_dict()
    hf_config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(hf_config, indent=2) + "\n")
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        with atomic_path(folder / name) as tmp:
            save_file(shard, tmp, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard}}
        with atomic_path(folder / "model.safetensors.index.json") as tmp:
            tmp.write_text(json.dumps(index, indent=2))
