"""One plain Hugging Face Phi-2 checkpoint per target, for vLLM, TGI or transformers:

    python export.py --lora runs/sft/best --head mistral.safetensors --out phi2-prompter-mistral

The stage-1 LoRA is merged into its projections (W + (alpha/r) B A, as generate.py merges it) and the head
is folded into the LM head. The head computes W (A h + c) + b, with A, c its adapter and W, b its head (the
full copy, or the base head plus its low-rank update W0 + s B' A'); that is one linear layer, W' h + b', with

    W' = W A        b' = W c + b

computed in float64 and written in --dtype. The folder is a standard Phi-2 checkpoint (the base's
config.json, safetensors shards and index as transformers writes them, the tokenizer files, a README naming
the base and the adapters) that PhiForCausalLM loads and vLLM serves, with tensor parallelism across GPUs.
--no-head exports stage 1 alone. The folder is written beside --out and renamed into place when complete.
It holds a marker, .phi2-prompter-export.json, listing the files written; --overwrite replaces only a folder
that holds that marker and nothing but the files it lists (or nothing at all), and refuses anything else.
"""

import support.threads  # noqa: F401  (first: OpenMP reads its settings when torch loads)

import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from head_adapter import content_id
from phi2.config import Phi2Config, read_json
from phi2.errors import UsageError
from phi2.weights import hf_to_ours, save_hf_tensors
from support import cli
from support.prompter import Prompter, add_args, base_folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "generation_config.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MARKER = ".phi2-prompter-export.json"  # in every export: its id and the files it wrote
MARKER_FORMAT = "phi2-prompter export v1"


@dataclass
class ExportConfig:
    out: str
    lora: str | None = None
    head: str | None = None
    no_head: bool = False
    model: str | None = None  # default: the base the stage-1 adapter names
    dtype: str = "auto"  # auto: the base checkpoint's own
    shard_gb: float = 5.0
    overwrite: bool = False


def parse_args(argv=None) -> ExportConfig:
    p = cli.parser(__doc__)
    d = ExportConfig(out="")
    p.add_argument("--out", required=True, help="the folder to write (refused if it exists, unless --overwrite)")
    add_args(p, heads="one")
    p.add_argument("--no-head", action="store_true", help="export stage 1 alone (the base LM head)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default=d.dtype,
                   help="of the written weights; auto: the base checkpoint's (fp16 for microsoft/phi-2)")
    p.add_argument("--shard-gb", type=cli.positive_float, default=d.shard_gb, help="largest safetensors shard, in GB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cfg = ExportConfig(**vars(p.parse_args(argv)))
    if cfg.head and cfg.no_head:
        raise UsageError("--head and --no-head: give one of them (--no-head exports stage 1 alone)")
    if not cfg.head and not cfg.no_head:
        raise UsageError("give --head FILE to fold a target's head in, or --no-head to export stage 1 alone")
    return cfg


@torch.no_grad()
def fold_head(head) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of the one linear layer equal to head: W' = W A, b' = W c + b, in float64."""
    A, c = head.adapter.weight.double(), head.adapter.bias.double()  # (C, C), (C,)
    lm = head.lm_head
    W = lm.weight.double()  # (V, C): the full copy, or the frozen base head ...
    if head.head_rank is not None:  # ... plus its low-rank update
        W = W + lm.scaling * (lm.lora_B.double() @ lm.lora_A.double())
    return W @ A, W @ c + lm.bias.double()


def main(cfg: ExportConfig) -> Path:
    out = Path(cfg.out).resolve()
    if out.exists() and not cfg.overwrite:
        raise UsageError(f"--out {cfg.out} exists; choose another folder, or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {cfg.out} is a file; --out is the folder to write")
    above = next(p for p in out.parents if p.exists())  # where the folders to make begin
    if not above.is_dir():
        raise UsageError(f"--out {cfg.out}: {above} is a file, so no folder can go there; choose another --out")
    folder = base_folder(cfg.model, cfg.lora)
    for given in (folder, cfg.lora, cfg.head):
        if given and (out == Path(given).resolve() or out in Path(given).resolve().parents):
            raise UsageError(f"--out {cfg.out} holds an input ({given}), which replacing it would delete; "
                             "choose another folder")
    if out.exists():
        _owned_files(out, cfg.out)  # refused now, before the model loads, if the folder is not an export's
    Phi2Config.from_hf_json(folder / "config.json")  # a damaged one is one line, before anything loads
    base_config = read_json(folder / "config.json")
    stored = str(base_config.get("torch_dtype") or base_config.get("dtype") or "float32")
    stored = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(stored.removeprefix("torch."), torch.float32)
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else stored

    # fp32 throughout, as generate.py's fp32 path: the merge is the same arithmetic
    prompter = Prompter.load(cfg.model, cfg.lora, dtype=torch.float32)
    model, tokenizer = prompter.model, prompter.tokenizer
    params = model.state_dict()
    tensors = {hf: params[ours].to(dtype) for hf, ours in hf_to_ours(model.config.n_layer).items()}
    target = None
    if cfg.head:
        head = prompter.add_head(cfg.head, dtype=torch.float32)
        weight, bias = fold_head(head)
        tensors["lm_head.weight"], tensors["lm_head.bias"] = weight.to(dtype), bias.to(dtype)
        target = head.target

    # what transformers and vLLM read to stop at the end of the rewrite, and the rotary settings in the
    # top-level spelling older readers know (transformers 5 reads rope_parameters)
    base_config.setdefault("eos_token_id", tokenizer.eos_id)
    base_config.setdefault("bos_token_id", tokenizer.eos_id)
    rope = base_config.get("rope_parameters") or {}
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in rope:
            base_config.setdefault(key, rope[key])

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.partial")  # a new name: nothing of anyone's
        tmp.mkdir()
    except OSError as e:
        raise UsageError(f"--out {cfg.out}: cannot make a folder beside it ({e.strerror}); choose another --out") \
            from None
    try:
        save_hf_tensors(tensors, base_config, tmp, max_shard_bytes=int(cfg.shard_gb * 1e9))
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        (tmp / "README.md").write_text(readme(cfg, folder, prompter.base_fingerprint, prompter.stage1, target,
                                              dtype))
        marker = {"format": MARKER_FORMAT, "id": uuid.uuid4().hex, "files": sorted(p.name for p in tmp.iterdir())}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _replace(out, tmp, cfg.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # made above under a new name: only ours (gone once renamed)
    print(f"wrote {out}: Phi-2 with {'the stage-1 adapter merged' if cfg.lora else 'no stage-1 adapter'}"
          f"{f' and the {target} head folded in' if target else ''}, {str(dtype).removeprefix('torch.')}",
          file=sys.stderr)
    return out


def _owned_files(folder: Path, flag: str) -> list[str]:
    """The names in folder, if it is provably an earlier export: its marker is there and everything else is a
    plain file the marker lists (or the folder is empty). Anything else is refused, in one line."""
    refuse = UsageError(f"--out {flag} holds files export.py did not write; --overwrite only replaces an earlier "
                        f"export (a folder with its {MARKER} and only the files it lists): choose another folder")
    try:
        entries = {e.name: e.is_file(follow_symlinks=False) for e in os.scandir(folder)}
        if not entries:
            return []
        if not entries.get(MARKER):
            raise refuse
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON, nested too deep
        raise refuse from None
    listed = marker.get("files") if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None
    if not isinstance(listed, list) or not all(
            plain and (name == MARKER or name in listed) for name, plain in entries.items()):
        raise refuse
    return sorted(entries)


def _replace(out: Path, new: Path, flag: str):
    """Rename new onto out; an earlier export there is moved aside first and only its own files removed."""
    if not out.exists():
        new.rename(out)
        return
    _owned_files(out, flag)  # again: the folder may have changed while the model was loading
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.old")
    out.rename(old)
    new.rename(out)
    try:
        names = _owned_files(old, flag)  # what is there now: if anything was added since the check, nothing goes
    except UsageError:
        names = None
    if names is not None:
        for name in names:
            (old / name).unlink()
        try:
            old.rmdir()
            return
        except OSError:
            pass
    print(f"warning: the earlier export at {flag} held files export.py did not write by the time it was replaced; "
          f"it is kept whole in {old}", file=sys.stderr)


def readme(cfg: ExportConfig, base: Path, base_fingerprint: str, stage1: str, target, dtype) -> str:
    lines = [f"# phi2-prompter{f' for {target}' if target else ' (stage 1)'}", "",
             "A prompt rewriter: Microsoft Phi-2 with phi2-prompter's adapters merged in, as a plain Phi-2 "
             "checkpoint. Give it `System: Fix the following prompt. Prompt: {prompt}. Answer:` and it continues "
             "with the improved prompt.", "",
             f"- base: `{base}` (weight fingerprint {base_fingerprint})",
             f"- stage-1 LoRA: `{cfg.lora}` (content id {stage1}), merged into the projections" if cfg.lora else
             "- stage-1 LoRA: none",
             f"- stage-2 head for `{target}`: `{cfg.head}` (content id {content_id(cfg.head)}), folded into "
             "lm_head" if target else "- stage-2 head: none (the base LM head)",
             f"- weights: {str(dtype).removeprefix('torch.')}", "",
             "Serve it with vLLM: `vllm serve <this folder> --tensor-parallel-size N`; or load it with "
             "transformers' `PhiForCausalLM.from_pretrained`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run("export.py", main, parse_args)
