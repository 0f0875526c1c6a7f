"""One LoRA training step: ours against transformers + peft, same weights, same batch, same run.

    python bench/train_step.py [--configs small phi-2-2layer] [--steps 5] [--full]

Rank 32 on q/k/v/dense/fc1/fc2 (alpha 64, dropout 0.05), batch 4 x 256 built from real prompt pairs (the
oneprompted CSV in ../shared, tokenized with the real Phi-2 tokenizer): each row is one pair of at least
256 tokens cut at 256, so every position is a real token, with labels -100 on the prompt. bf16 base weights, bf16
autocast, AdamW over the LoRA parameters, gradient checkpointing off and on. Each setting runs in fresh
processes (2 threads), ours and peft alternating for --rounds rounds: the best of the processes' median
seconds per step (after one warm-up step; interference only slows a run down), tokens/s (4 x 256 / step
time), and the highest peak RSS. --full adds the real budget: one step of the full 32-layer Phi-2 (random bf16
weights, batch 4 x 512, checkpointing), ours, with transformers + peft at batch 1 x 256 for reference.
"""

import argparse
import json
import random
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

import phi2  # noqa: E402
from prompts import IGNORE_INDEX, encode_pair, read_pairs  # noqa: E402

CONFIGS = {
    "small": phi2.Phi2Config(n_layer=4, n_head=8, n_kv_head=8, n_embd=512, intermediate_size=2048,
                             vocab_size=51200, rotary_dim=32),
    "phi-2-2layer": phi2.Phi2Config.from_name("phi-2", n_layer=2),
    "phi-2": phi2.Phi2Config.from_name("phi-2"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


def make_batch(batch_size, length, seed=0):
    """(input_ids, labels) (B, length) of real pairs, one per row, every position a real token: pairs of at
    least `length` tokens, cut there, with labels -100 on the prompt part."""
    tok = phi2.load_tokenizer(SHARED / "phi-2")
    pairs = read_pairs(SHARED / "prompt_pairs" / "oneprompted_v1.csv", "bad_prompt", "good_prompt")
    examples = [encode_pair(tok, p.prompt, p.target) for p in pairs]
    long_enough = [e for e in examples if len(e.input_ids) >= length]
    rows = random.Random(seed).sample(long_enough, batch_size)
    ids = torch.tensor([e.input_ids[:length] for e in rows])
    labels = torch.tensor([e.labels[:length] for e in rows])
    return ids, labels


def worker(impl, folder, batch_file, checkpointing, steps):
    """Train in this process and print {seconds per step, peak RSS} as JSON."""
    import resource

    from safetensors.torch import load_file
    torch.set_num_threads(2)
    torch.manual_seed(0)
    batch = load_file(batch_file)
    ids, labels = batch["input_ids"], batch["labels"]
    if impl == "ours":
        import lora
        model = phi2.load_model(folder, dtype=torch.bfloat16)
        lora.inject(model, rank=32, alpha=64.0, dropout=0.05, targets=TARGETS)
        model.gradient_checkpointing = checkpointing

        def loss_fn():
            loss, n = model.loss(ids, labels)
            return loss / n
    else:
        import peft
        import transformers
        transformers.logging.set_verbosity_error()
        hf = transformers.PhiForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        model = peft.get_peft_model(hf, peft.LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05,
                                                         target_modules=TARGETS, task_type="CAUSAL_LM"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def loss_fn():
            return model(input_ids=ids, labels=labels).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    print(json.dumps({"seconds": statistics.median(times[1:]) if steps else times[0], "loss": loss.item(),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run(impl, folder, batch_file, checkpointing, steps):
    cmd = [sys.executable, __file__, "--worker", impl, str(folder), str(batch_file), str(int(checkpointing)),
           str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_checkpoint(config, folder):
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.PhiForCausalLM(transformers.PhiConfig(**config.to_hf_dict())).to(torch.bfloat16)
    hf.save_pretrained(folder)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=["small", "phi-2-2layer"], default=["small", "phi-2-2layer"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per implementation, alternating")
    p.add_argument("--full", action="store_true", help="also the full 32-layer Phi-2 budget check")
    p.add_argument("--full-dir", default="/tmp/phi2-random-32layer", help="a random 32-layer bf16 checkpoint")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, folder, batch_file, checkpointing, steps = args.worker
        return worker(impl, folder, batch_file, checkpointing == "1", int(steps))

    from safetensors.torch import save_file
    scratch = tempfile.TemporaryDirectory()  # checkpoints and runs, gigabytes: removed when main() ends
    tmp = Path(scratch.name)
    ids, labels = make_batch(4, 256)
    save_file({"input_ids": ids, "labels": labels}, tmp / "batch.safetensors")
    print(f"batch 4 x 256 of real pairs: {int((labels[:, 1:] != IGNORE_INDEX).sum())} of {ids.numel() - 4} "
          "next-token positions have a target (the rest are prompt)\n")
    rows = []
    for cname in args.configs:
        folder = tmp / cname
        write_checkpoint(CONFIGS[cname], folder)
        for checkpointing in (False, True):
            r = {}  # processes alternate (ours, peft, ours, peft): each keeps its best time and highest RSS
            for impl in ("ours", "peft") * args.rounds:
                one = run(impl, folder, tmp / "batch.safetensors", checkpointing, args.steps)
                best = r.setdefault(impl, one)
                best["seconds"] = min(best["seconds"], one["seconds"])
                best["peak_rss"] = max(best["peak_rss"], one["peak_rss"])
            row = (cname, "on" if checkpointing else "off", r["ours"], r["peft"])
            rows.append(row)
            _print(row)
    if args.full:
        full = Path(args.full_dir)
        if not (full / "model.safetensors.index.json").exists():
            print(f"writing a random 32-layer Phi-2 to {full} (bench/load_memory.py makes the same) ...")
            subprocess.run([sys.executable, str(ROOT / "bench" / "load_memory.py"), "--dir", str(full)], check=True)
        ids, labels = make_batch(4, 512)
        save_file({"input_ids": ids, "labels": labels}, tmp / "batch512.safetensors")
        ids1, labels1 = make_batch(1, 256)
        save_file({"input_ids": ids1, "labels": labels1}, tmp / "batch1.safetensors")
        ours = run("ours", full, tmp / "batch512.safetensors", True, 0)
        ref = run("peft", full, tmp / "batch1.safetensors", True, 0)
        print(f"\nfull 32-layer Phi-2, checkpointing, one step: ours at 4 x 512: {ours['seconds']:.0f} s, "
              f"peak RSS {ours['peak_rss'] / 1e9:.1f} GB; transformers + peft at 1 x 256: {ref['seconds']:.0f} s, "
              f"peak RSS {ref['peak_rss'] / 1e9:.1f} GB")

    print("\n| config | checkpointing | ours s/step | peft s/step | speed-up | ours tokens/s | "
          "ours peak RSS | peft peak RSS |\n|---|---|---|---|---|---|---|---|")
    for cname, ckpt, ours, ref in rows:
        print(f"| {cname} | {ckpt} | {ours['seconds']:.2f} | {ref['seconds']:.2f} | "
              f"{ref['seconds'] / ours['seconds']:.2f}x | {1024 / ours['seconds']:.0f} | "
              f"{ours['peak_rss'] / 1e9:.2f} GB | {ref['peak_rss'] / 1e9:.2f} GB |")


def _print(row):
    cname, ckpt, ours, ref = row
    print(f"{cname:13s} checkpointing {ckpt:3s}: ours {ours['seconds']:.2f} s/step ({1024 / ours['seconds']:.0f} "
          f"tok/s, {ours['peak_rss'] / 1e9:.2f} GB), peft {ref['seconds']:.2f} s/step ({1024 / ref['seconds']:.0f} "
          f"tok/s, {ref['peak_rss'] / 1e9:.2f} GB), x{ref['seconds'] / ours['seconds']:.2f}", flush=True)


if __name__ == "__main__":
    main()
