"""Stage 2: train one target's head adapter:
`python train_head.py --target mistral --data mistral.jsonl --lora runs/sft/best --out mistral.safetensors`.

The base and the stage-1 adapter (merged) are loaded, frozen and kept in eval mode; only the head adapter
trains, on the target LLM's pairs, with stage 1's template, label masking and runs.py's loop (schedule,
validation, atomic checkpoints, resume, log, progress bar). The frozen body's final hidden states never
change, so the first epoch computes them once, for the answer positions only, and on the device; later
epochs train the head on them alone (--no-cache recomputes them each time; tests/test_head_adapter.py
shows both give the same head). --out is the best head by validation loss; --run-dir holds the run.
"""

import re
from dataclasses import dataclass

import torch

import cli
import runs
from hardware import to_device
from head_adapter import HeadAdapter, load_prompter, save_head
from phi2.model import answer_rows
from prompts import IGNORE_INDEX, collate, read_pairs

TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class HeadConfig(runs.RunConfig):
    target: str = ""  # the target LLM's name, recorded in the head file
    lora: str | None = None  # the stage-1 adapter folder (e.g. runs/sft/best), merged into the base
    model: str | None = None  # the base folder; default: the one the stage-1 adapter was trained on
    out: str | None = None  # the head file; default <target>.safetensors
    head_rank: int | None = None  # None: a full copy of the LM head (the papers'); r: a rank-r update
    no_cache: bool = False  # recompute the body's hidden states every time (the straightforward path)
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    batch_size: int = 8
    grad_accum: int = 2
    eval_interval: int = 25
    save_interval: int = 25

    def __post_init__(self):
        if not TARGET_NAME.fullmatch(self.target):
            raise runs.TrainingError(f"--target {self.target!r}: a target's name is letters, digits and . _ - "
                                     "(it names files), e.g. mistral or gpt-4o")
        self.out = self.out or f"{self.target}.safetensors"
        self.run_dir = self.run_dir or f"runs/head-{self.target}"


def parse_args(argv=None) -> HeadConfig:
    d = HeadConfig(target="x")
    p = cli.parser(__doc__)
    p.add_argument("--target", required=True, help="the target LLM's name (mistral, gpt-4o, ...)")
    p.add_argument("--data", required=True, help="pairs improved by the target LLM (.jsonl, .json, .csv)")
    p.add_argument("--lora", help="stage-1 adapter folder, e.g. runs/sft/best")
    p.add_argument("--model", help="base model folder (default: the stage-1 adapter's base)")
    p.add_argument("--out", help="the best head's file (default: <target>.safetensors)")
    p.add_argument("--run-dir", default="", help="state and log (default: runs/head-<target>)")
    p.add_argument("--head-rank", type=cli.positive_int, help="train a rank-r update of the head, not a full copy")
    p.add_argument("--no-cache", action="store_true", help="recompute the frozen body's outputs every step")
    runs.add_run_args(p, d)
    return HeadConfig(**vars(p.parse_args(argv)))


def main(cfg: HeadConfig) -> dict:
    runs.check_output_kind(cfg.out, folder=False, flag="--out")
    run = runs.Run(cfg, cfg.out)
    pairs = read_pairs(cfg.data, cfg.prompt_field, cfg.improved_field)
    model, tokenizer, base_fingerprint, stage1 = load_prompter(cfg.model, cfg.lora, run.hw.dtype, run.hw.device)
    train, val = run.encode(tokenizer, pairs, model.config.block_size)

    # the head adapter: fp32 master weights, the only parameters that train
    head = HeadAdapter(model.lm_head, cfg.head_rank, dtype=torch.float32)
    params = {n: p for n, p in head.named_parameters() if p.requires_grad}

    def save(path):
        save_head(head, path, cfg.target, model, base_fingerprint, stage1)

    # The frozen body's outputs at answer positions, per example: (h (n_i, C), targets (n_i,)), on the
    # device, each process caching those it is given. An example's are always computed in the same batch
    # (its first-epoch micro-batch; for validation, its validation batch), so that they are the same bits
    # whenever and wherever they are computed: after --resume, or in another process.
    cache, home = {"train": {}, "val": {}}, {}

    def features(split_name, examples, idx):
        """Hidden states and targets of the answer positions of examples[idx], concatenated."""
        if cfg.no_cache:
            return _cat(body(examples, idx).values())
        store = cache[split_name]
        for i in idx:
            if i not in store:
                store.update(body(examples, home[split_name][i]))
        return _cat(store[i] for i in idx)

    def body(examples, idx) -> dict:
        ids, labels = collate([examples[i] for i in idx], tokenizer.pad_id)
        with torch.no_grad(), run.hw.autocast():
            h = model.hidden_states(to_device(ids[:, :-1], run.hw.device))  # (B, T-1, C)
        rows, targets = answer_rows(h, labels)
        # what the head's first matmul reads: under autocast it casts to bf16, so storing that is exact
        rows = rows.to(run.hw.dtype)
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()  # on the CPU: no sync
        return dict(zip(idx, zip(rows.split(counts), targets.split(counts))))

    def evaluate() -> float:
        total, count = 0.0, 0
        with torch.no_grad(), run.hw.autocast():
            for i in run.shard(range(0, len(val), cfg.batch_size)):
                h, t = features("val", val, list(range(i, min(i + cfg.batch_size, len(val)))))
                total, count = total + head.loss(h, t).item(), count + len(t)
        return run.mean(total, count)

    val_batches = [list(range(i, min(i + cfg.batch_size, len(val)))) for i in range(0, len(val), cfg.batch_size)]
    home["val"] = {i: b for b in val_batches for i in b}
    run.begin(head, params, train, val, base_fingerprint, what=f"stage 2, target {cfg.target}", evaluate=evaluate,
              save=save, initial_is_best=True,  # the identity head is the base's own: a valid start
              inputs={"stage-1 adapter": stage1})
    home["train"] = {i: idx for idx in run.epoch_micro_batches(0) for i in idx}
    with run:
        for micro_batches in run.steps():  # one optimizer step: this process's micro-batches of it
            for idx in micro_batches:
                h, t = features("train", train, idx)
                with run.hw.autocast():
                    loss = run.loss(h, t)  # head.loss, through DDP
                run.backward(loss)  # as its share of the mean over every answer token of the step
            run.optimizer_step()
    return {"step": run.step, "best_val_loss": run.best_val, "head": head, "model": model}


def _cat(pieces):
    hs, ts = zip(*pieces)
    return torch.cat(hs), torch.cat(ts)


if __name__ == "__main__":
    cli.run("train_head.py", main, parse_args)
