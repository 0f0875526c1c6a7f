"""Stage 2: train one target's head adapter:
`python train_head.py --target mistral --data mistral.jsonl --lora runs/sft/best --out mistral.safetensors`.

The base and the stage-1 adapter (merged) are loaded, frozen and kept in eval mode; only the head adapter
trains, on the target LLM's pairs, with stage 1's template and label masking, in a loop like stage 1's.
The method is `loss = CE(head(model.hidden_states(ids))[answer positions], next ids)`. The frozen body's final
hidden states never change, so the first epoch computes them once, for the answer positions only, and on the
device; later epochs train the head on them alone (--no-cache recomputes them each time;
tests/test_head_adapter.py shows both give the same head). --out is the best head by validation loss;
--run-dir holds the run.
"""

import support.threads  # noqa: F401  (first: OpenMP reads its settings when torch loads)

from dataclasses import dataclass

import torch

from head_adapter import TARGET_NAME, HeadAdapter, save_head
from phi2.model import answer_rows
from prompts import IGNORE_INDEX, collate, read_pairs, read_records
from support import cli, ddp, training
from support.hardware import to_device
from support.prompter import Prompter, add_args, base_config


@dataclass
class HeadConfig(training.RunConfig):
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
            raise training.TrainingError(f"--target {self.target!r}: a target's name is letters, digits and . _ - "
                                         "(it names files), e.g. mistral or gpt-4o")
        if self.target == "base":
            raise training.TrainingError("--target base: serve.py gives that name to stage 1 alone; name the head "
                                         "after its target LLM")
        self.report_to = tuple(self.report_to)
        self.out = self.out or f"{self.target}.safetensors"
        self.run_dir = self.run_dir or f"runs/head-{self.target}"


def parse_args(argv=None) -> HeadConfig:
    d = HeadConfig(target="x")
    p = cli.parser(__doc__)
    p.add_argument("--target", default="", help="the target LLM's name (mistral, gpt-4o, ...); required")
    p.add_argument("--data", default="", help="pairs improved by the target LLM (.jsonl, .json, .csv); required")
    add_args(p, heads=None)
    p.add_argument("--out", help="the best head's file (default: <target>.safetensors)")
    p.add_argument("--run-dir", default="", help="state, log and curves (default: runs/head-<target>)")
    p.add_argument("--head-rank", type=cli.positive_int, help="train a rank-r update of the head, not a full copy")
    p.add_argument("--no-cache", action="store_true", help="recompute the frozen body's outputs every step")
    training.add_run_args(p, d)
    args = p.parse_args(argv)
    if not args.resume and not (args.target and args.data):
        p.error("--target and --data are required (with --resume, --run-dir alone will do)")
    if args.resume and not (args.run_dir or args.target):
        p.error("--resume needs the run's --run-dir (or its --target, for runs/head-<target>)")
    return training.parse_config(p, argv, HeadConfig)


def targets_in(path) -> dict:
    """{target: first line} of the records' "target" field (target_data.py writes the model that made each pair)."""
    first = {}
    for line, record in read_records(path):
        if isinstance(record.get("target"), str):
            first.setdefault(record["target"], line)
    return first


def main(cfg: HeadConfig) -> dict:
    training.check_output_kind(cfg.out, folder=False, flag="--out")
    made_by = {} if "target" in (cfg.prompt_field, cfg.improved_field) else targets_in(cfg.data)
    if len(made_by) > 1:
        (a, line_a), (b, line_b) = list(made_by.items())[:2]
        raise training.TrainingError(f"{cfg.data}: its pairs come from several targets ({a!r} at line {line_a}, "
                                     f"{b!r} at line {line_b}); a head learns one target's rewrites: give it a file "
                                     "of that target's pairs")
    run = training.Run.open(cfg, cfg.out, base_config(cfg.model, cfg.lora), script="train_head.py")
    world, hw = run.world, run.hw
    pairs = read_pairs(cfg.data, cfg.prompt_field, cfg.improved_field)
    prompter = Prompter.load(cfg.model, cfg.lora, dtype=hw.dtype, device=hw.device)
    model, tokenizer = prompter.model, prompter.tokenizer
    train, val = run.encode(tokenizer, pairs, model.config.block_size)
    inputs = {"data": training.file_fingerprint(cfg.data), "stage-1 adapter": prompter.stage1}
    run.check_inputs(inputs)

    # the head adapter: fp32 master weights, the only parameters that train
    head = HeadAdapter(model.lm_head, cfg.head_rank, dtype=torch.float32)
    params = {n: p for n, p in head.named_parameters() if p.requires_grad}

    def save(path):
        save_head(head, path, cfg.target, model, prompter.base_fingerprint, prompter.stage1, cfg.lora)

    # The frozen body's outputs at answer positions, per example: (h (n_i, C), next_ids (n_i,)), on the
    # device, each process caching those it is given. An example's are always computed in the same batch
    # (its first-epoch micro-batch; for validation, its validation batch), so that they are the same bits
    # whenever and wherever they are computed: after --resume, or in another process.
    plan = training.Plan(cfg, train, world.size)
    val_batches = [list(range(i, min(i + cfg.batch_size, len(val)))) for i in range(0, len(val), cfg.batch_size)]
    home = {"train": {i: idx for idx in plan.epoch_micro_batches(0) for i in idx},
            "val": {i: b for b in val_batches for i in b}}
    cache = {"train": {}, "val": {}}

    def features(split_name, examples, idx):
        """Hidden states and next-token ids of the answer positions of examples[idx], concatenated."""
        if cfg.no_cache:
            return _cat(body(examples, idx).values())
        store = cache[split_name]
        for i in idx:
            if i not in store:
                store.update(body(examples, home[split_name][i]))
        return _cat(store[i] for i in idx)

    def body(examples, idx) -> dict:
        ids, labels = collate([examples[i] for i in idx], tokenizer.pad_id)
        with torch.no_grad(), hw.autocast():
            h = model.hidden_states(to_device(ids[:, :-1], hw.device))  # (B, T-1, C)
        rows, next_ids = answer_rows(h, labels)
        # what the head's first matmul reads: autocast casts it to hw.dtype (bf16 or fp16), so storing that is
        # exact; in fp32 nothing is cast
        rows = rows.to(hw.dtype)
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()  # on the CPU: no sync
        return dict(zip(idx, zip(rows.split(counts), next_ids.split(counts))))

    def evaluate() -> float:
        """Mean validation loss per answer token, over every process's share of the validation batches."""
        total, count = 0.0, 0
        with torch.no_grad(), hw.autocast():
            for idx in val_batches[world.rank::world.size]:
                h, t = features("val", val, idx)
                total, count = total + head.loss(h, t).item(), count + len(t)
        return world.mean(total, count, hw.device)

    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(hw.device.type) if hw.needs_scaler else None  # fp16's; bf16 needs none
    loss_fn = ddp.wrap(training.LossOf(head), world, hw.device)  # head.loss, through DDP under torchrun
    if world.rank > 0:
        torch.manual_seed(cfg.seed * 1_000_003 + world.rank)
    step, best = 0, {}
    if cfg.resume:
        step, best = training.load_state(run, plan, params, optimizer, scaler, prompter.base_fingerprint)
    run.write_config(inputs)
    source = f" (its pairs made by {next(iter(made_by))})" if made_by else ""  # a misspelt --target shows here
    run.say(f"stage 2, target {cfg.target}{source}: {len(train)} training / {len(val)} validation examples, "
            f"{sum(p.numel() for p in params.values()):,} head parameters, {plan.total_steps} steps")
    wrote_out = cfg.resume and run.out.exists()

    with training.Log(run, plan, step, best, run.hparams(plan)) as log, training.StopSignals(run) as signals:
        if step == 0 and val:  # the identity head is the base's own: a valid start, and the one to beat
            log.validation(0, evaluate(), best=True)
            run.on_main(save, run.out)
            wrote_out = True
        while step < plan.end:
            lr = training.get_lr(step, cfg, plan.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches, scale = plan.share(step, world)  # this process's share of the step
            step_loss = 0.0
            for i, idx in enumerate(micro_batches):
                loss_fn.require_backward_grad_sync = i == len(micro_batches) - 1  # DDP all-reduces in the last only
                h, t = features("train", train, idx)  # the frozen body's answer rows (N, C), their next ids (N,)
                with hw.autocast():
                    # head.loss: CE(lm_head(adapter(h)), t) summed; times scale, its share of the step's mean over
                    # every answer token
                    loss = loss_fn(h, t) * scale
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss = step_loss + loss.detach() / world.size
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            log.add(step, step_loss, grad_norm)
            stop = signals.stop()
            validate = val and (step % cfg.eval_interval == 0 or step == plan.total_steps)  # not at a pause
            checkpoint = step % cfg.save_interval == 0 or step == plan.end or stop
            if validate or checkpoint or step % cfg.log_interval == 0:
                log.check(params, scaler)  # one wait for the device; stops here if training diverged
            if validate:
                val_loss = evaluate()
                improved = val_loss < log.best_val
                if improved:
                    run.on_main(save, run.out)
                log.validation(step, val_loss, improved)
            log.write()
            if checkpoint:
                training.save_state(run, step, log.best(), params, optimizer, scaler, prompter.base_fingerprint)
                run.on_main(save, run.folder / "last.safetensors")
                log.restart_clock()
            if stop and step < plan.end:  # at the end there is nothing left to resume: the run finishes
                raise training.Interrupted(f"interrupted after step {step}, saved in {run.folder}; continue with "
                                           f"`{run.resume_command()}`")
    if not val or not wrote_out:  # no validation: the last weights are the best we know
        run.on_main(save, run.out)
    run.summary(log, run.folder / "last.safetensors", start="the step-0 head, the base's own (the identity)")
    run.close()
    return {"step": step, "best_val_loss": log.best_val, "head": head, "model": model}


def _cat(pieces):
    hs, ts = zip(*pieces)
    return torch.cat(hs), torch.cat(ts)


if __name__ == "__main__":
    cli.run("train_head.py", main, parse_args, on_interrupt=training.on_interrupt)
