"""LoRA, written by hand: a frozen Linear plus a trainable low-rank update (Hu et al., 2021,
https://arxiv.org/abs/2106.09685).

        x ──┬── W x + b ───────────────────────(+)──> y
            └── dropout ── A (r x in) ── * alpha/r ── B (out x r) ──┘

A starts kaiming-uniform and B at zero (as in peft), so at initialisation the model is unchanged. Adapters
are saved in peft's own format (adapter_model.safetensors + adapter_config.json), so an adapter trained
here loads in peft and the reverse; a fingerprint of the base's weights travels in the file's metadata,
and an adapter is refused by a base it was not trained on. Left out on purpose: DoRA and other variants,
per-layer rank or alpha patterns, bias training, stage-1 LoRA on embeddings or the LM head (stage 2's
low-rank head, head_adapter.py, wraps the LM head in this class).
"""

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from phi2.config import read_json
from phi2.errors import UsageError
from phi2.files import atomic_path, write_atomic
from phi2.fused import FastDropout, FastLinear, autocast_dtype
from phi2.model import Phi2
from phi2.weights import check_finite, fingerprint, legacy_fingerprint, open_checked

DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")  # the papers': attention and MLP
PEFT_PREFIX = "base_model.model.model."  # peft's name for our `layers.*` (PeftModel > PhiForCausalLM > PhiModel)


class AdapterError(UsageError):
    """An adapter file that does not fit this base model; the message names the file and the reason."""


class LoRALinear(FastLinear):
    """A Linear whose weight and bias are frozen and shared with the layer it replaces, plus A and B."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: state_dict keys unchanged
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's init (nn.Linear's default)
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_dropout = FastDropout(dropout)
        self.merged = False

    def forward(self, x):
        y = super().forward(x)
        if self.merged:
            return y
        if not autocast_dtype(x):  # under autocast the matmuls pick the dtype
            x = x.to(self.lora_A.dtype)
        x = self.lora_dropout(x)  # dropout on the LoRA path only
        # scale the rank-r intermediate rather than the output: the same product, far fewer multiplies; add out
        # of place: y is a view of the Linear's product, and an in-place add on a view costs backward two
        # activation-sized copies (autograd's CopySlices), more than the tensor it saves
        return y + F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B).to(y.dtype)

    def delta(self):
        """The update (alpha/r) * B @ A (out, in), in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold the update into the frozen weight (W += (alpha/r) B A), for inference at base speed."""
        if not self.merged:
            self.weight.copy_(self.weight.float() + self.delta())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take the update back out of the weight (exact in fp32, up to rounding in half precision)."""
        if self.merged:
            self.weight.copy_(self.weight.float() - self.delta())
            self.merged = False


def lora_modules(model: Phi2) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject(model: Phi2, rank=32, alpha=64.0, dropout=0.0, modules=DEFAULT_MODULES, rslora=False) -> Phi2:
    """Replace every Linear whose leaf name is in modules by a LoRALinear; freeze everything else."""
    unknown = set(modules) - {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if unknown:
        raise AdapterError(f"no module named {sorted(unknown)} in Phi-2; LoRA modules are among q_proj, k_proj, "
                           "v_proj, dense, fc1, fc2")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if leaf in modules and isinstance(module, nn.Linear) and not isinstance(module, LoRALinear):
            wrapped = LoRALinear(module, rank, alpha, dropout, rslora)
            setattr(model.get_submodule(parent), leaf, wrapped)
    return model


def merge(model: Phi2):
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model: Phi2):
    for m in lora_modules(model).values():
        m.unmerge()


def trainable_parameters(model: Phi2) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------- peft's file format


def adapter_config(model: Phi2, base_path: str | None = None) -> dict:
    """peft's adapter_config.json for the LoRA layers in model."""
    modules = lora_modules(model)
    if not modules:
        raise AdapterError("the model has no LoRA layers to save")
    first = next(iter(modules.values()))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.lora_dropout.p,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": first.rslora,
        "use_dora": False,
        "inference_mode": True,
    }


def save_adapter(model: Phi2, folder, base_path=None, base_fingerprint=None):
    """Write adapter_model.safetensors (LoRA tensors only) and adapter_config.json, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in lora_modules(model).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
    metadata = {"format": "pt"}
    if base_fingerprint:
        metadata["phi2_base_fingerprint"] = base_fingerprint
    with atomic_path(folder / "adapter_model.safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)
    config = adapter_config(model, str(base_path) if base_path else None)
    write_atomic(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")


def read_adapter_config(folder) -> dict:
    """adapter_config.json, checked for what this implementation supports."""
    folder = Path(folder)
    path = folder / "adapter_config.json"
    if not folder.exists():
        raise AdapterError(f"{folder}: no such folder; a stage-1 adapter is a folder such as runs/sft/best")
    if folder.is_file():
        what = "a file, a stage-2 head perhaps (--head)" if folder.suffix == ".safetensors" else "a file"
        raise AdapterError(f"{folder}: {what}; a stage-1 adapter is a folder holding adapter_config.json and "
                           "adapter_model.safetensors")
    if not path.exists():
        hint = ("a model folder (a base, or export.py's merged model), not an adapter: pass it as --model"
                if (folder / "config.json").exists() else "missing")
        raise AdapterError(f"{path}: {hint}; a stage-1 adapter folder holds adapter_config.json and "
                           "adapter_model.safetensors")
    config = read_json(path, AdapterError, "the adapter folder is damaged: save or download it again")
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: not a JSON object; the adapter folder is damaged: save or download it again")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}, only 'LORA' adapters are read")
    for key, default in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False),
                         ("rank_pattern", {}), ("alpha_pattern", {}), ("modules_to_save", None),
                         ("layers_to_transform", None), ("layer_replication", None), ("exclude_modules", None),
                         ("target_parameters", None), ("trainable_token_indices", None)):
        value = config.get(key)
        if value and value != default:  # absent, empty or the default: fine
            raise AdapterError(f"{path}: {key}={value!r} is not supported")

    def number(value, integer=False):
        return isinstance(value, int if integer else (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value)

    modules, base = config.get("target_modules"), config.get("base_model_name_or_path")
    dropout, rslora = config.get("lora_dropout"), config.get("use_rslora")
    for key, ok, what in (
            ("r", number(config.get("r"), integer=True) and config.get("r", 0) >= 1, "a positive integer"),
            ("lora_alpha", number(config.get("lora_alpha")) and config.get("lora_alpha", 0) > 0, "a positive number"),
            ("lora_dropout", dropout is None or number(dropout) and 0 <= dropout < 1, "a number in [0, 1)"),
            ("use_rslora", rslora is None or isinstance(rslora, bool), "true or false"),
            ("target_modules", isinstance(modules, list) and modules and all(isinstance(m, str) and m for m in modules),
             "a non-empty list of module names"),
            ("base_model_name_or_path", base is None or isinstance(base, str) and base and "\0" not in base,
             "a folder name or null")):
        if not ok:
            shown = json.dumps(config.get(key), ensure_ascii=False)
            raise AdapterError(f"{path}: {key!r} is {shown if len(shown) <= 60 else shown[:57] + '...'}; it must be "
                               f"{what}")
    return config


@torch.no_grad()
def copy_checked(params: dict, tensors: dict, file, error=AdapterError):
    """Copy tensors[key] into params[key] for every key of params, refusing any shape that differs."""
    for key, param in params.items():
        if tensors[key].shape != param.shape:
            raise error(f"{file}: tensor {key!r} has shape {tuple(tensors[key].shape)}, this base needs "
                        f"{tuple(param.shape)}; it was made for another model")
        check_finite(tensors[key], file, key, error)
        param.copy_(tensors[key])


def load_adapter(model: Phi2, folder, merge_weights=False) -> dict:
    """Inject LoRA layers as described by a peft adapter folder and load their tensors; returns its config.

    Fails if the adapter was trained on another base: other shapes, other module names, or (for
    adapters saved here) another fingerprint of the base weights.
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    file = folder / "adapter_model.safetensors"
    if not file.exists():
        raise AdapterError(f"{file}: missing (weights only travel as safetensors; adapter_model.bin is not read)")
    with open_checked(file, AdapterError) as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = metadata.get("phi2_base_fingerprint")
    # the older hash (legacy_fingerprint) is taken only when the current one does not match
    if expected and expected != fingerprint(model) and expected != legacy_fingerprint(model):
        raise AdapterError(f"{file}: trained on another base model (fingerprint {expected}, this base is "
                           f"{fingerprint(model)}); load the base it was trained on")

    inject(model, config["r"], config["lora_alpha"], config.get("lora_dropout") or 0.0,
           config["target_modules"], bool(config.get("use_rslora")))
    ours = {}
    for name, m in lora_modules(model).items():
        ours[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A
        ours[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B
    extra, missing = sorted(set(tensors) - set(ours)), sorted(set(ours) - set(tensors))
    if extra or missing:
        what = f"has tensor {extra[0]!r} that this base lacks" if extra else f"lacks tensor {missing[0]!r}"
        raise AdapterError(f"{file}: {what} ({len(extra)} unexpected, {len(missing)} missing); "
                           "it was made for another model")
    copy_checked(ours, tensors, file)
    if merge_weights:
        merge(model)
    return config
