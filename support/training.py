"""The toolbox both trainers call: the run's settings and flags, its folder, the step plan and schedule,
checkpoint state, the metrics log and what users watch, and a clean stop on Ctrl-C.

A run lives in a folder (--run-dir): train_config.json (the settings, the device and precision they resolved
to, the number of processes, fingerprints of the inputs), metrics.jsonl (a record per optimizer step and per
validation), curves.svg (the losses against the step), state.safetensors (trainable weights, AdamW moments,
gradient scaler and RNG: all that --resume needs to go on exactly as if never stopped) and the last adapter
or head. The optimizer step itself is written out in each trainer (train_sft.py, train_head.py); nothing here
calls back into it.

Which examples make up a step is a pure function of the step and the global batch (Plan), so a resumed run,
or one on N processes under torchrun (support/ddp.py), sees what an uninterrupted one-process run would.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
import types
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from phi2.config import read_json
from phi2.errors import UsageError
from phi2.files import atomic_path, write_atomic
from phi2.weights import open_checked
from prompts import IGNORE_INDEX, DataError, batch_order, encode_pairs, split_pairs
from support import cli, ddp, hardware
from support.plots import line_chart


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
    report_to: tuple[str, ...] = ()  # "tensorboard", "wandb"


# Settings that may change between a run and its resumption (how long it runs, how often it logs and saves,
# where it computes, where it reports); any other change would make it another run and is refused.
RESUMABLE_CHANGES = {"epochs", "max_steps", "eval_interval", "save_interval", "log_interval", "resume", "stop_after",
                     "device", "overwrite", "report_to"}
ONE_INVOCATION = {"resume", "stop_after", "overwrite"}  # what a --resume does not take from the run's folder
SAVED_ON_RESUME = {"epochs", "max_steps", "eval_interval", "save_interval", "log_interval", "device"}  # kept after
REPORTERS = ("tensorboard", "wandb")


class TrainingError(UsageError):
    """A run that cannot start or go on."""


class Interrupted(TrainingError):
    """Ctrl-C or SIGTERM, after the run was saved: exit status 130, as for any interrupted command. Every process
    stops so, after the same step: rank 0 alone says it."""
    exit_code = 130
    rank_0_says = True


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
    cli.add_hardware_args(p, d)
    p.add_argument("--val-fraction", type=cli.fraction, default=d.val_fraction, help="share of pairs held out")
    p.add_argument("--eval-interval", type=cli.positive_int, default=d.eval_interval, help="steps between validations")
    p.add_argument("--save-interval", type=cli.positive_int, default=d.save_interval, help="steps between checkpoints")
    p.add_argument("--log-interval", type=cli.positive_int, default=d.log_interval,
                   help="steps between writes of the metrics log (each waits for the device)")
    p.add_argument("--seed", type=int, default=d.seed, help="data split, batch order, initialisation, dropout")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir where it stopped, with the settings it was started with")
    p.add_argument("--stop-after", type=cli.positive_int, help="stop after this step; continue later with --resume")
    p.add_argument("--overwrite", action="store_true", help="let a new run replace an existing --out")
    p.add_argument("--report-to", nargs="+", choices=REPORTERS, default=list(d.report_to),
                   help="also log to TensorBoard (pip install -e '.[tensorboard]') and/or W&B ('.[wandb]'); "
                        "metrics.jsonl and curves.svg are always written")


def parse_config(p: argparse.ArgumentParser, argv, make):
    """make(**flags) from argv; with --resume, every setting not given on the command line comes from the run
    folder's train_config.json, so that `--run-dir X --resume` is the whole command."""
    args = p.parse_args(argv)
    if not args.resume:
        return make(**vars(args))
    unset = object()
    given = {k for k, v in vars(p.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))).items()
             if v is not unset}
    run_dir = args.run_dir or (make(**vars(args)).run_dir if "target" in given else "")
    saved = read_saved_config(Path(run_dir)) if run_dir else {}
    fields = {k: saved[k] for k in vars(args) if k in saved and k not in given and k not in ONE_INVOCATION}
    kinds = typing.get_type_hints(make)
    for key, value in fields.items():
        if key in kinds and not _fits(value, kinds[key]):
            raise TrainingError(f"{Path(run_dir) / 'train_config.json'}: '{key}' is {json.dumps(value)[:40]}, not a "
                                f"value --{key.replace('_', '-')} takes; {DAMAGED}")
    return make(**{**vars(args), **fields, "run_dir": run_dir or args.run_dir, "resume": True})


DAMAGED = "the run folder is damaged: start a new --run-dir"


def read_saved_config(folder: Path) -> dict:
    """A run folder's train_config.json; one line if there is none to resume, or if it is damaged."""
    path = folder / "train_config.json"
    if not (folder / "state.safetensors").exists() or not path.exists():
        raise TrainingError(f"{folder}: nothing to resume (no state.safetensors); start without --resume")
    saved = read_json(path, TrainingError, DAMAGED)
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k, {}), dict) for k in ("hardware", "inputs")):
        raise TrainingError(f"{path}: not the settings of a run (an object, with objects for hardware and inputs); "
                            f"{DAMAGED}")
    if type(saved.get("processes", 1)) is not int:
        raise TrainingError(f"{path}: 'processes' is {saved['processes']!r}, not a number of processes; {DAMAGED}")
    return saved


def _fits(value, kind) -> bool:
    """Whether a value read from JSON is one of a config field's type (int, float, str, bool, None, tuple[str])."""
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        return any(_fits(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if typing.get_origin(kind) in (tuple, list):
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    return isinstance(value, kind)


def get_lr(step: int, cfg: RunConfig, total_steps: int) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class LossOf(torch.nn.Module):
    """module.loss(...) as a forward pass: DistributedDataParallel syncs the gradients of what its forward
    computed, so a trainer calls the loss through it."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module.loss(*args)


# ---------------------------------------------------------------------------------------------- the plan


class Plan:
    """Which examples make up each optimizer step, and how long the run is.

    A step's examples are a pure function of the step and the global batch (batch x grad-accum x processes):
    how they split into micro-batches and processes changes which examples share a forward pass, never which
    make up a step. Each step's list is sorted by length, so that its micro-batches pad little."""

    def __init__(self, cfg: RunConfig, examples, processes: int = 1):
        self.cfg, self.processes = cfg, processes
        self.lengths = [len(e.input_ids) for e in examples]
        self.answer_tokens = [sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples]
        self.global_batch = cfg.batch_size * cfg.grad_accum * processes
        self.steps_per_epoch = len(batch_order(self.lengths, self.global_batch, cfg.seed, 0))
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.end = min(self.total_steps, cfg.stop_after or self.total_steps)  # where this invocation stops

    def micro_batches(self, step: int) -> list[list[int]]:
        """Every micro-batch of optimizer step `step`, over all processes."""
        epoch, k = divmod(step, self.steps_per_epoch)
        batch = self.epoch(epoch)[k]
        return [batch[i:i + self.cfg.batch_size] for i in range(0, len(batch), self.cfg.batch_size)]

    def epoch(self, epoch: int) -> list[list[int]]:
        return [sorted(b, key=lambda i: self.lengths[i])
                for b in batch_order(self.lengths, self.global_batch, self.cfg.seed, epoch)]

    def epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        B = self.cfg.batch_size
        return [batch[i:i + B] for batch in self.epoch(epoch) for i in range(0, len(batch), B)]

    def share(self, step: int, world: ddp.World) -> tuple[list[list[int]], float]:
        """This process's micro-batches of the step (every W-th), and what to multiply each micro-batch's
        summed loss by so that the step's gradient is the mean over every answer token of the step: 1 / its
        answer tokens, times the processes, whose gradients DDP averages. A short last step may leave a
        process none: it then takes one example with a weight of 0, to join the all-reduce every process
        must join."""
        all_micro = self.micro_batches(step)
        total = sum(self.answer_tokens[i] for idx in all_micro for i in idx)
        mine = all_micro[world.rank::world.size]
        if not mine:
            return [all_micro[0][:1]], 0.0
        return mine, world.size / total

    def record(self, step: int) -> dict:
        """What the log says of a step's data: epoch, learning rate, tokens and answer tokens."""
        examples = [i for idx in self.micro_batches(step) for i in idx]
        return {"epoch": step // self.steps_per_epoch, "lr": get_lr(step, self.cfg, self.total_steps),
                "tokens": sum(self.lengths[i] for i in examples),
                "targets": sum(self.answer_tokens[i] for i in examples)}


# ---------------------------------------------------------------------------------------------- the folder


class Run:
    """A training run's folder, hardware and processes: checked and set up by open(), before any loading."""

    def __init__(self, cfg: RunConfig, out: Path, world: ddp.World, hw: hardware.Hardware, saved: dict, script: str):
        self.cfg, self.out, self.world, self.hw, self.saved, self.script = cfg, Path(out), world, hw, saved, script
        self.locked = None  # the run folder whose lock this process holds (see lock)
        self.folder = Path(cfg.run_dir)

    @classmethod
    def open(cls, cfg: RunConfig, out, config, script: str) -> "Run":
        """Check the folder (a fresh run, or one to resume with the settings it began with), resolve the hardware
        (for a model of this config), join the other processes under torchrun, and print the run's first line.
        out: the artefact the run makes (the best adapter or head), which a fresh run may only replace with
        --overwrite; script: the trainer's file, for the command that resumes the run."""
        world, folder, out = ddp.from_env(), Path(cfg.run_dir), Path(out)
        if folder.exists() and not folder.is_dir():
            raise TrainingError(f"--run-dir {folder} is a file; a run's folder goes there: choose another --run-dir")
        saved = {}
        if cfg.resume:
            saved = check_resumable(cfg, folder, world.size)
        elif (folder / "state.safetensors").exists():
            raise TrainingError(f"{folder} already holds a run; continue it with --resume, or choose another "
                                "--run-dir or delete that one (--overwrite replaces only --out)")
        elif out.exists() and not cfg.overwrite:
            raise TrainingError(f"{out} already exists (a trained adapter or head?); a new run would replace it: "
                                "choose another --out, or pass --overwrite")
        hw = hardware.resolve(ddp.device_name(cfg.device, world), cfg.precision, config)
        was = saved.get("hardware", {})
        if was.get("precision", hw.precision) != hw.precision:
            raise TrainingError(f"{folder} was trained in {was['precision']} on {was.get('device')}, but here "
                                f"--precision {cfg.precision} means {hw.precision}; resume with --precision "
                                f"{was['precision']}")
        locked = lock(folder) if world.is_main else None  # made and ours: after the checks, which leave no folder
        ddp.start(world, hw.device)
        world.barrier()  # every process has checked the folder before rank 0 writes to it
        run = cls(cfg, out, world, hw, saved, script)
        run.locked = locked
        _opened.append(run)
        processes = f" x {world.size} processes" if world.size > 1 else ""
        run.say(f"{hw.describe()}; batch {cfg.batch_size} x grad-accum {cfg.grad_accum}{processes} = global "
                f"batch {cfg.batch_size * cfg.grad_accum * world.size}")
        torch.manual_seed(cfg.seed)  # the same initialisation in every process
        return run

    def say(self, message: str):
        """One line on stderr, from rank 0 only (above the progress bar, if one is showing)."""
        if self.world.is_main:
            tqdm.write(message, file=sys.stderr)

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

    def check_inputs(self, inputs: dict):
        """inputs: {name: content fingerprint} of what the run reads besides its settings (data, adapters): a
        resume with any of them changed is refused, naming it."""
        for name, value in inputs.items():
            was = self.saved.get("inputs", {}).get(name, value)
            if was != value:
                raise TrainingError(f"{self.folder} was started on another {name} (fingerprint {was}, now {value}): "
                                    f"the {name} changed since; resume with the one it started with, or start a "
                                    "new --run-dir")

    def write_config(self, inputs: dict):
        """train_config.json (rank 0): a fresh run's settings (paths made absolute, so that it resumes from any
        folder), hardware, processes and inputs; on a resume, the settings it may change (how long it runs, how
        often it logs and saves, where it computes), so that the next resume keeps them."""
        if not self.world.is_main:
            return
        now = dataclasses.asdict(self.cfg)
        if self.cfg.resume:
            saved = {**self.saved, **{k: v for k, v in now.items() if k in SAVED_ON_RESUME},
                     "hardware": self.hw.to_dict()}
        else:
            saved = {**{k: saved_value(k, v) for k, v in now.items()}, "hardware": self.hw.to_dict(),
                     "processes": self.world.size, "inputs": inputs}
        write_atomic(self.folder / "train_config.json", json.dumps(saved, indent=2) + "\n")

    def close(self):
        """The run is over: another process may use its folder (see lock)."""
        held = _LOCKS.pop(self.locked, None)
        if held:
            held.close()

    def resume_command(self) -> str:
        """The command that continues this run: the same script, on as many processes."""
        args = f"{self.script} --run-dir {shlex.quote(str(self.folder))} --resume"
        if self.world.size == 1:
            return f"python {args}"
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world.size))
        nodes = f" --nnodes {self.world.size // local} (and the rendezvous flags)" if local < self.world.size else ""
        return f"torchrun --nproc_per_node {local}{nodes} {args}"

    def hparams(self, plan: Plan) -> dict:
        """What the reporters record of the run: its settings and what they resolved to."""
        return {**dataclasses.asdict(self.cfg), "hardware": self.hw.to_dict(), "processes": self.world.size,
                "global_batch": plan.global_batch, "total_steps": plan.total_steps}

    def on_main(self, write, *args):
        """write(*args) on rank 0, while the other processes wait for it to finish."""
        if self.world.is_main:
            write(*args)
        self.world.barrier()

    def summary(self, log: "Log", last: Path, start: str | None = None):
        """What the run did and where it put it, from rank 0. start: what --out holds when validation never beat
        step 0, for a trainer that writes it at step 0 (stage 2: the identity head); else the last weights."""
        if not self.world.is_main:
            return
        best, best_step, first = log.best_val, log.best_step, log.first_val
        paused = log.step < log.total_steps
        lines = [f"{'paused after' if paused else 'done:'} step {log.step} of {log.total_steps} in "
                 f"{_duration(log.seconds)}" + (f", {log.tokens / log.seconds:,.0f} tokens/s" if log.seconds else "")]
        if paused:
            lines.append(f"continue with `{self.resume_command()}`" + (
                "" if best is None or best_step is None else f"; best validation loss so far {best:.4f} at step "
                f"{best_step}"))
        elif best is None:
            lines.append("no validation split (--val-fraction 0): the best artefact is the last weights")
        elif best_step == 0:
            lines.append(f"validation never improved on its first value ({first:.4f} at step 0): the best artefact "
                         f"is {start or 'the last weights'}; try a lower --lr, more data, or fewer epochs")
        else:
            lines.append(f"best validation loss {best:.4f} at step {best_step} (first {first:.4f})")
        lines += [f"best:  {self.out}", f"last:  {last}", f"log:   {self.folder / 'metrics.jsonl'} and "
                  f"{self.folder / 'curves.svg'}"]
        for line in lines:
            self.say(line)


PATHS = {"model", "data", "run_dir", "out", "lora"}  # settings naming a file or folder: saved as absolute paths


def saved_value(key: str, value):
    """A setting as train_config.json holds it: a path absolute (--model tiny, a random model, as it is)."""
    if key in PATHS and isinstance(value, str) and value and (key, value) != ("model", "tiny"):
        return os.path.realpath(value)
    return value


_LOCKS = {}  # folder -> its open .lock file, held until the process ends
_opened = []  # the runs this process has opened; the last is the one a forced stop names


def on_interrupt() -> str:
    """What a trainer says after a stop that skipped its own handling (a second Ctrl-C): the command that
    continues the run it opened last, or, before its first checkpoint, that there is none."""
    if not _opened:  # stopped before the run began
        return "; run the same command again"
    run = _opened[-1]
    if (run.folder / "state.safetensors").exists():
        return f"; the last checkpoint is kept: continue with `{run.resume_command()}`"
    wrote = f", with --overwrite ({run.out} was written already)" if run.out.exists() and not run.cfg.overwrite else ""
    return f"; there was no checkpoint yet: run the same command again{wrote}"


def lock(folder: Path):
    """Make folder and hold a lock on folder/.lock until the run closes or this process ends: a second trainer
    on the same run folder (a --resume while the run still goes on) is refused. A POSIX record lock, which a
    crash or a kill releases; where there is none (Windows), nothing is locked."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        return None
    f = _LOCKS.get(folder.resolve()) or open(folder / ".lock", "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip()
        f.close()
        raise TrainingError(f"{folder} is in use by another training process{f' (pid {pid})' if pid else ''}; "
                            "wait for it to end or stop it, or choose another --run-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[folder.resolve()] = f
    return folder.resolve()


def check_resumable(cfg: RunConfig, folder: Path, processes: int = 1) -> dict:
    """A run may only be resumed with the settings it was started with (bar RESUMABLE_CHANGES) and on as
    many processes (a step's examples depend on the global batch); returns the saved train_config.json. Paths
    are compared as absolute paths: a run resumes from any folder, but not once moved (its --out may be in it)."""
    saved = read_saved_config(folder)
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as saved: tuples become lists
    changed = [f"--{key.replace('_', '-')} {_flag(saved.get(key))}, not {_flag(value)}" for key, value in now.items()
               if key not in RESUMABLE_CHANGES and saved_value(key, saved.get(key)) != saved_value(key, value)]
    if changed:
        raise TrainingError(f"{folder} was started with {'; '.join(changed)}; resume with the same settings "
                            "(`--run-dir DIR --resume` alone takes them from the folder) or choose another --run-dir")
    if saved.get("processes", 1) != processes:
        raise TrainingError(f"{folder} was started on {saved.get('processes', 1)} processes, this is {processes}; "
                            f"resume with torchrun --nproc_per_node (x --nnodes) giving {saved.get('processes', 1)}")
    return saved


def _flag(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def check_output_kind(path, folder: bool, flag: str):
    """One line if path exists as a file where a folder belongs, or the reverse."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        found, wanted = ("a folder", "a file") if path.is_dir() else ("a file", "a folder")
        raise TrainingError(f"{flag} {path} is {found}, but {wanted} goes there; choose another {flag}")


def file_fingerprint(path) -> str:
    """A short hash of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- checkpoints (safetensors only)


def rng_state(device: torch.device) -> dict:
    state = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng.cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":  # dropout on the device draws from its generator
        state["rng.mps"] = torch.mps.get_rng_state()
    return state


def save_state(run: Run, step: int, best: dict, params: dict, optimizer, scaler, base_fingerprint: str):
    """Trainable weights, AdamW moments, gradient scale, each process's RNG and the best validation so far in
    state.safetensors, written atomically by rank 0."""
    world, device = run.world, run.hw.device
    rng = rng_state(device)
    if world.size > 1:  # rank r's generators as rng.torch.r (the same on every process otherwise)
        rng = {f"{k}.{r}": t for k, v in rng.items() for r, t in enumerate(world.gather(v, device))}
    if not world.is_main:
        world.barrier()  # until rank 0 has written the file
        return
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    for n, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{key}.{n}"] = value.detach().reshape(-1).contiguous() if key == "step" else value
    tensors.update(rng)
    metadata = {"step": str(step), "best": json.dumps(best), "base_fingerprint": base_fingerprint}
    if scaler:
        metadata["scaler"] = json.dumps(scaler.state_dict())
    with atomic_path(run.folder / "state.safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)
    world.barrier()


def load_state(run: Run, plan: Plan, params: dict, optimizer, scaler, base_fingerprint: str) -> tuple[int, dict]:
    """Restore what save_state wrote, each tensor on its parameter's device; returns (step, best validation).
    Stops if the run is already where plan ends."""
    path, world = run.folder / "state.safetensors", run.world
    with open_checked(path, TrainingError, fix=DAMAGED) as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mine = "" if world.size == 1 else f".{world.rank}"
    try:
        step = int(metadata["step"])
        best = json.loads(metadata["best"]) if "best" in metadata else {"val": float(metadata["best_val"]),
                                                                         "step": None}
        scaler_state = json.loads(metadata["scaler"]) if scaler and "scaler" in metadata else None
        numbers = (int, float, type(None))
        if (not isinstance(best, dict) or not all(isinstance(best.get(k), numbers) for k in ("val", "step", "first"))
                or f"rng.torch{mine}" not in tensors or not isinstance(scaler_state, dict | None)):
            raise ValueError
    except (KeyError, ValueError, TypeError, RecursionError):
        raise TrainingError(f"{path}: its step, best validation, gradient scale or random state is missing or "
                            f"damaged; {DAMAGED}") from None
    if step >= plan.end:
        more = ("the run is finished; raise --max-steps or --epochs to train further" if step >= plan.total_steps
                else "raise --stop-after, or leave it out to finish the run")
        raise TrainingError(f"{run.folder} is already at step {step}, with nothing left to do up to {plan.end}; "
                            f"{more}")
    if metadata.get("base_fingerprint") != base_fingerprint:
        raise TrainingError(f"{path}: saved on another base model (fingerprint {metadata.get('base_fingerprint')}, "
                            f"this one is {base_fingerprint}); resume on the base it started with")
    with torch.no_grad():
        for n, p in params.items():
            if f"param.{n}" not in tensors:
                raise TrainingError(f"{path}: has no tensor for {n}; it belongs to another model or settings")
            p.copy_(tensors[f"param.{n}"])
            state = {key: tensors[f"adam.{key}.{n}"].to(p.device) for key in ("step", "exp_avg", "exp_avg_sq")
                     if f"adam.{key}.{n}" in tensors}
            if state:
                state["step"] = state["step"].reshape(())
                optimizer.state[p] = state
    torch.set_rng_state(tensors[f"rng.torch{mine}"])
    if f"rng.cuda{mine}" in tensors and run.hw.device.type == "cuda":
        torch.cuda.set_rng_state(tensors[f"rng.cuda{mine}"], run.hw.device)
    if f"rng.mps{mine}" in tensors and run.hw.device.type == "mps":
        torch.mps.set_rng_state(tensors[f"rng.mps{mine}"])
    if scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    run.say(f"resuming after step {step} of {plan.total_steps}, from {path}")
    return step, best


# --------------------------------------------------------------------------------------- the metrics log


class Log:
    """metrics.jsonl, curves.svg, the progress bar and the reporters users watch (--report-to), on rank 0.

    add() keeps each optimizer step's loss and gradient norm on the device; check() waits for the device
    once for all of them, stops the run if one is not finite, and writes them: every --log-interval steps,
    and before each validation and checkpoint, so that a checkpoint never holds a diverged step."""

    def __init__(self, run: Run, plan: Plan, start: int, best: dict, hparams: dict):
        self.run, self.plan, self.world = run, plan, run.world
        self.step, self.total_steps = start, plan.total_steps
        self.best_val, self.best_step = best.get("val"), best.get("step")
        self.first_val = best.get("first")
        self.pending = []  # (record, loss, grad_norm): losses and norms still on the device
        self.ready = []  # checked records not yet written
        self.seconds = self.tokens = 0.0
        self.clock = time.perf_counter()
        self.path = run.folder / "metrics.jsonl"
        main = self.world.is_main
        if main:
            if run.cfg.resume:
                trim_log(self.path, start)
            else:
                self.path.write_text("")
        self.file = open(self.path, "a", encoding="utf-8") if main else None
        self.reporters = open_reporters(run, start, hparams) if main else []
        self.bar = tqdm(total=plan.total_steps, initial=start, unit="step", file=sys.stderr, disable=not main,
                        dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor):
        """Optimizer step `step` (counted from 1) is done: its summed loss share and its gradient norm."""
        self.step = step
        self.pending.append(({"step": step, **self.plan.record(step - 1)}, loss, grad_norm))
        self.bar.update()

    def check(self, params: dict, scaler=None):
        """Make the pending steps' records, after one wait for the device (and one all-reduce of the losses);
        stops with TrainingError if a loss, a gradient norm (without a scaler, whose skipped steps are normal)
        or a weight is not finite, in every process at the same step."""
        if not self.pending:
            return
        values = torch.stack([torch.stack([loss.float(), norm.float()]) for _, loss, norm in self.pending])
        if self.world.size > 1:  # each process holds its share of a step's loss; the norms are the same
            values[:, 0] = self.world.sum_(values[:, 0].contiguous())
        values = values.tolist()
        # a NaN or an inf makes its tensor's sum non-finite (finite weights overflow it only past ~1e30 each);
        # isfinite() would allocate boolean copies of every parameter
        weights_ok = bool(torch.stack([p.detach().sum() for p in params.values()]).isfinite().all())
        seconds = time.perf_counter() - self.clock  # the device's time for these steps, after the wait
        for i, ((record, _, _), (loss, norm)) in enumerate(zip(self.pending, values)):
            bad_step = not math.isfinite(loss) or not (scaler or math.isfinite(norm))
            if bad_step or (not weights_ok and i == len(self.pending) - 1):
                self.write()  # the good steps before it
                what = f"loss {loss:.4g}, gradient norm {norm:.4g}" if bad_step else "a weight is not finite"
                hint = "a lower --lr" + (" or --precision fp32" if self.run.hw.precision != "fp32" else "")
                raise TrainingError(f"training diverged at step {record['step']} ({what}); stopped, and the last "
                                    f"good checkpoint is kept in {self.run.folder}; try {hint}")
            each = seconds / len(self.pending)
            # a step fp16's scaler skipped has an infinite norm: null in the log (NaN and Infinity are not JSON)
            record.update(loss=loss, grad_norm=norm if math.isfinite(norm) else None, seconds=each,
                          tokens_per_s=record["tokens"] / each)
            self.ready.append(record)
        self.seconds += seconds
        self.tokens += sum(record["tokens"] for record, _, _ in self.pending)
        self.pending, self.clock = [], time.perf_counter()
        self.bar.set_postfix(loss=f"{self.ready[-1]['loss']:.3f}", lr=f"{self.ready[-1]['lr']:.1e}")

    def validation(self, step: int, val_loss: float, best: bool):
        """A validation's result: in the step's record, drawn in curves.svg, and said in one line above the bar."""
        if self.first_val is None:
            self.first_val = val_loss
        if best:
            self.best_val, self.best_step = val_loss, step
        if self.ready and self.ready[-1]["step"] == step:
            self.ready[-1]["val_loss"] = val_loss
        else:
            self.ready.append({"step": step, "val_loss": val_loss})
        train = self.ready[-1].get("loss")
        self.write()
        self.draw()
        best_so_far = "best so far" if best else f"best {self.best_val:.4f} at step {self.best_step}"
        self.run.say(f"step {step}: {'' if train is None else f'train loss {train:.4f}, '}validation loss "
                     f"{val_loss:.4f} ({best_so_far})")
        self.clock = time.perf_counter()  # the next steps' time starts now, not before validation

    def write(self):
        """Write the checked records to metrics.jsonl and the reporters."""
        if self.file and self.ready:
            self.file.writelines(json.dumps(r) + "\n" for r in self.ready)
            self.file.flush()
            for reporter in self.reporters:
                reporter.log(self.ready)
        self.ready = []

    def restart_clock(self):
        """After a checkpoint: the time it took is not the next steps'."""
        self.clock = time.perf_counter()

    def best(self) -> dict:
        return {"val": self.best_val, "step": self.best_step, "first": self.first_val}

    def draw(self):
        """curves.svg: train and validation loss against the step, from metrics.jsonl."""
        if not self.world.is_main:
            return
        records = read_log(self.path)
        series = {"train loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
                  "validation loss": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]}
        title = f"{self.run.folder}: loss against optimizer step"
        write_atomic(self.run.folder / "curves.svg", line_chart(series, title=title, x_label="step", y_label="loss"))

    def close(self):
        self.bar.close()
        if self.file and not self.file.closed:
            self.file.close()
            for reporter in self.reporters:
                reporter.close()


def read_log(path: Path) -> list[dict]:
    """metrics.jsonl's records; a last line cut short by a crash is left out."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # damaged: not JSON, a too-long integer, nested too deeply
            continue
        if isinstance(record, dict) and type(record.get("step")) is int and all(
                isinstance(record.get(k, 0.0), (int, float)) for k in ("loss", "val_loss")):
            records.append(record)
    return records


def trim_log(path: Path, step: int):
    """Drop log records past the resumed step (written after the last checkpoint), and a line cut short."""
    if path.exists():
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in read_log(path) if r["step"] <= step))


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s} s" if minutes else f"{seconds:.1f} s"


# ------------------------------------------------------------------------------------------- reporters


class TensorBoard:
    """Scalars through tensorboard's own SummaryWriter, in <run-dir>/tensorboard. A resumed run purges what
    the first one logged past the resumed step, so that no step is drawn twice."""

    def __init__(self, run: Run, start: int, hparams: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainingError("--report-to tensorboard needs tensorboard: pip install -e '.[tensorboard]'") from None
        # a resumed run logs from step start + 1: what the first one logged from there on is dropped
        self.writer = SummaryWriter(str(run.folder / "tensorboard"), purge_step=start + 1 if start else None)
        if not start:
            self.writer.add_text("config", "    " + json.dumps(hparams, indent=2).replace("\n", "\n    "), 0)

    def log(self, records: list[dict]):
        for r in records:
            for key, value in r.items():
                if key in SCALARS and value is not None:
                    self.writer.add_scalar(SCALARS[key], value, r["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """Scalars through wandb; the run id is kept in <run-dir>/wandb_id, so that a resumed run continues the
    same W&B run (resume="allow"). WANDB_MODE=offline writes it locally."""

    def __init__(self, run: Run, start: int, hparams: dict):
        try:
            import wandb
        except ImportError:
            raise TrainingError("--report-to wandb needs wandb: pip install -e '.[wandb]'") from None
        id_file = run.folder / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        write_atomic(id_file, run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(id=run_id, resume="allow", dir=str(run.folder), config=hparams,
                              name=run.folder.name, settings=wandb.Settings(silent=True))

    def log(self, records: list[dict]):
        for r in records:
            self.run.log({SCALARS[k]: v for k, v in r.items() if k in SCALARS and v is not None}, step=r["step"])

    def close(self):
        self.run.finish()
        self.wandb.teardown()  # its service writes the run's file fully before the process goes on


SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
           "val_loss": "val/loss"}


def open_reporters(run: Run, start: int, hparams: dict) -> list:
    return [{"tensorboard": TensorBoard, "wandb": WandB}[name](run, start, hparams)
            for name in dict.fromkeys(run.cfg.report_to)]


# ----------------------------------------------------------------------------------------- a clean stop


class StopSignals:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler, or torchrun stopping the other processes when one fails)
    asks the loop to stop after the step it is in: the loop saves a checkpoint there and ends with
    Interrupted. A second Ctrl-C stops at once, keeping the last checkpoint. Outside the main thread (where
    signals cannot be caught) Ctrl-C keeps Python's behaviour."""

    def __init__(self, run: Run):
        self.run, self.asked, self.previous = run, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._ask)
        return self

    def _ask(self, signum, frame):
        if self.asked:  # a second Ctrl-C stops at once; a SIGTERM after a first signal asks nothing new
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.asked = True
        if os.environ.get("LOCAL_RANK", "0") == "0":  # once on each machine, where its terminal sees it
            print("\nstopping after this step (Ctrl-C again to stop at once, keeping the last checkpoint)",
                  file=sys.stderr, flush=True)

    def stop(self) -> bool:
        """Whether any process was asked to stop: every process stops after the same step."""
        world = self.run.world
        if world.size == 1:
            return self.asked
        return bool(world.sum_(torch.tensor([float(self.asked)], device=self.run.hw.device)).item())

    def __exit__(self, kind, error, traceback):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if kind is not None:  # the run ends here (interrupted, diverged, failed): its folder is free again
            self.run.close()
        lost = kind is not None and (issubclass(kind, torch.distributed.DistError) or (
            self.run.world.size > 1 and issubclass(kind, RuntimeError) and LOST.search(str(error))))
        if lost:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun stops the survivors: say why first
            why = re.sub(r"^\[[^]]*\] *", "", " ".join(str(error).split())).split(". ")[0][:200]  # gloo's file:line
            raise TrainingError(f"lost contact with another process ({why}); the last checkpoint in "
                                f"{self.run.folder} is kept; continue with `{self.run.resume_command()}`") from None


# what a collective raises when another process has gone (gloo's transport errors are plain RuntimeErrors)
LOST = re.compile(r"connection (reset|closed|refused)|broken pipe|timed out|socket timeout", re.I)
