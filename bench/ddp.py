"""Data parallelism's cost and gain: stage 1 on 1 process against 2 (torchrun, gloo on the CPU or nccl on
GPUs) on the same global batch, and the bytes every step all-reduces.

    python bench/ddp.py [--steps 30] [--device cpu] [--model tiny] [--batch-size 4] [--grad-accum 4]

The one-process run takes --grad-accum x 2 micro-batches a step, the two-process run --grad-accum each:
the same examples per step. Times are the medians of the runs' own per-step logs (every step logged),
the first steps left out. On a CPU the two processes share the machine's cores (each gets half the
threads), so the CPU figure measures the overhead of DDP more than a speed-up; on N GPUs each process has
its own. The all-reduce is of the LoRA gradients in fp32, computed for this run's model and for Phi-2 at
rank 32, with what a ring all-reduce moves per process (2 (N-1)/N of them) over a 25 Gb/s link and
NVLink (about 450 GB/s per direction on an H100's NVLink 4).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora
import phi2
from prompts import DEFAULT_DATA


def lora_values(config: phi2.Phi2Config, rank: int) -> int:
    """Trainable LoRA values of a model of this config, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = phi2.Phi2(config)
    lora.inject(model, rank, 2.0 * rank)
    return sum(p.numel() for p in lora.trainable_parameters(model).values())


def run(processes: int, args, folder: Path) -> dict:
    common = ["--model", args.model, "--data", str(DEFAULT_DATA), "--run-dir", str(folder / f"p{processes}"),
              "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--log-interval", "1",
              "--eval-interval", str(10 ** 6), "--save-interval", str(10 ** 6), "--val-fraction", "0",
              "--device", args.device, "--precision", args.precision, "--rank", str(args.rank), "--dropout", "0",
              "--grad-accum", str(args.grad_accum * (2 // processes))]
    if processes == 1:
        command = [sys.executable, "train_sft.py", *common]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(port), "train_sft.py", *common]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    if args.device == "cpu":  # the cores, shared out between the processes
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // processes))
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    records = [json.loads(line) for line in (folder / f"p{processes}" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if "seconds" in r][3:]
    return {"seconds": statistics.median(r["seconds"] for r in steady),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default="tiny", help="tiny, or a Phi-2 checkpoint folder")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (torchrun gives each process its GPU)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4, help="per process in the 2-process run")
    p.add_argument("--rank", type=int, default=32)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        one, two = run(1, args, Path(tmp)), run(2, args, Path(tmp))
        config = (phi2.PRESETS["tiny"] if args.model == "tiny" else
                  phi2.Phi2Config.from_hf_json(Path(args.model) / "config.json"))
    global_batch = args.batch_size * args.grad_accum * 2
    print(f"stage 1, {args.model}, LoRA rank {args.rank}, global batch {global_batch}, {args.device}:")
    for name, r in (("1 process ", one), ("2 processes", two)):
        print(f"  {name}: {r['seconds'] * 1000:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s")
    print(f"  2 processes / 1: {one['seconds'] / two['seconds']:.2f}x the steps per second")
    for name, cfg in ((args.model, config), ("phi-2", phi2.PRESETS["phi-2"])):
        values = lora_values(cfg, args.rank)
        ring = 2 * (2 - 1) / 2 * values * 4  # bytes each of 2 processes sends in a ring all-reduce of fp32
        print(f"  all-reduce per step, {name}: {values / 1e6:.2f} M fp32 values = {values * 4 / 1e6:.1f} MB; "
              f"ring, 2 processes: {ring / 1e6:.1f} MB each, {ring / (25e9 / 8) * 1e3:.1f} ms at 25 Gb/s, "
              f"{ring / 450e9 * 1e3:.2f} ms over NVLink")


if __name__ == "__main__":
    main()
