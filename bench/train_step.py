"""One LoRA training step: ours against transformers + peft, same weights, same batch, same run.

    python bench/train_step.py [--configs small phi-2-2layer] [--steps 5] [--full] [--device auto] [--precision auto]

Rank 32 on q/k/v/dense/fc1/fc2 (alpha 64, dropout 0.05), batch 4 x 256 built from real prompt pairs (the
oneprompted CSV in ../shared, tokenized with the real Phi-2 tokenizer): each row is one pair of at least
256 tokens cut at 256, so every position is a real token, with labels -100 on the prompt. On --device, in
the precision --precision resolves to (the first line printed says which, and why): base weights in that
dtype and autocast to it (none in fp32; fp16 adds a gradient scaler), AdamW over the LoRA parameters,
gradient checkpointing off and on. Each setting runs in fresh processes (2 CPU threads), ours and peft
alternating for --rounds rounds, on the same device and precision: the best of the processes' median
seconds per step (after one warm-up step; interference only slows a run down), tokens/s (4 x 256 / step
time), and the highest peak memory (the process's peak RSS on a CPU, the peak of allocated device memory
on a GPU). --full adds the real budget: one step of the full 32-layer Phi-2 (random bf16 weights, loaded in
the run's precision, batch 4 x 512, checkpointing), ours, with transformers + peft at batch 1 x 256 for
reference. --report-to tensorboard adds what logging costs: train_sft.py's own loop on each config, every step
logged (--log-interval 1, the worst case), with and without the reporter, alternating, its median seconds
per step from metrics.jsonl.
"""

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

import lora
import phi2
from prompts import IGNORE_INDEX, encode_pair, read_pairs
from support import cli, hardware

CONFIGS = {
    "small": phi2.Phi2Config(n_layer=4, n_head=8, n_kv_head=8, n_embd=512, intermediate_size=2048,
                             vocab_size=51200, rotary_dim=32),
    "phi-2-2layer": phi2.Phi2Config.from_name("phi-2", n_layer=2),
    "phi-2": phi2.Phi2Config.from_name("phi-2"),
}
MODULES = list(lora.DEFAULT_MODULES)  # q/k/v/dense/fc1/fc2, for both implementations


def make_batch(batch_size, length, seed=0):
    """(input_ids, labels) (B, length) of real pairs, one per row, every position a real token: pairs of at
    least `length` tokens, cut there, with labels -100 on the prompt part."""
    tok = phi2.load_tokenizer(SHARED / "phi-2")
    pairs = read_pairs(SHARED / "prompt_pairs" / "oneprompted_v1.csv", "bad_prompt", "good_prompt")
    examples = [encode_pair(tok, p.prompt, p.improved) for p in pairs]
    long_enough = [e for e in examples if len(e.input_ids) >= length]
    rows = random.Random(seed).sample(long_enough, batch_size)
    ids = torch.tensor([e.input_ids[:length] for e in rows])
    labels = torch.tensor([e.labels[:length] for e in rows])
    return ids, labels


def synchronize(device: torch.device):
    """Wait for the device's queued work, so that a timer around it measures the work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def worker(impl, folder, batch_file, checkpointing, steps, device, precision):
    """Train in this process and print {seconds per step, loss, peak memory} as JSON."""
    import resource

    from safetensors.torch import load_file
    torch.set_num_threads(2)
    torch.manual_seed(0)
    hw = hardware.resolve(device, precision)
    batch = load_file(batch_file)
    ids, labels = batch["input_ids"].to(hw.device), batch["labels"]  # labels: see each loss_fn
    if impl == "ours":
        model = phi2.load_model(folder, dtype=hw.dtype, device=hw.device)
        lora.inject(model, rank=32, alpha=64.0, dropout=0.05, modules=MODULES)
        model.gradient_checkpointing = checkpointing

        def loss_fn():  # labels stay on the CPU, as train_sft.py keeps them (the rows are found without a sync)
            loss, n = model.loss(ids, labels)
            return loss / n
    else:
        import peft
        import transformers
        transformers.logging.set_verbosity_error()
        hf = transformers.PhiForCausalLM.from_pretrained(folder, dtype=hw.dtype).to(hw.device)
        model = peft.get_peft_model(hf, peft.LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05,
                                                         target_modules=MODULES, task_type="CAUSAL_LM"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        labels = labels.to(hw.device)

        def loss_fn():
            return model(input_ids=ids, labels=labels).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(hw.device.type) if hw.needs_scaler else None  # fp16 only
    times = []
    for _ in range(steps + 1):
        synchronize(hw.device)
        t = time.perf_counter()
        with hw.autocast():
            loss = loss_fn()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(hw.device)
        times.append(time.perf_counter() - t)
    if hw.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(hw.device)
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": statistics.median(times[1:]) if steps else times[0], "loss": loss.item(),
                      "peak_memory": peak}))


def run(impl, folder, batch_file, checkpointing, steps, hw):
    """One worker process on hw's device and precision; its JSON result."""
    cmd = [sys.executable, __file__, "--worker", impl, str(folder), str(batch_file), str(int(checkpointing)),
           str(steps), str(hw.device), hw.precision]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"train_step.py: the {impl} worker failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_checkpoint(config, folder, dtype):
    """A random-weight checkpoint of config in dtype (the dtype both implementations load it in)."""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.PhiForCausalLM(transformers.PhiConfig(**config.to_hf_dict())).to(dtype)
    hf.save_pretrained(folder)


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--configs", nargs="+", choices=["small", "phi-2-2layer"], default=["small", "phi-2-2layer"],
                   help="model configs to run")
    p.add_argument("--steps", type=cli.count, default=5, help="timed steps per process, after one warm-up step")
    p.add_argument("--rounds", type=cli.positive_int, default=2, help="fresh processes per implementation, alternating")
    p.add_argument("--full", action="store_true", help="also the full 32-layer Phi-2 budget check")
    p.add_argument("--full-dir", default="/tmp/phi2-random-32layer",
                   help="a random 32-layer bf16 checkpoint (bench/load_memory.py writes one there if it is missing)")
    cli.add_hardware_args(p)
    p.add_argument("--report-to", choices=["tensorboard", "wandb"],
                   help="also time train_sft.py's step with and without this reporter")
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)  # internal: one measuring process
    return p.parse_args(argv)


def main(args):
    if args.worker:
        impl, folder, batch_file, checkpointing, steps, device, precision = args.worker
        return worker(impl, folder, batch_file, checkpointing == "1", int(steps), device, precision)
    hw = hardware.resolve(args.device, args.precision)
    print(hw.describe(), flush=True)  # what this run measured on, before anything else
    memory = "peak GPU memory" if hw.device.type == "cuda" else "peak RSS"

    from safetensors.torch import save_file
    scratch = tempfile.TemporaryDirectory()  # checkpoints and runs, gigabytes: removed when main() ends
    tmp = Path(scratch.name)
    ids, labels = make_batch(4, 256)
    save_file({"input_ids": ids, "labels": labels}, tmp / "batch.safetensors")
    print(f"batch 4 x 256 of real pairs: {int((labels[:, 1:] != IGNORE_INDEX).sum())} of {ids.numel() - 4} "
          "next-token positions have a target (the rest are prompt)\n", flush=True)
    rows = []
    for cname in args.configs:
        folder = tmp / cname
        write_checkpoint(CONFIGS[cname], folder, hw.dtype)
        for checkpointing in (False, True):
            r = {}  # processes alternate (ours, peft, ours, peft): each keeps its best time and highest memory
            for impl in ("ours", "peft") * args.rounds:
                one = run(impl, folder, tmp / "batch.safetensors", checkpointing, args.steps, hw)
                best = r.setdefault(impl, one)
                best["seconds"] = min(best["seconds"], one["seconds"])
                best["peak_memory"] = max(best["peak_memory"], one["peak_memory"])
            row = (cname, "on" if checkpointing else "off", r["ours"], r["peft"])
            rows.append(row)
            _print(row, memory)
    if args.report_to:
        logging_cost(args, tmp, hw)
    if args.full:
        full = Path(args.full_dir)
        if not (full / "model.safetensors.index.json").exists():
            print(f"writing a random 32-layer Phi-2 to {full} (bench/load_memory.py makes the same) ...")
            subprocess.run([sys.executable, str(ROOT / "bench" / "load_memory.py"), "--dir", str(full)], check=True)
        ids, labels = make_batch(4, 512)
        save_file({"input_ids": ids, "labels": labels}, tmp / "batch512.safetensors")
        ids1, labels1 = make_batch(1, 256)
        save_file({"input_ids": ids1, "labels": labels1}, tmp / "batch1.safetensors")
        ours = run("ours", full, tmp / "batch512.safetensors", True, 0, hw)
        ref = run("peft", full, tmp / "batch1.safetensors", True, 0, hw)
        print(f"\nfull 32-layer Phi-2, checkpointing, one step: ours at 4 x 512: {ours['seconds']:.0f} s, "
              f"{memory} {ours['peak_memory'] / 1e9:.1f} GB; transformers + peft at 1 x 256: {ref['seconds']:.0f} s, "
              f"{memory} {ref['peak_memory'] / 1e9:.1f} GB")

    print(f"\n| config | checkpointing | ours s/step | peft s/step | speed-up | ours tokens/s | "
          f"ours {memory} | peft {memory} |\n|---|---|---|---|---|---|---|---|")
    for cname, ckpt, ours, ref in rows:
        print(f"| {cname} | {ckpt} | {ours['seconds']:.2f} | {ref['seconds']:.2f} | "
              f"{ref['seconds'] / ours['seconds']:.2f}x | {1024 / ours['seconds']:.0f} | "
              f"{ours['peak_memory'] / 1e9:.2f} GB | {ref['peak_memory'] / 1e9:.2f} GB |")


def logging_cost(args, tmp: Path, hw):
    """train_sft.py on each config's checkpoint for 12 steps, every step logged, with and without --report-to:
    the median of its steps' own seconds (metrics.jsonl), best of --rounds alternating runs each."""
    import train_sft
    from support.training import read_log
    print(f"\nlogging: train_sft.py's step, every step logged, without and with --report-to {args.report_to}")
    for cname in args.configs:
        shutil.copy(SHARED / "phi-2" / "tokenizer.json", tmp / cname)  # the base needs its tokenizer to train
        best = {}
        for reporter in ("none", args.report_to) * args.rounds:
            run_dir = tmp / f"run-{cname}-{reporter}-{len(best)}-{time.perf_counter_ns()}"
            argv = ["--model", str(tmp / cname), "--run-dir", str(run_dir), "--max-steps", "12", "--batch-size", "4",
                    "--grad-accum", "1", "--max-len", "256", "--log-interval", "1", "--eval-interval", "100",
                    "--save-interval", "100", "--device", args.device, "--precision", hw.precision]
            if reporter != "none":
                argv += ["--report-to", reporter]
            train_sft.main(train_sft.parse_args(argv))
            seconds = statistics.median(r["seconds"] for r in read_log(run_dir / "metrics.jsonl")[2:] if "seconds" in r)
            best[reporter] = min(best.get(reporter, seconds), seconds)
        print(f"{cname:13s} {best['none']:.3f} s/step without, {best[args.report_to]:.3f} with: "
              f"{best[args.report_to] / best['none']:.3f}x", flush=True)


def _print(row, memory):
    cname, ckpt, ours, ref = row
    print(f"{cname:13s} checkpointing {ckpt:3s}: ours {ours['seconds']:.2f} s/step ({1024 / ours['seconds']:.0f} "
          f"tok/s, {memory} {ours['peak_memory'] / 1e9:.2f} GB), peft {ref['seconds']:.2f} s/step "
          f"({1024 / ref['seconds']:.0f} tok/s, {memory} {ref['peak_memory'] / 1e9:.2f} GB), "
          f"x{ref['seconds'] / ours['seconds']:.2f}", flush=True)


if __name__ == "__main__":
    cli.run("train_step.py", main, parse_args)
