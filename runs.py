"""What both training stages share, so that each trainer is its own set-up and its own step.

A run lives in a folder (--run-dir): train_config.json (the settings, and the device and precision they
resolved to), metrics.jsonl (one record per optimizer step) and state.safetensors (trainable weights, AdamW
moments, gradient scaler and RNG: all that --resume needs to go on exactly as if never stopped). `Run` owns
the folder and everything around a step: the learning-rate schedule, which examples make up each step (a
pure function of the step, so a resumed run sees what an uninterrupted one would), gradient scaling,
clipping, the optimizer step, the divergence check, validation, checkpoints, the log and the progress bar.
A trainer keeps what is its own: the model, the data, and the forward and backward pass of a step:

    with run:
        for micro_batches in run.steps():
            for idx in micro_batches:  # this process's share of the step
                run.backward(run.loss(...))  # through DDP when under torchrun
            run.optimizer_step()

Under torchrun (ddp.py) each process takes every W-th micro-batch of a step, the gradients are summed
across processes in the last micro-batch's backward, and only rank 0 writes; a step means the same
examples and the same update whatever the number of processes, for the same global batch.

Nothing here waits for the device except every --log-interval steps, and at validation and checkpoints:
the losses and gradient norms of the steps between stay on the device until then.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import cli
import ddp
import hardware
from phi2.errors import UsageError
from phi2.files import atomic_path, write_atomic
from phi2.weights import open_checked
from prompts import IGNORE_INDEX, DataError, batch_order, encode_pairs, split_pairs


@dataclass
class RunConfig:
    """The settings every training run has; TrainConfig and HeadConfig add their own and their defaults."""
    data: str = ""
    prompt_field: str = "prompt"
    improved_field: str = "improved"
    run_dir: str = ""
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
    device: str = "auto"
    precision: str = "auto"
    val_fraction: float = 0.1
    eval_interval: int = 50
    save_interval: int = 50
    log_interval: int = 10
    seed: int = 1337
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this step; --resume continues
    overwrite: bool = False  # a fresh run may replace an existing --out


# Tests set this to make the last process SIGKILL itself right after that step, between checkpoints.
KILL_AT_STEP = int(os.environ.get("PHI2_PROMPTER_KILL_AT_STEP", "0"))

# Settings that may change between a run and its resumption; any other change is refused.
RESUMABLE_CHANGES = {"epochs", "max_steps", "eval_interval", "save_interval", "log_interval", "resume", "stop_after",
                     "device", "overwrite"}


class TrainingError(UsageError):
    """A run that cannot start or go on."""


class RunInterrupted(TrainingError):
    """Ctrl-C, after the run was saved: exit status 130, as for any interrupted command."""
    exit_code = 130


def add_run_args(p: argparse.ArgumentParser, d: RunConfig):
    """The flags of RunConfig's fields, with d's defaults (--data, --run-dir and the model flags are the trainer's)."""
    p.add_argument("--prompt-field", default=d.prompt_field, help="the field holding the original prompt")
    p.add_argument("--improved-field", default=d.improved_field, help="the field holding the improved prompt")
    p.add_argument("--epochs", type=cli.positive_int, default=d.epochs, help="passes over the training split")
    p.add_argument("--max-steps", type=cli.positive_int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=cli.positive_float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=cli.nonnegative_float, default=d.min_lr,
                   help="learning rate at the end of the cosine")
    p.add_argument("--warmup-steps", type=cli.count, default=d.warmup_steps, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=cli.nonnegative_float, default=d.weight_decay, help="AdamW's decoupled decay")
    p.add_argument("--batch-size", type=cli.positive_int, default=d.batch_size, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=cli.positive_int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--max-len", type=cli.positive_int, default=d.max_len,
                   help="examples longer than this many tokens are left out (and counted)")
    p.add_argument("--grad-clip", type=cli.positive_float, default=d.grad_clip, help="largest gradient norm")
    cli.add_hardware_args(p)
    p.add_argument("--val-fraction", type=cli.fraction, default=d.val_fraction, help="share of pairs held out")
    p.add_argument("--eval-interval", type=cli.positive_int, default=d.eval_interval, help="steps between validations")
    p.add_argument("--save-interval", type=cli.positive_int, default=d.save_interval, help="steps between checkpoints")
    p.add_argument("--log-interval", type=cli.positive_int, default=d.log_interval,
                   help="steps between writes of the metrics log (each waits for the device)")
    p.add_argument("--seed", type=int, default=d.seed, help="data split, batch order, initialisation, dropout")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir where it stopped")
    p.add_argument("--stop-after", type=cli.positive_int, help="stop after this step; continue later with --resume")
    p.add_argument("--overwrite", action="store_true", help="let a new run replace an existing --out")


def get_lr(step: int, cfg: RunConfig, total_steps: int) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def global_batches(lengths: list[int], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of each optimizer step of one epoch, each list sorted by length (so that its
    micro-batches pad little). A pure function of the global batch: how it is split into micro-batches
    and processes changes which examples share a forward pass, never which make up a step."""
    return [sorted(b, key=lambda i: lengths[i]) for b in batch_order(lengths, global_batch, seed, epoch)]


def step_plan(step: int, cfg: RunConfig, lengths: list[int], steps_per_epoch: int, total_steps: int,
              world_size: int = 1):
    """(epoch, the step's micro-batches as lists of example indices, learning rate) of optimizer step `step`."""
    epoch, k = divmod(step, steps_per_epoch)
    batch = global_batches(lengths, cfg.batch_size * cfg.grad_accum * world_size, cfg.seed, epoch)[k]
    micro_batches = [batch[i:i + cfg.batch_size] for i in range(0, len(batch), cfg.batch_size)]
    return epoch, micro_batches, get_lr(step, cfg, total_steps)


class LossOf(torch.nn.Module):
    """module.loss(...) as a forward pass: DistributedDataParallel syncs the gradients of what its forward
    computed, so a trainer calls the loss through it (run.loss)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module.loss(*args)


class Run:
    """A training run in its folder: started fresh, or resumed with the settings it began with."""

    def __init__(self, cfg: RunConfig, out: Path):
        """Check the folder, resolve the hardware, join the other processes under torchrun, and print the
        run's first line. out: the artefact the run makes (the best adapter or head), saved whenever
        validation improves."""
        self.cfg, self.folder, self.out = cfg, Path(cfg.run_dir), Path(out)
        self.world = world = ddp.from_env()
        if self.folder.exists() and not self.folder.is_dir():
            raise TrainingError(f"--run-dir {self.folder} is a file; a run's folder goes there: choose another --run-dir")
        self.saved = {}
        if cfg.resume:
            self.saved = saved = check_resumable(cfg, self.folder, world.size)
        elif (self.folder / "state.safetensors").exists():
            raise TrainingError(f"{self.folder} already holds a run; continue it with --resume or choose another "
                                "--run-dir")
        elif self.out.exists() and not cfg.overwrite:
            raise TrainingError(f"{self.out} already exists (a trained adapter or head?); a new run would replace it: "
                                "choose another --out, or pass --overwrite")
        self.hw = hardware.resolve(ddp.device_name(cfg.device, world), cfg.precision)
        if cfg.resume:
            was = saved.get("hardware", {})
            if was.get("precision", self.hw.precision) != self.hw.precision:
                raise TrainingError(f"{self.folder} was trained in {was['precision']} on {was.get('device')}, "
                                    f"but here --precision {cfg.precision} means {self.hw.precision}; resume with "
                                    f"--precision {was['precision']}")
        ddp.start(world, self.hw.device)
        world.barrier()  # every process has checked the folder before rank 0 writes to it
        processes = f" x {world.size} processes" if world.size > 1 else ""
        self.say(f"{self.hw.describe()}; batch {cfg.batch_size} x grad-accum {cfg.grad_accum}{processes} = global "
                 f"batch {self.global_batch}")
        torch.manual_seed(cfg.seed)  # the same initialisation in every process
        if world.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.wrote_out = cfg.resume and self.out.exists()  # whether out holds this run's weights

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world.size

    def say(self, message: str):
        """One line on stderr, from rank 0 only."""
        if self.world.is_main:
            print(message, file=sys.stderr)

    def encode(self, tokenizer, pairs, context: int) -> tuple[list, list]:
        """The seeded train/validation split, tokenized; says how many examples --max-len dropped, and stops
        if none is left to train on. context: the model's, which --max-len may not pass."""
        cfg = self.cfg
        if cfg.max_len > context:
            raise TrainingError(f"--max-len {cfg.max_len} is longer than the model's context of {context} tokens; "
                                f"use --max-len {context} or less")
        train_pairs, val_pairs, duplicates = split_pairs(pairs, cfg.val_fraction, cfg.seed)
        if duplicates:
            self.say(f"dropped {duplicates} of {len(pairs)} pairs: exact duplicates of others")
        train, dropped = encode_pairs(tokenizer, train_pairs, cfg.max_len)
        val, dropped_val = encode_pairs(tokenizer, val_pairs, cfg.max_len)
        if dropped + dropped_val:
            self.say(f"dropped {dropped + dropped_val} of {len(pairs)} examples longer than --max-len {cfg.max_len}")
        if not train:
            raise DataError(f"{cfg.data}: no training example fits in --max-len {cfg.max_len}")
        return train, val

    def begin(self, module, params: dict, train: list, val: list, base_fingerprint: str, *, what: str, evaluate,
              save, initial_is_best=False, inputs: dict | None = None):
        """AdamW over params (module's trainable parameters), the schedule over train, and on --resume the
        saved state. module.loss(...) becomes run.loss(...), under DDP when there are several processes.

        evaluate() -> mean validation loss per token (over run.shard's batches, then run.mean); save(path)
        writes the trained tensors to path (called on rank 0 only). initial_is_best: save the untrained
        parameters as the best so far (a head's identity start is a valid head; an untrained LoRA is not
        worth a file). inputs: {name: content fingerprint} of what the run reads (data, adapters): a resume
        with any of them changed is refused, naming it.
        """
        cfg, world = self.cfg, self.world
        inputs = {**({"data": file_fingerprint(cfg.data)} if cfg.data else {}), **(inputs or {})}
        for name, value in inputs.items():
            was = self.saved.get("inputs", {}).get(name, value)
            if was != value:
                raise TrainingError(f"{self.folder} was started on another {name} (fingerprint {was}, now {value}): "
                                    f"the {name} changed since; resume with the one it started with, or start a "
                                    "new --run-dir")
        self.params, self.evaluate, self.save, self.has_val = params, evaluate, save, bool(val)
        self.base_fingerprint = base_fingerprint
        self.loss = ddp.wrap(LossOf(module), world, self.hw.device)
        # fused: one kernel for all tensors; the per-tensor loop costs ~1 s a step on Phi-2's 137M head parameters
        self.optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.scaler = torch.amp.GradScaler(self.hw.device.type) if self.hw.needs_scaler else None
        self.lengths = [len(e.input_ids) for e in train]
        self.answer_tokens = [sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in train]
        self.steps_per_epoch = len(batch_order(self.lengths, self.global_batch, cfg.seed, 0))
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.step, self.best_val = 0, float("inf")
        if world.rank > 0:  # dropout differs between processes; rank 0 keeps the one-process stream
            torch.manual_seed(cfg.seed * 1_000_003 + world.rank)
        if cfg.resume:
            self.step, self.best_val = self.load_state()
            if world.is_main:
                trim_log(self.folder / "metrics.jsonl", self.step)
            if self.step >= self.total_steps or self.step == cfg.stop_after:
                raise TrainingError(f"{self.folder} is already at step {self.step}, with nothing left to do up to "
                                    f"{min(self.total_steps, cfg.stop_after or self.total_steps)}; raise --max-steps, "
                                    "--epochs or --stop-after")
        elif world.is_main:
            saved = {**dataclasses.asdict(cfg), "hardware": self.hw.to_dict(), "processes": world.size,
                     "inputs": inputs}
            write_atomic(self.folder / "train_config.json", json.dumps(saved, indent=2) + "\n")
            (self.folder / "metrics.jsonl").write_text("")
        n_params = sum(p.numel() for p in params.values())
        self.say(f"{what}: {len(train)} training / {len(val)} validation examples, {n_params:,} trainable "
                 f"parameters, {self.total_steps} steps")
        self.log = open(self.folder / "metrics.jsonl", "a") if world.is_main else None
        if self.step == 0 and val and not cfg.resume:
            self.best_val = evaluate()
            self.write([{"step": 0, "val_loss": self.best_val}])
            if initial_is_best:
                self.save_out()
        self.bar = tqdm(total=self.total_steps, initial=self.step, unit="step", file=sys.stderr,
                        disable=not world.is_main)
        self.pending = []  # (record, loss, grad_norm) of steps not yet written: tensors still on the device
        self.unwritten = []  # checked records not yet in the log
        self.step_loss, self.updating, self.in_step, self.clock = None, False, False, time.perf_counter()

    def epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        """Every micro-batch of an epoch, over all processes."""
        B = self.cfg.batch_size
        return [batch[i:i + B] for batch in global_batches(self.lengths, self.global_batch, self.cfg.seed, epoch)
                for i in range(0, len(batch), B)]

    def plan_of(self, step: int):
        return step_plan(step, self.cfg, self.lengths, self.steps_per_epoch, self.total_steps, self.world.size)

    def steps(self):
        """For each optimizer step still to run, with its learning rate set: this process's micro-batches."""
        cfg = self.cfg
        while self.step < self.total_steps and self.step != cfg.stop_after:
            epoch, micro_batches, lr = self.plan_of(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            examples = [i for idx in micro_batches for i in idx]
            self.step_targets = sum(self.answer_tokens[i] for i in examples)  # every process knows the whole step
            self.plan = {"epoch": epoch, "lr": lr, "tokens": sum(self.lengths[i] for i in examples),
                         "targets": self.step_targets}
            self.rng_at_step = self.rng_state()  # what a Ctrl-C inside this step saves: it is replayed whole
            self.in_step = True
            yield self.share(micro_batches)

    def share(self, micro_batches):
        """This process's micro-batches of a step (every W-th), each inside DDP's no_sync but the last, whose
        backward all-reduces the step's gradients."""
        mine = micro_batches[self.world.rank::self.world.size]
        self.stand_in = not mine
        if self.stand_in:  # a short last step left this process none: one example, with no weight, keeps it
            mine = [micro_batches[0][:1]]  # in the all-reduce that every process must join
        for i, idx in enumerate(mine):
            last = i == len(mine) - 1
            with contextlib.nullcontext() if last or self.world.size == 1 else self.loss.no_sync():
                yield idx

    def shard(self, items):
        """This process's share of validation batches; run.mean adds the shares up."""
        return items[self.world.rank::self.world.size]

    def mean(self, total: float, count: int) -> float:
        """total / count, each summed over the processes."""
        sums = self.world.sum_(torch.tensor([total, count], dtype=torch.float64, device=self.hw.device))
        total, count = sums.tolist()
        return total / max(count, 1)

    def __enter__(self):
        # SIGTERM (torchrun stopping the others when one process fails, a cluster's scheduler) as Ctrl-C
        main_thread = threading.current_thread() is threading.main_thread()  # the only one that may set it
        self.sigterm = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
        return self

    def __exit__(self, kind, error, traceback):
        """Close the log and the bar; on Ctrl-C, save the run if it stopped between steps and say how to go on."""
        if self.sigterm is not None:
            signal.signal(signal.SIGTERM, self.sigterm)
        several = self.world.size > 1  # processes interrupted at different points cannot meet to save
        try:
            if kind is KeyboardInterrupt and not self.updating and not several:
                self.write(self.unwritten + self.check())
                self.save_state(rng=self.rng_at_step if self.in_step else None)
        finally:
            self.bar.close()
            if self.log:
                self.log.close()
        if kind is KeyboardInterrupt:
            if self.updating or several:
                kept = (f"the last checkpoint in {self.folder} is kept" if (self.folder / "state.safetensors").exists()
                        else "no checkpoint was written yet")
                raise RunInterrupted(f"interrupted during step {self.step + 1}; {kept}; continue with --resume") \
                    from None
            raise RunInterrupted(f"interrupted after step {self.step}, saved in {self.folder}; continue with "
                                 "--resume") from None
        if kind is not None and issubclass(kind, torch.distributed.DistError):
            raise TrainingError(f"lost contact with another process during step {self.step + 1} ({error}); the last "
                                f"checkpoint in {self.folder} is kept; continue with --resume") from None

    def backward(self, loss):
        """Backward of a micro-batch's summed loss as its share of the step's mean over every answer token of
        every process (through the gradient scaler in fp16); the share stays on the device for the log."""
        loss = loss * 0.0 if self.stand_in else loss / self.step_targets
        self.step_loss = loss.detach() if self.step_loss is None else self.step_loss + loss.detach()
        if self.world.size > 1:
            loss = loss * self.world.size  # DDP averages the processes' gradients; the step's is their sum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def optimizer_step(self):
        """Clip, step and zero the gradients; then, on their intervals, check for divergence and write the log,
        validate (saving the best), and checkpoint."""
        cfg, optimizer = self.cfg, self.optimizer
        self.updating = True  # an interrupt from here to the end of the update leaves no consistent state
        if self.scaler:
            self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params.values(), cfg.grad_clip)  # a tensor: no sync
        if self.scaler:
            self.scaler.step(optimizer)  # skipped when fp16 gradients overflowed; the scale then shrinks
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.updating = self.in_step = False
        if self.step == KILL_AT_STEP and self.world.rank == self.world.size - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the tests: the last process dies here
        self.pending.append(({"step": self.step, **self.plan}, self.step_loss, grad_norm))
        self.step_loss = None
        self.bar.update()

        last = self.step == self.total_steps or self.step == cfg.stop_after
        evaluate = self.has_val and (self.step % cfg.eval_interval == 0 or last)
        save = self.step % cfg.save_interval == 0 or last
        if evaluate or save or self.step % cfg.log_interval == 0:
            self.unwritten = self.check()  # written by __exit__ if Ctrl-C comes during validation or saving
            if evaluate:
                val_loss = self.evaluate()
                if val_loss < self.best_val:
                    self.save_out()
                    self.best_val = val_loss  # only once out holds those weights
                self.unwritten[-1]["val_loss"] = val_loss
            self.write(self.unwritten)
            self.unwritten = []
        if save:
            self.save_state()
            self.on_main(self.save, self.folder / f"last{self.out.suffix}")  # last/ beside best/, or last.safetensors
            if not self.has_val:  # no validation set: the latest weights are the best we know
                self.save_out()
        if last and not self.wrote_out:  # validation never beat the start: the last weights stand in
            self.save_out()
        if evaluate or save:
            self.clock = time.perf_counter()  # the next steps' time starts now, not before validation or saving

    def check(self) -> list[dict]:
        """The log records of the pending steps, after one wait for the device (and one all-reduce of the
        losses); stops with TrainingError if a loss, a gradient norm (without a scaler, whose skipped steps
        are normal) or a weight is not finite, in every process at the same step. Nothing is saved then:
        the last checkpoint on disk stays the last good one."""
        if not self.pending:
            return []
        values = torch.stack([torch.stack([loss.float(), norm.float()]) for _, loss, norm in self.pending])
        if self.world.size > 1:  # each process holds its share of a step's loss; the norms are the same
            values[:, 0] = self.world.sum_(values[:, 0].contiguous())
        values = values.tolist()
        # a NaN or an inf makes its tensor's sum non-finite (finite weights overflow it only past ~1e30 each);
        # isfinite() would allocate boolean copies of every parameter: 2 s a step on a full 131M-number head
        weights_ok = bool(torch.stack([p.detach().sum() for p in self.params.values()]).isfinite().all())
        seconds = (time.perf_counter() - self.clock) / len(self.pending)  # the device's time, after the wait
        records = []
        for i, ((record, _, _), (loss, norm)) in enumerate(zip(self.pending, values)):
            bad_step = not math.isfinite(loss) or not (self.scaler or math.isfinite(norm))
            if bad_step or (not weights_ok and i == len(self.pending) - 1):
                self.write(records)  # the good steps before it
                what = f"loss {loss:.4g}, gradient norm {norm:.4g}" if bad_step else "a weight is not finite"
                hint = "a lower --lr" + (" or --precision fp32" if self.hw.precision != "fp32" else "")
                raise TrainingError(f"training diverged at step {record['step']} ({what}); stopped, and the last "
                                    f"good checkpoint is kept in {self.folder}; try {hint}")
            record.update(loss=loss, seconds=seconds, tokens_per_s=record["tokens"] / seconds)
            records.append(record)
        self.pending, self.clock = [], time.perf_counter()
        return records

    def on_main(self, write, *args):
        """write(*args) on rank 0, while the other processes wait for it to finish."""
        if self.world.is_main:
            write(*args)
        self.world.barrier()

    def save_out(self):
        self.on_main(self.save, self.out)
        self.wrote_out = True

    def write(self, records: list[dict]):
        if not self.log:
            return
        self.log.writelines(json.dumps(r) + "\n" for r in records)
        self.log.flush()
        if records and "loss" in records[-1]:
            self.bar.set_postfix(loss=f"{records[-1]['loss']:.3f}", lr=f"{records[-1]['lr']:.1e}")

    # ---------------------------------------------------------------------- checkpoints (safetensors only)

    def rng_state(self) -> dict:
        state = {"rng.torch": torch.get_rng_state()}
        if self.hw.device.type == "cuda":
            state["rng.cuda"] = torch.cuda.get_rng_state(self.hw.device)
        return state

    def save_state(self, rng=None):
        """Trainable weights, AdamW moments, gradient scale and RNG (now, or rng as taken earlier; each
        process's) in one safetensors file, written atomically by rank 0."""
        rng = rng or self.rng_state()
        if self.world.size > 1:  # rank r's generators as rng.torch.r (the same on every process otherwise)
            rng = {f"{k}.{r}": t for k, v in rng.items() for r, t in enumerate(self.world.gather(v, self.hw.device))}
        if not self.world.is_main:
            self.world.barrier()  # until rank 0 has written the file
            return
        tensors = {f"param.{n}": p.detach().contiguous() for n, p in self.params.items()}
        for n, p in self.params.items():
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"adam.{key}.{n}"] = value.detach().reshape(-1).contiguous() if key == "step" else value
        tensors.update(rng)
        metadata = {"step": str(self.step), "best_val": repr(self.best_val), "base_fingerprint": self.base_fingerprint}
        if self.scaler:
            metadata["scaler"] = json.dumps(self.scaler.state_dict())
        with atomic_path(self.folder / "state.safetensors") as tmp:
            save_file(tensors, tmp, metadata=metadata)
        self.world.barrier()

    def load_state(self) -> tuple[int, float]:
        """Restore what save_state wrote, each tensor on its parameter's device; returns (step, best val loss)."""
        path = self.folder / "state.safetensors"
        with open_checked(path, TrainingError) as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("base_fingerprint") != self.base_fingerprint:
            raise TrainingError(f"{path}: saved on another base model (fingerprint {metadata.get('base_fingerprint')}, "
                                f"this one is {self.base_fingerprint}); resume on the base it started with")
        with torch.no_grad():
            for n, p in self.params.items():
                if f"param.{n}" not in tensors:
                    raise TrainingError(f"{path}: has no tensor for {n}; it belongs to another model or settings")
                p.copy_(tensors[f"param.{n}"])
                state = {key: tensors[f"adam.{key}.{n}"].to(p.device) for key in ("step", "exp_avg", "exp_avg_sq")
                         if f"adam.{key}.{n}" in tensors}
                if state:
                    state["step"] = state["step"].reshape(())
                    self.optimizer.state[p] = state
        mine = "" if self.world.size == 1 else f".{self.world.rank}"
        torch.set_rng_state(tensors[f"rng.torch{mine}"])
        if f"rng.cuda{mine}" in tensors and self.hw.device.type == "cuda":
            torch.cuda.set_rng_state(tensors[f"rng.cuda{mine}"], self.hw.device)
        if self.scaler and "scaler" in metadata:
            self.scaler.load_state_dict(json.loads(metadata["scaler"]))
        return int(metadata["step"]), float(metadata["best_val"])


def file_fingerprint(path) -> str:
    """A short hash of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_output_kind(path, folder: bool, flag: str):
    """One line if path exists as a file where a folder belongs, or the reverse."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        found, wanted = ("a folder", "a file") if path.is_dir() else ("a file", "a folder")
        raise TrainingError(f"{flag} {path} is {found}, but {wanted} goes there; choose another {flag}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def check_resumable(cfg: RunConfig, folder: Path, processes: int = 1) -> dict:
    """A run may only be resumed with the settings it was started with (bar RESUMABLE_CHANGES) and on as
    many processes (a step's examples depend on the global batch); returns the saved train_config.json."""
    if not (folder / "state.safetensors").exists():
        raise TrainingError(f"{folder}: nothing to resume (no state.safetensors); start without --resume")
    saved = json.loads((folder / "train_config.json").read_text())
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as saved: tuples become lists
    for key, value in now.items():
        if key not in RESUMABLE_CHANGES and saved.get(key) != value:
            raise TrainingError(f"{folder} was started with --{key.replace('_', '-')} {saved.get(key)}, not {value}; "
                                "resume with the same settings or choose another --run-dir")
    if saved.get("processes", 1) != processes:
        raise TrainingError(f"{folder} was started on {saved.get('processes', 1)} processes, this is {processes}; "
                            f"resume with torchrun --nproc_per_node (x --nnodes) giving {saved.get('processes', 1)}")
    return saved


def trim_log(path: Path, step: int):
    """Drop log records past the resumed step (written after the last checkpoint)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_atomic(path, "".join(line + "\n" for line in keep))
