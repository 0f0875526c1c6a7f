"""Stage 1: LoRA-fine-tune Phi-2 on (prompt, improved prompt) pairs: `python train_sft.py --rank 32`.

The text is `System: Fix the following prompt. Prompt: {bad}. Answer: {good}` and the loss is on the answer
and its EOS. LoRA (rank 32 on q/k/v/dense/fc1/fc2) is the only thing trained: AdamW, warm-up then cosine,
gradient clipping, bf16 autocast, optional gradient checkpointing. The run folder (--out) holds the adapter
in peft's format (best/ by validation loss, last/), train_config.json, metrics.jsonl, and state.safetensors,
from which --resume continues exactly (model, optimizer, schedule, data order, RNG). `--model tiny` trains a
random-init tiny model offline, whose base and tokenizer are written to <out>/base.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import lora
import phi2
from phi2.weights import atomic_path, fingerprint
from prompts import (DEFAULT_DATA, IGNORE_INDEX, DataError, batch_order, collate, encode_pairs, format_answer,
                     format_prompt, read_pairs, split, write_atomic)


@dataclass
class TrainConfig:
    model: str = "checkpoints/phi-2"  # a Phi-2 checkpoint folder, or "tiny" (random init, offline)
    data: str = str(DEFAULT_DATA)
    prompt_field: str = "prompt"
    target_field: str = "improved"
    out: str = "runs/sft"
    rank: int = 32
    alpha: float | None = None  # None: twice the rank
    dropout: float = 0.05
    targets: tuple[str, ...] = lora.DEFAULT_TARGETS
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 4
    max_len: int = 512
    grad_clip: float = 1.0
    precision: str = "bf16"  # "bf16": bf16 base weights and autocast; "fp32": everything in fp32
    grad_checkpointing: bool = False
    val_fraction: float = 0.1
    eval_interval: int = 50
    save_interval: int = 50
    seed: int = 1337
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this step; --resume continues

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        self.targets = tuple(self.targets)


# Settings that may change between a run and its resumption; any other change is refused.
RESUMABLE_CHANGES = {"epochs", "max_steps", "eval_interval", "save_interval", "resume", "stop_after"}


class TrainingError(RuntimeError):
    """A run that cannot start or go on; printed as one line."""


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].split(":")[0])
    p.add_argument("--model", default=d.model, help="Phi-2 folder, or 'tiny' for an offline random-init model")
    p.add_argument("--data", default=d.data, help=".jsonl, .json or .csv with prompt pairs")
    p.add_argument("--prompt-field", default=d.prompt_field)
    p.add_argument("--target-field", default=d.target_field)
    p.add_argument("--out", default=d.out, help="run folder")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: twice the rank)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the LoRA path")
    p.add_argument("--targets", nargs="+", default=list(d.targets), help="module names to adapt")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--max-len", type=int, default=d.max_len, help="longer examples are dropped")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=d.precision)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--eval-interval", type=int, default=d.eval_interval)
    p.add_argument("--save-interval", type=int, default=d.save_interval)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--stop-after", type=int, help="stop after this step; continue later with --resume")
    return TrainConfig(**vars(p.parse_args(argv)))


def get_lr(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def encode_split(tokenizer, pairs, cfg) -> tuple[list, list]:
    """The seeded train/validation split, tokenized; says how many examples --max-len dropped, and stops
    if none is left to train on."""
    train_pairs, val_pairs = split(pairs, cfg.val_fraction, cfg.seed)
    train, dropped = encode_pairs(tokenizer, train_pairs, cfg.max_len)
    val, dropped_val = encode_pairs(tokenizer, val_pairs, cfg.max_len)
    if dropped + dropped_val:
        print(f"dropped {dropped + dropped_val} of {len(pairs)} examples longer than --max-len {cfg.max_len}",
              file=sys.stderr)
    if not train:
        raise DataError(f"{cfg.data}: no training example fits in --max-len {cfg.max_len}")
    return train, val


def step_plan(step: int, cfg, lengths: list[int], steps_per_epoch: int, total_steps: int):
    """(epoch, micro-batches as lists of example indices, learning rate) of optimizer step `step`: a function
    of the step alone, which is what lets --resume see the batches an uninterrupted run would."""
    epoch, k = divmod(step, steps_per_epoch)
    order = batch_order(lengths, cfg.batch_size, cfg.seed, epoch)
    return epoch, order[k * cfg.grad_accum:(k + 1) * cfg.grad_accum], get_lr(step, cfg, total_steps)


def main(cfg: TrainConfig) -> dict:
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    if cfg.resume:
        check_resumable(cfg, out)
    elif (out / "state.safetensors").exists():
        raise TrainingError(f"{out} already holds a run; continue it with --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    # data
    pairs = read_pairs(cfg.data, cfg.prompt_field, cfg.target_field)
    base_dir = prepare_base(cfg, pairs, out)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model = phi2.load_model(base_dir, dtype=dtype)
    tokenizer = phi2.load_tokenizer(base_dir)
    train, val = encode_split(tokenizer, pairs, cfg)

    # model: LoRA on the frozen base, AdamW over the LoRA parameters only
    base_fingerprint = fingerprint(model)
    lora.inject(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.targets)
    model.gradient_checkpointing = cfg.grad_checkpointing
    params = lora.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    device = model.lm_head.weight.device.type

    def autocast():  # a fresh context each time: an autocast object must not be entered twice at once
        return torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    lengths = [len(e.input_ids) for e in train]
    steps_per_epoch = math.ceil(math.ceil(len(train) / cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    step, best_val = 0, float("inf")
    if cfg.resume:
        step, best_val = load_state(out / "state.safetensors", params, optimizer)
        trim_log(out / "metrics.jsonl", step)
    else:
        write_atomic(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        (out / "metrics.jsonl").write_text("")
    print(f"{len(train)} training / {len(val)} validation examples, {sum(p.numel() for p in params.values()):,} "
          f"LoRA parameters, {total_steps} steps of {cfg.batch_size}x{cfg.grad_accum}", file=sys.stderr)

    def evaluate() -> float:
        """Mean validation loss per answer token."""
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), autocast():
            for i in range(0, len(val), cfg.batch_size):
                ids, labels = collate(val[i:i + cfg.batch_size], tokenizer.pad_id)
                loss, n = model.loss(ids, labels)
                total, count = total + loss.item(), count + n
        model.train()
        return total / max(count, 1)

    def save(step):
        save_state(out / "state.safetensors", params, optimizer, step, best_val, base_fingerprint)
        lora.save_adapter(model, out / "last", base_path=base_dir.resolve(), base_fingerprint=base_fingerprint)

    log = open(out / "metrics.jsonl", "a")
    if step == 0 and val:
        best_val = evaluate()
        log.write(json.dumps({"step": 0, "val_loss": best_val}) + "\n")
    model.train()
    bar = tqdm(total=total_steps, initial=step, unit="step", file=sys.stderr)
    try:
        while step < total_steps:
            epoch, micro_batches, lr = step_plan(step, cfg, lengths, steps_per_epoch, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # one optimizer step: the loss is the mean over every answer token of the micro-batches
            t0 = time.perf_counter()
            batches = [collate([train[i] for i in idx], tokenizer.pad_id) for idx in micro_batches]
            n_targets = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in batches)
            step_loss = 0.0
            for ids, labels in batches:
                with autocast():
                    loss, _ = model.loss(ids, labels)
                    loss = loss / n_targets
                loss.backward()
                step_loss += loss.item()
            optimizer_step(params, optimizer, step_loss, cfg, step, out)
            optimizer.zero_grad(set_to_none=True)
            step += 1

            tokens = sum(lengths[i] for idx in micro_batches for i in idx)
            seconds = time.perf_counter() - t0
            record = {"step": step, "epoch": epoch, "loss": step_loss, "lr": lr, "seconds": seconds,
                      "tokens_per_s": tokens / seconds}
            if val and (step % cfg.eval_interval == 0 or step == total_steps):
                record["val_loss"] = evaluate()
                if record["val_loss"] < best_val:
                    best_val = record["val_loss"]
                    lora.save_adapter(model, out / "best", base_path=base_dir.resolve(),
                                      base_fingerprint=base_fingerprint)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update()
            if step % cfg.save_interval == 0 or step == total_steps or step == cfg.stop_after:
                save(step)
            if step == cfg.stop_after:
                break
    except KeyboardInterrupt:
        save(step)
        raise TrainingError(f"interrupted after step {step}, saved in {out}; continue with --resume") from None
    finally:
        bar.close()
        log.close()
    if not (out / "best").exists():  # no validation set: the last adapter is the best we know
        lora.save_adapter(model, out / "best", base_path=base_dir.resolve(), base_fingerprint=base_fingerprint)
    return {"step": step, "best_val_loss": best_val, "model": model}


def optimizer_step(params: dict, optimizer, step_loss: float, cfg, step: int, out: Path):
    """Clip the gradients and step, unless the loss, the gradients or the updated weights are not finite:
    then stop with TrainingError, saving nothing, so the last checkpoint on disk stays the last good one."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip))
    diverged = not (math.isfinite(step_loss) and math.isfinite(grad_norm))
    if not diverged:
        optimizer.step()
        # a NaN or an inf makes its tensor's sum non-finite (finite weights overflow it only past ~1e30 each);
        # isfinite() would allocate boolean copies of every parameter: 2 s a step on a full 131M-number head
        diverged = not bool(torch.stack([p.detach().sum() for p in params.values()]).isfinite().all())
    if diverged:
        hint = "a lower --lr" + (" or --precision fp32" if cfg.precision == "bf16" else "")
        raise TrainingError(f"training diverged at step {step + 1} (loss {step_loss:.4g}, gradient norm "
                            f"{grad_norm:.4g}); stopped, and the last good checkpoint is kept in {out}; try {hint}")


def prepare_base(cfg: TrainConfig, pairs, out: Path) -> Path:
    """The base checkpoint folder: --model, or for "tiny" a random-init model and a tokenizer trained on
    the data, written once to <out>/base."""
    if cfg.model != "tiny":
        folder = Path(cfg.model)
        if not (folder / "config.json").exists():
            raise TrainingError(f"{folder}: no Phi-2 checkpoint here; download it with `huggingface-cli download "
                                f"microsoft/phi-2 --local-dir {folder}`, or use --model tiny to run offline "
                                "with a random-init tiny model")
        return folder
    folder = out / "base"
    if not (folder / "config.json").exists():
        config = phi2.PRESETS["tiny"]
        texts = [format_prompt(p.prompt) + format_answer(p.target) for p in pairs]
        folder.mkdir(parents=True, exist_ok=True)
        phi2.train_tokenizer(texts, config.vocab_size).save(folder)
        phi2.save_hf_checkpoint(phi2.build_model(config, seed=cfg.seed), folder)
    return folder


# ------------------------------------------------------------------------ checkpoints (safetensors only)


def save_state(path: Path, params: dict, optimizer, step: int, best_val: float, base_fingerprint: str):
    """LoRA weights, AdamW moments and RNG state in one safetensors file, written atomically."""
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    for n, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{key}.{n}"] = value.detach().reshape(-1).contiguous() if key == "step" else value
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {"step": str(step), "best_val": repr(best_val), "base_fingerprint": base_fingerprint}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_state(path: Path, params: dict, optimizer) -> tuple[int, float]:
    """Restore what save_state wrote; returns (step, best validation loss)."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():
        for n, p in params.items():
            if f"param.{n}" not in tensors:
                raise TrainingError(f"{path}: has no tensor for {n}; it belongs to a different model or --targets")
            p.copy_(tensors[f"param.{n}"])
            state = {key: tensors[f"adam.{key}.{n}"] for key in ("step", "exp_avg", "exp_avg_sq")
                     if f"adam.{key}.{n}" in tensors}
            if state:
                state["step"] = state["step"].reshape(())
                optimizer.state[p] = state
    torch.set_rng_state(tensors["rng.torch"])
    return int(metadata["step"]), float(metadata["best_val"])


def check_resumable(cfg: TrainConfig, out: Path):
    """A run may only be resumed with the settings it was started with (bar RESUMABLE_CHANGES)."""
    if not (out / "state.safetensors").exists():
        raise TrainingError(f"{out}: nothing to resume (no state.safetensors); start without --resume")
    saved = json.loads((out / "train_config.json").read_text())
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as saved: tuples become lists
    for key, value in now.items():
        if key not in RESUMABLE_CHANGES and saved.get(key) != value:
            raise TrainingError(f"{out} was started with --{key.replace('_', '-')} {saved.get(key)}, not {value}; "
                                "resume with the same settings or choose another --out")


def trim_log(path: Path, step: int):
    """Drop log records past the resumed step (written after the last checkpoint)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_atomic(path, "".join(line + "\n" for line in keep))


if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainingError, DataError, lora.AdapterError, phi2.ConfigError, phi2.CheckpointError) as e:
        sys.exit(f"train_sft.py: error: {e}")
