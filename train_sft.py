"""Stage 1: LoRA-fine-tune Phi-2 on (prompt, improved prompt) pairs: `python train_sft.py --rank 32`.

The text is `System: Fix the following prompt. Prompt: {prompt}. Answer: {improved}` and the loss is on the
answer and its EOS. LoRA (rank 32 on q/k/v/dense/fc1/fc2) is the only thing trained, with runs.py's AdamW,
warm-up then cosine, clipping, autocast in the precision the hardware does well, and gradient checkpointing
for models of a billion parameters or more. --out is the adapter (peft's format) with the best validation
loss, by default <run-dir>/best; the run folder also holds last/, train_config.json, metrics.jsonl and
state.safetensors, from which --resume continues exactly. `--model tiny` trains a random-init tiny model
offline, whose base and tokenizer are written to <run-dir>/base.
"""

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import cli
import lora
import phi2
import runs
from hardware import to_device
from phi2.weights import fingerprint
from prompts import DEFAULT_DATA, collate, format_answer, format_prompt, read_pairs


@dataclass
class TrainConfig(runs.RunConfig):
    model: str = "checkpoints/phi-2"  # a Phi-2 checkpoint folder, or "tiny" (random init, offline)
    data: str = str(DEFAULT_DATA)
    run_dir: str = "runs/sft"
    out: str | None = None  # the best adapter; default <run_dir>/best
    rank: int = 32
    alpha: float | None = None  # None: twice the rank
    dropout: float = 0.05
    lora_modules: tuple[str, ...] = lora.DEFAULT_MODULES
    grad_checkpointing: bool | None = None  # None: on for models of a billion parameters or more

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        self.lora_modules = tuple(self.lora_modules)
        self.out = self.out or str(Path(self.run_dir) / "best")


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    p = cli.parser(__doc__)
    p.add_argument("--model", default=d.model,
                   help="Phi-2 checkpoint folder, or 'tiny' for an offline random-init model")
    p.add_argument("--data", default=d.data, help=".jsonl, .json or .csv file of prompt pairs")
    p.add_argument("--run-dir", default=d.run_dir, help="the run's folder: state, log, last adapter")
    p.add_argument("--out", help="the best adapter's folder (default: <run-dir>/best)")
    p.add_argument("--rank", type=cli.positive_int, default=d.rank, help="LoRA rank r")
    p.add_argument("--alpha", type=cli.positive_float, help="LoRA alpha (default: twice the rank)")
    p.add_argument("--dropout", type=cli.fraction, default=d.dropout, help="dropout on the LoRA path")
    p.add_argument("--lora-modules", nargs="+", default=list(d.lora_modules), help="the Linear layers to adapt")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on for models of 1B parameters or more)")
    runs.add_run_args(p, d)
    return TrainConfig(**vars(p.parse_args(argv)))


def main(cfg: TrainConfig) -> dict:
    runs.check_output_kind(cfg.out, folder=True, flag="--out")
    run = runs.Run(cfg, cfg.out)
    pairs = read_pairs(cfg.data, cfg.prompt_field, cfg.improved_field)
    with run.world.main_first():  # under torchrun, rank 0 writes a tiny base; the others then read it
        base_dir = prepare_base(cfg, pairs, run.folder)
    model = phi2.load_model(base_dir, dtype=run.hw.dtype, device=run.hw.device)
    tokenizer = phi2.load_tokenizer(base_dir)
    train, val = run.encode(tokenizer, pairs, model.config.block_size)

    # LoRA on the frozen base; only its A and B train
    base_fingerprint = fingerprint(model)
    lora.inject(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.lora_modules)
    model.gradient_checkpointing = use_checkpointing(cfg, model)
    params = lora.trainable_parameters(model)

    def evaluate() -> float:
        """Mean validation loss per answer token."""
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), run.hw.autocast():
            for i in run.shard(range(0, len(val), cfg.batch_size)):
                ids, labels = collate(val[i:i + cfg.batch_size], tokenizer.pad_id)
                loss, n = model.loss(to_device(ids, run.hw.device), labels)
                total, count = total + loss.item(), count + n
        model.train()
        return run.mean(total, count)

    def save(folder):
        lora.save_adapter(model, folder, base_path=base_dir.resolve(), base_fingerprint=base_fingerprint)

    run.begin(model, params, train, val, base_fingerprint, what="stage 1", evaluate=evaluate, save=save)
    model.train()
    with run:
        for micro_batches in run.steps():  # one optimizer step: this process's micro-batches of it
            for idx in micro_batches:
                ids, labels = collate([train[i] for i in idx], tokenizer.pad_id)
                with run.hw.autocast():  # labels stay on the CPU: the loss picks answer rows without a sync
                    loss, _ = run.loss(to_device(ids, run.hw.device), labels)  # model.loss, through DDP
                run.backward(loss)  # as its share of the mean over every answer token of the step
            run.optimizer_step()
    return {"step": run.step, "best_val_loss": run.best_val, "model": model}


def use_checkpointing(cfg: TrainConfig, model) -> bool:
    """--grad-checkpointing as given, else on for a billion parameters or more (Phi-2's 2.7B on a 24 GB GPU)."""
    if cfg.grad_checkpointing is not None:
        return cfg.grad_checkpointing
    return sum(p.numel() for p in model.parameters()) >= 1e9


def prepare_base(cfg: TrainConfig, pairs, folder: Path) -> Path:
    """The base checkpoint folder: --model, or for "tiny" a random-init model and a tokenizer trained on
    the data, written once to <run-dir>/base."""
    if cfg.model != "tiny":
        base = Path(cfg.model)
        if not (base / "config.json").exists():
            raise runs.TrainingError(f"{base}: no Phi-2 checkpoint here; download it with `huggingface-cli download "
                                     f"microsoft/phi-2 --local-dir {base}`, or use --model tiny to run offline "
                                     "with a random-init tiny model")
        return base
    base = folder / "base"
    if not (base / "config.json").exists():  # written whole into a scratch folder, then renamed: a run
        config = phi2.PRESETS["tiny"]        # killed meanwhile leaves no half base to be taken for one
        texts = [format_prompt(p.prompt) + format_answer(p.improved) for p in pairs]
        scratch = folder / ".base.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        phi2.train_tokenizer(texts, config.vocab_size).save(scratch)
        phi2.save_hf_checkpoint(phi2.build_model(config, seed=cfg.seed), scratch)
        shutil.rmtree(base, ignore_errors=True)  # a folder without config.json: an older half-written one
        scratch.rename(base)
    return base


if __name__ == "__main__":
    cli.run("train_sft.py", main, parse_args)
