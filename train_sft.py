"""Stage 1: LoRA-fine-tune Phi-2 on (prompt, improved prompt) pairs: `python train_sft.py --rank 32`.

The text is `System: Fix the following prompt. Prompt: {prompt}. Answer: {improved}` and the loss is on the
answer and its EOS. LoRA (rank 32 on q/k/v/dense/fc1/fc2) is the only thing trained: AdamW, warm-up then
cosine, clipping, autocast in the precision the hardware does well, and gradient checkpointing for models of a
billion parameters or more. --out is the adapter (peft's format) with the best validation loss, by default
<run-dir>/best; the run folder also holds last/, train_config.json, metrics.jsonl, curves.svg and
state.safetensors, from which `--run-dir DIR --resume` continues exactly. `--model tiny` trains a random-init
tiny model offline, whose base and tokenizer are written to <run-dir>/base.
"""

import support.threads  # noqa: F401  (first: OpenMP reads its settings when torch loads)

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import lora
import phi2
from phi2.weights import fingerprint
from prompts import DEFAULT_DATA, collate, format_answer, format_prompt, read_pairs
from support import cli, ddp, training
from support.hardware import to_device
from support.prompter import base_config


@dataclass
class TrainConfig(training.RunConfig):
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
        self.report_to = tuple(self.report_to)
        self.out = self.out or str(Path(self.run_dir) / "best")


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    p = cli.parser(__doc__)
    p.add_argument("--model", default=d.model,
                   help="Phi-2 checkpoint folder, or 'tiny' for an offline random-init model")
    p.add_argument("--data", default=d.data, help=".jsonl, .json or .csv file of prompt pairs")
    p.add_argument("--run-dir", default=d.run_dir, help="the run's folder: state, log, curves, last adapter")
    p.add_argument("--out", help="the best adapter's folder (default: <run-dir>/best)")
    p.add_argument("--rank", type=cli.positive_int, default=d.rank, help="LoRA rank r")
    p.add_argument("--alpha", type=cli.positive_float, help="LoRA alpha (default: twice the rank)")
    p.add_argument("--dropout", type=cli.fraction, default=d.dropout, help="dropout on the LoRA path")
    p.add_argument("--lora-modules", nargs="+", default=list(d.lora_modules), help="the Linear layers to adapt")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on for models of 1B parameters or more)")
    training.add_run_args(p, d)
    return training.parse_config(p, argv, TrainConfig)


def main(cfg: TrainConfig) -> dict:
    training.check_output_kind(cfg.out, folder=True, flag="--out")
    config = phi2.PRESETS["tiny"] if cfg.model == "tiny" else base_config(cfg.model)
    run = training.Run.open(cfg, cfg.out, config, script="train_sft.py")
    world, hw = run.world, run.hw
    pairs = read_pairs(cfg.data, cfg.prompt_field, cfg.improved_field)
    with world.main_first():  # under torchrun, rank 0 writes a tiny base; the others then read it
        base_dir = prepare_base(cfg, pairs, run.folder)
    model = phi2.load_model(base_dir, dtype=hw.dtype, device=hw.device)
    tokenizer = phi2.load_tokenizer(base_dir)
    train, val = run.encode(tokenizer, pairs, model.config.block_size)

    # LoRA on the frozen base: only its A and B train
    base_fingerprint = fingerprint(model)
    lora.inject(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.lora_modules)
    model.gradient_checkpointing = use_checkpointing(cfg, model)
    params = lora.trainable_parameters(model)
    inputs = {"data": training.file_fingerprint(cfg.data)}
    run.check_inputs(inputs)

    def evaluate() -> float:
        """Mean validation loss per answer token, over every process's share of the validation batches."""
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), hw.autocast():
            for i in range(world.rank * cfg.batch_size, len(val), world.size * cfg.batch_size):
                ids, labels = collate(val[i:i + cfg.batch_size], tokenizer.pad_id)
                loss, n = model.loss(to_device(ids, hw.device), labels)
                total, count = total + loss.item(), count + n
        model.train()
        return world.mean(total, count, hw.device)

    def save(folder):
        lora.save_adapter(model, folder, base_path=base_dir.resolve(), base_fingerprint=base_fingerprint)

    # the optimizer over the LoRA tensors, and for fp16 a gradient scaler (bf16 has fp32's range and needs none)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(hw.device.type) if hw.needs_scaler else None
    plan = training.Plan(cfg, train, world.size)
    loss_fn = ddp.wrap(training.LossOf(model), world, hw.device)  # model.loss, through DDP under torchrun
    if world.rank > 0:  # dropout differs between processes; rank 0 keeps the one-process stream
        torch.manual_seed(cfg.seed * 1_000_003 + world.rank)
    step, best = 0, {}
    if cfg.resume:
        step, best = training.load_state(run, plan, params, optimizer, scaler, base_fingerprint)
    run.write_config(inputs)
    run.say(f"stage 1: {len(train)} training / {len(val)} validation examples, "
            f"{sum(p.numel() for p in params.values()):,} LoRA parameters, {plan.total_steps} steps")
    # whether --out holds this run's best weights: a validation beat step 0 (an older state does not say which)
    wrote_out = cfg.resume and best.get("step") != 0 and run.out.exists()

    model.train()
    with training.Log(run, plan, step, best, run.hparams(plan)) as log, training.StopSignals(run) as signals:
        if step == 0 and val:  # the untrained adapter's validation loss: what training has to beat
            log.validation(0, evaluate(), best=True)
        while step < plan.end:
            lr = training.get_lr(step, cfg, plan.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches, scale = plan.share(step, world)  # this process's share of the step
            step_loss = 0.0
            for i, idx in enumerate(micro_batches):
                loss_fn.require_backward_grad_sync = i == len(micro_batches) - 1  # DDP all-reduces in the last only
                ids, labels = collate([train[j] for j in idx], tokenizer.pad_id)
                with hw.autocast():  # labels stay on the CPU: the loss picks answer rows without a sync
                    loss, _ = loss_fn(to_device(ids, hw.device), labels)  # summed over the answer tokens
                loss = loss * scale  # its share of the step's mean over every answer token, every process
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss = step_loss + loss.detach() / world.size
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)  # a tensor: no sync
            if scaler:
                scaler.step(optimizer)  # skipped when fp16 gradients overflowed; the scale then shrinks
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # log, validate and checkpoint on their intervals, and wherever the run stops
            log.add(step, step_loss, grad_norm)
            stop = signals.stop()
            validate = val and (step % cfg.eval_interval == 0 or step == plan.total_steps)  # not at a pause
            checkpoint = step % cfg.save_interval == 0 or step == plan.end or stop
            if validate or checkpoint or step % cfg.log_interval == 0:
                log.check(params, scaler)  # one wait for the device; stops here if training diverged
            if validate:
                val_loss = evaluate()
                improved = val_loss < log.best_val
                if improved:  # --out holds the best weights so far
                    run.on_main(save, run.out)
                    wrote_out = True
                log.validation(step, val_loss, improved)
            log.write()
            if checkpoint:
                training.save_state(run, step, log.best(), params, optimizer, scaler, base_fingerprint)
                run.on_main(save, run.folder / "last")
                log.restart_clock()
            if stop and step < plan.end:  # at the end there is nothing left to resume: the run finishes
                raise training.Interrupted(f"interrupted after step {step}, saved in {run.folder}; continue with "
                                           f"`{run.resume_command()}`")
    if not val or not wrote_out:  # no validation, or it never beat the start: the last weights stand in
        run.on_main(save, run.out)
    run.summary(log, run.folder / "last")
    run.close()
    return {"step": step, "best_val_loss": log.best_val, "model": model}


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
            raise training.TrainingError(f"{base}: no Phi-2 checkpoint here; download it with `huggingface-cli "
                                         f"download microsoft/phi-2 --local-dir {base}`, or use --model tiny to run "
                                         "offline with a random-init tiny model")
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
    cli.run("train_sft.py", main, parse_args, on_interrupt=training.on_interrupt)
