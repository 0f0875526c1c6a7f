"""Stage 2's cost: a head epoch against a stage-1 epoch, on the full-width 2-layer Phi-2 config.

    python bench/head_epoch.py [--pairs 64] [--head-rank 64] [--device auto] [--precision auto]

Random weights in the released layout with the real Phi-2 tokenizer; real pairs (the oneprompted CSV,
cut to --max-len), batch 4, on --device in the precision --precision resolves to (the first line printed
says which, and why; the README's figures are bf16 autocast), 2 CPU threads. Times come from the runs' own
per-step logs (written at every step):
one stage-1 epoch (LoRA rank 32), then three head epochs, where the first computes and caches the frozen
body's outputs and the later ones train the head on them alone; for the papers' full head copy and for a
rank-r head update. Also prints the head files' sizes: the width and vocabulary are Phi-2's, so these are
the sizes a real Phi-2 head has, and the floor of a cached epoch: the two head-sized products that every
stage-2 step needs (the logits, and their gradient with respect to the adapter's output), timed alone on
the same numbers of answer rows, in the run's precision.
"""

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

import phi2
import train_head
import train_sft
from support import cli, hardware


def epoch_seconds(metrics: Path) -> dict:
    """{epoch: seconds} summed from a run's per-step log."""
    out = {}
    for r in map(json.loads, metrics.read_text().splitlines()):
        if "seconds" in r:
            out[r["epoch"]] = out.get(r["epoch"], 0.0) + r["seconds"]
    return out


def synchronize(device: torch.device):
    """Wait for the device's queued work, so that a timer around it measures the work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def head_products_seconds(metrics: Path, epoch: int, C: int, V: int, hw: hardware.Hardware) -> float:
    """The logits h W^T and the gradient g W of one epoch's steps, on each step's number of answer rows, in
    hw's dtype (what autocast computes them in; fp32 when there is no autocast) on hw's device."""
    steps = [r["targets"] for r in map(json.loads, metrics.read_text().splitlines()) if r.get("epoch") == epoch]
    W = torch.randn(V, C, dtype=hw.dtype, device=hw.device) * 0.02
    best = float("inf")
    for _ in range(2):  # best of two: interference only slows down
        total = 0.0
        for n in steps:
            h = torch.randn(n, C, dtype=hw.dtype, device=hw.device)
            g = torch.randn(n, V, dtype=hw.dtype, device=hw.device)
            synchronize(hw.device)
            t0 = time.perf_counter()
            h @ W.t(), g @ W
            synchronize(hw.device)
            total += time.perf_counter() - t0
        best = min(best, total)
    return best


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--pairs", type=cli.positive_int, default=64,
                   help="pairs to train on: the first in the file that fit in --max-len")
    p.add_argument("--max-len", type=cli.positive_int, default=256, help="longest example in tokens")
    p.add_argument("--head-rank", type=cli.positive_int, default=64, help="rank of the low-rank head update compared")
    cli.add_hardware_args(p)
    return p.parse_args(argv)


def main(args):
    hw = hardware.resolve(args.device, args.precision)
    print(hw.describe(), flush=True)  # what this run measured on, before anything else
    torch.set_num_threads(2)
    scratch = tempfile.TemporaryDirectory()  # checkpoints and runs, gigabytes: removed when main() ends
    tmp = Path(scratch.name)
    base = tmp / "base"
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = phi2.Phi2Config.from_name("phi-2", n_layer=2)
    transformers.PhiForCausalLM(transformers.PhiConfig(**config.to_hf_dict())).save_pretrained(base)
    shutil.copy(SHARED / "phi-2" / "tokenizer.json", base)  # into the temporary checkpoint, not the project

    from prompts import read_pairs
    pairs = read_pairs(SHARED / "prompt_pairs" / "oneprompted_v1.csv", "bad_prompt", "good_prompt")
    tok = phi2.load_tokenizer(base)
    short = [p for p in pairs if len(tok.encode(p.prompt + " " + p.improved)) < args.max_len - 30][: args.pairs]
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "improved": p.improved}) + "\n" for p in short))

    # log_interval 1: each step's log record times that step alone (the log spreads the time between writes)
    common = dict(data=str(data), batch_size=4, grad_accum=1, max_len=args.max_len, val_fraction=0.0, seed=0,
                  log_interval=1, device=args.device, precision=args.precision)
    train_sft.main(train_sft.TrainConfig(model=str(base), run_dir=str(tmp / "sft"), epochs=1, rank=32,
                                         save_interval=10**6, **common))
    stage1 = epoch_seconds(tmp / "sft" / "metrics.jsonl")[0]
    rows = []
    for rank in (None, args.head_rank):
        name = "full head" if rank is None else f"rank-{rank} head"
        run = tmp / f"head-{rank}"
        train_head.main(train_head.HeadConfig(target="bench", lora=str(tmp / "sft" / "best"), run_dir=str(run),
                                              out=str(run / "h.safetensors"), epochs=3, head_rank=rank,
                                              save_interval=10**6, **common))
        epochs = epoch_seconds(run / "metrics.jsonl")
        later = statistics.mean([epochs[1], epochs[2]])
        rows.append((name, epochs[0], later, (run / "h.safetensors").stat().st_size))
    # both runs took the same steps (same data, order and batches): any run's log gives the rows per step
    floor = head_products_seconds(tmp / "head-None" / "metrics.jsonl", 1, config.n_embd, config.vocab_size, hw)

    print(f"\n{hw.describe()}\n{len(short)} pairs, batch 4, max_len {args.max_len}; stage-1 epoch (LoRA rank 32): "
          f"{stage1:.1f} s\n")
    print("| head | epoch 1 (body + head) | later epochs (cached) | later / stage-1 epoch | head file (fp32) |")
    print("|---|---|---|---|---|")
    for name, first, later, size in rows:
        print(f"| {name} | {first:.1f} s | {later:.1f} s | {later / stage1:.0%} | {size / 1e6:.0f} MB |")
    print(f"\nfloor of a cached epoch: the two head-sized products alone take {floor:.1f} s = {floor / stage1:.0%} "
          "of the stage-1 epoch")


if __name__ == "__main__":
    cli.run("head_epoch.py", main, parse_args)
