"""Load a Hugging Face Phi-2 checkpoint folder (config.json + safetensors, single or sharded) into `Phi2`.

The `safetensors` library reads each file's header (and checks it: sound JSON, offsets inside the file, no
overlaps). The model is built on the meta device, given uninitialised storage in the target dtype, and
filled one tensor at a time, each read by safetensors' pread backend into fresh memory that becomes the
parameter when the dtype matches: peak memory is the model plus one tensor (bench/load_memory.py). Its
default memory map would keep each shard's pages in the process until the file closes, and a parameter
that is a view of the map would not be the model's own memory.
Loading is strict: every checkpoint tensor is used once, every parameter filled once, every shape checked.
Left out on purpose: pickled checkpoints (pytorch_model.bin are never unpickled) and name remapping of old
remote-code layouts (transformer.h.*, mixer.Wqkv), which are refused with a message.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import Phi2Config, read_json
from .errors import UsageError
from .files import atomic_path
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
# the safetensors library's words for a damaged file -> ours
_DAMAGE = {"header too large": "bad header length", "header too small": "bad header length",
           "not fully covered": "truncated", "incomplete metadata": "truncated"}
_OLD_LAYOUT = ("transformer.h.", "transformer.embd.", ".mixer.", "layers.0.wte.")


class CheckpointError(UsageError):
    """A checkpoint folder or file that cannot be loaded; the message names the file or tensor."""


def hf_to_ours(n_layer: int) -> dict:
    """The full name table for a model with n_layer blocks (453 entries for Phi-2)."""
    table = {}
    for hf, ours in WEIGHT_MAP.items():
        for i in range(n_layer) if "{i}" in hf else [None]:
            table[hf.format(i=i)] = ours.format(i=i)
    return table


def check_finite(tensor, path, name, error=None):
    """Refuse a tensor holding NaN or inf. Its fp32 sum is non-finite then (finite weights would need values
    past ~1e30 to overflow it): one pass as the tensor is read, no boolean copy of it."""
    if not torch.isfinite(tensor.sum(dtype=torch.float32)):
        raise (error or CheckpointError)(f"{path}: tensor {name!r} holds NaN or infinite values; the file is "
                                         "damaged (or was saved from a diverged run): use another copy")


def open_checked(path: Path, error=None, fix="download it again"):
    """safe_open on path (pread backend), with a damaged file named in one line (as `error`, by default a
    CheckpointError) that ends with what to do."""
    try:
        return safe_open(path, framework="pt", backend="pread")
    except SafetensorError as e:
        reason = next((ours for theirs, ours in _DAMAGE.items() if theirs in str(e)), "unreadable header")
        raise (error or CheckpointError)(f"{path}: not a safetensors file ({reason}); {fix}") from None


def read_header(f, path: Path) -> dict:
    """{name: (dtype, shape)} for each tensor of the safetensors file f (opened by open_checked) at path."""
    header = {}
    for name in f.keys():
        info = f.get_slice(name)
        dtype = DTYPES.get(info.get_dtype())
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info.get_dtype()}; only "
                                  f"{', '.join(DTYPES)} are read")
        header[name] = dtype, tuple(info.get_shape())
    return header


def checkpoint_files(folder: Path) -> dict:
    """{HF tensor name: file} for a folder with model.safetensors or a sharded index."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, CheckpointError, "download it again")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map' of tensor names to files); "
                                  "download it again")
        files = {}
        for name, shard in weight_map.items():
            if not (folder / shard).exists():
                raise CheckpointError(f"{folder / shard}: missing, but {index.name} lists tensor {name!r} in it")
            files[name] = folder / shard
        return files
    single = folder / "model.safetensors"
    if single.exists():
        with open_checked(single) as f:
            return {name: single for name in f.keys()}
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
        with open_checked(path) as f:
            header = read_header(f, path)
            for name in names:
                if name not in header:
                    raise CheckpointError(f"{path}: has no tensor {name!r}, though the index puts it there")
                dtype, shape = header[name]
                param = params[table[name]]
                if shape != tuple(param.shape):
                    raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}, but config.json implies "
                                          f"{tuple(param.shape)}")
                tensor = f.get_tensor(name)  # fresh memory (pread), not a view of the file
                check_finite(tensor, path, name, CheckpointError)
                if tensor.dtype == param.dtype and param.device == tensor.device:
                    param.data = tensor  # the storage itself: no copy
                else:
                    param.data.copy_(tensor)  # to the model's dtype (e.g. the fp16 release to bf16) and device


def fingerprint(model: Phi2) -> str:
    """A short hash identifying the base weights, the same whatever float type they are stored or loaded in:
    the config, and each checkpoint tensor's name, shape and the sign bits of about 1024 evenly spaced elements.
    Rounding to bf16 or fp16 never changes a sign bit (not even rounding to zero or to infinity), so a copy
    re-saved in another dtype keeps its fingerprint; another base, the same base fine-tuned or with an adapter
    merged into it, flips the signs of many of its near-zero weights. Adapters and heads record it to refuse a
    base they were not trained on. (LoRA layers are not part of it.)"""
    return _sampled_hash(model, lambda name, tensor, sample: (
        f"{name}{tuple(tensor.shape)}".encode(), torch.signbit(sample).to("cpu", torch.uint8).numpy().tobytes()))


def legacy_fingerprint(model: Phi2) -> str:
    """The fingerprint earlier versions recorded (samples rounded to bf16, which an fp16 re-save can change):
    adapters and heads saved by them still load on the base they were made for."""
    return _sampled_hash(model, lambda name, tensor, sample: (
        name.encode(), sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()))


def _sampled_hash(model: Phi2, parts) -> str:
    """sha256 (16 hex digits) of the config, then parts(name, tensor, sample) for each checkpoint tensor in
    name order, sample being about 1024 of its elements, evenly spaced."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode())
    params = model.state_dict()
    for name in sorted(hf_to_ours(model.config.n_layer).values()):
        tensor = params[name].detach()
        flat = tensor.reshape(-1)
        for part in parts(name, tensor, flat[:: max(1, flat.numel() // 1024)]):
            h.update(part)
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
    ours_to_hf = {ours: hf for hf, ours in hf_to_ours(model.config.n_layer).items()}
    tensors = {ours_to_hf[k]: v for k, v in model.state_dict().items()}
    save_hf_tensors(tensors, model.config.to_hf_dict(), folder, max_shard_bytes)


def save_hf_tensors(tensors: dict, hf_config: dict, folder, max_shard_bytes: int | None = None) -> None:
    """Write {HF name: tensor} and config.json as transformers' save_pretrained does: one model.safetensors,
    or model-0000i-of-0000n.safetensors shards of at most max_shard_bytes with model.safetensors.index.json;
    each file atomically. The config's dtype fields are set from the tensors'."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and max_shard_bytes and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)

    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    hf_config = {**hf_config, "dtype": dtype, **({"torch_dtype": dtype} if "torch_dtype" in hf_config else {})}
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
