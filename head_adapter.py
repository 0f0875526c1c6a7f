"""Stage 2: a head adapter per target LLM, one file each, on a shared base.

        h (final LayerNorm output, C) ── adapter: W_a h + b_a ── lm_head copy: W h' + b ──> logits (V)
                                          (C x C, identity at init)   (trainable, starts as the base head)

Only the adapter and the head copy are trained, on pairs the target LLM itself improved ("Designing
Universal Prompts for LLM"); at initialisation the logits are bit-identical to the base model's. A head
composes with the model from outside, `head(model.hidden_states(x))`, and goes to generate() per call,
so one loaded model serves several targets. The file holds only the head's tensors and metadata: the
target's name, the base's config and weight fingerprint, the stage-1 adapter it was trained on (its id, and
the path it had then), the sizes. `head_rank` swaps the full head copy (V x C, 131M parameters for Phi-2)
for a low-rank update of the frozen base head, which is what makes a file small (docs/training.md: "Head
files"). Left out: per-target tokenizers or vocabularies.
"""

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import lora
from lora import LoRALinear
from phi2.errors import UsageError
from phi2.files import atomic_path
from phi2.fused import FastLinear, linear_cross_entropy
from phi2.model import Phi2
from phi2.weights import DTYPES, open_checked

FORMAT = "phi2-prompter head adapter v1"
TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a target's name: it names files (--target)


class HeadError(UsageError):
    """A head file that is not a head, or not for this base; the message names the file and the reason."""


class HeadAdapter(nn.Module):
    def __init__(self, lm_head: nn.Linear, head_rank: int | None = None, dtype=torch.float32):
        super().__init__()
        C, V = lm_head.in_features, lm_head.out_features
        device = lm_head.weight.device
        self.adapter = FastLinear(C, C, device=device, dtype=dtype)
        with torch.no_grad():
            self.adapter.weight.copy_(torch.eye(C, device=device))
            self.adapter.bias.zero_()
        self.head_rank = head_rank
        if head_rank is None:  # the papers' choice: a full trainable copy of the LM head
            self.lm_head = FastLinear(C, V, device=device, dtype=dtype)
            with torch.no_grad():
                self.lm_head.weight.copy_(lm_head.weight)
                self.lm_head.bias.copy_(lm_head.bias)
        else:  # the base head, frozen and shared, plus a trainable rank-r update (B starts at zero)
            self.lm_head = LoRALinear(lm_head, head_rank, alpha=float(head_rank))
            self.lm_head.lora_A.data = self.lm_head.lora_A.data.to(dtype)
            self.lm_head.lora_B.data = self.lm_head.lora_B.data.to(dtype)

    def forward(self, h):
        return self.lm_head(self.adapter(h))  # (..., V)

    def loss(self, h, next_ids):
        """Summed cross-entropy of this head's logits for h (N, C) against next_ids (N,)."""
        head = self.lm_head
        low_rank = None if self.head_rank is None else (head.lora_A, head.lora_B, head.scaling)
        return linear_cross_entropy(self.adapter(h), head.weight, head.bias, next_ids, low_rank)

    def trained_tensors(self) -> dict:
        """The tensors a head file stores: the adapter, and the head copy or its low-rank update."""
        head = ["lm_head.weight", "lm_head.bias"] if self.head_rank is None else ["lm_head.lora_A", "lm_head.lora_B"]
        params = dict(self.named_parameters())
        return {f"head_adapter.{n}": params[n].detach().contiguous() for n in ["adapter.weight", "adapter.bias", *head]}


def stage1_id(adapter_folder) -> str:
    """Identity of a stage-1 LoRA adapter ("none" without one): a hash of its tensors' names, shapes and
    values (as fp32), not of the file's bytes, which change with the metadata's order when it is re-saved."""
    if adapter_folder is None:
        return "none"
    return content_id(Path(adapter_folder) / "adapter_model.safetensors")


def content_id(path) -> str:
    """A short hash of a safetensors file's tensors: names, shapes and values as fp32."""
    digest = hashlib.sha256()
    with safe_open(path, framework="pt") as f:
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name).float()
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_head(head: HeadAdapter, path, target: str, model: Phi2, base_fingerprint: str, stage1: str,
              stage1_path=None):
    """Write the head's trained tensors and its metadata to one safetensors file, atomically. stage1_path: where
    the stage-1 adapter was, for the message that asks for it back."""
    path = Path(path)
    config = model.config
    metadata = {
        "format": FORMAT,
        "target": target,
        "base_fingerprint": base_fingerprint,
        "base_config": json.dumps(dataclasses.asdict(config), sort_keys=True),
        "stage1_adapter": stage1,
        "hidden_size": str(config.n_embd),
        "vocab_size": str(config.vocab_size),
        "head_rank": "full" if head.head_rank is None else str(head.head_rank),
    }
    if stage1_path:
        metadata["stage1_path"] = str(Path(stage1_path).resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(head.trained_tensors(), tmp, metadata=metadata)


def read_metadata(path) -> dict:
    """A head file's metadata, each field it is read for checked: a damaged or foreign file is one HeadError
    naming the field."""
    path = Path(path)
    if not path.exists():
        raise HeadError(f"{path}: no such head file")
    if path.is_dir():
        raise HeadError(f"{path}: a folder; give a head's .safetensors file (train_head.py writes one per target)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise HeadError(f"{path}: not a safetensors file ({e}); heads are made by train_head.py") from None
    if metadata.get("format") != FORMAT:
        raise HeadError(f"{path}: not a head adapter (no '{FORMAT}' marker); heads are made by train_head.py")
    number = re.compile(r"[1-9][0-9]{0,8}")  # ASCII digits only: int() would take other scripts' digits
    for key, ok, what in (
            ("target", TARGET_NAME.fullmatch(metadata.get("target", "")), "a target name (letters, digits, . _ -)"),
            ("base_fingerprint", metadata.get("base_fingerprint"), "the base model's fingerprint"),
            ("stage1_adapter", metadata.get("stage1_adapter"), "the stage-1 adapter's id, or 'none'"),
            ("head_rank", metadata.get("head_rank") == "full" or number.fullmatch(metadata.get("head_rank", "")),
             "'full' or a positive integer"),
            ("hidden_size", number.fullmatch(metadata.get("hidden_size", "")), "a positive integer"),
            ("vocab_size", number.fullmatch(metadata.get("vocab_size", "")), "a positive integer")):
        if not ok:
            value = metadata.get(key)
            shown = "missing" if value is None else f"{value[:40]!r}{'...' if len(value) > 40 else ''}"
            raise HeadError(f"{path}: metadata field {key!r} is {shown}, but must be {what}; the file is damaged "
                            "(train the head again with train_head.py)")
    return metadata


def load_head(path, model: Phi2, base_fingerprints, stage1: str, dtype=None) -> HeadAdapter:
    """A head from its file, checked against the base it goes on (base_fingerprints: the base's fingerprint,
    taken before any LoRA merge, or several that it answers to) and the stage-1 adapter in use; in dtype
    (default: the model's)."""
    path = Path(path)
    metadata = read_metadata(path)
    accepted = (base_fingerprints,) if isinstance(base_fingerprints, str) else tuple(base_fingerprints)
    if metadata["base_fingerprint"] not in accepted:
        raise HeadError(f"{path}: made for another base model (fingerprint {metadata['base_fingerprint']}, this "
                        f"base is {accepted[0]}); load the base it was trained on")
    if metadata["stage1_adapter"] != stage1:
        where = (f" (it was then at {' '.join(str(metadata['stage1_path']).split())[:300]!r}; if that folder was "
                 "trained again since, train this head again on it)" if metadata.get("stage1_path") else "")
        raise HeadError(f"{path}: trained on stage-1 adapter {metadata['stage1_adapter']}, but the one in use is "
                        f"{stage1}; pass the --lora it was trained with{where}")
    config = model.config
    for key, value in (("hidden_size", config.n_embd), ("vocab_size", config.vocab_size)):
        if int(metadata[key]) != value:
            raise HeadError(f"{path}: made for a model of {key} {metadata[key]}, this base has {value}; load the base "
                            "it was trained on")
    rank = None if metadata["head_rank"] == "full" else int(metadata["head_rank"])
    head_names = ["lm_head.weight", "lm_head.bias"] if rank is None else ["lm_head.lora_A", "lm_head.lora_B"]
    expected = {f"head_adapter.{n}" for n in ["adapter.weight", "adapter.bias", *head_names]}
    with open_checked(path, HeadError) as f:  # the tensors' names, dtypes and shapes before any is read or made
        header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
        if set(header) != expected:
            raise HeadError(f"{path}: holds {sorted(header)[:3]}..., expected {sorted(expected)[:3]}... for head_rank "
                            f"{metadata['head_rank']}; the file is damaged")
        for key, (kind, _) in header.items():
            if kind not in DTYPES:
                raise HeadError(f"{path}: tensor {key!r} has dtype {kind}; a head's are {', '.join(DTYPES)}: the file "
                                "is damaged")
        lora_a = header.get("head_adapter.lm_head.lora_A", (None, (rank, config.n_embd)))[1]
        if lora_a != (rank, config.n_embd):
            raise HeadError(f"{path}: tensor 'head_adapter.lm_head.lora_A' has shape {lora_a}, head_rank {rank} on "
                            f"this base needs {(rank, config.n_embd)}; the file is damaged or for another model")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    head = HeadAdapter(model.lm_head, rank, dtype=dtype or model.lm_head.weight.dtype)
    params = dict(head.named_parameters())
    lora.copy_checked({key: params[key.removeprefix("head_adapter.")] for key in expected}, tensors, path, HeadError)
    head.target = metadata["target"]
    return head.requires_grad_(False).eval()
