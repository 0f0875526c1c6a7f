"""The prompter as every command loads it: the base with the stage-1 LoRA merged in, its tokenizer, and a head
per target LLM, checked against the base and the adapter they were trained on.

    prompter = Prompter.load(lora_dir="runs/sft/best", heads=["mistral.safetensors"], dtype=torch.bfloat16,
                             device="cuda")
    prompter.rewrite(["write a poem about rain"], target="mistral")[0]  # the rewrite, a str

generate.py, serve.py, export.py, evaluate.py and train_head.py load it this way, and `add_args` gives each the
same --model/--lora/--head flags.
"""

import argparse
from pathlib import Path

import torch

import lora
import phi2
from head_adapter import HeadAdapter, HeadError, load_head, stage1_id
from phi2.generation import Completion, generate
from phi2.weights import fingerprint, legacy_fingerprint
from prompts import format_prompt
from support import cli

DEFAULT_BASE = "checkpoints/phi-2"


def add_args(p: argparse.ArgumentParser, heads: str | None = "many"):
    """--model, --lora and --head: heads "many" (repeatable: one rewrite per target), "one", or None."""
    p.add_argument("--model", help=f"base checkpoint folder (default: the --lora adapter's base, else {DEFAULT_BASE})")
    p.add_argument("--lora", help="stage-1 LoRA adapter folder, e.g. runs/sft/best")
    if heads == "many":
        p.add_argument("--head", dest="heads", action="append", default=[],
                       help="a stage-2 head file, e.g. mistral.safetensors (repeatable: one per target)")
    elif heads == "one":
        p.add_argument("--head", action=cli.Once, help="a stage-2 head file, e.g. mistral.safetensors")


def base_folder(model_dir, lora_dir) -> Path:
    """--model; else the base named in the stage-1 adapter's config; else checkpoints/phi-2."""
    given = model_dir is not None
    if model_dir is None and lora_dir:
        model_dir = lora.read_adapter_config(lora_dir).get("base_model_name_or_path")
        if model_dir and not (Path(model_dir) / "config.json").exists():
            raise phi2.CheckpointError(f"{lora_dir}: its base, {model_dir} (recorded in its adapter_config.json), "
                                       "is not there; pass --model with the base's folder (moved or copied, or "
                                       "downloaded with `huggingface-cli download microsoft/phi-2 --local-dir DIR`)")
    folder = Path(model_dir or DEFAULT_BASE)
    if given and (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
        raise phi2.CheckpointError(f"--model {folder}: a stage-1 LoRA adapter, not a Phi-2 checkpoint; pass it "
                                   "as --lora (its base is then found from its config)")
    if not (folder / "config.json").exists():
        raise phi2.CheckpointError(f"{folder}: no Phi-2 checkpoint here; download it with `huggingface-cli download "
                                   f"microsoft/phi-2 --local-dir {folder}`, or pass --model DIR")
    return folder


def base_config(model_dir, lora_dir=None) -> phi2.Phi2Config | None:
    """The base's config, which decides the precision on a CPU; None where there is no checkpoint or adapter to
    find it by (loading them then says why)."""
    try:
        return phi2.Phi2Config.from_hf_json(base_folder(model_dir, lora_dir) / "config.json")
    except (phi2.CheckpointError, lora.AdapterError):
        return None


class Prompter:
    """model: the merged base (frozen, eval mode); fingerprints: the base's (taken before the merge, with the
    older hash heads saved before the sign-bit fingerprint recorded); stage1: the adapter's identity ("none");
    heads: {target: HeadAdapter}, None for the base's own LM head."""

    def __init__(self, model, tokenizer, folder: Path, base_fingerprint: str, legacy: str, stage1: str):
        self.model, self.tokenizer, self.folder = model, tokenizer, folder
        self.base_fingerprint, self.legacy_fingerprint, self.stage1 = base_fingerprint, legacy, stage1
        self.heads: dict[str | None, HeadAdapter | None] = {None: None}

    @classmethod
    def load(cls, model_dir=None, lora_dir=None, heads=(), dtype=torch.float32, device="cpu") -> "Prompter":
        try:
            folder = base_folder(model_dir, lora_dir)
        except phi2.CheckpointError as e:
            if heads and not lora_dir and model_dir is None:  # the default base was looked for: say why
                raise phi2.CheckpointError(f"{e}; a --head goes with the --lora it was trained on, which names its "
                                           "base") from None
            raise
        model = phi2.load_model(folder, dtype=dtype, device=device)
        base_fingerprint, legacy = fingerprint(model), legacy_fingerprint(model)  # before the merge changes them
        if lora_dir:
            lora.load_adapter(model, lora_dir, merge_weights=True)
        prompter = cls(model.requires_grad_(False).eval(), phi2.load_tokenizer(folder), folder, base_fingerprint,
                       legacy, stage1_id(lora_dir))
        for path in heads:
            prompter.add_head(path)
        return prompter

    def add_head(self, path, dtype=None) -> HeadAdapter:
        """Load a head, checked against this base and stage-1 adapter; one head per target."""
        head = load_head(path, self.model, (self.base_fingerprint, self.legacy_fingerprint), self.stage1, dtype)
        if head.target in self.heads:
            raise HeadError(f"{path}: a second head for target '{head.target}'; give one head per target")
        self.heads[head.target] = head
        return head

    @property
    def targets(self) -> list[str]:
        return [t for t in self.heads if t is not None]

    def encode(self, text: str, raw: bool = False) -> list[int]:
        """The ids the model continues: text in the training template (raw: as it is)."""
        return self.tokenizer.encode(text if raw else format_prompt(text))

    def complete(self, ids: list[list[int]], target: str | None = None, max_new_tokens: int = 128,
                 **decoding) -> list[Completion]:
        """Continue each prompt (token ids) with target's head (None: stage 1 alone), decoded together.
        decoding: generate()'s sampling, stop string and streaming arguments."""
        return generate(self.model, ids, max_new_tokens, eos_id=self.tokenizer.eos_id, tokenizer=self.tokenizer,
                        head=self.heads[target], **decoding)

    def rewrite(self, texts: list[str], target: str | None = None, max_new_tokens: int = 128, **decoding) -> list[str]:
        """Each text's rewrite by target's head: the text in the template, the model's answer stripped."""
        return [c.text.strip() for c in self.complete([self.encode(t) for t in texts], target, max_new_tokens,
                                                      **decoding)]

    def describe(self) -> str:
        heads = ", ".join(self.targets) or "none"
        return f"prompter: base {self.folder}, stage-1 adapter {self.stage1}, heads: {heads}"
