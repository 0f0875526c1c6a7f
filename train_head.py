"""Stage 2: train one target's head adapter:
`python train_head.py --target mistral --data mistral.jsonl --lora runs/sft/best --out mistral.safetensors`.

The base and the stage-1 adapter (merged) are loaded, frozen and kept in eval mode; only the head adapter
trains, with stage 1's template, label masking, autocast, schedule, validation, atomic checkpoints,
resume, log and progress bar. The frozen body's final hidden states never change, so the first epoch
computes them once, for the answer positions only, and later epochs train the head on them alone
(--no-cache recomputes them each time; tests/test_train_head.py shows both give the same head).
The run's state and log live in --run-dir; the best head by validation loss is written to --out.
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
from tqdm import tqdm

import lora
import phi2
from head_adapter import HeadAdapter, HeadError, load_prompter, save_head
from prompts import DataError, collate, read_pairs, write_atomic
from train_sft import (TrainingError, check_resumable, encode_split, load_state, optimizer_step, save_state,
                       step_plan, trim_log)


@dataclass
class HeadConfig:
    target: str = ""  # the target LLM's name, recorded in the head file
    data: str = ""  # pairs whose improved prompt came from the target LLM
    lora: str | None = None  # the stage-1 adapter folder (e.g. runs/sft/best), merged into the base
    model: str | None = None  # the base folder; default: the one the stage-1 adapter was trained on
    prompt_field: str = "prompt"
    target_field: str = "improved"
    out: str | None = None  # the head file; default <target>.safetensors
    run_dir: str | None = None  # state, log, last head; default runs/head-<target>
    head_rank: int | None = None  # None: a full copy of the LM head (the papers'); r: a rank-r update
    epochs: int = 3
    max_steps: int | None = None
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 2
    max_len: int = 512
    grad_clip: float = 1.0
    precision: str = "bf16"
    val_fraction: float = 0.1
    eval_interval: int = 25
    save_interval: int = 25
    seed: int = 1337
    resume: bool = False
    stop_after: int | None = None
    no_cache: bool = False  # recompute the body's hidden states every time (the straightforward path)

    def __post_init__(self):
        self.out = self.out or f"{self.target}.safetensors"
        self.run_dir = self.run_dir or f"runs/head-{self.target}"


def parse_args(argv=None) -> HeadConfig:
    d = HeadConfig()
    p = argparse.ArgumentParser(description="Stage 2: train one target's head adapter")
    p.add_argument("--target", required=True, help="the target LLM's name (mistral, gpt-4o, ...)")
    p.add_argument("--data", required=True, help="pairs improved by the target LLM (.jsonl, .json, .csv)")
    p.add_argument("--lora", help="stage-1 adapter folder, e.g. runs/sft/best")
    p.add_argument("--model", help="base model folder (default: the stage-1 adapter's base)")
    p.add_argument("--prompt-field", default=d.prompt_field)
    p.add_argument("--target-field", default=d.target_field)
    p.add_argument("--out", help="head file (default <target>.safetensors)")
    p.add_argument("--run-dir", help="state and log (default runs/head-<target>)")
    p.add_argument("--head-rank", type=int, help="train a rank-r update of the head instead of a full copy")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=d.precision)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--eval-interval", type=int, default=d.eval_interval)
    p.add_argument("--save-interval", type=int, default=d.save_interval)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=int)
    p.add_argument("--no-cache", action="store_true", help="recompute the frozen body's outputs every step")
    return HeadConfig(**vars(p.parse_args(argv)))


def main(cfg: HeadConfig) -> dict:
    if not cfg.target or not cfg.data:
        raise TrainingError("--target and --data are required")
    run = Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)
    if cfg.resume:
        check_resumable(cfg, run)
    elif (run / "state.safetensors").exists():
        raise TrainingError(f"{run} already holds a run; continue it with --resume or choose another --run-dir")
    run.mkdir(parents=True, exist_ok=True)

    # the frozen prompter and the data
    pairs = read_pairs(cfg.data, cfg.prompt_field, cfg.target_field)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model, tokenizer, base_fingerprint, stage1 = load_prompter(cfg.model, cfg.lora, dtype)
    train, val = encode_split(tokenizer, pairs, cfg)

    # the head adapter: fp32 master weights, AdamW over them only
    head = HeadAdapter(model.lm_head, cfg.head_rank, dtype=torch.float32)
    params = {n: p for n, p in head.named_parameters() if p.requires_grad}
    # fused: one kernel for all tensors; the per-tensor loop costs ~1 s a step on Phi-2's 137M head parameters
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    device = model.lm_head.weight.device.type

    def autocast():  # a fresh context each time: an autocast object must not be entered twice at once
        return torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    # the frozen body's outputs at answer positions, per example: (h (n_i, C), targets (n_i,))
    cache = {"train": {}, "val": {}}

    def features(split_name, examples, idx):
        """Hidden states and targets of the answer positions of examples[idx], concatenated."""
        store = cache[split_name]
        todo = [i for i in idx if i not in store]
        if todo:
            ids, labels = collate([examples[i] for i in todo], tokenizer.pad_id)
            with torch.no_grad(), autocast():
                h = model.hidden_states(ids[:, :-1])  # (B, T-1, C)
            targets = labels[:, 1:]
            keep = targets != -100
            # what the head's first matmul reads: under autocast it casts to bf16, so storing bf16 is exact
            rows = h[keep].to(dtype)
            counts = keep.sum(dim=1).tolist()
            pieces = zip(rows.split(counts), targets[keep].split(counts))
            fresh = dict(zip(todo, pieces))
            if cfg.no_cache:
                return _cat([fresh[i] for i in idx])
            store.update(fresh)
        return _cat([store[i] for i in idx])

    def evaluate() -> float:
        total, count = 0.0, 0
        with torch.no_grad(), autocast():
            for i in range(0, len(val), cfg.batch_size):
                h, t = features("val", val, list(range(i, min(i + cfg.batch_size, len(val)))))
                total, count = total + head.loss(h, t).item(), count + len(t)
        return total / max(count, 1)

    lengths = [len(e.input_ids) for e in train]
    steps_per_epoch = math.ceil(math.ceil(len(train) / cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    step, best_val = 0, float("inf")
    if cfg.resume:
        step, best_val = load_state(run / "state.safetensors", params, optimizer)
        trim_log(run / "metrics.jsonl", step)
    else:
        write_atomic(run / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        (run / "metrics.jsonl").write_text("")
    n_params = sum(p.numel() for p in params.values())
    print(f"target {cfg.target}: {len(train)} training / {len(val)} validation examples, {n_params:,} head "
          f"parameters, {total_steps} steps of {cfg.batch_size}x{cfg.grad_accum}", file=sys.stderr)

    def save_as(path):
        save_head(head, path, cfg.target, model, base_fingerprint, stage1)

    log = open(run / "metrics.jsonl", "a")
    if step == 0 and val:
        best_val = evaluate()
        log.write(json.dumps({"step": 0, "val_loss": best_val}) + "\n")
        save_as(cfg.out)  # the identity head is the best so far
    bar = tqdm(total=total_steps, initial=step, unit="step", file=sys.stderr)
    try:
        while step < total_steps:
            epoch, micro_batches, lr = step_plan(step, cfg, lengths, steps_per_epoch, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # one optimizer step over the answer tokens of the micro-batches
            t0 = time.perf_counter()
            batches = [features("train", train, idx) for idx in micro_batches]
            n_targets = sum(len(t) for _, t in batches)
            step_loss = 0.0
            for h, t in batches:
                with autocast():
                    loss = head.loss(h, t) / n_targets
                loss.backward()
                step_loss += loss.item()
            optimizer_step(params, optimizer, step_loss, cfg, step, run)
            optimizer.zero_grad(set_to_none=True)
            step += 1

            record = {"step": step, "epoch": epoch, "loss": step_loss, "lr": lr, "seconds": time.perf_counter() - t0,
                      "targets": n_targets}
            if val and (step % cfg.eval_interval == 0 or step == total_steps):
                record["val_loss"] = evaluate()
                if record["val_loss"] < best_val:
                    best_val = record["val_loss"]
                    save_as(cfg.out)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.1e}")
            bar.update()
            if step % cfg.save_interval == 0 or step == total_steps or step == cfg.stop_after:
                save_state(run / "state.safetensors", params, optimizer, step, best_val, base_fingerprint)
                save_as(run / "last.safetensors")
            if step == cfg.stop_after:
                break
    except KeyboardInterrupt:
        save_state(run / "state.safetensors", params, optimizer, step, best_val, base_fingerprint)
        raise TrainingError(f"interrupted after step {step}, saved in {run}; continue with --resume") from None
    finally:
        bar.close()
        log.close()
    if not val:
        save_as(cfg.out)
    return {"step": step, "best_val_loss": best_val, "head": head, "model": model}


def _cat(pieces):
    return torch.cat([h for h, _ in pieces]), torch.cat([t for _, t in pieces])


if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainingError, DataError, HeadError, lora.AdapterError, phi2.ConfigError, phi2.CheckpointError) as e:
        sys.exit(f"train_head.py: error: {e}")
